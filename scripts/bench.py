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
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import random
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import apsw

    import coord

# coord and apsw are imported where they are used: the worker processes of the peers and of
# the plain references start without them (a spawn costs less, and measures only the peer).

SCRIPT = Path(__file__).resolve()


def mono() -> float:
    """CLOCK_MONOTONIC: one clock for every process of this boot (latencies across processes)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass
class Result:
    """One measured row: ``work`` done by ``impl``; latencies in microseconds.

    Throughput rows carry ``rates`` (ops/s of each round; the figure is their median);
    latency rows carry ``latencies_us`` (the figure is their p50). ``coord`` marks coord's
    own row of a work: every other row of that work is a reference, and coord's ratio to it
    is coord's figure divided by the reference's (ops/s: above 1 is faster; p50: below 1 is
    faster)."""

    section: str
    work: str
    impl: str
    n: int
    seconds: float
    latencies_us: list[float] = field(default_factory=list, repr=False)
    limit: bool = False  # the floor (or ceiling) of this work
    note: str = ""
    rates: list[float] = field(default_factory=list)
    coord: bool = False
    error: str | None = None
    per_op: bool = False  # latencies of back-to-back operations: n / seconds is a throughput

    @property
    def metric(self) -> str:
        return "ops/s" if self.rates else "p50_us"

    @property
    def ops_per_s(self) -> float | None:
        if self.error is not None:
            return None
        if self.rates:
            return statistics.median(self.rates)
        return self.n / self.seconds if self.per_op and self.seconds else None

    def pct(self, q: float) -> float | None:
        if not self.latencies_us:
            return None
        xs = sorted(self.latencies_us)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def figure(self) -> float | None:
        if self.error is not None:
            return None
        return self.ops_per_s if self.rates else self.pct(0.50)

    def summary(self, ours: Result | None) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("latencies_us", "rates")}
        d.update(
            metric=self.metric,
            rounds=len(self.rates) or None,
            ops_per_s=_round(self.ops_per_s),
            p50_us=_round(self.pct(0.50)),
            p90_us=_round(self.pct(0.90)),
            p99_us=_round(self.pct(0.99)),
            coord_ratio=None if ours is None or ours is self else self.ratio(ours),
        )
        return d

    def ratio(self, ours: Result) -> float | None:
        """coord's figure divided by this row's. Throughput rows measured in the same rounds
        (as many rates each) give the median of the per-round ratios: a slow spell of the
        machine then weighs on both sides of each ratio alike."""
        if self.error is not None or ours.error is not None:
            return None
        if len(self.rates) == len(ours.rates) > 1 and all(self.rates):
            return round(statistics.median(a / b for a, b in zip(ours.rates, self.rates,
                                                                   strict=True)), 3)
        a, b = ours.figure(), self.figure()
        if a is None or not b:
            return None
        return round(a / b, 3)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@dataclass(frozen=True)
class Sizes:
    tx: int  # one-row transactions per impl
    jobs: int  # jobs per queue round
    rounds: int
    warmup: int  # untimed jobs first
    timebox: float  # seconds a queue phase may run before it stops (noted when it does)
    budget: float  # seconds an impl may spend on one queue work before skipping rounds
    fan_jobs: int
    lat_jobs: int  # jobs timed at the paced rate
    lat_warmup: int
    rtt: int  # request/reply round trips timed per impl
    rtt_warmup: int
    kills: int  # failover trials per impl
    ttl_kills: int  # trials for the TTL lease row (each takes ~2 s)
    reg_sizes: tuple[int, ...]
    reg_rounds: int
    cli_runs: int


SIZES = {
    "full": Sizes(tx=5000, jobs=10_000, rounds=5, warmup=200, timebox=30.0, budget=40.0,
                  fan_jobs=5000, lat_jobs=1000, lat_warmup=100, rtt=2000, rtt_warmup=200,
                  kills=30, ttl_kills=10, reg_sizes=(10, 1000, 10_000), reg_rounds=3,
                  cli_runs=10),
    "quick": Sizes(tx=500, jobs=1000, rounds=3, warmup=50, timebox=2.5, budget=6.0,
                   fan_jobs=400, lat_jobs=100, lat_warmup=20, rtt=300, rtt_warmup=50,
                   kills=8, ttl_kills=2, reg_sizes=(10, 1000), reg_rounds=3, cli_runs=3),
    "tiny": Sizes(tx=50, jobs=40, rounds=1, warmup=5, timebox=2.0, budget=0.0,
                  fan_jobs=40, lat_jobs=10, lat_warmup=2, rtt=10, rtt_warmup=2,
                  kills=2, ttl_kills=1, reg_sizes=(10, 50), reg_rounds=1, cli_runs=1),
}


@dataclass
class Context:
    quick: bool
    base: Path
    size: str = "full"
    depths: tuple[int, ...] = ()  # --size: put and claim+ack at each of these depths

    @property
    def sizes(self) -> Sizes:
        return SIZES[self.size]

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


# -- worker processes ------------------------------------------------------------------------
# Every process a section needs is this script run with --worker '{"role": ..., ...}': it
# prints progress lines, then its result as one JSON line last.


class WorkerFailed(RuntimeError):
    pass


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def start_worker(role: str, **spec: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--worker", json.dumps({"role": role, **spec})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_worker_env(),
    )


def wait_line(p: subprocess.Popen[str], word: str, timeout: float = 60.0) -> str:
    """Read the worker's stdout until a line starting with ``word``: byte by byte from the
    descriptor, so that nothing after that line is buffered here (finish() reads the rest)."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    line = b""
    try:
        while True:
            if not sel.select(max(0.0, end - time.monotonic())):
                raise WorkerFailed(f"worker {p.pid}: no {word!r} line within {timeout:.0f} s")
            ch = os.read(fd, 1)
            if not ch:
                raise WorkerFailed(f"worker {p.pid} exited before {word!r}: {_stderr(p)}")
            if ch != b"\n":
                line += ch
                continue
            text, line = line.decode(), b""
            if text.startswith(word):
                return text
    finally:
        sel.close()


def _stderr(p: subprocess.Popen[str]) -> str:
    with contextlib.suppress(Exception):
        p.wait(timeout=5)
    err = p.stderr.read() if p.stderr is not None else ""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"status {p.returncode}"


def finish(p: subprocess.Popen[str], timeout: float = 300.0) -> dict[str, Any]:
    """Wait for a worker; its last stdout line is the result."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_worker(p)
        raise WorkerFailed(f"worker {p.pid} took longer than {timeout:.0f} s") from None
    lines = out.strip().splitlines()
    if p.returncode != 0 or not lines:
        tail = [x for x in err.strip().splitlines() if x.strip()]
        raise WorkerFailed(tail[-1] if tail else f"worker exited with status {p.returncode}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_worker(role: str, timeout: float = 300.0, **spec: Any) -> dict[str, Any]:
    return finish(start_worker(role, **spec), timeout)


def stop_worker(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    with contextlib.suppress(Exception):
        p.communicate(timeout=10)


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {}


def worker(fn: Callable[[dict[str, Any]], dict[str, Any] | None]
           ) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    WORKERS[fn.__name__.removeprefix("w_")] = fn
    return fn


def run_as_worker(spec_text: str) -> int:
    spec = json.loads(spec_text)
    result = WORKERS[spec.pop("role")](spec)
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


# -- section 1: one-row write transactions (the limit) --------------------------------------------

_TABLE = "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"


def _raw_connection(path: Path | str) -> apsw.Connection:
    """A raw apsw connection with coord's own settings (WAL, synchronous=NORMAL ...)."""
    import apsw

    from coord.db import CONNECTION_PRAGMAS
    conn = apsw.Connection(str(path))
    conn.set_busy_timeout(5000)
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    for name, value in CONNECTION_PRAGMAS:
        conn.execute(f"PRAGMA {name}={value}").fetchall()
    return conn


