"""coord benchmark: each piece of work done by coord beside the same work done by the limit
(raw apsw transactions, a pipe, a kernel lock, a bare interpreter) and by what coord replaces
or competes with, in the same run, with coord's ratio to each.

Run (the peers come with the bench extra: ``pip install -e '.[bench]'``):

    .venv/bin/python scripts/bench.py               # full run, a table (under 10 minutes)
    .venv/bin/python scripts/bench.py --quick       # small sizes (under a minute)
    .venv/bin/python scripts/bench.py --json        # one JSON object per section, per line
    .venv/bin/python scripts/bench.py --tiny --json # smallest sizes: the CI smoke test
    .venv/bin/python scripts/bench.py --only queue,messages --json-out run.jsonl
    .venv/bin/python scripts/bench.py --only queue --size   # put, claim+ack at 1k/10k/100k jobs

A benchmark, not a test: nothing here asserts on speed. It prints the targets it checks and
whether they were met. Every section runs in a fresh private temporary directory beside the
default database's directory (the same filesystem; override with --dir). Every throughput
figure is the median over rounds (peers alternate within each round, so a busy moment of the
machine falls on all of them alike), after an untimed warm-up; every latency figure is a p50
(and p99) over all rounds' samples after a warm-up. Only ratios from one run mean anything.

Sections (SECTIONS, in order); the impl marked "limit" is the floor or ceiling of that work:
  1. transactions: one-row write transactions, raw apsw (limit) vs coord's Store.write.
  2. queue: put (one producer process), claim+ack (one consumer process), 1 producer with
     4 consumer processes, and end-to-end latency at a paced 200 jobs/s; coord vs the minimal
     SQLite claim queue (limit: one table, claim = UPDATE … RETURNING in BEGIN IMMEDIATE, ack
     = DELETE, raw apsw with coord's pragmas), raw apsw doing coord's row work on coord's own
     schema, persist-queue (SQLiteAckQueue, multithreading=True), litequeue, huey's
     SqliteStorage (enqueue/dequeue: no acks) and a naive file-per-job directory queue (tmp +
     atomic rename; claim by rename; ack by unlink). ``--size`` runs put and claim+ack at
     1 000, 10 000 and 100 000 jobs (several peers slow down with depth).
  3. messages: request -> reply between two processes; coord vs a pipe round trip (limit)
     and file-per-message IPC (a JSON file per message, atomic rename, 1 ms directory polls).
  4. failover: SIGKILL of a lease holder -> the next waiter holds it; coord vs a kernel
     record lock handover (F_SETLKW, limit), filelock (its default 50 ms poll), and a
     TTL-only lease row (2 s TTL, renewed every 0.5 s, polled every 50 ms).
  5. registry: register, list with liveness, reap, at 10, 1 000 and 10 000 instances; coord
     vs a file-per-PID registry (one JSON file per pid, liveness by pid and create time).
  6. cli: cold start of ``coord instances --json`` and ``coord sql "select 1"`` vs
     ``python -c pass`` (limit) and ``python -c "import typer"`` with the same interpreter.

On PostgreSQL (``--db postgresql://user@host/db``: two new schemas on that server, dropped at
the end) the sections are benchkit/pg.py's: coord beside PostgreSQL's own limits measured in
the same run with raw psycopg (benchkit/pg_limits.py, also run alone by scripts/bench_pg.py).

    .venv/bin/python scripts/bench.py --quick --db 'postgresql://postgres@/postgres?host=/tmp/pg'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchkit import pg

# The sections, the harness and the output are the benchkit package beside this script.
from benchkit.cli import section_cli
from benchkit.failover import section_failover
from benchkit.harness import Context, Result, run_as_worker
from benchkit.messages import section_messages
from benchkit.queue import DEPTHS, section_queue
from benchkit.registry import section_registry
from benchkit.report import print_table, section_objects
from benchkit.transactions import section_transactions

#: Every section, in order.
SECTIONS: list[Callable[[Context], list[Result]]] = [
    section_transactions, section_queue, section_messages, section_failover,
    section_registry, section_cli,
]


def section_name(fn: Callable[[Context], list[Result]]) -> str:
    return fn.__name__.removeprefix("section_")


def machine_facts(base: Path) -> dict[str, Any]:
    import apsw

    import coord
    from coord.paths import fs_type
    return {
        "coord": coord.__version__,
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "filesystem": fs_type(base),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def _default_base() -> Path:
    """The directory that holds the default database's directory: the same filesystem."""
    from coord.paths import default_db_path
    parent = default_db_path({k: v for k, v in os.environ.items() if k != "COORD_DB"}).parent
    return parent.parent if parent.parent.is_dir() else Path(tempfile.gettempdir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    ap.add_argument("--tiny", action="store_true",
                    help="the smallest sizes (the CI smoke test): every section and reference "
                         "answers, the figures mean little")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object per section (one per line), not the table")
    ap.add_argument("--json-out", metavar="PATH", help="also write the JSON lines to PATH")
    ap.add_argument("--only", metavar="SECTIONS",
                    help="comma-separated sections: " + ",".join(map(section_name, SECTIONS)))
    ap.add_argument("--dir", help="where to create the benchmark databases (default: beside "
                                  "the default database's directory)")
    ap.add_argument("--size", nargs="?", const=",".join(map(str, DEPTHS)), metavar="JOBS",
                    help="run the queue's put and claim+ack at each of these depths "
                         "(comma-separated; alone: " + ", ".join(f"{x:,}" for x in DEPTHS) + ")")
    ap.add_argument("--db", metavar="URL", help="a postgresql:// URL: run the PostgreSQL "
                    "sections (" + ",".join(pg.SECTION_NAMES) + ") on that server")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_as_worker(args.worker)
    if args.db:
        return run_postgresql(args, ap)
    depths: tuple[int, ...] = ()
    if args.size:
        try:
            depths = tuple(int(x.replace("_", "")) for x in args.size.split(",") if x.strip())
        except ValueError:
            ap.error(f"--size takes job counts such as 1000,10000: got {args.size!r}")
        if not depths or min(depths) < 1:
            ap.error(f"--size takes positive job counts: got {args.size!r}")

    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    wanted = SECTIONS
    if args.only:
        names = {x.strip() for x in args.only.split(",") if x.strip()}
        unknown = names - {section_name(s) for s in SECTIONS}
        if unknown:
            ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
        wanted = [s for s in SECTIONS if section_name(s) in names]
    parent = Path(args.dir) if args.dir else _default_base()
    base = Path(tempfile.mkdtemp(prefix="coord-bench-", dir=parent))
    os.chmod(base, 0o700)
    run = {**machine_facts(base), "size": size, "depths": list(depths) or None,
           "argv": sys.argv[1:]}
    started = time.monotonic()
    results: list[Result] = []
    try:
        for section in wanted:
            d = base / section.__name__
            d.mkdir(mode=0o700)
            t = time.monotonic()
            results.extend(section(Context(quick=size != "full", base=d, size=size,
                                               depths=depths)))
            print(f"{section_name(section)}: {time.monotonic() - t:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    run["seconds"] = round(time.monotonic() - started, 1)
    run["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    objects = section_objects(results, run)
    lines = [json.dumps(o, ensure_ascii=False) for o in objects]
    if args.json_out:
        Path(args.json_out).write_text("\n".join(lines) + "\n")
    if args.json:
        for line in lines:
            print(line)
    else:
        print(f"coord {run['coord']} · Python {run['python']} · SQLite {run['sqlite']} · "
              f"apsw {run['apsw']} · {run['cpus']} CPUs · Linux {run['kernel']} · "
              f"{run['filesystem']} · load {run['load_avg']} → {run['load_avg_after']} · "
              f"{size} run, {run['seconds']} s\n")
        print_table(results)
    return 0


def run_postgresql(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """The PostgreSQL sections on the server of ``--db``, beside its raw limits."""
    if not args.db.startswith(("postgresql://", "postgres://")):
        ap.error("--db takes a postgresql:// URL (SQLite runs need no --db)")
    wanted = pg.SECTION_NAMES
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = set(wanted) - set(pg.SECTION_NAMES)
        if unknown:
            ap.error(f"unknown PostgreSQL sections: {', '.join(sorted(unknown))}")
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    started = time.monotonic()
    results: list[Result] = []
    with pg.pg_run(args.db, size) as pgrun:
        run = {**pg.facts(pgrun), "argv": sys.argv[1:]}
        for name in wanted:
            t = time.monotonic()
            try:
                results.extend(pg.SECTIONS[name](pgrun))
            except Exception as e:  # one section's failure is reported, the rest run
                results.append(Result(f"pg {name}", "(section)", "coord", 0, 0.0,
                                      error=f"{type(e).__name__}: {e}"))
            print(f"pg {name}: {time.monotonic() - t:.1f} s", file=sys.stderr)
    run["seconds"] = round(time.monotonic() - started, 1)
    run["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    lines = [json.dumps(o, ensure_ascii=False) for o in section_objects(results, run)]
    if args.json_out:
        Path(args.json_out).write_text("\n".join(lines) + "\n")
    if args.json:
        for line in lines:
            print(line)
    else:
        print(f"PostgreSQL {run['server_version']} · psycopg {run['psycopg']} "
              f"({run['psycopg_impl']}) · Python {run['python']} · {run['cpus']} CPUs · "
              f"synchronous_commit={run['synchronous_commit']} · load {run['load_avg']} → "
              f"{run['load_avg_after']} · {size} run, {run['seconds']} s\n")
        print_table(results)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
