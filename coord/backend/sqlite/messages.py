"""The SQLite engine's messages: the ``messages`` table (see ``coord.messages`` for the
delivery rules). Expiry is ``expires_mono``, stamped from the engine's clock; recipients are
nudged at their ``nudge_path`` after the commit.

Replies taken by a waiting requester whose instance lives in this process are deleted by
that instance's next write rather than in a transaction of their own (``_spent``): a round
trip costs one transaction less. Left over at exit, they go at their expiry or with the
instance.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import apsw

from ...errors import InvalidArgument, NotFound, NotRegistered, RecipientDead
from ..records import Member, MessageRecord, Problem
from ..spent import SpentReplies
from .clock import MonotonicClock
from .connection import fetch, translated
from .events import log_event
from .wakeup import SqliteWakeup

if TYPE_CHECKING:
    from ...db import Row, Store

T = TypeVar("T")

# One read per look: the next message for us, and whether earlier deliveries still await
# their acknowledgement. CAST(?1 AS TEXT): with a bare parameter compared to an indexed
# column and an ORDER BY, SQLite prepares the statement again at every bind (12 µs a look
# instead of 3; see coord/queues.py's _PICK).
_PEEK = (
    "SELECT (SELECT id FROM messages WHERE recipient_id = CAST(?1 AS TEXT) AND acked = 0 "
    "AND kind <> 'reply' AND (delivered_incarnation IS NULL OR delivered_incarnation <> ?2) "
    "AND expires_mono > ?3 AND (?4 IS NULL OR topic = ?4) ORDER BY rowid LIMIT 1), "
    "EXISTS (SELECT 1 FROM messages WHERE recipient_id = ?1 AND acked = 0 "
    "AND delivered_incarnation = ?2)"
)


# A request's one look: the recipient (what watching and judging it needs) and whether the
# asker itself is still registered.
_ASK_LOOK = (
    "SELECT id, incarnation, status, pid, pidns, boot_id, start_token, heartbeat_mono, ttl, "
    "nudge_path, EXISTS (SELECT 1 FROM instances WHERE id = ?2 AND incarnation = ?3 "
    "AND status = 'alive') AS me_alive FROM instances WHERE id = ?1"
)

# A reply takes its request (only while the replier is registered) and, in the same
# statement, the nudge path of the requester if it is still registered ('' without one,
# NULL when it is not).
_ANSWER = (
    "DELETE FROM messages WHERE id = ?1 AND recipient_id = ?2 AND kind = 'request' "
    "AND EXISTS (SELECT 1 FROM instances WHERE id = ?2 AND incarnation = ?3 "
    "AND status = 'alive') "
    "RETURNING sender_id, sender_incarnation, topic, correlation_id, expires_mono, "
    "(SELECT coalesce(i.nudge_path, '') FROM instances AS i WHERE i.id = messages.sender_id "
    "AND i.incarnation = messages.sender_incarnation AND i.status = 'alive') AS asker"
)


def _record(row: Row) -> MessageRecord:
    return MessageRecord(
        id=row["id"], kind=row["kind"], sender_id=row["sender_id"],
        sender_incarnation=row["sender_incarnation"], recipient_id=row["recipient_id"],
        topic=row["topic"], payload=row["payload"], correlation_id=row["correlation_id"],
        reply_to=row["reply_to"], created_at=row["created_at"], expires_at=row["expires_at"],
    )


def _ids_json(ids: Iterable[str]) -> str:
    return json.dumps(list(ids))


def _check_me(c: apsw.Connection, me: Member) -> None:
    if not c.execute(
        "SELECT 1 FROM instances WHERE id = ? AND incarnation = ? AND status = 'alive'", me,
    ).fetchall():
        raise NotRegistered(me[0], "closed, declared dead or taken over")


class SqliteMessages:
    """``coord.backend.MessageOps``."""

    def __init__(self, store: Store, clock: MonotonicClock, wakeup: SqliteWakeup) -> None:
        self._store = store
        self._path = str(store.path)
        self._clock = clock
        self._wakeup = wakeup
        # (id, incarnation) -> ids of replies it took and has not deleted yet.
        self._spent = SpentReplies()

    # -- writing ------------------------------------------------------------------------------

    def _insert(
        self, c: apsw.Connection, me: Member, *, id: str, kind: str, to: str, topic: str,
        payload: str, correlation_id: str | None, reply_to: str | None, ttl: float,
    ) -> None:
        now_mono, now_wall = self._clock.now(), self._store.wall()
        c.execute(
            "INSERT INTO messages (id, kind, sender_id, sender_incarnation, recipient_id, topic, "
            "payload, correlation_id, reply_to, created_at, expires_at, expires_mono) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (id, kind, *me, to, topic, payload, correlation_id, reply_to,
             now_wall, now_wall + ttl, now_mono + ttl),
        )

    def _drop_spent(self, c: apsw.Connection, me: Member, ids: Iterable[str]) -> None:
        c.execute(
            "DELETE FROM messages WHERE recipient_id = ? AND kind = 'reply' "
            "AND id IN (SELECT value FROM json_each(?))",
            (me[0], _ids_json(ids)),
        )

    def _write(self, me: Member, fn: Callable[[apsw.Connection], T]) -> T:
        """``store.write(fn)`` for ``me``, also deleting the replies it has taken since its
        last write."""
        return self._spent.write(me, self._store.write, fn, self._drop_spent)

    def send(self, me: Member, id: str, to: str, topic: str, payload: str, ttl: float) -> None:
        def txn(c: apsw.Connection) -> str | None:
            _check_me(c, me)
            rec = c.execute("SELECT nudge_path FROM instances WHERE id = ?", (to,)).fetchall()
            if not rec:
                raise NotFound("instance", to)
            self._insert(c, me, id=id, kind="message", to=to, topic=topic, payload=payload,
                         correlation_id=None, reply_to=None, ttl=ttl)
            return str(rec[0][0]) if rec[0][0] else None

        self._wakeup.nudge([self._write(me, txn)])

    def broadcast(
        self, me: Member, sends: dict[str, tuple[Member, str]], topic: str, payload: str,
        ttl: float,
    ) -> dict[str, str]:
        sent: dict[str, str] = {}

        def txn(c: apsw.Connection) -> list[str | None]:
            _check_me(c, me)
            sent.clear()
            paths: list[str | None] = []
            for to, (member, mid) in sends.items():
                # Skip one that left or was replaced since the caller looked.
                found = c.execute(
                    "SELECT nudge_path FROM instances WHERE id = ? AND incarnation = ? "
                    "AND status = 'alive'", member).fetchall()
                if not found:
                    continue
                self._insert(c, me, id=mid, kind="message", to=to, topic=topic,
                             payload=payload, correlation_id=None, reply_to=None, ttl=ttl)
                sent[to] = mid
                paths.append(str(found[0][0]) if found[0][0] else None)
            return paths

        self._wakeup.nudge(self._write(me, txn))
        return sent

    def request(self, me: Member, id: str, to: str, topic: str, payload: str,
                ttl: float) -> Row:
        def txn(c: apsw.Connection) -> Row:
            rows = fetch(c, _ASK_LOOK, (to, *me))
            if not rows or not rows[0].pop("me_alive"):
                _check_me(c, me)  # raises when it is us who is not registered
            if not rows:
                raise NotFound("instance", to)
            if rows[0]["status"] != "alive":
                raise RecipientDead(to)
            self._insert(c, me, id=id, kind="request", to=to, topic=topic, payload=payload,
                         correlation_id=id, reply_to=me[0], ttl=ttl)
            return rows[0]

        row = self._write(me, txn)
        self._wakeup.nudge([row["nudge_path"]])
        return row

    def ask(self, me: Member, asked: dict[str, str], topic: str, payload: str,
            ttl: float) -> None:
        def txn(c: apsw.Connection) -> list[Any]:
            _check_me(c, me)
            for mid, to in asked.items():
                self._insert(c, me, id=mid, kind="request", to=to, topic=topic,
                             payload=payload, correlation_id=mid, reply_to=me[0], ttl=ttl)
            return [r[0] for r in c.execute(
                "SELECT nudge_path FROM instances WHERE id IN (SELECT value FROM json_each(?))",
                (_ids_json(asked.values()),))]

        self._wakeup.nudge(self._write(me, txn))

    def reply(self, me: Member, request_id: str, id: str, payload: str) -> bool:
        def txn(c: apsw.Connection) -> tuple[bool, str | None]:
            got = fetch(c, _ANSWER, (request_id, *me))
            if not got:
                _check_me(c, me)  # raises when it is us who is not registered
                other = c.execute("SELECT kind FROM messages WHERE id = ? AND recipient_id = ?",
                                  (request_id, me[0])).fetchall()
                if other:
                    raise InvalidArgument(f"message {request_id} is a {other[0][0]}, not a "
                                          "request: only requests take a reply")
                return False, None
            req = got[0]
            if req["asker"] is None:  # the requester is gone: nobody waits for the answer
                return False, None
            ttl = max(req["expires_mono"] - self._clock.now(), 1.0)
            self._insert(c, me, id=id, kind="reply", to=req["sender_id"], topic=req["topic"],
                         payload=payload, correlation_id=req["correlation_id"] or request_id,
                         reply_to=None, ttl=ttl)
            return True, str(req["asker"]) or None

        ok, path = self._write(me, txn)
        if ok:
            self._wakeup.nudge([path])
        return ok

    def drop(self, me: Member, message: MessageRecord, error: str) -> None:
        def txn(c: apsw.Connection) -> None:
            c.execute("DELETE FROM messages WHERE id = ?", (message.id,))
            log_event(c, self._store.wall(), "message dropped", me[0], message.id,
                      sender=message.sender_id, error=error)

        self._store.write(txn)

    # -- receiving ------------------------------------------------------------------------------

    def receive(self, me: Member, topic: str | None) -> MessageRecord | None:
        store = self._store
        while True:
            # The hot path of every wait: one plain read, no row dicts.
            with translated(self._path):
                found, owed = store.conn().execute(
                    _PEEK, (*me, self._clock.now(), topic)).fetchall()[0]
            if found is None and not owed:
                return None
            mid = None if found is None else str(found)
            row = self._write(me, self._deliverer(me, mid, bool(owed)))
            if row is not None:
                return _record(row)
            if found is None:
                return None
            # else taken by another receiver acting as this instance: look again

    def _deliverer(
        self, me: Member, mid: str | None, owed: bool
    ) -> Callable[[apsw.Connection], Row | None]:
        def txn(c: apsw.Connection) -> Row | None:
            if owed:
                _check_me(c, me)
                # Acknowledge what this incarnation was given before (the 'next receive' rule).
                c.execute(
                    "DELETE FROM messages WHERE recipient_id = ? AND delivered_incarnation = ? "
                    "AND acked = 0 AND kind = 'message'", me)
                c.execute(
                    "UPDATE messages SET acked = 1 WHERE recipient_id = ? "
                    "AND delivered_incarnation = ? AND acked = 0 AND kind = 'request'", me)
            if mid is None:
                return None
            rows = fetch(
                c,
                "UPDATE messages SET delivered_incarnation = ?1 WHERE id = ?2 AND acked = 0 "
                "AND (delivered_incarnation IS NULL OR delivered_incarnation <> ?1) "
                "AND EXISTS (SELECT 1 FROM instances WHERE id = ?3 AND incarnation = ?1 "
                "AND status = 'alive') RETURNING *",
                (me[1], mid, me[0]),
            )
            if not rows:
                _check_me(c, me)  # raises if we are no longer registered
            return rows[0] if rows else None

        return txn

    def ack(self, me: Member, message_id: str) -> bool:
        def txn(c: apsw.Connection) -> bool:
            gone = c.execute(
                "DELETE FROM messages WHERE id = ? AND recipient_id = ? AND kind = 'message' "
                "RETURNING 1", (message_id, me[0])).fetchall()
            marked = c.execute(
                "UPDATE messages SET acked = 1, delivered_incarnation = "
                "coalesce(delivered_incarnation, ?) WHERE id = ? AND recipient_id = ? "
                "AND kind = 'request' AND acked = 0 RETURNING 1",
                (me[1], message_id, me[0])).fetchall()
            return bool(gone or marked)

        return self._write(me, txn)

    # -- waiting for replies --------------------------------------------------------------------

    def replies(
        self, me: Member, request_ids: list[str], peers: list[Member], *, defer: bool
    ) -> tuple[list[MessageRecord], set[str] | None]:
        store = self._store
        conn = store.conn()
        with translated(self._path):
            if len(request_ids) == 1:
                rows = fetch(
                    conn,
                    "SELECT * FROM messages WHERE correlation_id = ? AND recipient_id = ? "
                    "AND kind = 'reply'", (request_ids[0], me[0]))
            else:
                rows = fetch(
                    conn,
                    "SELECT * FROM messages WHERE recipient_id = ? AND kind = 'reply' "
                    "AND correlation_id IN (SELECT value FROM json_each(?))",
                    (me[0], _ids_json(request_ids)))
            if not rows:
                if not peers:
                    return [], set()
                if len(peers) == 1:
                    found = conn.execute(
                        "SELECT id FROM instances WHERE id = ? AND incarnation = ? "
                        "AND status = 'alive'", peers[0]).fetchall()
                else:
                    found = conn.execute(
                        "SELECT id FROM instances WHERE status = 'alive' AND (id, incarnation) "
                        "IN (SELECT value->>0, value->>1 FROM json_each(?))",
                        (json.dumps([list(p) for p in peers]),)).fetchall()
                return [], {str(r[0]) for r in found}
        spent = [r["id"] for r in rows]
        if defer:
            self._spent.add(me, spent)
        else:
            store.write(lambda c: self._drop_spent(c, me, spent))
        return [_record(r) for r in rows], None

    def give_up(self, me: Member, request_ids: list[str]) -> list[MessageRecord]:
        ids = _ids_json(request_ids)

        def txn(c: apsw.Connection) -> list[Row]:
            c.execute(
                "DELETE FROM messages WHERE kind = 'request' AND sender_id = ? "
                "AND sender_incarnation = ? AND id IN (SELECT value FROM json_each(?))",
                (*me, ids),
            )
            return fetch(
                c,
                "DELETE FROM messages WHERE recipient_id = ? AND kind = 'reply' "
                "AND correlation_id IN (SELECT value FROM json_each(?)) RETURNING *",
                (me[0], ids),
            )

        return [_record(r) for r in self._write(me, txn)]

    # -- invariants -----------------------------------------------------------------------------

    def pending(self) -> int:
        return int(self._store.value("SELECT count(*) FROM messages WHERE acked = 0"))

    def problems(self) -> list[Problem]:
        store, out = self._store, []
        for r in store.rows("SELECT id, kind FROM messages WHERE kind IN ('request', 'reply') "
                            "AND correlation_id IS NULL"):
            out.append(Problem(f"{r['kind']} {r['id']} has no correlation id"))
        for r in store.rows(
            "SELECT id FROM messages WHERE kind = 'request' AND reply_to IS NOT sender_id"
        ):
            out.append(Problem(f"request {r['id']} does not reply to its sender"))
        for r in store.rows("SELECT id FROM messages WHERE NOT json_valid(payload)"):
            out.append(Problem(f"message {r['id']}: payload is not valid JSON"))
        for r in store.rows(
            "SELECT id FROM messages WHERE acked <> 0 AND delivered_incarnation IS NULL"
        ):
            out.append(Problem(f"message {r['id']} is acked but never delivered"))
        for r in store.rows("SELECT id FROM messages WHERE expires_at < created_at"):
            out.append(Problem(f"message {r['id']} expires before it was created"))
        n = store.value("SELECT count(*) FROM messages WHERE expires_mono < ?",
                        (self._clock.now(),))
        if n:
            out.append(Problem(f"{n} expired messages, awaiting the reaper", pending=True))
        return out

    def holders(self) -> tuple[list[tuple[str, Member]], list[tuple[str, str]]]:
        store = self._store
        requests = [(r["id"], (r["sender_id"], r["sender_incarnation"])) for r in store.rows(
            "SELECT id, sender_id, sender_incarnation FROM messages WHERE kind = 'request'")]
        replies = [(r["id"], r["recipient_id"]) for r in store.rows(
            "SELECT id, recipient_id FROM messages WHERE kind = 'reply'")]
        return requests, replies
