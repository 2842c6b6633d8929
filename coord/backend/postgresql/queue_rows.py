"""The PostgreSQL engine's queue rows inside a caller's transaction: the queue row (made and
locked), inserting jobs (max depth, dedupe), the queues' ``NOTIFY`` channels, and claim
tokens, the put inside a caller's transaction. ``queues.py`` holds the operations; the death rule's "back to ready" notifies too."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from psycopg import errors as pgerrors

from ...errors import NotFound, QueueFull, StorageError
from .connection import RETRIES, Conn, fetch, scalar

if TYPE_CHECKING:
    from ..queue_ops import NewJobRow
    from .connection import PgDb

T = TypeVar("T")

#: (payload, priority, delay, dedupe_key, max_attempts, attempts, state, created_at or None
#: for now, last_error) of a row to insert.
NewRow = tuple[str, int, float, str | None, int, int, str, float | None, str | None]


def channel(schema: str, queue: str) -> str:
    """The ``NOTIFY`` channel of ``queue`` in the deployment ``schema`` (channels are per
    database, shared by every schema): the name ``CHANNEL`` computes in SQL. (md5 makes a
    short name here, not a secret.)"""
    return "coord_q_" + hashlib.md5(f"{schema}:{queue}".encode()).hexdigest()[:16]


#: The channel in SQL, for statements that learn the queue as they run.
CHANNEL = "'coord_q_' || substr(md5(current_schema() || ':' || {}), 1, 16)"
NOTIFY = f"SELECT pg_notify({CHANNEL.format('%s')}, '')"


def notify(c: Conn, queues: Sequence[str]) -> None:
    """Tell waiting claimers of these queues that a job is ready (sent at commit)."""
    for q in sorted(set(queues)):
        c.execute(NOTIFY, (q,))


INSERT_JOB = (
    "INSERT INTO jobs (queue, payload, priority, available_mono, dedupe_key, max_attempts, "
    "attempts, state, created_at, last_error, finished_at, finished_mono) "
    "VALUES (%s, %s, %s, coord_now() + %s, %s, %s, %s, %s, coalesce(%s, coord_now()), %s, "
    "CASE WHEN %s THEN NULL ELSE coord_now() END, CASE WHEN %s THEN NULL ELSE coord_now() END) "
    "ON CONFLICT (queue, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING RETURNING id"
)

def claim_id(token: str) -> int:
    """The job a claim token names (``<job id>-<random>``); -1 names none."""
    head, sep, _ = token.partition("-")
    return int(head) if sep and head.isascii() and head.isdigit() and len(head) < 19 else -1


def queue_row(c: Conn, name: str) -> tuple[str | None, int | None]:
    """(owner, max_depth) of a queue inside the caller's transaction, creating it shared if
    it does not exist. Its row is locked before any job goes in: ``FOR KEY SHARE`` (what the
    jobs' foreign key check takes anyway, taken first so that a purge or an adoption holding
    the row ``FOR UPDATE`` is waited for before any job row is written, not after: no
    deadlock), and a bounded queue's ``FOR NO KEY UPDATE``, so puts that count its depth
    take turns."""
    for _ in range(3):
        rows = fetch(c, "SELECT owner_id, max_depth FROM queues WHERE name = %s FOR KEY SHARE",
                     (name,))
        if rows:
            break
        c.execute("INSERT INTO queues (name, owner_id, max_depth, created_at) "
                  "VALUES (%s, NULL, NULL, coord_now()) ON CONFLICT (name) DO NOTHING", (name,))
    else:  # made and deleted again, over and over: the whole write is tried again
        raise pgerrors.SerializationFailure(f"queue {name!r} kept being deleted")
    if rows[0]["max_depth"] is not None:
        rows = fetch(c, "SELECT owner_id, max_depth FROM queues WHERE name = %s "
                     "FOR NO KEY UPDATE", (name,))
        if not rows:
            raise pgerrors.SerializationFailure(f"queue {name!r} deleted meanwhile")
    return rows[0]["owner_id"], rows[0]["max_depth"]


def insert(c: Conn, queue: str, max_depth: int | None, rows: Sequence[NewRow]
           ) -> list[tuple[int, bool]]:
    """Insert rows into ``queue`` inside the caller's transaction (its row locked by
    ``queue_row`` when bounded): [(id, added)]. Raises ``QueueFull`` past ``max_depth``."""
    depth = None
    if max_depth is not None:
        # Two counts, each in its partial index (jobs_ready, jobs_claimed).
        depth = int(scalar(c, "SELECT (SELECT count(*) FROM jobs WHERE queue = %(q)s AND "
                           "state = 'ready') + (SELECT count(*) FROM jobs WHERE queue = %(q)s "
                           "AND state = 'claimed') AS n", {"q": queue}))
    out: list[tuple[int, bool]] = []
    ready_now = False
    for text, prio, delay, key, max_att, att, state, created, error in rows:
        ready = state == "ready"
        if depth is not None and max_depth is not None and depth >= max_depth and ready:
            known = existing(c, queue, key)
            if known is None:
                raise QueueFull(queue, depth)
            out.append((known, False))
            continue
        while True:
            got = fetch(c, INSERT_JOB, (queue, text, prio, delay, key, max_att, att, state,
                                        created, error, ready, ready))
            if got:
                out.append((int(got[0]["id"]), True))
                ready_now = ready_now or (ready and delay <= 0)
                if depth is not None and ready:
                    depth += 1
                break
            # A dedupe repeat: the other row is committed (ON CONFLICT waited for it) unless
            # it was deleted meanwhile, and then the insert is tried again.
            known = existing(c, queue, key)
            if known is not None:
                out.append((known, False))
                break
    if ready_now:
        notify(c, [queue])
    return out


def put_in(c: Conn, queue: str, rows: Sequence[NewJobRow]
           ) -> tuple[list[int], bool, str | None]:
    """``PgQueues.put_rows`` inside the caller's transaction (also the fenced put's)."""
    owner, max_depth = queue_row(c, queue)
    ids = insert(c, queue, max_depth, [(text, prio, delay, key, att, 0, "ready", None, None)
                                       for text, prio, delay, key, att in rows])
    return [i for i, _ in ids], any(new for _, new in ids), owner


def into_queue(db: PgDb, txn: Callable[[Conn], T]) -> T:
    """A write that puts jobs into a queue it made sure exists: tried again when the queue
    was deleted meanwhile (a purge of the whole queue committed between that look and the
    insert's foreign key check), so that it makes the queue anew."""
    for _ in range(RETRIES):
        try:
            return db.write(txn)
        except pgerrors.ForeignKeyViolation:
            continue
    raise StorageError(db.where, f"queue deleted while put into ({RETRIES} tries)")


def existing(c: Conn, queue: str, key: str | None) -> int | None:
    if key is None:
        return None
    found = scalar(c, "SELECT id FROM jobs WHERE queue = %s AND dedupe_key = %s", (queue, key))
    return None if found is None else int(found)


def job_state(c: Conn, job_id: int) -> str:
    state = scalar(c, "SELECT state FROM jobs WHERE id = %s", (job_id,))
    if state is None:
        raise NotFound("job", job_id)
    return str(state)