def section_transactions(ctx: Context) -> list[Result]:
    import coord
    n = ctx.sizes.tx
    work = "one-row write transaction"

    conn = _raw_connection(ctx.fresh_dir("raw") / "raw.db")
    conn.execute(_TABLE)

    def raw(i: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO bench (v) VALUES (?)", (f"row {i}",))
        conn.execute("COMMIT")

    store = coord.Store(ctx.fresh_dir("store") / "coord.db")
    store.write(lambda c: c.execute(_TABLE))

    def via_store(i: int) -> None:
        store.write(lambda c: c.execute("INSERT INTO bench (v) VALUES (?)", (f"row {i}",)))

    for i in range(min(200, n)):  # warm-up: caches, the WAL file's first pages
        raw(i)
        via_store(i)
    (raw_s, raw_lat), (store_s, store_lat) = interleaved(n, [raw, via_store])
    conn.close()
    store.close()
    return [
        Result("transactions", work, "coord Store.write", n, store_s, store_lat, coord=True,
               note="same, with pid/thread check and busy handling", per_op=True),
        Result("transactions", work, "raw apsw", n, raw_s, raw_lat, limit=True,
               note="BEGIN IMMEDIATE; INSERT; COMMIT", per_op=True),
    ]


# -- section 2: queues ---------------------------------------------------------------------------
# One adapter per implementation, used inside the worker processes. claim(timeout) returns
# (payload, handle) or None; implementations with no cross-process wait poll every 1 ms.

POLL = 0.001
QUEUE = "bench/jobs"
#: The queue limit, and the reference doing coord's row work on coord's schema.
LIMIT_QUEUE = "minimal queue"
RAW_SCHEMA = "coord's schema, raw"
#: coord and these run back to back in every round of a queue work (their ratios are per round).
TRIO = ("coord", LIMIT_QUEUE, RAW_SCHEMA)


def job_payload(i: int, t: float | None = None, warm: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = {"n": i, "task": "resize", "path": f"/srv/img/{i}.png"}
    if t is not None:
        p["t"] = t
    if warm:
        p["w"] = 1
    return p


class QueueImpl:
    name = ""
    native_wait = False  # claim(timeout) waits without polling

    def __init__(self, d: Path, consumer: bool) -> None:
        self.d = d

    def put(self, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    def try_claim(self) -> tuple[Any, Any] | None:
        raise NotImplementedError

    def claim(self, timeout: float) -> tuple[Any, Any] | None:
        end = mono() + timeout
        while True:
            got = self.try_claim()
            if got is not None or mono() >= end:
                return got
            time.sleep(POLL)

    def ack(self, handle: Any) -> None:
        pass

    # Batches: only the implementations in BATCH_IMPLS claim and ack many in one transaction.
    def claim_batch(self, n: int, timeout: float) -> list[tuple[Any, Any]]:
        raise NotImplementedError

    def ack_batch(self, handles: list[Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @classmethod
    def setup(cls, d: Path) -> None:
        """Create the empty queue (in the benchmark process, before any worker opens it)."""
        cls(d, consumer=False).close()


class CoordQueue(QueueImpl):
    """coord's worker loop: each ack is made in the transaction of the next claim
    (``claim(..., ack=job)``, one commit per job); the last is acked on close."""

    name = "coord"
    native_wait = True

    def __init__(self, d: Path, consumer: bool) -> None:
        import coord
        from coord import queues
        self.q = queues
        self.store = coord.Store(d / "coord.db")
        self.inst = coord.register(self.store, app="bench") if consumer else None
        self.done: dict[int, Any] = {}  # thread -> the job (or batch) its next claim acks

    @classmethod
    def setup(cls, d: Path) -> None:
        import coord
        from coord import queues
        store = coord.Store(d / "coord.db")
        queues.create_queue(store, QUEUE)
        store.close()

    def put(self, payload: dict[str, Any]) -> None:
        self.q.put(self.store, QUEUE, payload)

    def claim(self, timeout: float) -> tuple[Any, Any] | None:
        done = self.done.pop(threading.get_ident(), None)
        job = self.q.claim(self.store, QUEUE, self.inst, timeout=timeout, ack=done)
        return None if job is None else (job.payload, job)

    def ack(self, handle: Any) -> None:
        self.done[threading.get_ident()] = handle

    def claim_batch(self, n: int, timeout: float) -> list[tuple[Any, Any]]:
        done = self.done.pop(threading.get_ident(), ())
        return [(j.payload, j) for j in self.q.claim_many(self.store, QUEUE, n, self.inst,
                                                          timeout=timeout, ack=done)]

    def ack_batch(self, handles: list[Any]) -> None:
        self.done[threading.get_ident()] = handles

    def close(self) -> None:
        for done in self.done.values():
            self.q.ack_many(self.store, done if isinstance(done, list) else [done])
        if self.inst is not None:
            self.inst.close()
        self.store.close()


class MinimalQueue(QueueImpl):
    """The engine's limit for a claim queue: one table, no secondary index; put = INSERT,
    claim = UPDATE … RETURNING of the first unclaimed (or expired) row, ack = DELETE, each
    in its own BEGIN IMMEDIATE, on a raw apsw connection with coord's pragmas."""

    name = "minimal queue"

    def __init__(self, d: Path, consumer: bool) -> None:
        import secrets
        self.token = secrets.token_hex
        self.c = _raw_connection(d / "minimal.db")

    @classmethod
    def setup(cls, d: Path) -> None:
        c = _raw_connection(d / "minimal.db")
        c.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, token TEXT, "
                  "expires REAL)")
        c.close()

    def put(self, payload: dict[str, Any]) -> None:
        c = self.c
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO q (payload) VALUES (?)", (json.dumps(payload),))
        c.execute("COMMIT")

    def try_claim(self) -> tuple[Any, Any] | None:
        c, now = self.c, mono()
        c.execute("BEGIN IMMEDIATE")
        got = c.execute(
            "UPDATE q SET token = ?, expires = ? WHERE id = (SELECT id FROM q "
            "WHERE token IS NULL OR expires < ? ORDER BY id LIMIT 1) RETURNING id, payload, token",
            (self.token(8), now + 60, now),
        ).fetchall()
        c.execute("COMMIT")
        return (json.loads(str(got[0][1])), (got[0][0], got[0][2])) if got else None

    def ack(self, handle: Any) -> None:
        c = self.c
        c.execute("BEGIN IMMEDIATE")
        c.execute("DELETE FROM q WHERE id = ? AND token = ?", handle)
        c.execute("COMMIT")

    def claim_batch(self, n: int, timeout: float) -> list[tuple[Any, Any]]:
        end = mono() + timeout
        while True:
            c, now = self.c, mono()
            c.execute("BEGIN IMMEDIATE")
            got = c.execute(
                "UPDATE q SET token = ?, expires = ? WHERE id IN (SELECT id FROM q "
                "WHERE token IS NULL OR expires < ? ORDER BY id LIMIT ?) "
                "RETURNING id, payload, token", (self.token(8), now + 60, now, n),
            ).fetchall()
            c.execute("COMMIT")
            if got or mono() >= end:
                return [(json.loads(str(p)), (i, t)) for i, p, t in got]
            time.sleep(POLL)

    def ack_batch(self, handles: list[Any]) -> None:
        c = self.c
        c.execute("BEGIN IMMEDIATE")
        c.executemany("DELETE FROM q WHERE id = ? AND token = ?", handles)
        c.execute("COMMIT")

    def close(self) -> None:
        self.c.close()


class RawQueue(QueueImpl):
    """The same rows as coord's (its schema, its indexes) and coord's own statements, in the
    plainest transactions: what coord's Python adds is the difference."""

    name = RAW_SCHEMA

    def __init__(self, d: Path, consumer: bool) -> None:
        self.c = _raw_connection(d / "coord.db")

    @classmethod
    def setup(cls, d: Path) -> None:
        import coord
        from coord import queues
        store = coord.Store(d / "coord.db")  # coord's schema and pragmas
        queues.create_queue(store, QUEUE)
        store.close()

    def put(self, payload: dict[str, Any]) -> None:
        c = self.c
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO jobs (queue, payload, priority, available_mono, max_attempts, "
                  "created_at) VALUES (?, ?, 0, ?, 5, ?)",
                  (QUEUE, json.dumps(payload), mono(), time.time()))
        c.execute("COMMIT")

    def try_claim(self) -> tuple[Any, Any] | None:
        c, now = self.c, mono()
        c.execute("BEGIN IMMEDIATE")
        got = c.execute(
            "SELECT id, payload FROM jobs WHERE id = (SELECT id FROM jobs WHERE state = 'ready' "
            "AND queue = CAST(? AS TEXT) AND available_mono <= ? ORDER BY priority DESC, id "
            "LIMIT 1)", (QUEUE, now),
        ).fetchall()
        if got:
            token = f"{got[0][0]}-raw"
            c.execute(
                "UPDATE jobs SET state = 'claimed', claim_token = ?, claimed_by = 'raw', "
                "claimed_incarnation = 0, claim_expires_mono = ?, claimed_at = ?, "
                "attempts = attempts + 1 WHERE id = ?", (token, now + 60, time.time(), got[0][0]))
        c.execute("COMMIT")
        return (json.loads(str(got[0][1])), (got[0][0], token)) if got else None

    def ack(self, handle: Any) -> None:
        c = self.c
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE jobs SET state = 'done', claim_token = NULL, claim_expires_mono = NULL,"
                  " finished_at = ?, finished_mono = ? WHERE id = ? AND claim_token = ?",
                  (time.time(), mono(), *handle))
        c.execute("COMMIT")

    def close(self) -> None:
        self.c.close()


class PersistQueue(QueueImpl):
    name = "persist-queue"

    def __init__(self, d: Path, consumer: bool) -> None:
        import persistqueue
        import persistqueue.serializers.json as pq_json
        self.empty = persistqueue.Empty
        # auto_resume=False: its default turns every unacked job back to ready whenever a
        # process opens the queue, other processes' claims included.
        self.q = persistqueue.SQLiteAckQueue(str(d / "pq"), multithreading=True,
                                             serializer=pq_json, auto_resume=False)

    def put(self, payload: dict[str, Any]) -> None:
        self.q.put(payload)

    def try_claim(self) -> tuple[Any, Any] | None:
        try:
            item = self.q.get(block=False, raw=True)
        except self.empty:
            return None
        return item["data"], item["pqid"]

    def ack(self, handle: Any) -> None:
        self.q.ack(id=handle)

    def close(self) -> None:
        self.q.close()


class LiteQueue(QueueImpl):
    name = "litequeue"

    def __init__(self, d: Path, consumer: bool) -> None:
        import litequeue
        self.q = litequeue.LiteQueue(str(d / "lq.db"))

    def put(self, payload: dict[str, Any]) -> None:
        self.q.put(json.dumps(payload))

    def try_claim(self) -> tuple[Any, Any] | None:
        m = self.q.pop()
        return None if m is None else (json.loads(m.data), m.message_id)

    def ack(self, handle: Any) -> None:
        self.q.done(handle)

    def close(self) -> None:
        self.q.conn.close()


class HueyQueue(QueueImpl):
    """huey's SqliteStorage at its defaults: enqueue/dequeue, no claim lease and no ack."""

    name = "huey (no ack)"

    def __init__(self, d: Path, consumer: bool) -> None:
        from huey.storage import SqliteStorage
        self.s = SqliteStorage(name="bench", filename=str(d / "huey.db"))

    def put(self, payload: dict[str, Any]) -> None:
        self.s.enqueue(json.dumps(payload).encode())

    def try_claim(self) -> tuple[Any, Any] | None:
        data = self.s.dequeue()
        return None if data is None else (json.loads(bytes(data)), None)

    def close(self) -> None:
        self.s.close()


class FileQueue(QueueImpl):
    """A naive directory queue: put = write tmp/ + rename into ready/; claim = rename from
    ready/ into claimed/ (the rename decides the race); ack = unlink. FIFO by name."""

    name = "file-per-job dir"

    def __init__(self, d: Path, consumer: bool) -> None:
        self.ready, self.claimed, self.tmp = (str(d / x) for x in ("ready", "claimed", "tmp"))
        self.seq = 0
        self.tag = f"{os.getpid()}-{threading.get_ident() % 10_000}"
        self.batch: list[str] = []

    @classmethod
    def setup(cls, d: Path) -> None:
        for x in ("ready", "claimed", "tmp"):
            (d / x).mkdir(mode=0o700)

    def put(self, payload: dict[str, Any]) -> None:
        self.seq += 1
        name = f"{time.time_ns():020d}-{self.tag}-{self.seq:09d}.json"
        tmp = os.path.join(self.tmp, name)
        with open(tmp, "w") as f:
            f.write(json.dumps(payload))
        os.rename(tmp, os.path.join(self.ready, name))

    def try_claim(self) -> tuple[Any, Any] | None:
        for _ in range(2):
            while self.batch:
                name = self.batch.pop()
                dst = os.path.join(self.claimed, name)
                try:
                    os.rename(os.path.join(self.ready, name), dst)
                except FileNotFoundError:
                    continue  # another consumer took it
                with open(dst) as f:
                    return json.loads(f.read()), dst
            self.batch = sorted(os.listdir(self.ready), reverse=True)
        return None

    def ack(self, handle: Any) -> None:
        os.unlink(handle)


QUEUE_IMPLS: dict[str, type[QueueImpl]] = {
    c.name: c for c in (CoordQueue, MinimalQueue, RawQueue, PersistQueue, LiteQueue, HueyQueue,
                        FileQueue)
}


@worker
def w_q_put(spec: dict[str, Any]) -> dict[str, Any]:
    """Put warmup + n jobs (paced at ``rate`` per second if given), then ``stops`` sentinels."""
    q = QUEUE_IMPLS[spec["impl"]](Path(spec["dir"]), consumer=False)
    warmup, n, rate = spec["warmup"], spec["n"], spec.get("rate")
    paced = rate is not None
    interval = 1.0 / rate if paced else 0.0
    nxt = mono()
    start = t0 = mono()
    done = 0
    for i in range(warmup + n):
        if i == warmup:
            t0 = mono()
            deadline = t0 + spec["timebox"]
        if paced:
            nxt += interval
            delay = nxt - mono()
            if delay > 0:
                time.sleep(delay)
        q.put(job_payload(i, mono() if paced else None, warm=i < warmup))
        if i >= warmup:
            done += 1
            if mono() > deadline:
                break
    seconds = mono() - t0
    for _ in range(spec.get("stops", 0)):
        q.put({"stop": True})
    q.close()
    return {"n": done, "seconds": seconds, "start": start}


def _consume(q: QueueImpl, spec: dict[str, Any], out: dict[str, Any], lock: threading.Lock
             ) -> None:
    """Claim and ack until ``expect`` jobs (drain) or a sentinel; time from the first job
    after the warm-up."""
    expect, warmup = spec.get("expect"), spec.get("warmup", 0)
    give_up = mono() + spec["timebox"] + spec.get("patience", 60.0)
    while mono() < give_up:
        with lock:
            if out["stopped"] or (expect is not None and out["claimed"] >= expect):
                return
        got = q.claim(min(1.0, max(0.0, give_up - mono())))
        if got is None:
            continue
        now = mono()
        payload, handle = got
        if isinstance(payload, dict) and payload.get("stop"):
            q.ack(handle)
            with lock:
                out["stopped"] = True
            return
        q.ack(handle)
        end = mono()
        with lock:
            out["claimed"] += 1
            out["ids"].append(payload["n"])
            if "t" in payload and not payload.get("w"):
                out["latencies_us"].append((now - payload["t"]) * 1e6)
            if expect is not None and out["claimed"] == warmup + 1:
                out["t0"], out["t0_count"] = now, warmup
            if out["first"] is None:
                out["first"] = now
            out["last"] = end
            if out["t0"] is not None and end - out["t0"] > spec["timebox"]:
                out["boxed"] = True
                out["stopped"] = True


def _consume_batches(q: QueueImpl, spec: dict[str, Any], out: dict[str, Any]) -> None:
    """Drain ``expect`` jobs, ``batch`` at a time: claim a batch, ack it in one call; time
    from the first batch after the warm-up."""
    expect, warmup, size = spec["expect"], spec.get("warmup", 0), spec["batch"]
    give_up = mono() + spec["timebox"] + spec.get("patience", 60.0)
    while mono() < give_up and out["claimed"] < expect:
        got = q.claim_batch(size, min(1.0, max(0.0, give_up - mono())))
        if not got:
            continue
        now = mono()
        q.ack_batch([h for _, h in got])
        if out["t0"] is None and out["claimed"] >= warmup:
            out["t0"], out["t0_count"] = now, out["claimed"]
        out["claimed"] += len(got)
        out["ids"].extend(p["n"] for p, _ in got)
        out["last"] = mono()
        if out["t0"] is not None and out["last"] - out["t0"] > spec["timebox"]:
            out["boxed"] = True
            return


@worker
def w_q_consume(spec: dict[str, Any]) -> dict[str, Any]:
    q = QUEUE_IMPLS[spec["impl"]](Path(spec["dir"]), consumer=True)
    out: dict[str, Any] = {"claimed": 0, "ids": [], "latencies_us": [], "t0": None,
                           "first": None, "last": None, "stopped": False, "boxed": False}
    lock = threading.Lock()
    print("ready", flush=True)
    threads = [threading.Thread(target=_consume, args=(q, spec, out, lock))
               for _ in range(spec.get("threads", 1))]
    if spec.get("batch"):
        threads = [threading.Thread(target=_consume_batches, args=(q, spec, out))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.close()
    if spec.get("expect") is not None:  # drain: the rate after the warm-up
        timed = out["claimed"] - out.get("t0_count", spec.get("warmup", 0))
        out["n"] = max(0, timed)
        out["seconds"] = (out["last"] - out["t0"]) if out["t0"] is not None else 0.0
    if not spec.get("want_ids"):
        out["ids"] = []
    return out


def _setup_queue(impl: str, d: Path) -> None:
    QUEUE_IMPLS[impl].setup(d)


def _rotate(xs: list[str], r: int) -> list[str]:
    r %= len(xs)
    return xs[r:] + xs[:r]


def _in_turn(impls: list[str], r: int) -> list[str]:
    """The order of round ``r``: coord and the two raw references back to back (rotated, so
    each goes first in turn) so that their per-round ratios see the same moment of the
    machine; then the others, rotated."""
    trio = [i for i in TRIO if i in impls]
    return _rotate(trio, r) + _rotate([i for i in impls if i not in trio], r)


def _jobs_label(work: str, jobs: int | None) -> str:
    return work if jobs is None else f"{work[:-1]}, {jobs:_} jobs)".replace("_", " ")


def queue_put_claim(ctx: Context, impls: list[str], jobs: int | None = None) -> list[Result]:
    """put by one producer process, then claim+ack by one consumer process, per round
    (``jobs`` per round: the depth the consumer starts at; default the size's)."""
    s = ctx.sizes
    n_jobs = s.jobs if jobs is None else jobs
    put: dict[str, list[tuple[int, float]]] = {i: [] for i in impls}
    take: dict[str, list[tuple[int, float]]] = {i: [] for i in impls}
    spent = dict.fromkeys(impls, 0.0)
    errors: dict[str, str] = {}
    boxed: dict[str, set[str]] = {i: set() for i in impls}
    stopped: set[str] = set()
    for r in range(s.rounds):
        for impl in _in_turn(impls, r):
            # a slow peer stops when one more round would overrun its budget (coord and the
            # raw references always run every round: their ratios are per round)
            if r > 0 and impl not in TRIO and spent[impl] * (r + 1) / r > s.budget:
                stopped.add(impl)
            if impl in errors or impl in stopped:
                continue
            began = time.monotonic()
            d = ctx.fresh_dir(f"pc-{n_jobs}-{_slug(impl)}-{r}")
            try:
                _setup_queue(impl, d)
                p = run_worker("q_put", impl=impl, dir=str(d), n=n_jobs, warmup=s.warmup,
                               timebox=s.timebox)
                if p["n"] < n_jobs:
                    boxed[impl].add("put")
                put[impl].append((p["n"], p["seconds"]))
                c = run_worker("q_consume", impl=impl, dir=str(d), expect=p["n"] + s.warmup,
                               warmup=s.warmup, timebox=s.timebox)
                if c["boxed"]:
                    boxed[impl].add("claim")
                take[impl].append((c["n"], c["seconds"]))
            except WorkerFailed as e:
                errors[impl] = str(e)
            spent[impl] += time.monotonic() - began
    out = []
    for work, data, part in ((_jobs_label("put (1 producer)", jobs), put, "put"),
                             (_jobs_label("claim+ack (1 consumer)", jobs), take, "claim")):
        for impl in impls:
            rows = data[impl]
            note = _queue_note(impl)
            if part in boxed[impl]:
                note = _join(note, f"time-boxed at {s.timebox:.0f} s: {min(n for n, _ in rows)}"
                             f" of {n_jobs} jobs")
            if rows and len(rows) < s.rounds:
                note = _join(note, f"{len(rows)} of {s.rounds} rounds (slow: time budget)")
            out.append(_rate_result("queue", work, impl, rows, note, errors.get(impl)))
    return out


def _rate_result(section: str, work: str, impl: str, rows: list[tuple[int, float]], note: str,
                 error: str | None) -> Result:
    rates = [n / sec for n, sec in rows if sec > 0]
    if not rates and error is None:
        error = "no round completed"
    return Result(section, work, impl, rows[0][0] if rows else 0, sum(x for _, x in rows),
                  rates=rates, limit=impl == LIMIT_QUEUE, coord=impl == "coord", note=note,
                  error=error)


def _queue_note(impl: str) -> str:
    return {
        "coord": "claim with a lease and a token, ack by token in the next claim's "
                 "transaction",
        LIMIT_QUEUE: "one table, no index: UPDATE … RETURNING, DELETE; waits by 1 ms polls",
        RAW_SCHEMA: "coord's schema and statements, no checks, no Python around them; "
                    "waits by 1 ms polls",
        "persist-queue": "SQLiteAckQueue(multithreading=True), synchronous=FULL (its default)",
        "litequeue": "WAL, synchronous=NORMAL (its default)",
        "huey (no ack)": "SqliteStorage: a claim deletes the job (no lease, no ack)",
        "file-per-job dir": "tmp + rename; claim by rename; ack by unlink; no fsync",
    }.get(impl, "")


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s)


def queue_fanout(ctx: Context, impls: list[str]) -> list[Result]:
    """1 producer and 4 consumer processes at once: jobs/s from the first put to the last ack.
    coord and the raw references run in every round (back to back, rotated); the others in
    the first. persist-queue is also run as 4 consumer threads in one process (what it
    supports)."""
    s = ctx.sizes
    rates: dict[str, list[tuple[int, float]]] = {}
    notes: dict[str, dict[str, None]] = {}
    errors: dict[str, str] = {}
    for r in range(s.rounds):
        order = _in_turn(impls, r)
        runs: list[tuple[str, str, int, int]] = [(i, i, 4, 1) for i in order
                                                 if r == 0 or i in TRIO]
        if r == 0 and "persist-queue" in impls:
            runs.append(("persist-queue", "persist-queue (4 threads)", 1, 4))
        for impl, label, procs, threads in runs:
            if label in errors:
                continue
            got = _fanout_round(ctx, impl, label, procs, threads, r)
            if isinstance(got, str):
                errors[label] = got
                continue
            rates.setdefault(label, []).append(got[0])
            notes.setdefault(label, {})[got[1]] = None  # distinct notes, in order
    labels = [x for x in dict.fromkeys([*impls, *rates, *errors]) if x in rates or x in errors]
    return [_rate_result("queue", "1 producer + 4 consumers", label, rates.get(label, []),
                         "; ".join(notes.get(label, {})), errors.get(label)) for label in labels]


def _fanout_round(ctx: Context, impl: str, label: str, procs: int, threads: int, r: int
                  ) -> tuple[tuple[int, float], str] | str:
    """One 1-producer, 4-consumer run: ((jobs, seconds), note), or the error text."""
    s = ctx.sizes
    d = ctx.fresh_dir(f"fan-{_slug(label)}-{r}")
    consumers: list[subprocess.Popen[str]] = []
    try:
        _setup_queue(impl, d)
        consumers = [start_worker("q_consume", impl=impl, dir=str(d), threads=threads,
                                  timebox=s.timebox, want_ids=True, patience=30.0)
                     for _ in range(procs)]
        for c in consumers:
            wait_line(c, "ready")
        p = run_worker("q_put", impl=impl, dir=str(d), n=s.fan_jobs, warmup=0,
                       timebox=s.timebox, stops=procs * threads)
        got = [finish(c) for c in consumers]
        ids = [i for g in got for i in g["ids"]]
        last = max((g["last"] for g in got if g["last"] is not None), default=None)
        seconds = (last - p["start"]) if last is not None else 0.0
        unique = len(set(ids))
        note = f"{procs} processes" if procs > 1 else f"{threads} threads in 1 process"
        if len(ids) != unique:
            note = _join(note, f"UNSAFE: {len(ids) - unique} of {unique} jobs delivered "
                               "twice")
        if unique < p["n"]:
            note = _join(note, f"{p['n'] - unique} jobs never claimed")
        if any(g["boxed"] for g in got) or p["n"] < s.fan_jobs:
            note = _join(note, f"time-boxed at {s.timebox:.0f} s")
        return (unique, seconds), note
    except WorkerFailed as e:
        return str(e)
    finally:
        for c in consumers:
            stop_worker(c)


def queue_latency(ctx: Context, impls: list[str]) -> list[Result]:
    """One producer paced at 200 jobs/s, one waiting consumer: put → claimed, per job."""
    s = ctx.sizes
    out = []
    for impl in impls:
        d = ctx.fresh_dir(f"lat-{_slug(impl)}")
        c = None
        try:
            _setup_queue(impl, d)
            c = start_worker("q_consume", impl=impl, dir=str(d), timebox=60.0, patience=30.0)
            wait_line(c, "ready")
            run_worker("q_put", impl=impl, dir=str(d), n=s.lat_jobs, warmup=s.lat_warmup,
                       rate=200.0, timebox=60.0, stops=1)
            got = finish(c)
            lat = got["latencies_us"]
            wait = "claim(timeout=) wakes on a nudge" if QUEUE_IMPLS[impl].native_wait else \
                "polls every 1 ms when empty"
            if impl == "huey (no ack)":
                wait += " (huey's own consumer polls every 0.1 s, backing off)"
            if impl == "persist-queue":
                wait += " (its blocking get() waits on an in-process event: up to 10 s " \
                        "across processes)"
            out.append(Result("queue", "latency at 200 jobs/s", impl, len(lat),
                              sum(lat) / 1e6, lat, limit=impl == LIMIT_QUEUE,
                              coord=impl == "coord", note=wait,
                              error=None if lat else "no job arrived"))
        except WorkerFailed as e:
            out.append(Result("queue", "latency at 200 jobs/s", impl, 0, 0.0, error=str(e),
                              coord=impl == "coord", limit=impl == LIMIT_QUEUE))
        finally:
            if c is not None:
                stop_worker(c)
    return out


#: Who claims and acks in batches (claim_many/ack_many; one UPDATE … LIMIT n and one
#: executemany of DELETEs for the minimal queue), and how many jobs a batch takes.
BATCH_IMPLS = ("coord", LIMIT_QUEUE)
BATCH = 10


def queue_batches(ctx: Context) -> list[Result]:
    """One consumer draining the queue BATCH jobs at a time: claim a batch in one
    transaction, ack it in one; coord and the minimal queue back to back in every round."""
    s = ctx.sizes
    work = f"claim+ack, batches of {BATCH} (1 consumer)"
    rows: dict[str, list[tuple[int, float]]] = {i: [] for i in BATCH_IMPLS}
    errors: dict[str, str] = {}
    for r in range(s.rounds):
        for impl in _rotate(list(BATCH_IMPLS), r):
            if impl in errors:
                continue
            d = ctx.fresh_dir(f"batch-{_slug(impl)}-{r}")
            try:
                _setup_queue(impl, d)
                p = run_worker("q_put", impl=impl, dir=str(d), n=s.jobs, warmup=s.warmup,
                               timebox=s.timebox)
                c = run_worker("q_consume", impl=impl, dir=str(d), expect=p["n"] + s.warmup,
                               warmup=s.warmup, timebox=s.timebox, batch=BATCH)
                rows[impl].append((c["n"], c["seconds"]))
            except WorkerFailed as e:
                errors[impl] = str(e)
    note = {"coord": f"claim_many({BATCH}), ack_many: one transaction each",
            LIMIT_QUEUE: f"UPDATE … LIMIT {BATCH} RETURNING; DELETEs in one transaction"}
    return [_rate_result("queue", work, impl, rows[impl], note[impl], errors.get(impl))
            for impl in BATCH_IMPLS]


#: ``--size`` without a value: the depths put and claim+ack run at.
DEPTHS = (1000, 10_000, 100_000)


def section_queue(ctx: Context) -> list[Result]:
    impls = list(QUEUE_IMPLS)
    depths: list[int | None] = list(ctx.depths) if ctx.depths else [None]
    out = [r for jobs in depths for r in queue_put_claim(ctx, impls, jobs)]
    return out + queue_batches(ctx) + queue_fanout(ctx, impls) + queue_latency(ctx, impls)


# -- section 3: messages ----------------------------------------------------------------------


@worker
def w_msg_coord(spec: dict[str, Any]) -> None:
    """Answer every request with its own payload until "stop"."""
    import coord
    from coord import messages
    store = coord.Store(spec["db"])
    inst = coord.register(store, spec["id"], app="bench")
    print("ready", flush=True)
    while True:
        m = messages.receive(inst, timeout=None)
        if m is None:
            continue
        m.reply(m.payload)
        if m.payload == "stop":
            break
    inst.close()
    store.close()


@worker
def w_msg_pipe(spec: dict[str, Any]) -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        payload = json.loads(line)
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
        if payload == "stop":
            break


def _drop_file(directory: str, tmp: str, name: str, payload: Any) -> None:
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(json.dumps(payload))
    os.rename(path, os.path.join(directory, name))


def _take_file(directory: str) -> Any | None:
    names = os.listdir(directory)
    if not names:
        return None
    path = os.path.join(directory, min(names))
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    return json.loads(text)


@worker
def w_msg_files(spec: dict[str, Any]) -> None:
    """File-per-message IPC: poll the inbox every 1 ms; reply into the sender's inbox."""
    inbox, tmp = spec["inbox"], spec["tmp"]
    print("ready", flush=True)
    while True:
        msg = _take_file(inbox)
        if msg is None:
            time.sleep(POLL)
            continue
        _drop_file(msg["reply_to"], tmp, f"{msg['id']}.json", msg["payload"])
        if msg["payload"] == "stop":
            break


def section_messages(ctx: Context) -> list[Result]:
    import coord
    from coord import messages

    s = ctx.sizes
    d = ctx.fresh_dir("msg")
    store = coord.Store(d / "coord.db")
    me = coord.register(store, "bench-client", app="bench")
    boxes = {x: str(d / x) for x in ("server", "client", "tmp")}
    for path in boxes.values():
        os.mkdir(path, 0o700)
    servers = {
        "coord": start_worker("msg_coord", db=str(d / "coord.db"), id="bench-server"),
        "pipe": start_worker("msg_pipe"),
        "file-per-message dir": start_worker("msg_files", inbox=boxes["server"],
                                             tmp=boxes["tmp"]),
    }
    seq = iter(range(10**9))

    def via_coord(payload: Any) -> Any:
        return messages.request(me, "bench-server", payload, timeout=30).payload

    def via_pipe(payload: Any) -> Any:
        p = servers["pipe"]
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(payload) + "\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    def via_files(payload: Any) -> Any:
        i = next(seq)
        _drop_file(boxes["server"], boxes["tmp"], f"{i:012d}.json",
                   {"id": f"{i:012d}", "reply_to": boxes["client"], "payload": payload})
        end = mono() + 30
        while mono() < end:
            got = _take_file(boxes["client"])
            if got is not None:
                return got
            time.sleep(POLL)
        raise TimeoutError("no reply file within 30 s")

    ops: dict[str, Callable[[Any], Any]] = {
        "coord": via_coord, "pipe": via_pipe, "file-per-message dir": via_files}
    lats: dict[str, list[float]] = {k: [] for k in ops}
    errors: dict[str, str] = {}
    try:
        for k, p in servers.items():
            try:
                wait_line(p, "ready")
            except WorkerFailed as e:
                errors[k] = str(e)
        rounds = max(1, s.rounds)
        for r in range(rounds):
            for k in _rotate(list(ops), r):
                if k in errors:
                    continue
                count = s.rtt // rounds + (s.rtt_warmup if r == 0 else 0)
                try:
                    for i in range(count):
                        payload = {"n": i, "ask": "status"}
                        t = time.perf_counter()
                        answer = ops[k](payload)
                        dt = (time.perf_counter() - t) * 1e6
                        if answer != payload:
                            raise WorkerFailed(f"wrong reply {answer!r} to {payload!r}")
                        if r > 0 or i >= s.rtt_warmup:
                            lats[k].append(dt)
                except Exception as e:  # a broken reference is reported, not fatal
                    errors[k] = f"{type(e).__name__}: {e}"
        for k in ops:
            if k not in errors:
                with contextlib.suppress(Exception):
                    ops[k]("stop")
    finally:
        for p in servers.values():
            stop_worker(p)
        me.close()
        store.close()
    notes = {
        "coord": "messages.request(); the responder waits in receive(timeout=None)",
        "pipe": "a JSON line each way over two pipes",
        "file-per-message dir": "a JSON file per message (tmp + rename), inboxes polled "
                                "every 1 ms",
    }
    return [Result("messages", "request→reply round trip", k, len(lats[k]), sum(lats[k]) / 1e6,
                   lats[k], limit=k == "pipe", coord=k == "coord", note=notes[k], per_op=True,
                   error=errors.get(k) or (None if lats[k] else "no round trip"))
            for k in ops]


# -- section 4: failover -----------------------------------------------------------------------

LEASE = "bench/leader"
TTL, TTL_RENEW, TTL_POLL = 2.0, 0.5, 0.05


@worker
def w_fo_candidate(spec: dict[str, Any]) -> None:
    """Wait for the lock/lease; print "acquired <CLOCK_MONOTONIC>" the moment it is held;
    hold it until killed."""
    impl, d = spec["impl"], Path(spec["dir"])
    if impl == "coord":
        import coord
        from coord.leases import acquire
        store = coord.Store(d / "coord.db")
        inst = coord.register(store, app="bench")
        print("waiting", flush=True)
        acquire(inst, LEASE)
        print("acquired", mono(), flush=True)
        while True:
            time.sleep(1)
    elif impl == "kernel lock (F_SETLKW)":
        fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        print("waiting", flush=True)
        fcntl.lockf(fd, fcntl.LOCK_EX)  # F_SETLKW: the kernel wakes us when it is free
        print("acquired", mono(), flush=True)
        while True:
            time.sleep(1)
    elif impl == "filelock":
        from filelock import FileLock
        lock = FileLock(str(d / "filelock.lock"))
        print("waiting", flush=True)
        lock.acquire()  # default: no timeout, polls every 0.05 s
        print("acquired", mono(), flush=True)
        while True:
            time.sleep(1)
    elif impl == "TTL lease row":
        c = _raw_connection(d / "ttl.db")
        me = str(os.getpid())
        print("waiting", flush=True)
        while True:
            now = mono()
            c.execute("BEGIN IMMEDIATE")
            c.execute("UPDATE lease SET holder = ?, expires = ? WHERE name = ? AND expires < ?",
                      (me, now + TTL, LEASE, now))
            took = c.changes() > 0
            c.execute("COMMIT")
            if took:
                break
            time.sleep(TTL_POLL)
        print("acquired", mono(), flush=True)
        while True:
            time.sleep(TTL_RENEW)
            c.execute("UPDATE lease SET expires = ? WHERE name = ? AND holder = ?",
                      (mono() + TTL, LEASE, me))
    else:
        raise SystemExit(f"unknown impl {impl}")


FAILOVER_IMPLS = ["coord", "kernel lock (F_SETLKW)", "filelock", "TTL lease row"]
CANDIDATES = 3


class Pool:
    """CANDIDATES candidate processes; reads "waiting"/"acquired" lines from all of them."""

    def __init__(self, impl: str, d: Path) -> None:
        self.impl, self.d = impl, d
        self.sel = selectors.DefaultSelector()
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.waiting: set[int] = set()
        self.bufs: dict[int, bytes] = {}

    def spawn(self) -> None:
        p = start_worker("fo_candidate", impl=self.impl, dir=str(self.d))
        assert p.stdout is not None
        os.set_blocking(p.stdout.fileno(), False)
        self.procs[p.pid] = p
        self.bufs[p.pid] = b""
        self.sel.register(p.stdout.fileno(), selectors.EVENT_READ, p.pid)

    def forget(self, pid: int) -> subprocess.Popen[str]:
        """Stop listening to a candidate (before it is killed: its pipe then ends)."""
        p = self.procs.pop(pid)
        assert p.stdout is not None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(p.stdout.fileno())
        self.waiting.discard(pid)
        self.bufs.pop(pid, None)
        return p

    def kill(self, pid: int) -> None:
        stop_worker(self.forget(pid))

    def next_event(self, timeout: float) -> tuple[int, str]:
        """The next line any candidate printed: (pid, line)."""
        end = time.monotonic() + timeout
        while True:
            for pid, buf in self.bufs.items():
                if b"\n" in buf:
                    line, rest = buf.split(b"\n", 1)
                    self.bufs[pid] = rest
                    text = line.decode()
                    if text.startswith("waiting"):
                        self.waiting.add(pid)
                    elif text.startswith("acquired"):
                        self.waiting.discard(pid)
                    return pid, text
            left = end - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"{self.impl}: no candidate progressed within {timeout:.0f} s")
            for key, _ in self.sel.select(left):
                pid = key.data
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    self.sel.unregister(key.fd)
                    raise WorkerFailed(f"{self.impl}: candidate {pid} exited: "
                                       f"{_stderr(self.procs[pid])}")
                self.bufs[pid] += chunk

    def acquired(self, timeout: float) -> tuple[int, float]:
        while True:
            pid, text = self.next_event(timeout)
            if text.startswith("acquired"):
                return pid, float(text.split()[1])

    def close(self) -> None:
        for pid in list(self.procs):
            self.kill(pid)
        self.sel.close()


def failover_trials(impl: str, d: Path, trials: int) -> list[float]:
    """SIGKILL the holder ``trials`` times; each takeover latency in µs (CLOCK_MONOTONIC from
    just before the kill to the moment the next holder's wait returned)."""
    if impl == "TTL lease row":
        c = _raw_connection(d / "ttl.db")
        c.execute("CREATE TABLE lease (name TEXT PRIMARY KEY, holder TEXT, expires REAL)")
        c.execute("INSERT INTO lease VALUES (?, '', 0)", (LEASE,))
        c.close()
    waiters: Path | None = None
    if impl == "coord":
        import coord
        store = coord.Store(d / "coord.db")
        waiters = store.side_dir("waiters")  # where acquire() records that it waits
        store.close()
    pool = Pool(impl, d)
    out = []
    try:
        for _ in range(CANDIDATES):
            pool.spawn()
        holder, _ = pool.acquired(60)
        for _ in range(trials):
            end = time.monotonic() + 60
            while len(pool.waiting) < CANDIDATES - 1 or (
                    waiters is not None and _coord_waiters(waiters) < CANDIDATES - 1):
                if time.monotonic() > end:
                    raise WorkerFailed(f"{impl}: candidates did not all wait")
                with contextlib.suppress(WorkerFailed):
                    pool.next_event(0.005)
            time.sleep(0.2)  # let every waiter enter its wait, and the newcomer settle
            if impl == "TTL lease row":
                time.sleep(random.uniform(0, TTL_RENEW))  # kill at any point of the renew cycle
            victim = pool.forget(holder)
            t0 = mono()
            os.kill(holder, signal.SIGKILL)
            nxt, t1 = pool.acquired(60)
            out.append((t1 - t0) * 1e6)
            stop_worker(victim)
            holder = nxt
            pool.spawn()
    finally:
        pool.close()
    return out


def _coord_waiters(d: Path) -> int:
    """How many coord candidates have set up their wait on LEASE."""
    from coord.leases import _waiter_prefix
    prefix = _waiter_prefix(LEASE)
    with contextlib.suppress(OSError):
        return sum(1 for x in os.listdir(d) if x.startswith(prefix))
    return 0


def section_failover(ctx: Context) -> list[Result]:
    s = ctx.sizes
    notes = {
        "coord": "acquire() waits on the holder's pidfd and a nudge; proof of death by its "
                 "record lock",
        "kernel lock (F_SETLKW)": "lockf(LOCK_EX) blocked in the kernel",
        "filelock": "FileLock.acquire() at its default 0.05 s poll",
        "TTL lease row": f"{TTL:.0f} s TTL renewed every {TTL_RENEW} s, polled every "
                         f"{TTL_POLL * 1000:.0f} ms",
    }
    out = []
    for impl in FAILOVER_IMPLS:
        trials = s.ttl_kills if impl == "TTL lease row" else s.kills
        d = ctx.fresh_dir(f"fo-{_slug(impl)}")
        err = None
        try:
            lat = failover_trials(impl, d, trials)
        except (WorkerFailed, OSError) as e:
            lat, err = [], str(e)
        out.append(Result("failover", "SIGKILL holder → next holder", impl, len(lat),
                          sum(lat) / 1e6, lat, limit=impl == "kernel lock (F_SETLKW)",
                          coord=impl == "coord", note=f"{CANDIDATES} candidates; "
                          + notes[impl], error=err))
    return out


# -- section 5: registry -------------------------------------------------------------------------
# Filling a registry with a thousand real Python processes would measure the machine, not
# the registry. Alive rows: HELPERS real processes each hold the record locks of their share
# of the lock files (one per row, as real instances have); the rows carry a helper's pid and
# start token. Judging a row thus does the real work: a /proc read for its pid (cached per
# listing: the file registry's pid checks are cached alike) and an F_GETLK on its own lock
# file. Dead rows: each its own pid that does not exist and its own unheld lock file.

HELPERS = 4

HOLDER = """
import sys
from coord.identity import hold_lock
paths = sys.stdin.readline().split()
fds = [hold_lock(p) for p in paths]
print("ready", flush=True)
sys.stdin.read()
"""


def _insert_instances(store: coord.Store, rows: list[tuple[Any, ...]]) -> None:
    from coord.db import next_counter

    def txn(c: apsw.Connection) -> None:
        base = next_counter(c, "incarnation")
        c.execute("UPDATE counters SET value = value + ? WHERE name = 'incarnation'", (len(rows),))
        c.executemany(
            "INSERT INTO instances (id, incarnation, app, pid, start_token, boot_id, pidns, uid, "
            "user, host, cmdline, lock_path, ttl, started_at, heartbeat_at, heartbeat_mono) "
            "VALUES (?, ?, 'bench', ?, ?, ?, ?, ?, 'bench', 'localhost', '[\"bench\"]', ?, ?, ?, ?,"
            " ?)",
            [(r[0], base + i, *r[1:]) for i, r in enumerate(rows)],
        )

    store.write(txn)


def _start_helpers(paths: list[str]) -> list[subprocess.Popen[str]]:
    helpers = []
    for h in range(HELPERS):
        p = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=_worker_env())
        assert p.stdin is not None
        p.stdin.write(" ".join(paths[h::HELPERS]) + "\n")
        p.stdin.flush()
        helpers.append(p)
    for p in helpers:
        wait_line(p, "ready")
    return helpers


def _end_helpers(helpers: list[subprocess.Popen[str]]) -> None:
    for p in helpers:
        with contextlib.suppress(Exception):
            assert p.stdin is not None
            p.stdin.close()
        with contextlib.suppress(Exception):
            p.wait(timeout=30)
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()


def _free_pids(n: int) -> list[int]:
    used = {int(x) for x in os.listdir("/proc") if x.isdigit()}
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    free = [p for p in range(pid_max - 1, 300, -1) if p not in used]
    if len(free) < n:
        raise WorkerFailed(f"only {len(free)} free pids below pid_max {pid_max}")
    return free[:n]


class FileRegistry:
    """The file-per-PID registry coord replaces: ``{pid}.json`` with pid, username, cmdline,
    create_time, status; alive = the pid exists with the same create time (psutil)."""

    def __init__(self, d: Path) -> None:
        import psutil
        self.psutil = psutil
        self.d = d
        d.mkdir(mode=0o700, exist_ok=True)

    def register(self, key: str, pid: int, create_time: float) -> None:
        entry = {"pid": pid, "username": "bench", "cmdline": "python -m bench",
                 "create_time": create_time, "status": "running"}
        tmp = self.d / f".{key}.tmp"
        tmp.write_text(json.dumps(entry))
        os.rename(tmp, self.d / f"{key}.json")

    def _alive(self, pid: int, created: float, cache: dict[tuple[int, float], bool]) -> bool:
        got = cache.get((pid, created))
        if got is None:
            try:
                got = abs(self.psutil.Process(pid).create_time() - created) < 1.0
            except self.psutil.Error:
                got = False
            cache[(pid, created)] = got
        return got

    def scan(self, reap: bool) -> tuple[int, int]:
        """(alive, removed): read every entry, judge it; with ``reap``, unlink the dead."""
        cache: dict[tuple[int, float], bool] = {}
        alive = removed = 0
        for name in os.listdir(self.d):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.d, name)
            try:
                with open(path) as f:
                    e = json.load(f)
                ok = self._alive(int(e["pid"]), float(e["create_time"]), cache)
            except (OSError, ValueError, KeyError, TypeError):
                ok = False  # cut off mid-write, or unreadable: stale
            if ok:
                alive += 1
            elif reap:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed += 1
        return alive, removed


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    r = fn()
    return (time.perf_counter() - t) * 1e6, r


