"""Torture run: many real processes use leases (with fenced writes), queues, messages and kv
at once while the monitor SIGKILLs and SIGSTOPs them at random moments; it checks as it goes
and runs the invariant checker at the end.

Run (the full run, ≥ 1 000 kills):

    .venv/bin/python scripts/torture.py --duration 1800 --kills 1000 --workers 8

The bounded version CI runs (tests/test_torture.py):

    .venv/bin/python scripts/torture.py --duration 15 --workers 5

On PostgreSQL (a schema nobody else uses; it is created, and left behind for a look after):

    .venv/bin/python scripts/torture.py --db 'postgresql://user@host/db?schema=torture' --kills 300

Its last line is ``kills=N ops=N violations=N``; the exit status is 1 when violations > 0.

What is checked:
- leases: every fenced write carries its term; a term has exactly one holder, and the terms
  in the fenced log never go backwards (a stale holder's write is rejected, not applied);
- queues: every job a producer put is done at the end — none lost — and no job's ack
  succeeded for two workers (a stale token is refused with ClaimLost);
- messages: every request to the anchor (a live instance that is never killed) is answered,
  with the matching payload;
- kv: after a SIGKILL, the victim's ephemeral key is gone within a second;
- at the end: ``coord.check.check(strict=True)`` after a final reap finds nothing.
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
import time
from pathlib import Path
from typing import Any

LEASE = "torture/leader"
QUEUE = "torture/jobs"
ANCHOR = "torture-anchor"
TTL = 1.0  # short instance and lease TTLs, so SIGSTOPped holders expire within the run


def _sql(store: Any, sql: str) -> str:
    """``sql`` in the store engine's placeholder style (written with SQLite's ``?``)."""
    return sql if store.engine == "sqlite" else sql.replace("?", "%s")


def _rows(store: Any, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    if store.engine == "sqlite":
        return store.rows(sql, params)  # type: ignore[no-any-return]
    return store.backend.db.rows(_sql(store, sql), params)  # type: ignore[no-any-return]


def _create_fence_table(store: Any) -> None:
    # ``id`` orders the fenced log: a new holder's takeover waits for the old holder's fenced
    # transaction (it locks the lease row), so on both engines a later term gets a later id.
    if store.engine == "sqlite":
        store.write(lambda c: c.execute(
            "CREATE TABLE IF NOT EXISTS torture_fence (id INTEGER PRIMARY KEY, "
            "term INTEGER NOT NULL, holder TEXT NOT NULL)"))
    else:
        store.backend.db.write(lambda c: c.execute(
            "CREATE TABLE IF NOT EXISTS torture_fence (id BIGSERIAL PRIMARY KEY, "
            "term BIGINT NOT NULL, holder TEXT NOT NULL)"))


def _config() -> Any:
    from coord.config import Config

    return Config(instance_ttl=TTL, heartbeat=0.2, lease_ttl=TTL, renew_deadline=0.7,
                  claim_lease=2.0)


# -- workers (run as `torture.py --worker ...` in their own processes) ------------------------


def _log(path: Path, record: dict[str, Any]) -> None:
    # One write() per line with O_APPEND: lines from a killed worker are whole or absent.
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def anchor(db: str, logdir: Path) -> None:
    """Answers every request with its own payload; never killed."""
    import coord
    from coord import messages

    store = coord.Store(db, config=_config())
    inst = coord.register(store, ANCHOR, app="torture-anchor")
    print("ready", flush=True)
    while True:
        m = messages.receive(inst, timeout=1.0)
        if m is not None and m.kind == "request":
            m.reply({"echo": m.payload})


def worker(db: str, slot: int, logdir: Path) -> None:
    import coord
    from coord import kv, leases, messages, queues
    from coord.errors import ClaimLost, CoordError, LeaseLost, TimeoutExpired

    store = coord.Store(db, config=_config())
    inst = coord.register(store, f"torture-{slot}", app="torture")
    me = f"{inst.id}#{inst.incarnation}"
    kv.set(store, f"torture/eph/{slot}", {"incarnation": inst.incarnation}, owner=inst)
    mylog = logdir / f"{os.getpid()}.log"
    fence_sql = _sql(store, "INSERT INTO torture_fence (term, holder) VALUES (?, ?)")
    print("ready", flush=True)
    rng = random.Random(os.getpid())
    n = 0
    while True:
        n += 1
        r = rng.random()
        try:
            if r < 0.2:
                lease = leases.try_acquire(inst, LEASE, ttl=TTL)
                if lease is not None:
                    try:
                        for _ in range(rng.randint(1, 5)):
                            lease.write(fence_sql, (lease.term, me))
                            _log(mylog, {"op": "fence", "term": lease.term})
                            time.sleep(rng.random() * 0.02)
                    except LeaseLost:
                        _log(mylog, {"op": "fence-refused", "term": lease.term})
                    finally:
                        lease.release()
            elif r < 0.45:
                keys = [f"{me}-{n}-{i}" for i in range(rng.randint(1, 10))]
                ids = queues.put_many(store, QUEUE, [queues.NewJob({"k": k}, dedupe_key=k, max_attempts=1000)
                                                     for k in keys])
                for i in ids:
                    _log(mylog, {"op": "put", "job": i})
            elif r < 0.8:
                job = queues.claim(store, QUEUE, inst, timeout=0.05)
                if job is not None:
                    time.sleep(rng.random() * 0.01)
                    try:
                        queues.ack(store, job, {"by": me})
                        _log(mylog, {"op": "ack", "job": job.id})
                    except ClaimLost:
                        _log(mylog, {"op": "stale-ack-refused", "job": job.id})
            else:
                k = rng.randrange(1 << 30)
                try:
                    rep = messages.request(inst, ANCHOR, {"k": k}, timeout=10.0)
                    ok = rep.payload == {"echo": {"k": k}}
                    _log(mylog, {"op": "request", "ok": ok, "k": k})
                except TimeoutExpired:
                    _log(mylog, {"op": "request", "ok": False, "k": k, "timeout": True})
        except CoordError as e:
            if inst.lost.is_set() or inst.closed:
                return
            _log(mylog, {"op": "error", "error": str(e), "type": type(e).__name__})


# -- the monitor ------------------------------------------------------------------------------


class Run:
    def __init__(self, db: Path | str, logdir: Path, workers: int) -> None:
        self.db, self.logdir, self.n = db, logdir, workers
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.kills = 0
        self.stops = 0
        self.violations: list[str] = []
        self.anchor: subprocess.Popen[str] | None = None

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        for attempt in range(3):
            try:
                return self._spawn(*args)
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self, *args: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
        p = subprocess.Popen([sys.executable, __file__, "--db", str(self.db), "--logdir",
                              str(self.logdir), *args], env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("ready"):
            p.wait()
            if p.stdout:
                p.stdout.close()
            raise RuntimeError(f"worker {args} did not start: {line!r} (exit {p.poll()})")
        return p

    def start(self) -> None:
        self.anchor = self.spawn("--anchor")
        for slot in range(self.n):
            self.procs[slot] = self.spawn("--worker", str(slot))

    def violate(self, what: str) -> None:
        self.violations.append(what)
        print(f"VIOLATION: {what}", file=sys.stderr, flush=True)

    def ephemeral_gone(self, store: Any, slot: int, incarnation: int | None) -> None:
        from coord import kv

        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            e = kv.get(store, f"torture/eph/{slot}")
            if e is None or e.owner_incarnation != incarnation:
                return
            time.sleep(0.005)
        self.violate(f"ephemeral key of torture-{slot}#{incarnation} outlived its owner by 1 s")

    def chaos(self, store: Any, duration: float, rng: random.Random, kills: int | None) -> None:
        from coord.instances import get_instance

        end = time.monotonic() + duration
        while time.monotonic() < end and (kills is None or self.kills < kills):
            time.sleep(rng.random() * 0.15)
            slot = rng.randrange(self.n)
            p = self.procs[slot]
            try:
                inc: int | None = get_instance(store, f"torture-{slot}").incarnation
            except Exception:
                inc = None
            if rng.random() < 0.1:
                # A hung holder: stopped past its TTL, then resumed; its fenced writes must fail.
                p.send_signal(signal.SIGSTOP)
                self.stops += 1
                time.sleep(TTL * rng.uniform(0.5, 2.0))
                p.send_signal(signal.SIGCONT)
                continue
            p.kill()
            p.wait()
            if p.stdout:
                p.stdout.close()
            self.kills += 1
            if self.kills % 100 == 0:
                print(f"progress: kills={self.kills} stops={self.stops} "
                      f"violations={len(self.violations)}", file=sys.stderr, flush=True)
            self.ephemeral_gone(store, slot, inc)
            self.procs[slot] = self.spawn("--worker", str(slot))

    def stop_all(self) -> None:
        for p in [*self.procs.values(), *( [self.anchor] if self.anchor else [])]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in [*self.procs.values(), *( [self.anchor] if self.anchor else [])]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()

    def verify(self, store: Any) -> int:
        from coord import queues
        from coord.check import check
        from coord.reaper import reap

        records: list[dict[str, Any]] = []
        for f in self.logdir.glob("*.log"):
            for line in f.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # a line cut by SIGKILL mid-write
        ops = len(records)
        # Leases: one holder per term; terms never go backwards in the fenced log.
        holders: dict[int, set[str]] = {}
        last = 0
        for row in _rows(store, "SELECT term, holder FROM torture_fence ORDER BY id"):
            term, holder = row["term"], row["holder"]
            holders.setdefault(term, set()).add(holder)
            if term < last:
                self.violate(f"fenced write of term {term} applied after term {last}")
            last = max(last, term)
        for term, hs in holders.items():
            if len(hs) > 1:
                self.violate(f"term {term} had {len(hs)} holders: {sorted(hs)}")
        # Queues: no ack succeeded twice.
        acked: dict[int, int] = {}
        for r in records:
            if r["op"] == "ack":
                acked[r["job"]] = acked.get(r["job"], 0) + 1
        for job, times in acked.items():
            if times > 1:
                self.violate(f"job {job} acked successfully {times} times")
        # Messages: every request to the live anchor answered correctly.
        for r in records:
            if r["op"] == "request" and not r["ok"]:
                self.violate(f"request {r['k']} to the live anchor not answered correctly: {r}")
        # Drain what is left, then nothing may be lost.
        reap(store)
        import coord

        drainer = coord.register(store, "torture-drainer", app="torture")
        while True:
            job = queues.claim(store, QUEUE, drainer, timeout=0.2)
            if job is None:
                break
            queues.ack(store, job)
        drainer.close()
        put = {r["job"] for r in records if r["op"] == "put"}
        states = {j.id: j.state for j in queues.list_jobs(store, QUEUE, state="all")}
        for job in sorted(put):
            state = states.get(job, "missing")
            if state != "done":
                self.violate(f"job {job} was put but is {state}")
        reap(store)
        for p in check(store, strict=True):
            self.violate(f"checker: {p.check}: {p.detail}")
        return ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of chaos")
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--kills", type=int, default=None, help="stop the chaos after this many kills")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default=None, help="directory for the database (default: a temp dir)")
    ap.add_argument("--db", help="a postgresql:// URL (with ?schema=NAME) to run on instead of "
                    "a new SQLite file")
    ap.add_argument("--logdir", help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--anchor", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.anchor:
        anchor(a.db, Path(a.logdir))
        return 0
    if a.worker is not None:
        worker(a.db, a.worker, Path(a.logdir))
        return 0

    import coord

    seed = a.seed if a.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="coord-torture-", dir=a.dir) as tmp:
        base = Path(tmp)
        os.chmod(base, 0o700)
        db: Path | str = a.db or base / "coord.db"
        logdir = base / "logs"
        logdir.mkdir()
        store = coord.Store(db, config=_config())
        _create_fence_table(store)
        run = Run(db, logdir, a.workers)
        try:
            run.start()
            run.chaos(store, a.duration, rng, a.kills)
        finally:
            run.stop_all()
        ops = run.verify(store)
        store.close()
    print(f"seed={seed} stops={run.stops}", file=sys.stderr)
    print(f"kills={run.kills} ops={ops} violations={len(run.violations)}", flush=True)
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
