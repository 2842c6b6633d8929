"""Registry probe: register, list with liveness, and reap at 10, 1 000 and 10 000 instances.

Run:  /tmp/venv/bin/python scripts/registry_probe.py [--sizes 10,1000,10000] [--rounds 5]

How the registry is filled (a thousand real Python processes would measure the machine, not
coord):

* alive rows: HELPERS real helper processes each open and record-lock their share of the
  lock files (one file per row, as real instances have); the rows are inserted with SQL and
  carry a helper's pid and start token, their own lock file and a fresh heartbeat. Judging a
  row therefore does the real work: a /proc read for its pid (shared between rows, and
  cached per listing) and an F_GETLK on its own lock file (never shared).
* dead rows: each row gets its own pid that does not exist (picked from pids unused right
  now) and its own lock file that nobody holds, as a crashed instance leaves behind; the
  reaper reads /proc for every one, buries them in batches and removes every lock file.

Phases, for each size N (a fresh database each):

* register: with N alive rows in the registry, 100 real ``register()`` calls (lock file,
  socket, row; no heartbeat thread) and their ``close()``; per-call latency.
* list: ``list_instances(store)`` over the N alive rows (every verdict computed); also
  ``reap()`` over them when there is nothing to do (what cron pays on a healthy registry).
* reap: N dead rows, one ``reap()`` that buries them all (death rule, events, lock files).

Targets: list 1 000 alive in <= 50 ms; reap 10 000 dead in <= 1 s. Nothing here is asserted
by a test: the machine is shared, so read medians, and rerun when in doubt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HELPERS = 4

# Holds record locks on every path given on stdin (one per line) until stdin closes.
HOLDER = """
import os, sys
from coord.identity import hold_lock
paths = sys.stdin.readline().split()
fds = [hold_lock(p) for p in paths]
print("ready", flush=True)
sys.stdin.read()
"""


def _ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50_ms": round(1000 * statistics.median(xs), 2),
        "p90_ms": round(1000 * xs[min(len(xs) - 1, int(0.9 * len(xs)))], 2),
        "p99_ms": round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 2),
        "best_ms": round(1000 * xs[0], 2),
    }


def _insert(store: Any, rows: list[tuple[Any, ...]]) -> None:
    from coord.db import next_counter

    def txn(c: Any) -> None:
        base = next_counter(c, "incarnation")
        c.execute("UPDATE counters SET value = value + ? WHERE name = 'incarnation'", (len(rows),))
        c.executemany(
            "INSERT INTO instances (id, incarnation, app, pid, start_token, boot_id, pidns, uid, "
            "user, host, cmdline, lock_path, ttl, started_at, heartbeat_at, heartbeat_mono) "
            "VALUES (?, ?, 'probe', ?, ?, ?, ?, ?, 'probe', 'localhost', '[\"probe\"]', ?, ?, ?, ?, ?)",
            [(r[0], base + i, *r[1:]) for i, r in enumerate(rows)],
        )

    store.write(txn)


def fill_alive(store: Any, n: int, tag: str) -> list[subprocess.Popen[str]]:
    """N alive rows held by HELPERS real processes (one lock file per row)."""
    from coord.clock import boot_id
    from coord.identity import pid_namespace, start_token

    locks = store.side_dir("locks")
    paths = [str(locks / f"{tag}-{i}.lock") for i in range(n)]
    helpers = []
    shares = [paths[h::HELPERS] for h in range(HELPERS)]
    for share in shares:
        p = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(" ".join(share) + "\n")
        p.stdin.flush()
        helpers.append(p)
    for p in helpers:
        assert p.stdout is not None and p.stdout.readline().startswith("ready")
    mono, wall, boot, ns, uid = store.mono(), store.wall(), boot_id(), pid_namespace(), os.geteuid()
    rows = []
    for h, (p, share) in enumerate(zip(helpers, shares, strict=True)):
        token = start_token(p.pid)
        for j, path in enumerate(share):
            rows.append((f"{tag}-{h}-{j}", p.pid, token, boot, ns, uid, path, 3600.0, wall, wall, mono))
    _insert(store, rows)
    return helpers


def free_pids(n: int) -> list[int]:
    """``n`` pids no process has right now."""
    used = {int(d) for d in os.listdir("/proc") if d.isdigit()}
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    free = [p for p in range(pid_max - 1, 300, -1) if p not in used]
    if len(free) < n:
        raise SystemExit(f"only {len(free)} free pids below pid_max {pid_max}")
    return free[:n]


def fill_dead(store: Any, n: int, tag: str) -> None:
    """N rows of crashed instances: own nonexistent pid, own unlocked lock file each."""
    from coord.clock import boot_id
    from coord.identity import pid_namespace

    locks = store.side_dir("locks")
    mono, wall, boot, ns, uid = store.mono(), store.wall(), boot_id(), pid_namespace(), os.geteuid()
    rows = []
    for i, pid in enumerate(free_pids(n)):
        path = locks / f"{tag}-{i}.lock"
        path.touch(mode=0o600)
        rows.append((f"{tag}-{i}", pid, 12345, boot, ns, uid, str(path), 15.0, wall, wall, mono))
    _insert(store, rows)


def end(helpers: list[subprocess.Popen[str]]) -> None:
    for p in helpers:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.close()
        p.wait(timeout=30)
        p.stdout.close()


def probe_size(n: int, rounds: int, workdir: Path) -> dict[str, Any]:
    import coord
    from coord.instances import list_instances, register
    from coord.reaper import reap

    d = workdir / f"n{n}"
    d.mkdir(mode=0o700)
    store = coord.Store(d / "coord.db")
    out: dict[str, Any] = {"n": n}
    try:
        helpers = fill_alive(store, n, "live")
        try:
            # register / close with N rows present
            reg, dereg = [], []
            for i in range(100):
                t = time.perf_counter()
                inst = register(store, f"reg-{i}", app="probe", heartbeat=False,
                                handle_signals=False)
                reg.append(time.perf_counter() - t)
                t = time.perf_counter()
                inst.close()
                dereg.append(time.perf_counter() - t)
            out["register"] = _ms(reg)
            out["close"] = _ms(dereg)
            # list with liveness
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                alive = list_instances(store)
                times.append(time.perf_counter() - t)
                assert len(alive) == n, (len(alive), n)
            out["list"] = _ms(times)
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                report = reap(store, checkpoint=False)
                times.append(time.perf_counter() - t)
                assert not report.dead
            out["reap_idle"] = _ms(times)
        finally:
            end(helpers)
        store.write(lambda c: c.execute("DELETE FROM instances"))
        # reap N dead
        times = []
        for r in range(max(1, min(rounds, 3))):
            fill_dead(store, n, f"dead{r}")
            t = time.perf_counter()
            report = reap(store)
            times.append(time.perf_counter() - t)
            assert len(report.dead) == n, (len(report.dead), n)
            assert store.value("SELECT count(*) FROM instances") == 0
            left = list(store.side_dir("locks").glob(f"dead{r}-*"))
            assert not left, f"{len(left)} lock files left behind"
        out["reap_dead"] = _ms(times)
    finally:
        store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="coord-registry-") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            results.append(probe_size(n, args.rounds, Path(tmp)))
    print(f"{'N':>6}  {'register p50/p99':>17}  {'close p50':>9}  {'list p50/p90':>15}  "
          f"{'reap idle p50':>13}  {'reap dead p50':>13}")
    for r in results:
        print(f"{r['n']:>6}  {r['register']['p50_ms']:>8.2f}/{r['register']['p99_ms']:<8.2f}"
              f"  {r['close']['p50_ms']:>9.2f}  {r['list']['p50_ms']:>7.2f}/{r['list']['p90_ms']:<7.2f}"
              f"  {r['reap_idle']['p50_ms']:>13.2f}  {r['reap_dead']['p50_ms']:>13.2f}")
    targets = {"list_1000_ms": 50.0, "reap_dead_10000_ms": 1000.0}
    by_n = {r["n"]: r for r in results}
    verdict = {}
    if 1000 in by_n:
        verdict["list_1000_ms"] = by_n[1000]["list"]["p50_ms"]
    if 10000 in by_n:
        verdict["reap_dead_10000_ms"] = by_n[10000]["reap_dead"]["p50_ms"]
    print("times in ms (p50 of the rounds); targets:", targets, "measured:", verdict)
    print(json.dumps({"probe": "registry", "results": results, "targets": targets,
                      "measured": verdict}))


if __name__ == "__main__":
    main()