def registry_size(n: int, rounds: int, workdir: Path) -> dict[str, dict[str, list[float]]]:
    """{work: {impl: latencies µs}} for one registry size."""
    import psutil

    import coord
    from coord.clock import boot_id
    from coord.identity import pid_namespace, start_token
    from coord.instances import list_instances, register
    from coord.reaper import reap

    d = workdir / f"n{n}"
    d.mkdir(mode=0o700)
    store = coord.Store(d / "coord.db")
    files = FileRegistry(d / "registry")
    lat: dict[str, dict[str, list[float]]] = {}

    def add(work: str, impl: str, us: float) -> None:
        lat.setdefault(work, {}).setdefault(impl, []).append(us)

    try:
        locks = store.side_dir("locks")
        paths = [str(locks / f"live-{i}.lock") for i in range(n)]
        helpers = _start_helpers(paths)
        try:
            mono_now, wall = store.mono(), store.wall()
            boot, ns, uid = boot_id(), pid_namespace(), os.geteuid()
            rows = []
            for h, p in enumerate(helpers):
                token, created = start_token(p.pid), psutil.Process(p.pid).create_time()
                for j, path in enumerate(paths[h::HELPERS]):
                    rows.append((f"live-{h}-{j}", p.pid, token, boot, ns, uid, path, 3600.0,
                                 wall, wall, mono_now))
                    files.register(f"{p.pid}-{j}", p.pid, created)
            _insert_instances(store, rows)
            me = psutil.Process().create_time()
            for i in range(100 if n >= 100 else 20):
                us, inst = _timed(lambda i=i: register(store, f"reg-{i}", app="bench",
                                                       heartbeat=False, handle_signals=False))
                add("register", "coord", us)
                inst.close()
                us, _ = _timed(lambda i=i: files.register(f"{os.getpid()}-r{i}", os.getpid(), me))
                add("register", "file-per-PID", us)
                os.unlink(files.d / f"{os.getpid()}-r{i}.json")
            for _ in range(rounds):
                us, alive = _timed(lambda: list_instances(store))
                assert len(alive) == n, (len(alive), n)
                add("list alive", "coord", us)
                us, (seen, _) = _timed(lambda: files.scan(reap=False))
                assert seen == n, (seen, n)
                add("list alive", "file-per-PID", us)
                us, report = _timed(lambda: reap(store, checkpoint=False))
                assert not report.dead
                add("reap, nothing dead", "coord", us)
                us, (_, gone) = _timed(lambda: files.scan(reap=True))
                assert gone == 0
                add("reap, nothing dead", "file-per-PID", us)
        finally:
            _end_helpers(helpers)
        store.write(lambda c: c.execute("DELETE FROM instances"))
        for f in files.d.iterdir():
            f.unlink()
        for r in range(max(1, min(rounds, 3))):
            mono_now, wall = store.mono(), store.wall()
            rows = []
            for i, pid in enumerate(_free_pids(n)):
                lock = locks / f"dead{r}-{i}.lock"
                lock.touch(mode=0o600)
                rows.append((f"dead{r}-{i}", pid, 12345, boot, ns, uid, str(lock), 15.0, wall,
                             wall, mono_now))
                files.register(str(pid), pid, 1.0e9)
            _insert_instances(store, rows)
            us, report = _timed(lambda: reap(store))
            assert len(report.dead) == n, (len(report.dead), n)
            add("reap, all dead", "coord", us)
            us, (_, gone) = _timed(lambda: files.scan(reap=True))
            assert gone == n, (gone, n)
            add("reap, all dead", "file-per-PID", us)
    finally:
        store.close()
    return lat


