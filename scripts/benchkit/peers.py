"""The queue implementations the queue section measures side by side, one adapter each, used
inside the worker processes: coord's own, the minimal SQLite claim queue (the limit),
coord's schema driven raw, and the peers (persist-queue, litequeue, huey, a file-per-job
directory)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from .harness import POLL, mono, raw_connection

# One adapter per implementation, used inside the worker processes. claim(timeout) returns
# (payload, handle) or None; implementations with no cross-process wait poll every 1 ms.

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
        self.c = raw_connection(d / "minimal.db")

    @classmethod
    def setup(cls, d: Path) -> None:
        c = raw_connection(d / "minimal.db")
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
        self.c = raw_connection(d / "coord.db")

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
