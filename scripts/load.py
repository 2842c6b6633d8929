"""Load run: many instances at once with heartbeats, a busy shared queue, messages between
them, a reader holding the database open, and `coord reap` from a cron-style loop every
second. Checks: no Busy error reaches a caller, no instance ever misses its heartbeat TTL,
and the WAL stays bounded.

Run (the full run):

    .venv/bin/python scripts/load.py --instances 50 --duration 60

The bounded version CI runs (tests/test_load.py):

    .venv/bin/python scripts/load.py --instances 20 --duration 8

Its last line is ``instances=N ops=N busy=N missed=N wal_max=BYTES wal_end=BYTES violations=N``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PER_PROCESS = 5
WAL_BOUND = 4 << 20  # journal_size_limit: what a restarted WAL is cut back to
WAL_MAX = 128 << 20  # during the load: restarts keep it near coord.backend.sqlite.connection.WAL_RESTART_BYTES
QUEUE = "load/jobs"


def _config() -> Any:
    from coord.config import Config

    # Tighter than the defaults (15 s / 5 s), so a missed heartbeat shows within the run,
    # and still three beats per TTL as by default.
    return Config(instance_ttl=6.0, heartbeat=2.0)


def worker(db: str, group: int, count: int, out: Path) -> None:
    """``count`` instances in one process, each with its own thread doing mixed work."""
    import coord
    from coord import messages, queues
    from coord.errors import Busy, CoordError

    store = coord.Store(db, config=_config())
    insts = [coord.register(store, f"load-{group}-{i}", app="load") for i in range(count)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counts = {"ops": 0, "busy": 0, "errors": 0}
    lock = threading.Lock()

    def run(inst: coord.Instance) -> None:
        rng = random.Random(inst.id)
        peers = [f"load-{g}-{i}" for g in range(max(1, group + 1)) for i in range(count)]
        while not stop.is_set():
            try:
                r = rng.random()
                if r < 0.35:
                    queues.put(store, QUEUE, {"from": inst.id, "n": rng.randrange(1000)})
                elif r < 0.7:
                    job = queues.claim(store, QUEUE, inst, timeout=0.05)
                    if job is not None:
                        queues.ack(store, job)
                elif r < 0.85:
                    to = rng.choice(peers)
                    if to != inst.id:
                        messages.send(inst, to, {"hi": inst.id}, ttl=30)
                else:
                    messages.receive(inst, timeout=0.05)
                with lock:
                    counts["ops"] += 1
            except Busy:
                with lock:
                    counts["busy"] += 1
            except CoordError:
                with lock:
                    counts["errors"] += 1  # e.g. a peer not registered yet: not a failure

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in insts]
    for t in threads:
        t.start()
    print("ready", flush=True)
    stop.wait()
    for t in threads:
        t.join(timeout=5)
    for inst in insts:
        inst.close()
    out.write_text(json.dumps(counts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        db, group, count, out = a.worker
        worker(db, int(group), int(count), Path(out))
        return 0

    import apsw

    import coord
    from coord.instances import list_instances

    with tempfile.TemporaryDirectory(prefix="coord-load-", dir=a.dir) as tmp:
        base = Path(tmp)
        os.chmod(base, 0o700)
        db = base / "coord.db"
        store = coord.Store(db, config=_config())
        env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
        groups = max(1, a.instances // PER_PROCESS)
        procs = []
        for g in range(groups):
            n = PER_PROCESS if g < groups - 1 else a.instances - PER_PROCESS * (groups - 1)
            p = subprocess.Popen([sys.executable, __file__, "--worker", str(db), str(g), str(n),
                                  str(base / f"w{g}.json")], env=env, stdout=subprocess.PIPE, text=True)
            procs.append(p)
        for p in procs:
            assert p.stdout is not None
            if not p.stdout.readline().startswith("ready"):
                raise SystemExit(f"worker {p.pid} failed to start")
        # A person's sqlite3 shell held open beside the instances: reads every 100 ms.
        reader = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
        missed: set[str] = set()
        wal_max = 0
        reaps = reap_failures = 0
        wal = Path(f"{db}-wal")
        end = time.monotonic() + a.duration
        next_reap = time.monotonic()
        while time.monotonic() < end:
            list(reader.execute("SELECT count(*) FROM jobs"))
            for info in list_instances(store, include_dead=True, app="load"):
                if not info.alive:
                    missed.add(f"{info.id} ({info.status})")
            wal_max = max(wal_max, wal.stat().st_size if wal.exists() else 0)
            if time.monotonic() >= next_reap:
                r = subprocess.run([sys.executable, "-m", "coord", "--db", str(db), "reap"],
                                   env=env, capture_output=True, text=True)
                reaps += 1
                reap_failures += r.returncode != 0
                next_reap += 1.0
            time.sleep(0.1)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
            if p.stdout:
                p.stdout.close()
        # With the load gone, one reap empties the WAL although the reader is still open.
        list(reader.execute("SELECT count(*) FROM jobs"))
        coord.reap(store)
        wal_end = wal.stat().st_size if wal.exists() else 0
        reader.close()
        totals = {"ops": 0, "busy": 0, "errors": 0}
        for g in range(groups):
            f = base / f"w{g}.json"
            if f.exists():
                for k, v in json.loads(f.read_text()).items():
                    totals[k] += v
        store.close()
    violations = totals["busy"] + len(missed) + reap_failures + (wal_end > WAL_BOUND) + (wal_max > WAL_MAX)
    if wal_max > WAL_MAX:
        print(f"VIOLATION: WAL grew to {wal_max} bytes during the load", file=sys.stderr)
    if wal_end > WAL_BOUND:
        print(f"VIOLATION: WAL still {wal_end} bytes after the load and a reap", file=sys.stderr)
    for m in sorted(missed):
        print(f"VIOLATION: {m} missed its heartbeat TTL", file=sys.stderr)
    print(f"reaps={reaps} reap_failures={reap_failures} errors={totals['errors']}", file=sys.stderr)
    print(f"instances={a.instances} ops={totals['ops']} busy={totals['busy']} missed={len(missed)} "
          f"wal_max={wal_max} wal_end={wal_end} violations={violations}", flush=True)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