def section_registry(ctx: Context) -> list[Result]:
    s = ctx.sizes
    notes = {
        ("register", "coord"): "register(): lock file, socket, row (no heartbeat thread)",
        ("register", "file-per-PID"): "write {pid}.json (tmp + rename)",
        ("list alive", "coord"): "list_instances(): every verdict (pid, start token, F_GETLK)",
        ("list alive", "file-per-PID"): "read every file, pid + create time check (cached per "
                                        "pid)",
        ("reap, all dead", "coord"): "reap(): death rule, events, lock files, WAL checkpoint",
        ("reap, all dead", "file-per-PID"): "read every file, unlink the dead",
    }
    out = []
    work_dir = ctx.fresh_dir("registry")
    for n in s.reg_sizes:
        try:
            lat = registry_size(n, s.reg_rounds, work_dir)
        except (WorkerFailed, AssertionError, OSError) as e:
            for work in ("register", "list alive", "reap, nothing dead", "reap, all dead"):
                for impl in ("coord", "file-per-PID"):
                    out.append(Result("registry", f"{work} (N={n})", impl, 0, 0.0,
                                      coord=impl == "coord", error=f"{type(e).__name__}: {e}"))
            continue
        for work, by_impl in lat.items():
            for impl, xs in by_impl.items():
                out.append(Result("registry", f"{work} (N={n})", impl, len(xs), sum(xs) / 1e6,
                                  xs, coord=impl == "coord", note=notes.get((work, impl), "")))
    return out


