"""Queue throughput probe: coord's put and claim+ack against raw apsw doing the same row work.

Run:  /tmp/venv/bin/python scripts/queue_probe.py [--jobs 10000] [--rounds 3]

Each phase runs in its own fresh process against one database (coord's schema and pragmas):

* put: one producer process puts N small JSON jobs, one transaction each.
  raw: BEGIN IMMEDIATE; INSERT INTO jobs ...; COMMIT (json.dumps for the payload).
  coord: ``coord.queues.put(store, queue, payload)``.
* claim+ack: one consumer process claims and acks the N jobs, two transactions each.
  raw: BEGIN IMMEDIATE; UPDATE jobs ... WHERE id = (SELECT ... LIMIT 1) RETURNING; COMMIT;
  json.loads; BEGIN IMMEDIATE; UPDATE jobs SET state = 'done' ... ; COMMIT.
  coord: ``claim(store, queue, instance)`` then ``ack(store, job)`` by a registered instance.
* together: the producer and the consumer run at the same time (coord only; the consumer
  waits for work with ``timeout=``), each timed on its own.

Rounds alternate which side goes first; the script prints the median and best of each
phase in operations per second of wall-clock time, and also per second of the process's own
CPU time (on a busy shared machine the wall clock mostly measures the wait for a core; the
CPU time is what each side costs), and coord's medians as a fraction of raw's. No number here
is asserted by a test: only the ratios mean much.
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

ROLES = ("raw-put", "raw-claim", "coord-put", "coord-claim")


def payload(i: int) -> dict[str, object]:
    return {"n": i, "task": "resize", "path": f"/srv/img/{i}.png"}


def role(name: str, db: str, n: int, queue: str, timeout: float) -> tuple[float, float]:
    """Run one side in this process; returns (wall, CPU) seconds for its n operations."""
    import coord
    from coord import queues

    store = coord.Store(db)
    if name == "raw-put":
        import apsw

        c = apsw.Connection(db)
        c.set_busy_timeout(5000)
        store.configure(c)
        store.write(lambda c: c.execute(
            "INSERT OR IGNORE INTO queues (name, created_at) VALUES (?, ?)", (queue, time.time())))
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            c.execute("BEGIN IMMEDIATE")
            c.execute(
                "INSERT INTO jobs (queue, payload, priority, available_mono, max_attempts, "
                "created_at) VALUES (?, ?, 0, ?, 5, ?)",
                (queue, json.dumps(payload(i)), time.clock_gettime(time.CLOCK_MONOTONIC),
                 time.time()),
            )
            c.execute("COMMIT")
        return time.perf_counter() - t, time.process_time() - cpu
    if name == "raw-claim":
        import secrets

        import apsw

        c = apsw.Connection(db)
        c.set_busy_timeout(5000)
        store.configure(c)
        t, cpu = time.perf_counter(), time.process_time()
        done = 0
        while done < n:
            now = time.clock_gettime(time.CLOCK_MONOTONIC)
            c.execute("BEGIN IMMEDIATE")
            got = c.execute(
                "UPDATE jobs SET state = 'claimed', claim_token = ?, claimed_by = 'raw', "
                "claimed_incarnation = 0, claim_expires_mono = ?, claimed_at = ?, "
                "attempts = attempts + 1 WHERE id = (SELECT id FROM jobs WHERE queue = ? "
                "AND state = 'ready' AND available_mono <= ? ORDER BY priority DESC, id LIMIT 1) "
                "RETURNING id, payload, claim_token",
                (secrets.token_hex(8), now + 60, time.time(), queue, now),
            ).fetchall()
            c.execute("COMMIT")
            if not got:
                time.sleep(0.0005)
                continue
            json.loads(got[0][1])
            c.execute("BEGIN IMMEDIATE")
            c.execute(
                "UPDATE jobs SET state = 'done', claim_token = NULL, claim_expires_mono = NULL, "
                "finished_at = ?, finished_mono = ? WHERE claim_token = ?",
                (time.time(), now, got[0][2]),
            )
            c.execute("COMMIT")
            done += 1
        return time.perf_counter() - t, time.process_time() - cpu
    if name == "coord-put":
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            queues.put(store, queue, payload(i))
        return time.perf_counter() - t, time.process_time() - cpu
    if name == "coord-claim":
        inst = coord.register(store, app="probe")
        t, cpu = time.perf_counter(), time.process_time()
        done = 0
        while done < n:
            job = queues.claim(store, queue, inst, timeout=timeout)
            if job is None:
                raise SystemExit("consumer: nothing arrived within the timeout")
            if done == 0:  # timed from the first job, not from the wait for it
                t, cpu = time.perf_counter(), time.process_time()
            queues.ack(store, job)
            done += 1
        took = time.perf_counter() - t, time.process_time() - cpu
        inst.close()
        return took
    raise SystemExit(f"unknown role {name}")


def spawn(name: str, db: str, n: int, queue: str, timeout: float = 0.0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", name, "--db", db, "--jobs", str(n),
         "--queue", queue, "--timeout", str(timeout)],
        stdout=subprocess.PIPE, text=True,
    )


def seconds(p: subprocess.Popen[str]) -> tuple[float, float]:
    out, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"{p.args} failed with status {p.returncode}")
    wall, cpu = out.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--role", choices=ROLES)
    ap.add_argument("--db")
    ap.add_argument("--queue", default="probe")
    ap.add_argument("--timeout", type=float, default=0.0)
    args = ap.parse_args()
    if args.role:
        print(*role(args.role, args.db, args.jobs, args.queue, args.timeout))
        return

    n = args.jobs
    names = ("raw put", "coord put", "raw claim+ack", "coord claim+ack", "together put",
             "together claim+ack")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}

    def record(key: str, p: subprocess.Popen[str]) -> None:
        w, c = seconds(p)
        wall[key].append(n / w)
        cpu[key].append(n / c)

    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        for r in range(args.rounds):
            db = str(Path(tmp) / f"probe{r}.db")
            sides = [("raw", "raw-put", "raw-claim"), ("coord", "coord-put", "coord-claim")]
            if r % 2:
                sides.reverse()
            for label, put_role, claim_role in sides:
                q = f"{label}{r}"
                record(f"{label} put", spawn(put_role, db, n, q))
                record(f"{label} claim+ack", spawn(claim_role, db, n, q))
            q = f"together{r}"
            consumer = spawn("coord-claim", db, n, q, timeout=60)
            time.sleep(0.3)  # let it register and start waiting
            producer = spawn("coord-put", db, n, q)
            record("together put", producer)
            record("together claim+ack", consumer)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(f"{n} jobs, {args.rounds} rounds; operations per second (median, best), "
          "by wall clock and by the process's CPU time")
    print(f"  {'':<20} {'wall':>9} {'best':>9} {'cpu':>9} {'best':>9}")
    for k in names:
        print(f"  {k:<20} {statistics.median(wall[k]):>9.0f} {max(wall[k]):>9.0f} "
              f"{statistics.median(cpu[k]):>9.0f} {max(cpu[k]):>9.0f}")
    for what in ("put", "claim+ack"):
        rw = statistics.median(wall[f"coord {what}"]) / statistics.median(wall[f"raw {what}"])
        rc = statistics.median(cpu[f"coord {what}"]) / statistics.median(cpu[f"raw {what}"])
        print(f"  coord/raw {what:<10} {rw:.2f} by wall clock, {rc:.2f} by CPU time")


if __name__ == "__main__":
    main()
