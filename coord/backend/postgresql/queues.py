"""The PostgreSQL engine's queues: ``queues`` and ``jobs`` (see ``coord.queues`` for the
rules; the SQLite engine's ``queues.py`` is the reference behaviour).

READ COMMITTED does not serialise writers, so each invariant SQLite's single writer kept
is one statement here, or holds a row lock:

- A claim is one statement: it locks the claimer's instance row ``FOR SHARE`` (the death
  rule locks it ``FOR UPDATE``: a burial and a claim queue on that row, so a buried
  instance's claim never commits), picks due jobs ``FOR UPDATE SKIP LOCKED`` in claim order
  and marks them claimed. Two claimers never take one job. A claim carrying acks runs them
  first in its transaction (the acks lock only job rows, and the death rule skips locked
  job rows, so a burial waiting on the claimer's row never waits on them in turn).
- An ack, extend or release is one conditional ``UPDATE`` on (job id, whole token, lease
  not past ``coord_now()``): a release of the claim by the death rule locks the same row,
  so exactly one of them wins and a stale claim changes nothing.
- A put into a bounded queue, an import, a purge and an adoption lock the queue row
  (``FOR NO KEY UPDATE``/``FOR UPDATE``): puts into one bounded queue count its depth one
  after the other; ``FOR UPDATE`` also excludes every insert into the queue (the jobs'
  foreign key check takes a key-share lock on that row). Dedupe is the unique index.

Every expiry and delay is stamped and compared in SQL with ``coord_now()``, and what is read
back of them is a duration computed there (``queue_upkeep.py`` for the rows). A claim's
expiry is held back after a step of that clock (``CLAIM_EXPIRY``, see ``.clock``): each
claim's reading is observed, a release of expired claims verifies the clock before it
commits, and a refused ack, extend, fail or release reads the clock before it counts. A
transaction that makes a job ready and due sends ``NOTIFY`` on the queue's channel
(``channel``): a hint for waiting claimers on any host; the nudge sockets still wake this
host's waiters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from psycopg import errors as pgerrors

from ...clock import boot_id
from ...errors import ClaimLost, InvalidArgument, NotRegistered, PermissionDenied
from ..queue_ops import ImportRow, NewJobRow
from .clock import CLAIM_EXPIRY
from .connection import Conn, fetch
from .death import release_claims
from .events import log_event
from .queue_rows import CHANNEL, channel, claim_id, insert, into_queue, notify, put_in, queue_row
from .queue_upkeep import PgQueueUpkeep

if TYPE_CHECKING:
    from .clock import ServerClock
    from .connection import PgDb, Row


# The common put in one statement, into an existing queue without a max depth; the job is
# ready now or after its delay, and a job due now notifies the queue's waiters.
_PUT = (
    "WITH q AS (SELECT name FROM queues WHERE name = %(queue)s AND max_depth IS NULL), "  # noqa: S608
    "j AS (INSERT INTO jobs (payload, priority, available_mono, max_attempts, created_at, queue) "
    "SELECT %(text)s, %(prio)s, coord_now() + %(delay)s, %(att)s, coord_now(), name FROM q "
    "RETURNING id) "
    f"SELECT id, CASE WHEN %(delay)s <= 0 THEN pg_notify({CHANNEL.format('%(queue)s')}, '') "
    "END IS NULL AS sent FROM j"
)
# Once a process has seen that the queue has no max depth it inserts without looking (the
# foreign key still proves the queue exists).
_PUT_KNOWN = (
    "WITH j AS (INSERT INTO jobs (payload, priority, available_mono, max_attempts, created_at, "  # noqa: S608
    "queue) VALUES (%(text)s, %(prio)s, coord_now() + %(delay)s, %(att)s, coord_now(), "
    "%(queue)s) RETURNING id) "
    f"SELECT id, CASE WHEN %(delay)s <= 0 THEN pg_notify({CHANNEL.format('%(queue)s')}, '') "
    "END IS NULL AS sent FROM j"
)

# The claim, in one statement and so one transaction: the claimer's row locked FOR SHARE
# while alive (see the module docstring), the queue's owner, then up to n due jobs in claim
# order (jobs_ready: queue, priority DESC, id), each locked or skipped, claimed with a fresh
# token. The first row always comes (the LEFT JOIN), so "not alive" and "not yours" are told
# apart from "nothing due". ``acking``: the claimer's last job acked first (as ``_ACK``, and
# only then the claimer's row locked: job rows before instances, as the acks of a claim's
# transaction), and nothing claimed when that ack found its claim moved on ("acked").
def _claim_sql(acking: bool) -> str:
    acked = (
        "acked AS (UPDATE jobs SET state = 'done', claim_token = NULL, "  # noqa: S608 - fixed fragments
        "claim_expires_mono = NULL, result = %(result)s, finished_at = coord_now(), "
        "finished_mono = coord_now() WHERE id = %(aid)s AND claim_token = %(atok)s "
        f"AND {CLAIM_EXPIRY} >= coord_now() RETURNING 1), "
        if acking else "")
    gate = " AND EXISTS (SELECT 1 FROM acked)" if acking else ""
    return (
        f"WITH {acked}now AS MATERIALIZED (SELECT coord_now() AS t), "  # noqa: S608 - fixed fragments
        "me AS MATERIALIZED (SELECT 1 FROM instances WHERE id = %(id)s "
        f" AND incarnation = %(inc)s AND status = 'alive'{gate} FOR SHARE), "
        "q AS MATERIALIZED (SELECT owner_id FROM queues WHERE name = %(queue)s), "
        "picked AS (SELECT id FROM jobs WHERE state = 'ready' AND queue = %(queue)s "
        " AND available_mono <= (SELECT t FROM now) AND EXISTS (SELECT 1 FROM me) "
        " AND NOT EXISTS (SELECT 1 FROM q WHERE owner_id <> %(id)s) "
        " ORDER BY priority DESC, id LIMIT %(n)s FOR UPDATE SKIP LOCKED), "
        "got AS (UPDATE jobs j SET state = 'claimed', "
        " claim_token = j.id::text || '-' || substr(md5(gen_random_uuid()::text), 1, 16), "
        " claimed_by = %(id)s, claimed_incarnation = %(inc)s, "
        " claim_expires_mono = (SELECT t FROM now) + %(lease)s, claim_lease = %(lease)s, "
        " claimed_at = (SELECT t FROM now), "
        " attempts = j.attempts + 1 FROM picked WHERE j.id = picked.id "
        " RETURNING j.id, j.claim_token, j.priority, j.payload, j.dedupe_key, j.attempts - 1 AS "
        " attempts, j.max_attempts, j.created_at, j.last_error) "
        "SELECT EXISTS (SELECT 1 FROM me) AS alive, (SELECT owner_id FROM q) AS owner, "
        "(SELECT t FROM now) AS now_mono, "
        + ("EXISTS (SELECT 1 FROM acked) AS acked, " if acking else "")
        + "got.* FROM (SELECT 1) one LEFT JOIN got ON true ORDER BY got.priority DESC, got.id"
    )


_CLAIM = _claim_sql(acking=False)
_CLAIM_ACKING = _claim_sql(acking=True)
# A claim is found by its job id and the whole token compared; a lease past its end is lost.
_HELD = f"id = %s AND claim_token = %s AND {CLAIM_EXPIRY} >= coord_now()"
_ACK = (
    "UPDATE jobs SET state = 'done', claim_token = NULL, claim_expires_mono = NULL, "  # noqa: S608
    f"result = %s, finished_at = coord_now(), finished_mono = coord_now() WHERE {_HELD}"
)
_READY = ("SELECT 1 FROM jobs WHERE state = 'ready' AND queue = %s "
          "AND available_mono <= coord_now() LIMIT 1")
# Who is still owed an answer: a back-to-ready of this kind is a no-op unless expired.
_EXPIRED = f"id = %s AND claim_token = %s AND {CLAIM_EXPIRY} < coord_now()"


class PgQueues(PgQueueUpkeep):
    """``coord.backend.QueueOps`` on PostgreSQL: the hot path here, the upkeep and reading
    in ``PgQueueUpkeep`` (``queue_upkeep.py``)."""

    def __init__(self, db: PgDb, clock: ServerClock) -> None:
        self._db = db
        self._clock = clock

    def channel(self, queue: str) -> str:
        """The ``NOTIFY`` channel a waiter on ``queue`` listens on."""
        return channel(self._db.location.schema, queue)

    # -- queues --------------------------------------------------------------------------

    def create(self, name: str, owner: str | None, max_depth: int | None) -> None:
        def txn(c: Conn) -> None:
            if fetch(c, "INSERT INTO queues (name, owner_id, max_depth, created_at) "
                     "VALUES (%s, %s, %s, coord_now()) ON CONFLICT (name) DO NOTHING "
                     "RETURNING 1", (name, owner, max_depth)):
                return
            rows = fetch(c, "SELECT owner_id FROM queues WHERE name = %s FOR UPDATE", (name,))
            if not rows:  # deleted meanwhile: the write is tried again
                raise pgerrors.SerializationFailure("queue deleted while created")
            have = rows[0]["owner_id"]
            if have != owner:
                raise InvalidArgument(
                    f"queue {name!r} already exists and is "
                    + (f"private to {have!r}" if have else "shared"))
            if max_depth is not None:
                c.execute("UPDATE queues SET max_depth = %s WHERE name = %s", (max_depth, name))

        self._db.write(txn)

    def owner(self, queue: str) -> str | None:
        return self._db.value("SELECT owner_id FROM queues WHERE name = %s",  # type: ignore[no-any-return]
                              (queue,))

    def nudge_paths(self) -> list[tuple[str, str]]:
        # Sockets are host-local: only this boot's instances can be nudged from here.
        return [(str(r["id"]), str(r["nudge_path"])) for r in self._db.rows(
            "SELECT id, nudge_path FROM instances WHERE status = 'alive' "
            "AND nudge_path IS NOT NULL AND boot_id = %s", (boot_id(),))]

    # -- put -----------------------------------------------------------------------------

    def put(self, queue: str, text: str, priority: int, delay: float, max_attempts: int,
            known: bool) -> int | None:
        params = {"queue": queue, "text": text, "prio": priority, "delay": delay,
                  "att": max_attempts}
        try:
            # One statement: its own transaction, in autocommit.
            got = self._db.row(_PUT_KNOWN if known else _PUT, params)
        except pgerrors.ForeignKeyViolation:  # the queue is gone: take the general path
            return None
        return None if got is None else int(got["id"])

    def put_rows(self, queue: str, rows: Sequence[NewJobRow]
                 ) -> tuple[list[int], bool, str | None]:
        return into_queue(self._db, lambda c: put_in(c, queue, rows))

    def import_jobs(self, queue: str, rows: Sequence[ImportRow], path: str
                    ) -> tuple[list[tuple[int, bool]], str | None]:
        def txn(c: Conn) -> tuple[list[tuple[int, bool]], str | None]:
            owner, max_depth = queue_row(c, queue)
            ids = insert(c, queue, max_depth, [
                (text, prio, 0.0, key, max_att, att, state, created, error)
                for text, prio, key, max_att, att, state, created, error in rows])
            added = sum(1 for _, new in ids if new)
            if added:
                log_event(c, "queue imported", None, queue, path=path, jobs=added)
            return ids, owner

        return into_queue(self._db, txn)

    # -- claim ---------------------------------------------------------------------------

    def claim(self, queue: str, id: str, incarnation: int, lease: float, n: int,
              acks: Sequence[tuple[str, str | None]] = ()
              ) -> list[tuple[str, tuple[Any, ...]]]:
        params = {"id": id, "inc": incarnation, "queue": queue, "lease": float(lease), "n": n}
        if not acks:
            # One statement in autocommit: the common claim costs one round trip. Its
            # reading is observed: every worker can notice a step of the server's clock.
            return self._claimed(queue, id, self._clock.rows(_CLAIM, params))
        if len(acks) == 1:
            # A worker's loop (claim(ack=job)): the ack and the claim in one statement, one
            # round trip and one commit.
            token, result = acks[0]
            ack = {**params, "aid": claim_id(token), "atok": token, "result": result}
            for _ in range(2):  # as ``ack``: refused before a step was seen, again under the hold
                got = self._clock.rows(_CLAIM_ACKING, ack)
                if got[0]["acked"]:
                    return self._claimed(queue, id, got)
                if not self._refused(token):
                    break
            raise ClaimLost(token)

        def txn(c: Conn) -> tuple[list[str], list[Row]]:
            lost = self._ack_pairs(c, acks)
            return (lost, []) if lost else ([], self._clock.checked(c, _CLAIM, params))

        # Refused claims still commit the acks made before them: raised after the commit.
        lost, got = self._db.write(txn)
        if lost:
            raise ClaimLost(*lost)
        return self._claimed(queue, id, got)

    @staticmethod
    def _claimed(queue: str, id: str, got: list[Row]) -> list[tuple[str, tuple[Any, ...]]]:
        """The claim statement's rows as ``claim`` returns them, or why it was refused."""
        head = got[0]
        if not head["alive"]:
            raise NotRegistered(id, "its registration has ended (declared dead or taken over)")
        if head["owner"] is not None and head["owner"] != id:
            raise PermissionDenied(f"queue {queue!r} is private to instance {head['owner']!r}")
        return [(r["claim_token"], (r["id"], r["priority"], r["payload"], r["dedupe_key"],
                                    r["attempts"], r["max_attempts"], r["created_at"],
                                    r["last_error"]))
                for r in got if r["id"] is not None]

    def ready(self, queue: str) -> bool:
        return bool(self._db.value(_READY, (queue,)))

    def next_due(self, queue: str) -> float | None:
        # least() skips a NULL, as SQLite's min() over the two does; one reading of the clock.
        got = self._db.value(
            "SELECT least((SELECT min(available_mono) FROM jobs WHERE queue = %(q)s "  # noqa: S608
            "AND state = 'ready' AND available_mono > n.t), "
            f"(SELECT min({CLAIM_EXPIRY}) FROM jobs WHERE queue = %(q)s "
            "AND state = 'claimed')) - n.t AS t FROM (SELECT coord_now() AS t) n", {"q": queue})
        return None if got is None else float(got)

    def holders(self, queue: str) -> list[Row]:
        return self._db.rows(
            "SELECT h.claimed_by, h.claimed_incarnation, i.* FROM "
            "(SELECT DISTINCT claimed_by, claimed_incarnation FROM jobs "
            " WHERE queue = %s AND state = 'claimed') h "
            "LEFT JOIN instances i ON i.id = h.claimed_by", (queue,))

    def claimed(self, queue: str) -> int:
        return int(self._db.value(
            "SELECT count(*) FROM jobs WHERE queue = %s AND state = 'claimed'", (queue,)))

    def release_expired(self, queue: str) -> int:
        where = f"queue = %s AND {CLAIM_EXPIRY} < coord_now()"
        if not self._db.value(
                f"SELECT 1 FROM jobs WHERE state = 'claimed' AND {where} LIMIT 1", (queue,)):  # noqa: S608
            return 0
        return self._db.write(lambda c: self._clock.verified(c, release_claims(
            c, where, (queue,), error="claim lease expired")))

    def release_gone(self, who: str, incarnation: int) -> int:
        return self._db.write(lambda c: release_claims(
            c, "claimed_by = %s AND claimed_incarnation = %s", (who, incarnation),
            error=f"worker {who} is gone"))

    # -- ack, fail, extend, release ------------------------------------------------------

    def _expired_release(self, token: str) -> None:
        """The claim is gone or past its lease: if merely expired, release it now (the
        attempt counted). The operation that found it so changed nothing, so this is its
        own transaction (and usually finds nothing)."""
        self._db.write(lambda c: self._clock.verified(c, release_claims(
            c, _EXPIRED, (claim_id(token), token), error="claim lease expired")))

    def _refused(self, token: str) -> bool:
        """After an ack, extend or release found no claim: True when a reading of the
        server's clock finds it stepped (the operation is tried again, under the hold);
        else the claim, if merely expired, is released and False."""
        if self._clock.stepped():
            return True
        self._expired_release(token)
        return False

    def ack(self, token: str, result: str | None) -> bool:
        # One statement in autocommit: the common ack costs one round trip.
        for _ in range(2):
            if self._db.rows(f"{_ACK} RETURNING 1 AS ok", (result, claim_id(token), token)):
                return True
            if not self._refused(token):
                break
        return False

    def ack_many(self, pairs: Sequence[tuple[str, str | None]]) -> list[str]:
        return self._db.write(lambda c: self._ack_pairs(c, pairs))

    def _ack_pairs(self, c: Conn, pairs: Sequence[tuple[str, str | None]]) -> list[str]:
        """Ack each (token, result) inside the caller's transaction; the tokens whose claim
        had moved on (each merely expired one released)."""
        first: dict[str, str | None] = {}  # a token given twice acks with its first result
        for t, r in pairs:
            first.setdefault(t, r)
        done = {str(r["claim_token"]) for r in fetch(
            c,
            "UPDATE jobs j SET state = 'done', claim_token = NULL, claim_expires_mono = "  # noqa: S608
            "NULL, result = a.result, finished_at = coord_now(), finished_mono = coord_now() "
            "FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS a(id, token, result) "
            "WHERE j.id = a.id AND j.claim_token = a.token "
            f"AND {CLAIM_EXPIRY} >= coord_now() RETURNING a.token AS claim_token",
            ([claim_id(t) for t in first], list(first), list(first.values())))}
        # A token given twice acks once: its repeat has moved on (as one by one).
        lost = []
        for t, _ in pairs:
            if t in done:
                done.discard(t)
            else:
                lost.append(t)
        if lost:
            self._clock.verify(c)  # refused before a step was seen: acked again under the hold
        for t in lost:
            release_claims(c, _EXPIRED, (claim_id(t), t), error="claim lease expired")
        return lost

    def fail(self, token: str, error: str, retry_in: Callable[[int], float]
             ) -> tuple[str, str, float | None] | None:
        def txn(c: Conn) -> tuple[str, str, float | None] | None:
            rows = fetch(c, "SELECT id, queue, attempts, max_attempts, claimed_by FROM jobs "  # noqa: S608
                         f"WHERE {_HELD} FOR UPDATE", (claim_id(token), token))
            if not rows:
                self._clock.verify(c)  # refused before a step was seen: failed under the hold
                release_claims(c, _EXPIRED, (claim_id(token), token),
                               error="claim lease expired")
                return None
            j = rows[0]
            if j["attempts"] >= j["max_attempts"]:
                c.execute(
                    "UPDATE jobs SET state = 'dead', claim_token = NULL, claimed_by = NULL, "
                    "claimed_incarnation = NULL, claim_expires_mono = NULL, last_error = %s, "
                    "finished_at = coord_now(), finished_mono = coord_now() WHERE id = %s",
                    (error, j["id"]))
                log_event(c, "job dead-lettered", j["claimed_by"], j["queue"], job=j["id"],
                          error=error)
                return ("dead", j["queue"], None)
            delay = retry_in(j["attempts"])
            c.execute(
                "UPDATE jobs SET state = 'ready', claim_token = NULL, claimed_by = NULL, "
                "claimed_incarnation = NULL, claim_expires_mono = NULL, last_error = %s, "
                "available_mono = coord_now() + %s WHERE id = %s", (error, delay, j["id"]))
            if delay <= 0:
                notify(c, [j["queue"]])
            return ("ready", j["queue"], delay)

        return self._db.write(txn)

    def extend(self, token: str, lease: float) -> bool:
        for _ in range(2):
            if self._db.rows(
                "UPDATE jobs SET claim_expires_mono = coord_now() + %s, claim_lease = %s "  # noqa: S608
                f"WHERE {_HELD} RETURNING 1 AS ok",
                (float(lease), float(lease), claim_id(token), token)):
                return True
            if not self._refused(token):
                break
        return False

    def release(self, token: str) -> str | None:
        for _ in range(2):
            got = self._db.rows(
                "WITH r AS (UPDATE jobs SET state = 'ready', claim_token = NULL, "  # noqa: S608
                "claimed_by = NULL, claimed_incarnation = NULL, claim_expires_mono = NULL, "
                "attempts = greatest(attempts - 1, 0), available_mono = coord_now() "
                f"WHERE {_HELD} RETURNING queue) "
                f"SELECT queue, pg_notify({CHANNEL.format('queue')}, '') IS NULL AS sent FROM r",
                (claim_id(token), token))
            if got:
                return str(got[0]["queue"])
            if not self._refused(token):
                break
        return None