# -- section 6: CLI cold start ------------------------------------------------------------------


def section_cli(ctx: Context) -> list[Result]:
    import coord
    s = ctx.sizes
    d = ctx.fresh_dir("cli")
    db = d / "coord.db"
    store = coord.Store(db)
    inst = coord.register(store, "bench-cli", app="bench", heartbeat=False, handle_signals=False)
    env = {**_worker_env(), "COORD_DB": str(db)}
    py = sys.executable
    cmds = {
        "coord instances --json": [py, "-m", "coord", "instances", "--json"],
        'coord sql "select 1"': [py, "-m", "coord", "sql", "select 1"],
        "python -c pass": [py, "-c", "pass"],
        'python -c "import typer"': [py, "-c", "import typer"],
    }
    lat: dict[str, list[float]] = {k: [] for k in cmds}
    errors: dict[str, str] = {}
    try:
        for r in range(s.cli_runs + 1):  # the first run of each warms the page cache
            for k in _rotate(list(cmds), r):
                if k in errors:
                    continue
                t = time.perf_counter()
                p = subprocess.run(cmds[k], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, check=False)
                dt = (time.perf_counter() - t) * 1e6
                if p.returncode != 0:
                    last = [x for x in p.stderr.strip().splitlines() if x.strip()][-1:]
                    errors[k] = f"exit {p.returncode}: {' '.join(last)[-300:]}"
                elif r > 0:
                    lat[k].append(dt)
    finally:
        inst.close()
        store.close()
    out = []
    for work in ("coord instances --json", 'coord sql "select 1"'):
        for k in (work, "python -c pass", 'python -c "import typer"'):
            out.append(Result("cli", f"cold start: {work}", k, len(lat[k]), sum(lat[k]) / 1e6,
                              lat[k], coord=k == work, limit=k == "python -c pass",
                              note="same interpreter, wall time of the whole process",
                              error=errors.get(k)))
    return out


