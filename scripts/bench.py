"""coord benchmark: each piece of work done by coord beside the same work done by the limit
(raw apsw transactions) and by what coord replaces, with the ratio.

Run:

    .venv/bin/python scripts/bench.py            # full run: a table, then one JSON line
    .venv/bin/python scripts/bench.py --quick    # a few seconds, for a smoke test
    .venv/bin/python scripts/bench.py --json     # only the JSON line

A benchmark, not a test: nothing here asserts on speed. Every section runs in a fresh
private temporary directory on the same filesystem type as the default database would
(override with --dir). Sections are listed in SECTIONS; each returns Result rows, and the
"limit" row of a piece of work is the denominator of every other row's ratio.

Sections so far:
  1. one-row write transactions: raw apsw (BEGIN IMMEDIATE; INSERT; COMMIT, WAL,
     synchronous=NORMAL) — the limit every later section is compared with — and the same
     through coord's Store.write.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import apsw

import coord
from coord.db import CONNECTION_PRAGMAS


@dataclass
class Result:
    """One measured row: ``work`` done by ``impl``; latencies in microseconds."""

    section: str
    work: str
    impl: str
    n: int
    seconds: float
    latencies_us: list[float] = field(default_factory=list, repr=False)
    limit: bool = False  # the denominator for this work's ratios
    note: str = ""

    @property
    def ops_per_s(self) -> float:
        return self.n / self.seconds if self.seconds else float("inf")

    def pct(self, q: float) -> float | None:
        if not self.latencies_us:
            return None
        xs = sorted(self.latencies_us)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self, limit: Result | None) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "latencies_us"}
        d.update(
            ops_per_s=round(self.ops_per_s, 1),
            p50_us=_round(self.pct(0.50)),
            p90_us=_round(self.pct(0.90)),
            p99_us=_round(self.pct(0.99)),
            median_us=_round(statistics.median(self.latencies_us)) if self.latencies_us else None,
            vs_limit=self.vs(limit),
        )
        return d

    def vs(self, limit: Result | None) -> float | None:
        """How many times slower than the limit (1.0 = as fast as raw apsw): by median
        latency when both have latencies (robust on a busy machine), else by throughput."""
        if limit is None:
            return None
        if self.latencies_us and limit.latencies_us:
            return round(statistics.median(self.latencies_us) / statistics.median(limit.latencies_us), 2)
        return round(limit.ops_per_s / self.ops_per_s, 2) if self.ops_per_s else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@dataclass
class Context:
    quick: bool
    base: Path

    def fresh_dir(self, name: str) -> Path:
        d = self.base / name
        d.mkdir(mode=0o700)
        return d

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def interleaved(n: int, ops: list[Callable[[int], object]], rounds: int = 10
                ) -> list[tuple[float, list[float]]]:
    """Run each op n times, in alternating rounds so that a busy moment of the machine falls
    on all of them alike; (total seconds, latencies in µs) per op."""
    clock = time.perf_counter
    totals = [0.0] * len(ops)
    lats: list[list[float]] = [[] for _ in ops]
    per_round = max(1, n // rounds)
    done = 0
    while done < n:
        k = min(per_round, n - done)
        for j, op in enumerate(ops):
            lat = lats[j]
            start = clock()
            for i in range(done, done + k):
                t = clock()
                op(i)
                lat.append((clock() - t) * 1e6)
            totals[j] += clock() - start
        done += k
    return list(zip(totals, lats, strict=True))


# -- section 1: one-row write transactions (the limit) --------------------------------------------

_TABLE = "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"


def section_transactions(ctx: Context) -> list[Result]:
    n = ctx.scale(5000, 500)
    work = "one-row write transaction"

    conn = apsw.Connection(str(ctx.fresh_dir("raw") / "raw.db"))
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    for name, value in CONNECTION_PRAGMAS:  # the same settings coord uses
        conn.execute(f"PRAGMA {name}={value}").fetchall()
    conn.execute(_TABLE)

    def raw(i: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO bench (v) VALUES (?)", (f"row {i}",))
        conn.execute("COMMIT")

    store = coord.Store(ctx.fresh_dir("store") / "coord.db")
    store.write(lambda c: c.execute(_TABLE))

    def via_store(i: int) -> None:
        store.write(lambda c: c.execute("INSERT INTO bench (v) VALUES (?)", (f"row {i}",)))

    (raw_s, raw_lat), (store_s, store_lat) = interleaved(n, [raw, via_store])
    conn.close()
    store.close()
    return [
        Result("transactions", work, "raw apsw", n, raw_s, raw_lat, limit=True,
               note="BEGIN IMMEDIATE; INSERT; COMMIT"),
        Result("transactions", work, "coord Store.write", n, store_s, store_lat,
               note="same, with pid/thread check and busy handling"),
    ]


#: Every section, in order. Later sections append here.
SECTIONS: list[Callable[[Context], list[Result]]] = [section_transactions]


# -- output -------------------------------------------------------------------------------------


def summarise(results: list[Result]) -> list[dict[str, Any]]:
    limits = {(r.section, r.work): r for r in results if r.limit}
    return [r.summary(limits.get((r.section, r.work))) for r in results]


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("work", "WORK"), ("impl", "IMPLEMENTATION"), ("n", "N"), ("ops_per_s", "OPS/S"),
            ("p50_us", "P50 µs"), ("p90_us", "P90 µs"), ("p99_us", "P99 µs"),
            ("vs_limit", "× LIMIT")]
    cells = [[h for _, h in cols]] + [["-" if r[k] is None else str(r[k]) for k, _ in cols]
                                      for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of seconds")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--dir", help="where to create the benchmark databases (default: a temp dir)")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="coord-bench-", dir=args.dir))
    os.chmod(base, 0o700)
    try:
        results: list[Result] = []
        for section in SECTIONS:
            d = base / section.__name__
            d.mkdir(mode=0o700)
            results.extend(section(Context(quick=args.quick, base=d)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = summarise(results)
    if not args.json:
        print_table(rows)
    print(json.dumps({
        "coord": coord.__version__,
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "results": rows,
    }, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
