"""The PostgreSQL engine's messages: the ``messages`` table (see ``coord.messages`` for the
delivery rules; the SQLite engine's ``messages`` is the reference behaviour).

- Expiry: ``expires_mono`` is stamped ``coord_now() + ttl`` and compared with ``coord_now()``
  in SQL by the one rule (``MESSAGE_EXPIRY``: held back after a step of the server's clock,
  see ``.clock``); no client's clock enters it. ``created_at``/``expires_at`` are the same
  instant on the server's wall clock, for people.
- Arrival order is ``seq`` (an identity column): SQLite's rowid, which READ COMMITTED
  writers on several hosts cannot share.
- A write by an instance first locks the instance rows it relies on (its own, and the
  recipients') ``FOR SHARE``, in id order, and checks its own is still alive: the death
  rule locks those rows ``FOR UPDATE``, so a burial cannot interleave with the write (it
  waits for the commit, or the write waits and then sees the tombstone).
- Recipients are woken after the commit: the nudge socket when on this host and boot, and
  a NOTIFY on their inbox channel from inside the transaction (``.wakeup``).
- A round trip's writes — a send or request, a receive, a reply — are one statement each
  (``.message_sql``: one round trip to the server, no BEGIN/COMMIT); an empty receive
  writes nothing.

Replies taken by a waiting requester of this process are deleted by that instance's next
write (``_spent``), as on SQLite. A reply's NOTIFY carries the reply itself when it fits
(``message_sql.REPLY``): the LISTEN thread keeps it for the requester of this process that
awaits it, which then takes it without reading the table (the NOTIFY is sent at the reply's
commit, so what it carries is committed).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from ...clock import boot_id
from ...errors import InvalidArgument, NotFound, NotRegistered, RecipientDead
from .. import inbox_channel
from ..records import Member, MessageRecord, Problem
from ..spent import SpentReplies
from . import message_sql
from .clock import MESSAGE_EXPIRY
from .connection import Conn, fetch
from .death import MEMBERS, split
from .events import log_event
from .listen import channel_name

if TYPE_CHECKING:
    from .connection import PgDb, Row
    from .listen import Interest
    from .wakeup import PgWakeup

T = TypeVar("T")

#: Most requests of this store whose first look for a reply is still to come.
ARMED_MAX = 256


def _record(row: Row) -> MessageRecord:
    return MessageRecord(
        id=row["id"], kind=row["kind"], sender_id=row["sender_id"],
        sender_incarnation=row["sender_incarnation"], recipient_id=row["recipient_id"],
        topic=row["topic"], payload=row["payload"], correlation_id=row["correlation_id"],
        reply_to=row["reply_to"], created_at=row["created_at"], expires_at=row["expires_at"],
    )


def lock_alive(c: Conn, me: Member, others: Iterable[str] = ()) -> dict[str, Row]:
    """Lock the rows of ``me`` and of ``others`` (ids, any status) ``FOR SHARE`` in id order
    and return them by id; ``NotRegistered`` unless ``me`` is alive in its incarnation."""
    ids = sorted({me[0], *others})
    rows = {r["id"]: r for r in fetch(
        c, "SELECT id, incarnation, status, nudge_path, boot_id, pid, pidns, start_token, "
        "heartbeat_mono, ttl, lock_path FROM instances WHERE id = ANY(%s) ORDER BY id "
        "FOR SHARE", (ids,))}
    mine = rows.get(me[0])
    if mine is None or mine["incarnation"] != me[1] or mine["status"] != "alive":
        raise NotRegistered(me[0], "closed, declared dead or taken over")
    return rows


class PgMessages:
    """``coord.backend.MessageOps``."""

    def __init__(self, db: PgDb, wakeup: PgWakeup) -> None:
        self._db = db
        self._wakeup = wakeup
        self._boot = boot_id()
        # (id, incarnation) -> ids of replies it took and has not deleted yet.
        self._spent = SpentReplies()
        self._lock = threading.Lock()  # for _armed, _awaited and _heard
        # Request id -> the requester's interest in its inbox, taken before the request was
        # sent, until the first look for its reply (``replies``).
        self._armed: dict[str, Interest] = {}
        # Request id -> its requester, while it waits (``request``/``ask`` until
        # ``replies``/``give_up``); and the replies to those heard in a NOTIFY's payload.
        self._awaited: dict[str, Member] = {}
        self._heard: dict[str, MessageRecord] = {}
        wakeup.listener.on_payload = self._heard_note

    # -- writing ------------------------------------------------------------------------------

    def _insert(self, c: Conn, me: Member, *, id: str, kind: str, to: str, topic: str,
                payload: str, corr: str | None = None, reply_to: str | None = None,
                ttl: float | None = None) -> None:
        """Insert one message inside the caller's transaction (``_announce`` wakes them)."""
        c.execute(message_sql.INSERT, {
            "id": id, "kind": kind, "me": me[0], "inc": me[1], "to": to, "topic": topic,
            "payload": payload, "corr": corr, "reply_to": reply_to, "ttl": ttl, "until": None})

    def _announce(self, c: Conn | None, recipients: Sequence[Row], *,
                  notified: bool = False) -> list[str | None]:
        """NOTIFY the recipients' inboxes (delivered at commit) unless the statement did;
        their nudge paths on this host and boot, for after the commit."""
        if not notified and c is not None:
            self._wakeup.notify(c, [inbox_channel(r["id"]) for r in recipients])
        return [r["nudge_path"] for r in recipients if r["boot_id"] == self._boot]

    @staticmethod
    def _drop_spent(c: Conn, me: Member, ids: Iterable[str]) -> None:
        c.execute("DELETE FROM messages WHERE recipient_id = %s AND kind = 'reply' "
                  "AND id = ANY(%s)", (me[0], list(ids)))

    def _write(self, me: Member, fn: Callable[[Conn], T]) -> T:
        """``db.write(fn)`` for ``me``, also deleting the replies it has taken since its
        last write."""
        return self._spent.write(me, self._db.write, fn, self._drop_spent)

    def _statement(self, me: Member, sql: str, params: dict[str, object]) -> list[Row]:
        """One of ``.message_sql``'s statements as ``me``, deleting the replies it has taken
        since its last write."""
        spent = self._spent.of(me)
        rows = self._db.statement(sql, {**params, "me": me[0], "inc": me[1], "spent": spent})
        self._spent.deleted(me, spent)
        return rows

    def _send_one(self, me: Member, *, id: str, kind: str, to: str, topic: str,
                  payload: str, ttl: float) -> Row:
        """Store one message or request to ``to`` and announce it; its row (as locked)."""
        rows = {r["id"]: r for r in self._statement(me, message_sql.SEND, {
            "ids": sorted({me[0], to}), "id": id, "kind": kind, "to": to, "topic": topic,
            "payload": payload, "corr": id if kind == "request" else None,
            "reply_to": me[0] if kind == "request" else None, "ttl": ttl, "until": None,
            "alive": kind == "request",
            "channel": channel_name(self._db.location.schema, inbox_channel(to))})}
        mine = rows.get(me[0])
        if mine is None or mine["incarnation"] != me[1] or mine["status"] != "alive":
            raise NotRegistered(me[0], "closed, declared dead or taken over")
        row = rows.get(to)
        if row is None:
            raise NotFound("instance", to)
        if not mine["wrote"]:
            raise RecipientDead(to)
        self._wakeup.nudge(self._announce(None, [row], notified=True))
        return row

    def send(self, me: Member, id: str, to: str, topic: str, payload: str, ttl: float) -> None:
        self._send_one(me, id=id, kind="message", to=to, topic=topic, payload=payload, ttl=ttl)

    def broadcast(
        self, me: Member, sends: dict[str, tuple[Member, str]], topic: str, payload: str,
        ttl: float,
    ) -> dict[str, str]:
        sent: dict[str, str] = {}

        def txn(c: Conn) -> list[str | None]:
            rows = lock_alive(c, me, sends)
            sent.clear()
            reached = []
            for to, (member, mid) in sends.items():
                r = rows.get(to)
                # Skip one that left or was replaced since the caller looked.
                if r is None or r["incarnation"] != member[1] or r["status"] != "alive":
                    continue
                self._insert(c, me, id=mid, kind="message", to=to, topic=topic,
                             payload=payload, ttl=ttl)
                sent[to] = mid
                reached.append(r)
            return self._announce(c, reached)

        self._wakeup.nudge(self._write(me, txn))
        return sent

    def request(self, me: Member, id: str, to: str, topic: str, payload: str,
                ttl: float) -> Row:
        # Listening for the reply from before the request exists lets the first look for it
        # (made at once by the waiting requester) read nothing when no hint came since.
        armed = self._wakeup.listener.arm(inbox_channel(me[0]))
        self._await(me, [id])
        try:
            row = self._send_one(me, id=id, kind="request", to=to, topic=topic,
                                 payload=payload, ttl=ttl)
        except BaseException:
            self._unawait([id])
            if armed is not None:
                armed.close()
            raise
        if armed is not None:
            with self._lock:
                self._armed[id] = armed
                # Those whose first look never came (their caller failed in between).
                stale = list(self._armed)[:-ARMED_MAX] if len(self._armed) > ARMED_MAX else []
                dropped = [self._armed.pop(k) for k in stale]
            for it in dropped:
                it.close()
        return row

    def _disarm(self, request_ids: Iterable[str]) -> list[Interest]:
        with self._lock:
            return [it for k in request_ids if (it := self._armed.pop(k, None)) is not None]

    def _await(self, me: Member, request_ids: Iterable[str]) -> None:
        with self._lock:
            for k in request_ids:
                self._awaited[k] = me
            # Those nobody took the reply of (their caller failed in between).
            for k in list(self._awaited)[:-ARMED_MAX] if len(self._awaited) > ARMED_MAX else []:
                del self._awaited[k]
                self._heard.pop(k, None)

    def _unawait(self, request_ids: Iterable[str]) -> None:
        """Stop awaiting these requests (answered or given up)."""
        with self._lock:
            for k in request_ids:
                self._awaited.pop(k, None)
                self._heard.pop(k, None)

    def _heard_note(self, channel: str, payload: str) -> None:
        """The LISTEN thread's hook: keep a reply carried by a notification's payload (see
        ``message_sql.REPLY``) when this process awaits it."""
        head, sep, text = payload.partition("\n")
        if not sep or not head.startswith("{"):
            return
        try:
            f = json.loads(head)
            rec = MessageRecord(
                id=str(f["id"]), kind=str(f["kind"]), sender_id=str(f["sender_id"]),
                sender_incarnation=int(f["sender_incarnation"]),
                recipient_id=str(f["recipient_id"]), topic=str(f["topic"]), payload=text,
                correlation_id=f["correlation_id"], reply_to=f["reply_to"],
                created_at=float(f["created_at"]), expires_at=float(f["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return  # not one of the replies' notes: the waiter reads the table
        schema = self._db.location.schema
        with self._lock:
            me = self._awaited.get(rec.correlation_id or "")
            # Only on the requester's own inbox channel (that of its id on this deployment).
            if (me is not None and rec.kind == "reply" and rec.recipient_id == me[0]
                    and channel == channel_name(schema, inbox_channel(me[0]))):
                self._heard[rec.correlation_id or ""] = rec

    def ask(self, me: Member, asked: dict[str, str], topic: str, payload: str,
            ttl: float) -> None:
        def txn(c: Conn) -> list[str | None]:
            rows = lock_alive(c, me, asked.values())
            for mid, to in asked.items():
                self._insert(c, me, id=mid, kind="request", to=to, topic=topic,
                             payload=payload, corr=mid, reply_to=me[0], ttl=ttl)
            return self._announce(c, [rows[to] for to in set(asked.values()) if to in rows])

        self._await(me, asked)
        try:
            self._wakeup.nudge(self._write(me, txn))
        except BaseException:
            self._unawait(asked)
            raise

    def reply(self, me: Member, request_id: str, id: str, payload: str) -> bool:
        got = self._statement(me, message_sql.REPLY, {"rid": request_id, "id": id,
                                                      "payload": payload})[0]
        if not got["alive"]:
            raise NotRegistered(me[0], "closed, declared dead or taken over")
        if not got["took"]:
            other = self._db.row("SELECT kind FROM messages WHERE id = %s AND recipient_id = %s",
                                 (request_id, me[0]))
            if other:
                raise InvalidArgument(f"message {request_id} is a {other['kind']}, not "
                                      "a request: only requests take a reply")
            return False
        if not got["wrote"]:
            return False
        self._wakeup.nudge(self._announce(None, [got], notified=True))
        return True

    def drop(self, me: Member, message: MessageRecord, error: str) -> None:
        def txn(c: Conn) -> None:
            c.execute("DELETE FROM messages WHERE id = %s", (message.id,))
            log_event(c, "message dropped", me[0], message.id, sender=message.sender_id,
                      error=error)

        self._db.write(txn)

    # -- receiving ------------------------------------------------------------------------------

    def receive(self, me: Member, topic: str | None) -> MessageRecord | None:
        while True:
            got = self._statement(me, message_sql.RECEIVE, {"topic": topic})[0]
            if not got["found"] and not got["owed"]:
                return None
            if not got["alive"]:
                raise NotRegistered(me[0], "closed, declared dead or taken over")
            if got["id"] is not None:
                return _record(got)
            if not got["found"]:
                return None
            # else taken by another receiver acting as this instance: look again

    def ack(self, me: Member, message_id: str) -> bool:
        def txn(c: Conn) -> bool:
            gone = fetch(c, "DELETE FROM messages WHERE id = %s AND recipient_id = %s "
                         "AND kind = 'message' RETURNING 1", (message_id, me[0]))
            marked = fetch(
                c, "UPDATE messages SET acked = 1, delivered_incarnation = "
                "coalesce(delivered_incarnation, %s) WHERE id = %s AND recipient_id = %s "
                "AND kind = 'request' AND acked = 0 RETURNING 1", (me[1], message_id, me[0]))
            return bool(gone or marked)

        return self._write(me, txn)

    # -- waiting for replies --------------------------------------------------------------------

    def replies(
        self, me: Member, request_ids: list[str], peers: list[Member], *, defer: bool
    ) -> tuple[list[MessageRecord], set[str] | None]:
        armed = self._disarm(request_ids)
        quiet = len(armed) == len(request_ids) and all(a.quiet() for a in armed)
        for a in armed:
            a.close()
        with self._lock:
            heard = [r for k in request_ids if (r := self._heard.get(k)) is not None]
        if len(heard) == len(request_ids):
            # Taken from their NOTIFYs (sent at the replies' commits): no need to read them.
            self._unawait(request_ids)
            self._take(me, [r.id for r in heard], defer=defer)
            return heard, None
        if quiet and not peers:
            # The inbox was LISTENed from before the requests were sent and no hint came
            # since: no reply was committed (its hint would have reached those interests).
            return [], set()
        rows = self._db.rows(
            "SELECT * FROM messages WHERE recipient_id = %s AND kind = 'reply' "
            "AND correlation_id = ANY(%s)", (me[0], request_ids))
        if not rows:
            if not peers:
                return [], set()
            ids, incs = split(peers)
            found = self._db.rows(  # MEMBERS: a fixed fragment, its arrays bound
                "SELECT id FROM instances WHERE status = 'alive' AND (id, incarnation) "  # noqa: S608
                f"IN ({MEMBERS})", (ids, incs))
            return [], {str(r["id"]) for r in found}
        self._unawait([r["correlation_id"] for r in rows])
        self._take(me, [r["id"] for r in rows], defer=defer)
        return [_record(r) for r in rows], None

    def _take(self, me: Member, spent: list[str], *, defer: bool) -> None:
        """Replies taken: deleted by ``me``'s next write (``defer``) or now."""
        if defer:
            self._spent.add(me, spent)
        else:
            self._db.write(lambda c: self._drop_spent(c, me, spent))

    def give_up(self, me: Member, request_ids: list[str]) -> list[MessageRecord]:
        for armed in self._disarm(request_ids):
            armed.close()
        self._unawait(request_ids)

        def txn(c: Conn) -> list[Row]:
            c.execute("DELETE FROM messages WHERE kind = 'request' AND sender_id = %s "
                      "AND sender_incarnation = %s AND id = ANY(%s)", (*me, request_ids))
            return fetch(c, "DELETE FROM messages WHERE recipient_id = %s AND kind = 'reply' "
                         "AND correlation_id = ANY(%s) RETURNING *", (me[0], request_ids))

        return [_record(r) for r in self._write(me, txn)]

    # -- invariants -----------------------------------------------------------------------------

    def problems(self) -> list[Problem]:
        db, out = self._db, []
        for r in db.rows("SELECT id, kind FROM messages WHERE kind IN ('request', 'reply') "
                         "AND correlation_id IS NULL"):
            out.append(Problem(f"{r['kind']} {r['id']} has no correlation id"))
        for r in db.rows("SELECT id FROM messages WHERE kind = 'request' "
                         "AND reply_to IS DISTINCT FROM sender_id"):
            out.append(Problem(f"request {r['id']} does not reply to its sender"))
        for r in db.rows("SELECT id FROM messages WHERE NOT coord_is_json(payload)"):
            out.append(Problem(f"message {r['id']}: payload is not valid JSON"))
        for r in db.rows("SELECT id FROM messages WHERE acked <> 0 "
                         "AND delivered_incarnation IS NULL"):
            out.append(Problem(f"message {r['id']} is acked but never delivered"))
        for r in db.rows("SELECT id FROM messages WHERE expires_at < created_at"):
            out.append(Problem(f"message {r['id']} expires before it was created"))
        n = db.value(f"SELECT count(*) FROM messages WHERE {MESSAGE_EXPIRY} < coord_now()")  # noqa: S608 - fixed fragments
        if n:
            out.append(Problem(f"{n} expired messages, awaiting the reaper", pending=True))
        return out

    def holders(self) -> tuple[list[tuple[str, Member]], list[tuple[str, str]]]:
        requests = [(r["id"], (r["sender_id"], r["sender_incarnation"])) for r in self._db.rows(
            "SELECT id, sender_id, sender_incarnation FROM messages WHERE kind = 'request'")]
        replies = [(r["id"], r["recipient_id"]) for r in self._db.rows(
            "SELECT id, recipient_id FROM messages WHERE kind = 'reply'")]
        return requests, replies