#: Every section, in order.
SECTIONS: list[Callable[[Context], list[Result]]] = [
    section_transactions, section_queue, section_messages, section_failover,
    section_registry, section_cli,
]


def section_name(fn: Callable[[Context], list[Result]]) -> str:
    return fn.__name__.removeprefix("section_")


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    section: str
    text: str
    work: str  # ending in "*": every work whose name starts so (each --size depth)
    impl: str  # the row measured against the bound (coord's)
    bound: float
    versus: str | None = None  # a reference: the bound is a ratio coord/versus
    value: str = "figure"  # "figure" (ops/s or p50) or "p99"
    at_most: bool = False  # a ratio that must stay below the bound (latencies)


#: The targets of the issue this benchmark tracks: ratios to the limit in the same run where
#: there is one, absolute bounds (µs) otherwise.
TARGETS = [
    Target("queue", "claim+ack ≥ 0.5 × the minimal queue", "claim+ack (1 consumer*", "coord",
           0.5, LIMIT_QUEUE),
    Target("queue", "claim+ack ahead of litequeue", "claim+ack (1 consumer*", "coord", 1.0,
           "litequeue"),
    Target("queue", "claim+ack ahead of huey", "claim+ack (1 consumer*", "coord", 1.0,
           "huey (no ack)"),
    Target("queue", "put ≥ 0.6 × the minimal queue", "put (1 producer*", "coord", 0.6,
           LIMIT_QUEUE),
    Target("queue", "1 producer + 4 consumers ≥ 0.4 × the minimal queue",
           "1 producer + 4 consumers", "coord", 0.4, LIMIT_QUEUE),
    Target("queue", "latency at 200 jobs/s p50 ≤ 0.5 ms", "latency at 200 jobs/s", "coord", 500),
    Target("messages", "request→reply p50 ≤ 0.4 ms", "request→reply round trip", "coord", 400),
    Target("messages", "request→reply p99 ≤ 3 ms", "request→reply round trip", "coord",
           3000, value="p99"),
    Target("failover", "failover p50 ≤ 2 × the kernel's handover", "SIGKILL holder → next holder",
           "coord", 2.0, "kernel lock (F_SETLKW)", at_most=True),
    Target("failover", "failover p99 ≤ 10 ms", "SIGKILL holder → next holder", "coord", 10_000,
           value="p99"),
    Target("registry", "list 1 000 alive ≤ 50 ms", "list alive (N=1000)", "coord", 50_000),
    Target("registry", "reap 10 000 dead ≤ 1 s", "reap, all dead (N=10000)", "coord",
           1_000_000),
    Target("cli", "coord instances --json cold start ≤ 4 × python -c pass",
           "cold start: coord instances --json", "coord instances --json", 4.0,
           "python -c pass", at_most=True),
]


