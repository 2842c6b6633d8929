"""Leader failover after ``kill -9``: how long from SIGKILL to the next holder's takeover.

N candidate processes contend for one lease. Each round waits until every non-holder is
waiting (its waiter entry exists), SIGKILLs the holder, and measures CLOCK_MONOTONIC from
just before the kill to the moment the new holder's ``acquire()`` returned (the candidate
reports it; CLOCK_MONOTONIC is shared by all processes of one boot). A replacement keeps the
pool at N. Prints median/p90/p99 (ms), or one JSON line with ``--json``.

Run:  python scripts/failover_probe.py [--kills 30] [--candidates 5] [--json]
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

CANDIDATE = """
import os, sys, time, coord
from coord.leases import acquire
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, app="failover-probe")
print("ready", flush=True)
lease = acquire(inst, sys.argv[1])
print("acquired", lease.term, time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)
while True:
    time.sleep(1)
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def measure_failover(db: Path | None = None, *, kills: int = 30, candidates: int = 5,
                     lease: str = "probe/failover", timeout: float = 30.0) -> list[float]:
    """SIGKILL the holder ``kills`` times; return each takeover latency in seconds."""
    import coord
    from coord.leases import _waiter_prefix, get_lease

    tmp = None
    if db is None:
        tmp = tempfile.TemporaryDirectory(prefix="coord-failover-")
        os.chmod(tmp.name, 0o700)
        db = Path(tmp.name) / "coord.db"
    store = coord.Store(db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    env["COORD_DB"] = str(db)
    procs: dict[int, subprocess.Popen[str]] = {}

    def spawn() -> None:
        p = subprocess.Popen([sys.executable, "-c", CANDIDATE, lease], env=env,
                             stdout=subprocess.PIPE, text=True)
        procs[p.pid] = p

    def line(p: subprocess.Popen[str], word: str) -> str:
        assert p.stdout is not None
        while True:
            text = p.stdout.readline()
            if not text:
                raise RuntimeError(f"candidate {p.pid} exited early")
            if text.startswith(word):
                return text

    def wait(pred: Any) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            time.sleep(0.002)
        raise TimeoutError("no progress")

    waiters = store.side_dir("waiters")
    prefix = _waiter_prefix(lease)
    latencies: list[float] = []
    try:
        for _ in range(candidates):
            spawn()
        holder = wait(lambda: (i := get_lease(store, lease)).alive and i)
        line(procs[holder.holder_pid], "acquired")
        for _ in range(kills):
            wait(lambda: sum(1 for n in os.listdir(waiters) if n.startswith(prefix)) >= candidates - 1)
            victim = procs.pop(holder.holder_pid)
            t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
            victim.kill()
            victim.wait()
            if victim.stdout is not None:
                victim.stdout.close()
            term = holder.term
            holder = wait(lambda term=term: (i := get_lease(store, lease)).alive and (i.term or 0) > (term or 0) and i)
            t1 = float(line(procs[holder.holder_pid], "acquired").split()[2])
            latencies.append(t1 - t0)
            spawn()
    finally:
        for p in procs.values():
            p.kill()
        for p in procs.values():
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        coord.reap(store)
        store.close()
        if tmp is not None:
            tmp.cleanup()
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies]
    return {"kills": len(ms), "p50_ms": round(statistics.median(ms), 3),
            "p90_ms": round(_percentile(ms, 0.9), 3), "p99_ms": round(_percentile(ms, 0.99), 3),
            "max_ms": round(max(ms), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--db", type=Path, default=None, help="database (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    s = summary(measure_failover(args.db, kills=args.kills, candidates=args.candidates))
    if args.json:
        print(json.dumps({"failover_after_kill9": s}))
    else:
        print(f"leader failover after kill -9 ({s['kills']} kills, {args.candidates} candidates): "
              f"p50 {s['p50_ms']:.2f} ms  p90 {s['p90_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  "
              f"max {s['max_ms']:.2f} ms")


if __name__ == "__main__":
    main()
