"""The SQLite engine's queues: ``queues`` and ``jobs`` (see ``coord.queues`` for the rules).

The hot path was tuned statement by statement (``schema/004_queue_hot.sql``, and
docs/benchmarks.md "The queue's hot path, by profile"): the claim picks then updates by row
id, its parameters keep apsw's prepared statements valid, batches go through
``executemany``. Claimed jobs' rows are returned as read; ``coord.queues`` makes the jobs.
Claims that go back to ready because their holder is gone or their lease ran out go through
the death rule's ``release_claims`` (``death.py``): the one "back to ready".
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import apsw

from ...errors import (
    ClaimLost,
    InvalidArgument,
    NotRegistered,
    PermissionDenied,
    QueueFull,
)
from ..queue_ops import ImportRow, NewJobRow
from .connection import fetch, scalar
from .death import release_claims
from .events import log_event
from .queue_upkeep import QueueUpkeep, queue_row

if TYPE_CHECKING:
    from ...db import Row, Store

# The common put in one statement: it adds the job only to an existing queue without a max
# depth (a new queue, or one with a max depth, takes put_rows). Once a process has seen
# that a queue has no max depth, it inserts without looking (the foreign key still proves
# the queue exists).
_INSERT_FAST = (
    "INSERT INTO jobs (payload, priority, available_mono, max_attempts, created_at, queue) "
    "SELECT ?, ?, ?, ?, ?, name FROM queues WHERE name = ? AND max_depth IS NULL"
)
_INSERT_PLAIN_FAST = (
    "INSERT INTO jobs (payload, priority, available_mono, max_attempts, created_at, queue) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

#: (payload, priority, available_mono, dedupe_key, max_attempts, attempts, state, created_at,
#: last_error) of a row to insert.
NewRow = tuple[str, int, float, str | None, int, int, str, float, str | None]

_INSERT = (
    "INSERT INTO jobs (queue, payload, priority, available_mono, dedupe_key, max_attempts, "
    "attempts, state, created_at, last_error, finished_at, finished_mono) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (queue, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING RETURNING id"
)
# The common case, a ready job without a dedupe key, in the plainest statement.
_INSERT_PLAIN = (
    "INSERT INTO jobs (queue, payload, priority, available_mono, max_attempts, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

# The claim's first statement: may this incarnation claim here (registered and alive, and
# the queue shared or its own), and the best due job, in one read inside the claim's own
# transaction, so a buried instance's claim never commits. The job comes from jobs_active:
# (state, queue) then priority DESC, id, which is claim order (schema/004_queue_hot.sql).
# `queue = CAST(? AS TEXT)`, not `queue = ?`: with a bare parameter compared to an indexed
# column and an ORDER BY, SQLite prepares the statement again whenever that parameter is
# bound — every claim (measured: the cached statement cost what an uncached one does). The
# cast keeps the prepared statement (apsw's cache) valid: the pick costs a quarter.
# The job's columns are read here rather than by the UPDATE's RETURNING, which costs more
# (SQLite collects RETURNING rows in a temporary table).
_JOB_COLUMNS = "id, priority, payload, dedupe_key, attempts, max_attempts, created_at, last_error"
_PICK = (
    "SELECT (SELECT 1 FROM instances WHERE id = ?1 AND incarnation = ?2 AND status = 'alive'), "
    "(SELECT owner_id FROM queues WHERE name = ?3), "
    "j.id, j.priority, j.payload, j.dedupe_key, j.attempts, j.max_attempts, j.created_at, "
    "j.last_error FROM (SELECT 1) LEFT JOIN jobs j ON j.id = (SELECT id FROM jobs "
    "WHERE state = 'ready' AND queue = CAST(?3 AS TEXT) AND available_mono <= ?4 "
    "ORDER BY priority DESC, id LIMIT 1)"
)
# The next due jobs after the first, for claim_many.
_MORE = (
    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'ready' AND queue = CAST(? AS TEXT) "  # noqa: S608
    "AND available_mono <= ? AND id <> ? ORDER BY priority DESC, id LIMIT ?"
)
# Then each job by its row id. Selecting first and updating by id is about twice as fast as
# one UPDATE … WHERE id = (SELECT …): SQLite runs that in two passes, since the statement
# changes the index its subquery reads. Both run in one IMMEDIATE transaction: no race.
_CLAIM = (
    "UPDATE jobs SET state = 'claimed', claim_token = ?, claimed_by = ?, claimed_incarnation = ?, "
    "claim_expires_mono = ?, claimed_at = ?, attempts = attempts + 1 WHERE id = ?"
)
# An ack finds the claim by its job id and compares the token: a claim that moved on (or a
# lease past its end) changes nothing.
_ACK = (
    "UPDATE jobs SET state = 'done', claim_token = NULL, claim_expires_mono = NULL, "
    "result = ?, finished_at = ?, finished_mono = ? "
    "WHERE id = ? AND claim_token = ? AND claim_expires_mono >= ?"
)
_READY = "SELECT 1 FROM jobs WHERE state = 'ready' AND queue = ? AND available_mono <= ? LIMIT 1"


def claim_id(token: str) -> int:
    """The job a claim token names: tokens are ``<job id>-<random>``, so a claim is found by
    its row id and the whole token compared (no index on tokens). -1 for a token that names
    no job: it matches no claim."""
    head, sep, _ = token.partition("-")
    return int(head) if sep and head.isascii() and head.isdigit() else -1


def insert(
    c: apsw.Connection, queue: str, max_depth: int | None, rows: list[NewRow],
    now: float, wall: float,
) -> list[tuple[int, bool]]:
    """Insert rows into ``queue`` inside the caller's transaction: [(id, added)]. A row in
    a finished state (dead) is finished now. Raises ``QueueFull`` past ``max_depth``."""
    depth = None
    if max_depth is not None:
        depth = int(scalar(
            # An OR, not IN: then it counts in jobs_active (see schema/004_queue_hot.sql).
            c, "SELECT count(*) FROM jobs WHERE (state = 'ready' OR state = 'claimed') "
            "AND queue = ?", (queue,),
        ))
    out: list[tuple[int, bool]] = []
    for text, prio, avail, key, max_att, att, state, created, error in rows:
        ready = state == "ready"
        if depth is not None and max_depth is not None and depth >= max_depth and ready:
            existing = _existing(c, queue, key)
            if existing is None:
                raise QueueFull(queue, depth)
            out.append((existing, False))
            continue
        if key is None and ready and att == 0 and error is None:
            c.execute(_INSERT_PLAIN, (queue, text, prio, avail, max_att, created))
            out.append((c.last_insert_rowid(), True))
        else:
            finished = (None, None) if ready else (wall, now)
            got = c.execute(
                _INSERT,
                (queue, text, prio, avail, key, max_att, att, state, created, error, *finished),
            ).fetchall()
            if not got:
                existing = _existing(c, queue, key)
                assert existing is not None
                out.append((existing, False))
                continue
            out.append((int(got[0][0]), True))  # type: ignore[arg-type]
        if depth is not None and ready:
            depth += 1
    return out


def put_in(c: apsw.Connection, store: Store, queue: str, rows: Sequence[NewJobRow]
           ) -> tuple[list[int], bool, str | None]:
    """``SqliteQueues.put_rows`` inside the caller's transaction (also the fenced put's)."""
    now, wall = store.mono(), store.wall()
    owner, max_depth = queue_row(c, store, queue)
    ids = insert(
        c, queue, max_depth,
        [(text, prio, now + delay, key, att, 0, "ready", wall, None)
         for text, prio, delay, key, att in rows],
        now, wall,
    )
    return [i for i, _ in ids], any(new for _, new in ids), owner


def _existing(c: apsw.Connection, queue: str, key: str | None) -> int | None:
    if key is None:
        return None
    for (i,) in c.execute("SELECT id FROM jobs WHERE queue = ? AND dedupe_key = ?", (queue, key)):
        return int(i)
    return None


class SqliteQueues(QueueUpkeep):
    """``coord.backend.QueueOps``: the hot path here, the upkeep and reading in
    ``QueueUpkeep`` (``queue_upkeep.py``)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- queues --------------------------------------------------------------------------

    def create(self, name: str, owner: str | None, max_depth: int | None) -> None:
        store = self._store

        def txn(c: apsw.Connection) -> None:
            rows = fetch(c, "SELECT owner_id FROM queues WHERE name = ?", (name,))
            if not rows:
                c.execute(
                    "INSERT INTO queues (name, owner_id, max_depth, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (name, owner, max_depth, store.wall()),
                )
                return
            if rows[0]["owner_id"] != owner:
                have = rows[0]["owner_id"]
                raise InvalidArgument(
                    f"queue {name!r} already exists and is "
                    + (f"private to {have!r}" if have else "shared")
                )
            if max_depth is not None:
                c.execute("UPDATE queues SET max_depth = ? WHERE name = ?", (max_depth, name))

        store.write(txn)

    def owner(self, queue: str) -> str | None:
        return self._store.value("SELECT owner_id FROM queues WHERE name = ?", (queue,))  # type: ignore[no-any-return]

    def nudge_paths(self) -> list[tuple[str, str]]:
        return [
            (str(r[0]), str(r[1]))
            for r in self._store.conn().execute(
                "SELECT id, nudge_path FROM instances WHERE status = 'alive' "
                "AND nudge_path IS NOT NULL"
            )
        ]

    # -- put -----------------------------------------------------------------------------

    def put(self, queue: str, text: str, priority: int, delay: float, max_attempts: int,
            known: bool) -> int | None:
        store = self._store

        def txn(c: apsw.Connection) -> int | None:
            params = (text, priority, store.mono() + delay, max_attempts, store.wall(), queue)
            if known:
                try:
                    c.execute(_INSERT_PLAIN_FAST, params)
                except apsw.ConstraintError:  # the queue is gone: take the general path
                    return None
                return c.last_insert_rowid()
            c.execute(_INSERT_FAST, params)
            return c.last_insert_rowid() if c.changes() else None

        return store.write(txn)

    def put_rows(self, queue: str, rows: Sequence[NewJobRow]
                 ) -> tuple[list[int], bool, str | None]:
        store = self._store
        return store.write(lambda c: put_in(c, store, queue, rows))

    def import_jobs(self, queue: str, rows: Sequence[ImportRow], path: str
                    ) -> tuple[list[tuple[int, bool]], str | None]:
        store = self._store

        def txn(c: apsw.Connection) -> tuple[list[tuple[int, bool]], str | None]:
            now, wall = store.mono(), store.wall()
            owner, max_depth = queue_row(c, store, queue)
            ids = insert(
                c, queue, max_depth,
                [(text, prio, now, key, max_att, att, state, created, error)
                 for text, prio, key, max_att, att, state, created, error in rows],
                now, wall,
            )
            added = sum(1 for _, new in ids if new)
            if added:
                log_event(c, wall, "queue imported", None, queue, path=path, jobs=added)
            return ids, owner

        return store.write(txn)

    # -- claim ---------------------------------------------------------------------------

    def claim(self, queue: str, id: str, incarnation: int, lease: float, n: int,
              acks: Sequence[tuple[str, str | None]] = ()
              ) -> list[tuple[str, tuple[Any, ...]]]:
        store = self._store

        # The random part of the token is drawn before the transaction: less work while the
        # write lock is held. With the job id, a token is unique; the random part makes it
        # unguessable.
        secret = f"{random.getrandbits(64):016x}"

        def txn(c: apsw.Connection) -> tuple[list[str], BaseException | None,
                                             list[tuple[str, tuple[Any, ...]]]]:
            now = store.mono()
            if acks:
                lost = self._ack_pairs(c, acks, now, store.wall())
                if lost:
                    return lost, None, []
            (pick,) = c.execute(_PICK, (id, incarnation, queue, now))  # always one row
            # Refused claims still commit the acks made before them: raised after the commit.
            if not pick[0]:
                return [], NotRegistered(
                    id, "its registration has ended (declared dead or taken over)"), []
            owner, first = pick[1], pick[2]
            if owner is not None and owner != id:
                return [], PermissionDenied(
                    f"queue {queue!r} is private to instance {owner!r}"), []
            if first is None:
                return [], None, []
            if n == 1:  # executemany costs more than execute for one row
                token = f"{first}-{secret}"
                c.execute(_CLAIM, (token, id, incarnation, now + lease, store.wall(), first))
                return [], None, [(token, pick[2:])]
            rows = [pick[2:], *c.execute(_MORE, (queue, now, first, n - 1))]
            out = [(f"{row[0]}-{random.getrandbits(64):016x}", row) for row in rows]
            until, wall = now + lease, store.wall()
            c.executemany(_CLAIM, [(token, id, incarnation, until, wall, row[0])
                                   for token, row in out])
            return [], None, out

        lost, refused, out = store.write(txn)
        if lost:
            raise ClaimLost(*lost)
        if refused is not None:
            raise refused
        return out

    def ready(self, queue: str) -> bool:
        return bool(self._store.value(_READY, (queue, self._store.mono())))

    def next_due(self, queue: str) -> float | None:
        got = self._store.value(
            "SELECT min(t) - ?2 FROM (SELECT min(available_mono) AS t FROM jobs "
            "WHERE queue = ?1 AND state = 'ready' AND available_mono > ?2 "
            "UNION ALL SELECT min(claim_expires_mono) FROM jobs WHERE queue = ?1 "
            "AND state = 'claimed')",
            (queue, self._store.mono()),
        )
        return None if got is None else float(got)

    def holders(self, queue: str) -> list[Row]:
        return self._store.rows(
            "SELECT h.claimed_by, h.claimed_incarnation, i.* FROM "
            "(SELECT DISTINCT claimed_by, claimed_incarnation FROM jobs "
            " WHERE queue = ? AND state = 'claimed') h "
            "LEFT JOIN instances i ON i.id = h.claimed_by",
            (queue,),
        )

    def claimed(self, queue: str) -> int:
        return int(self._store.value(
            "SELECT count(*) FROM jobs WHERE queue = ? AND state = 'claimed'", (queue,)))

    def release_expired(self, queue: str) -> int:
        store = self._store
        if not store.value(
            "SELECT 1 FROM jobs WHERE queue = ? AND state = 'claimed' AND claim_expires_mono < ? "
            "LIMIT 1", (queue, store.mono()),
        ):
            return 0
        return store.write(lambda c: release_claims(
            c, store.mono(), store.wall(), "queue = ? AND claim_expires_mono < ?",
            (queue, store.mono()), error="claim lease expired"))

    def release_gone(self, who: str, incarnation: int) -> int:
        store = self._store
        return store.write(lambda c: release_claims(
            c, store.mono(), store.wall(), "claimed_by = ? AND claimed_incarnation = ?",
            (who, incarnation), error=f"worker {who} is gone"))

    # -- ack, fail, extend, release ------------------------------------------------------

    def _expired_release(self, c: apsw.Connection, token: str, now: float) -> None:
        """The claim is gone or past its lease: if merely expired, release it now (the
        attempt counted)."""
        release_claims(c, now, self._store.wall(),
                       "id = ? AND claim_token = ? AND claim_expires_mono < ?",
                       (claim_id(token), token, now), error="claim lease expired")

    def _acked(self, c: apsw.Connection, tok: str, text: str | None, now: float,
               wall: float) -> bool:
        c.execute(_ACK, (text, wall, now, claim_id(tok), tok, now))
        if c.changes():
            return True
        self._expired_release(c, tok, now)
        return False

    def ack(self, token: str, result: str | None) -> bool:
        store = self._store
        return store.write(lambda c: self._acked(c, token, result, store.mono(), store.wall()))

    def _ack_pairs(self, c: apsw.Connection, pairs: Sequence[tuple[str, str | None]],
                   now: float, wall: float) -> list[str]:
        """Ack each (token, result) inside the caller's transaction; the tokens whose claim
        had moved on."""
        if len(pairs) == 1:
            tok, text = pairs[0]
            return [] if self._acked(c, tok, text, now, wall) else [tok]
        # Usually every claim is still held: ack them all in one executemany, and only when
        # fewer rows changed than claims were given, undo that and go claim by claim.
        c.execute("SAVEPOINT ack_many")
        before = c.total_changes()
        c.executemany(_ACK, [(text, wall, now, claim_id(tok), tok, now) for tok, text in pairs])
        if c.total_changes() - before == len(pairs):
            c.execute("RELEASE ack_many")
            return []
        c.execute("ROLLBACK TO ack_many")
        c.execute("RELEASE ack_many")
        return [tok for tok, text in pairs if not self._acked(c, tok, text, now, wall)]

    def ack_many(self, pairs: Sequence[tuple[str, str | None]]) -> list[str]:
        store = self._store
        return store.write(lambda c: self._ack_pairs(c, pairs, store.mono(), store.wall()))

    def fail(self, token: str, error: str, retry_in: Callable[[int], float]
             ) -> tuple[str, str, float | None] | None:
        store = self._store

        def txn(c: apsw.Connection) -> tuple[str, str, float | None] | None:
            now, wall = store.mono(), store.wall()
            rows = fetch(
                c,
                "SELECT id, queue, attempts, max_attempts, claimed_by FROM jobs "
                "WHERE id = ? AND claim_token = ? AND claim_expires_mono >= ?",
                (claim_id(token), token, now),
            )
            if not rows:
                self._expired_release(c, token, now)
                return None
            j = rows[0]
            if j["attempts"] >= j["max_attempts"]:
                c.execute(
                    "UPDATE jobs SET state = 'dead', claim_token = NULL, claimed_by = NULL, "
                    "claimed_incarnation = NULL, claim_expires_mono = NULL, last_error = ?, "
                    "finished_at = ?, finished_mono = ? WHERE id = ?",
                    (error, wall, now, j["id"]),
                )
                log_event(c, wall, "job dead-lettered", j["claimed_by"], j["queue"], job=j["id"],
                          error=error)
                return ("dead", j["queue"], None)
            delay = retry_in(j["attempts"])
            c.execute(
                "UPDATE jobs SET state = 'ready', claim_token = NULL, claimed_by = NULL, "
                "claimed_incarnation = NULL, claim_expires_mono = NULL, last_error = ?, "
                "available_mono = ? WHERE id = ?",
                (error, now + delay, j["id"]),
            )
            return ("ready", j["queue"], delay)

        return store.write(txn)

    def extend(self, token: str, lease: float) -> bool:
        store = self._store

        def txn(c: apsw.Connection) -> bool:
            now = store.mono()
            if c.execute(
                "UPDATE jobs SET claim_expires_mono = ? WHERE id = ? AND claim_token = ? "
                "AND claim_expires_mono >= ? RETURNING 1",
                (now + lease, claim_id(token), token, now),
            ).fetchall():
                return True
            self._expired_release(c, token, now)
            return False

        return store.write(txn)

    def release(self, token: str) -> str | None:
        store = self._store

        def txn(c: apsw.Connection) -> str | None:
            now = store.mono()
            got = c.execute(
                "UPDATE jobs SET state = 'ready', claim_token = NULL, claimed_by = NULL, "
                "claimed_incarnation = NULL, claim_expires_mono = NULL, "
                "attempts = max(attempts - 1, 0), available_mono = ? "
                "WHERE id = ? AND claim_token = ? AND claim_expires_mono >= ? RETURNING queue",
                (now, claim_id(token), token, now),
            ).fetchall()
            if got:
                return str(got[0][0])
            self._expired_release(c, token, now)
            return None

        return store.write(txn)