def _target_works(t: Target, results: list[Result]) -> list[tuple[str, str]]:
    """(work, the target's text for it) of every work ``t`` applies to in ``results``."""
    if not t.work.endswith("*"):
        return [(t.work, t.text)]
    works = dict.fromkeys(r.work for r in results if r.section == t.section
                          and r.work.startswith(t.work[:-1]))
    return [(w, t.text + (f" ({w[len(t.work) - 1:].strip(' ,)')})" if w[len(t.work) - 1:]
                          not in ("", ")") else "")) for w in works]


def check_targets(results: list[Result]) -> list[dict[str, Any]]:
    by = {(r.section, r.work, r.impl): r for r in results}
    out = []
    for t in TARGETS:
        for work, text in _target_works(t, results):
            row = by.get((t.section, work, t.impl))
            if row is None:
                continue  # not measured at this size
            met: bool | None
            limit_value = None
            if t.versus is not None:
                ref = by.get((t.section, work, t.versus))
                value = None if ref is None else ref.ratio(row)
                met = None if value is None else (value <= t.bound if t.at_most
                                                  else value >= t.bound)
                limit = next((r for r in results if r.section == t.section and r.work == work
                              and r.limit), None)
                if ref is not None and limit is not None and limit is not ref:
                    limit_value = ref.ratio(limit)  # what the limit itself reaches in this run
            else:
                value = row.pct(0.99) if t.value == "p99" else row.figure()
                met = None if value is None else value <= t.bound
            out.append({"section": t.section, "target": text, "value": value if t.versus
                        else _round(value), "unit": "ratio" if t.versus else "us", "met": met,
                        "limit_value": limit_value})
    return out


# -- output -------------------------------------------------------------------------------------


def summarise(results: list[Result]) -> list[dict[str, Any]]:
    ours = {(r.section, r.work): r for r in results if r.coord}
    return [r.summary(ours.get((r.section, r.work))) for r in results]


def section_objects(results: list[Result], run: dict[str, Any]) -> list[dict[str, Any]]:
    """One JSON object per section: every row, and per work coord's figure, each
    reference's figure and coord's ratio to each; the targets checked."""
    targets = check_targets(results)
    out = []
    for name in dict.fromkeys(r.section for r in results):
        rows = [r for r in results if r.section == name]
        works = []
        for work in dict.fromkeys(r.work for r in rows):
            group = [r for r in rows if r.work == work]
            ours = next((r for r in group if r.coord), None)
            refs = [r for r in group if r is not ours]
            works.append({
                "work": work,
                "metric": group[0].metric,
                "better": "higher" if group[0].metric == "ops/s" else "lower",
                "coord": None if ours is None else {
                    "impl": ours.impl, "figure": _round(ours.figure()),
                    "p99_us": _round(ours.pct(0.99)), "error": ours.error},
                "references": [{"impl": r.impl, "limit": r.limit, "figure": _round(r.figure()),
                                "p99_us": _round(r.pct(0.99)), "error": r.error,
                                "coord_ratio": None if ours is None else r.ratio(ours)}
                               for r in refs],
            })
        out.append({"section": name, "run": run, "works": works,
                    "targets": [t for t in targets if t["section"] == name],
                    "rows": summarise(rows)})
    return out


def _fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt_ratio(x: float | None, metric: str) -> str:
    if x is None:
        return ""
    text = f"{x:.2f}" if x < 10 else f"{x:.0f}"
    faster = x > 1 if metric == "ops/s" else x < 1
    return f"{text}× ({'faster' if faster else 'slower'})" if x != 1 else "1.00×"


def print_table(results: list[Result], out: Any = None) -> None:
    out = out or sys.stdout
    cols = ["WORK", "IMPLEMENTATION", "N", "OPS/S", "P50 ms", "P99 ms", "COORD ÷ THIS", "NOTE"]
    cells: list[list[str] | str] = []
    ours = {(r.section, r.work): r for r in results if r.coord}
    for name in dict.fromkeys(r.section for r in results):
        cells.append(f"== {name} ==")
        cells.append(cols)
        last_work = None
        for r in (x for x in results if x.section == name):
            mine = ours.get((r.section, r.work))
            ratio = "" if mine is None or r is mine else _fmt_ratio(r.ratio(mine), r.metric)
            if r.error is not None:
                row = [r.work, r.impl, "-", "-", "-", "-", "", f"FAILED: {r.error}"]
            else:
                ops = r.ops_per_s
                metric_mark = "*" if r.rates else ""
                row = [r.work if r.work != last_work else "", r.impl + (" (limit)" if r.limit
                                                                        else ""),
                       str(r.n), "-" if ops is None else f"{ops:,.0f}{metric_mark}",
                       _fmt_us(r.pct(0.5)), _fmt_us(r.pct(0.99)), ratio, r.note]
            last_work = r.work
            cells.append(row)
        for t in check_targets([r for r in results if r.section == name]):
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            value = "-" if t["value"] is None else (
                f"{t['value']:.2f}" if t["unit"] == "ratio" else f"{t['value'] / 1000:.2f} ms")
            also = "" if t["limit_value"] is None else \
                f" (the limit itself: {t['limit_value']:.2f})"
            cells.append(f"   target {t['target']}: {value} → {verdict}{also}")
        cells.append("")
    table = [c for c in cells if isinstance(c, list)]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    for c in cells:
        if isinstance(c, str):
            print(c, file=out)
            continue
        print("  ".join([x.ljust(w) if i < 2 else x.rjust(w)
                         for i, (x, w) in enumerate(zip(c[:-1], widths, strict=True))]
                        + [c[-1]]).rstrip(), file=out)
    print("COORD ÷ THIS: coord's figure over this row's: by OPS/S where marked * (the median "
          "over rounds; rows run in the same rounds\ngive the median of the per-round ratios), "
          "else by P50. (faster)/(slower) says which way coord stands.", file=out)


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
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_as_worker(args.worker)
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


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
