"""Messages between instances: send, broadcast, receive, request → reply, gather.

The envelope (one row of the ``messages`` table)::

    id              a UUID
    kind            'message' (send, broadcast), 'request' (request, gather) or 'reply'
    sender          the sending instance's id (and sender_incarnation)
    recipient       the receiving instance's id
    topic           a plain string ('' when none); receive() can filter on it
    created_at      wall clock, for people
    expires_at      wall clock, for people (expiry itself uses expires_mono)
    correlation_id  a request's own id; a reply carries the id of the request it answers
    reply_to        on a request: the instance the reply goes to; None otherwise

Delivery is at least once to a live recipient:

* ``receive()`` returns the oldest message addressed to this instance that this incarnation
  has not been given yet (FIFO by arrival), and in the same transaction records it as
  delivered to this incarnation (``delivered_incarnation``).
* A delivered message is acknowledged by the recipient's next ``receive()`` (whatever its
  topic filter) or by an explicit ``ack()``. An acknowledged message is deleted; an
  acknowledged request is kept (``acked = 1``) until it is answered or its sender gives up.
* Until then a restart of the recipient with the same id (a new incarnation) gets it again,
  so a crash between receive() and the work it triggered loses nothing. Consumers that hand
  messages to several threads should ack explicitly: a receive() on any thread acknowledges
  everything this incarnation was given before.
* Messages to a dead instance are kept until their TTL (a restart with the same id gets
  them), then reaped; sending to an id that was never registered (or whose row is gone)
  raises ``NotFound`` at once.
* A request lives until it is answered (the reply replaces it), its timeout passes, or its
  sender dies. Its reply is addressed to the requester and consumed by the waiting
  ``request()``/``gather()``, never by ``receive()``; the requester deletes it with its next
  write. A reply to a request nobody waits for any more is discarded.
* A request whose recipient dies while the requester waits fails at once with
  ``RecipientDead``: the requester watches the recipient's pid (pidfd) and re-judges it.

Payloads are JSON data (``coord.payload``), validated on the way in and on the way out (a
stored payload that fails is dropped with a 'message dropped' event).
Waiting uses ``coord.nudge.wait_for``: the sender nudges the recipient's socket after each
commit, and ``PRAGMA data_version`` catches everything else; there is no fixed sleep. The
nudge socket is one per instance: when several threads of one instance wait at once, one
of them may wake by ``data_version`` polling (a millisecond or so) instead of the nudge.

In a program the instance itself is the mailbox (``send(inst, ...)``); a process that acts
for an instance registered elsewhere (the CLI under ``coord run``) uses ``mailbox(store)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import apsw

from . import nudge
from .clock import boot_id
from .db import Row, Store, fetch, translated
from .errors import (
    InvalidArgument,
    NotFound,
    NotRegistered,
    PayloadError,
    RecipientDead,
    TimeoutExpired,
)
from .events import log_event
from .identity import ProcIdentity, pid_namespace, still_running
from .instances import Instance, InstanceInfo, judge, list_instances, require_live, validate_id
from .payload import decode, encode

log = logging.getLogger("coord")
T = TypeVar("T")

# Replies taken by request()/gather() in this process and not yet deleted, per store and
# (id, incarnation): the instance's next write deletes them, so a round trip costs one
# transaction less. Left over at exit, they go at their expiry or with the instance.
_SPENT: weakref.WeakKeyDictionary[Store, dict[tuple[str, int], set[str]]] = (
    weakref.WeakKeyDictionary())
_SPENT_LOCK = threading.Lock()

#: How long request() waits for its reply unless told otherwise (seconds).
DEFAULT_REQUEST_TIMEOUT = 30.0
#: How long gather() waits for the replies unless told otherwise (seconds).
DEFAULT_GATHER_TIMEOUT = 5.0
#: Longest topic accepted, in characters.
TOPIC_MAX = 1000
#: How often a waiting requester re-judges a peer without news of its death (seconds); a
#: pidfd wakes it at once for a crash, this only covers a hung peer or another pid namespace.
REJUDGE_INTERVAL = 0.25


@dataclass(frozen=True)
class Message:
    """One received message (or reply), its payload already validated and decoded."""

    id: str
    kind: str
    sender: str
    sender_incarnation: int
    recipient: str
    topic: str
    payload: Any
    correlation_id: str | None
    reply_to: str | None
    created_at: float
    expires_at: float
    _mailbox: Mailbox | None = field(default=None, repr=False, compare=False)

    def reply(self, payload: Any) -> bool:
        """Answer this request. False when nobody waits for the answer any more (the
        requester gave up or died): the reply is then discarded."""
        if self._mailbox is None:
            raise InvalidArgument("this message was not received through a mailbox")
        return self._mailbox.reply(self.id, payload)

    def ack(self) -> bool:
        """Acknowledge this message now (see the module docstring)."""
        if self._mailbox is None:
            raise InvalidArgument("this message was not received through a mailbox")
        return self._mailbox.ack(self.id)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "sender": self.sender,
            "sender_incarnation": self.sender_incarnation,
            "recipient": self.recipient,
            "topic": self.topic,
            "payload": self.payload,
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True)
class Gathered:
    """What a gather brought back: the replies, in the order the instances were asked, and
    who did not answer — ``silent`` (alive at the timeout) and ``dead`` (died meanwhile)."""

    replies: list[Message]
    silent: list[str]
    dead: list[str]

    @property
    def missing(self) -> list[str]:
        return [*self.silent, *self.dead]

    def to_json(self) -> dict[str, Any]:
        return {
            "replies": [m.to_json() for m in self.replies],
            "silent": list(self.silent),
            "dead": list(self.dead),
        }


class _Peer:
    """A peer we wait on. A pidfd tells us at once when its process ends; each look also
    reads whether its registration is still there (a clean exit); a full ``judge`` runs on
    news of an exit and now and then otherwise (a hung peer, or one in another pid
    namespace, where there is no pidfd and a death is seen at the next look)."""

    def __init__(self, store: Store, row: Row | InstanceInfo, *, judged: bool = False) -> None:
        self.store = store
        self.id: str = _get(row, "id")
        self.incarnation: int = _get(row, "incarnation")
        self.row = row
        same_ns = _get(row, "pidns") == pid_namespace()
        self.pid: int = _get(row, "pid") if same_ns else 0
        self.fd = nudge.pidfd(self.pid)
        self.next_judge = store.mono() + REJUDGE_INTERVAL if judged else 0.0

    def pids(self) -> list[int]:
        return [self.pid] if self.fd is not None else []

    def _quick_alive(self, now: float) -> bool:
        """Alive without probing its lock: our pidfd pins the process, so a matching start
        token read after opening it proves the very process that registered still runs."""
        row = self.row
        if self.fd is None or not isinstance(row, dict) or row["status"] != "alive":
            return False
        if row["boot_id"] != boot_id() or now - row["heartbeat_mono"] > row["ttl"]:
            return False
        return still_running(ProcIdentity(row["boot_id"], row["pid"], row["start_token"]))

    def dead(self, registered: bool = True) -> bool:
        if not registered:
            return True
        exited = False
        if self.fd is not None:
            exited = bool(select.select([self.fd], [], [], 0)[0])
        now = self.store.mono()
        if not exited and now < self.next_judge:
            return False
        first = self.next_judge == 0.0
        self.next_judge = now + REJUDGE_INTERVAL
        if first and not exited and self._quick_alive(now):
            return False
        row = self.store.row(
            "SELECT * FROM instances WHERE id = ? AND incarnation = ?", (self.id, self.incarnation)
        )
        return row is None or not judge(self.store, row, now)[0]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _topic(topic: str) -> str:
    if not isinstance(topic, str) or len(topic) > TOPIC_MAX or "\x00" in topic:
        raise InvalidArgument(f"invalid topic {topic!r}: a string of at most {TOPIC_MAX} characters")
    return topic


def _seconds(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _ids_json(ids: Iterable[str]) -> str:
    return json.dumps(list(ids))


class Mailbox:
    """Messaging as one instance (id, incarnation). Cheap to make; one per call is fine.

    ``sock`` is the instance's nudge socket when the instance lives in this process (then
    waits wake within microseconds of a send); without it, waits poll ``data_version``.
    """

    def __init__(
        self, store: Store, id: str, incarnation: int, app: str, *, sock: Any = None
    ) -> None:
        self.store, self.id, self.incarnation, self.app, self.sock = store, id, incarnation, app, sock

    @classmethod
    def of(cls, who: Instance | Mailbox) -> Mailbox:
        if isinstance(who, Mailbox):
            return who
        if isinstance(who, Instance):
            mine = who.pid == os.getpid() and not who.closed
            return cls(who.store, who.id, who.incarnation, who.app, sock=who.sock if mine else None)
        raise InvalidArgument(f"expected an Instance or a Mailbox, got {type(who).__name__}")

    def __repr__(self) -> str:
        return f"Mailbox({self.id!r}#{self.incarnation})"

    # -- helpers ---------------------------------------------------------------------------

    def _encode(self, payload: Any) -> str:
        cfg = self.store.config
        return encode(payload, limit=cfg.payload_limit, max_depth=cfg.payload_max_depth)

    def _check_me(self, c: apsw.Connection) -> None:
        ok = c.execute(
            "SELECT 1 FROM instances WHERE id = ? AND incarnation = ? AND status = 'alive'",
            (self.id, self.incarnation),
        ).fetchall()
        if not ok:
            raise NotRegistered(self.id, "closed, declared dead or taken over")

    def _message(self, row: Row) -> Message:
        cfg = self.store.config
        value = decode(row["payload"], limit=cfg.payload_limit, max_depth=cfg.payload_max_depth)
        return Message(
            id=row["id"], kind=row["kind"], sender=row["sender_id"],
            sender_incarnation=row["sender_incarnation"], recipient=row["recipient_id"],
            topic=row["topic"], payload=value, correlation_id=row["correlation_id"],
            reply_to=row["reply_to"], created_at=row["created_at"], expires_at=row["expires_at"],
            _mailbox=self,
        )

    def _drop_bad(self, row: Row, error: PayloadError) -> None:
        """A stored payload that fails validation (written around coord) is dropped, with an
        event, rather than left to block the inbox."""
        log.warning("[%s] dropped message %s: %s", self.id, row["id"], error)

        def txn(c: apsw.Connection) -> None:
            c.execute("DELETE FROM messages WHERE id = ?", (row["id"],))
            log_event(c, self.store.wall(), "message dropped", self.id, row["id"],
                      sender=row["sender_id"], error=str(error))

        self.store.write(txn)

    def _insert(
        self, c: apsw.Connection, *, id: str, kind: str, to: str, topic: str, payload: str,
        correlation_id: str | None, reply_to: str | None, ttl: float,
    ) -> None:
        now_mono, now_wall = self.store.mono(), self.store.wall()
        c.execute(
            "INSERT INTO messages (id, kind, sender_id, sender_incarnation, recipient_id, topic, "
            "payload, correlation_id, reply_to, created_at, expires_at, expires_mono) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (id, kind, self.id, self.incarnation, to, topic, payload, correlation_id, reply_to,
             now_wall, now_wall + ttl, now_mono + ttl),
        )

    # -- sending ---------------------------------------------------------------------------

    def send(self, to: str, payload: Any, *, topic: str = "", ttl: float | None = None) -> str:
        """Send ``payload`` to instance ``to``; returns the message id.

        ``to`` must be registered (alive, or a tombstone that a restart would take over):
        an unknown id raises ``NotFound`` and nothing is stored. The message is kept for
        ``ttl`` seconds (default ``config.message_ttl``) until received.
        """
        validate_id(to)
        topic = _topic(topic)
        ttl = _seconds(self.store.config.message_ttl if ttl is None else ttl, "ttl")
        text = self._encode(payload)
        mid = str(uuid.uuid4())

        def txn(c: apsw.Connection) -> str | None:
            self._check_me(c)
            rec = c.execute("SELECT nudge_path FROM instances WHERE id = ?", (to,)).fetchall()
            if not rec:
                raise NotFound("instance", to)
            self._insert(c, id=mid, kind="message", to=to, topic=topic, payload=text,
                         correlation_id=None, reply_to=None, ttl=ttl)
            return str(rec[0][0]) if rec[0][0] else None

        nudge.nudge([self._write(txn)])
        return mid

    def broadcast(
        self, payload: Any, *, topic: str = "", app: str | None = None, ttl: float | None = None
    ) -> dict[str, str]:
        """Send ``payload`` to every live instance of ``app`` (default: this instance's app)
        except this one: one message per recipient. Returns {recipient id: message id}."""
        topic = _topic(topic)
        ttl = _seconds(self.store.config.message_ttl if ttl is None else ttl, "ttl")
        text = self._encode(payload)
        targets = [i for i in list_instances(self.store, app=app or self.app) if i.id != self.id]
        sent = {i.id: str(uuid.uuid4()) for i in targets}

        def txn(c: apsw.Connection) -> list[str | None]:
            self._check_me(c)
            paths: list[str | None] = []
            for info in targets:
                # Skip one that left or was replaced since we looked.
                if not c.execute(
                    "SELECT 1 FROM instances WHERE id = ? AND incarnation = ? AND status = 'alive'",
                    (info.id, info.incarnation),
                ).fetchall():
                    sent.pop(info.id, None)
                    continue
                self._insert(c, id=sent[info.id], kind="message", to=info.id, topic=topic,
                             payload=text, correlation_id=None, reply_to=None, ttl=ttl)
                paths.append(info.nudge_path)
            return paths

        nudge.nudge(self._write(txn))
        return sent

    # -- receiving -------------------------------------------------------------------------

    def _ack(self, c: apsw.Connection) -> None:
        """Acknowledge what this incarnation was given before (the 'next receive' rule)."""
        c.execute(
            "DELETE FROM messages WHERE recipient_id = ? AND delivered_incarnation = ? "
            "AND acked = 0 AND kind = 'message'",
            (self.id, self.incarnation),
        )
        c.execute(
            "UPDATE messages SET acked = 1 WHERE recipient_id = ? AND delivered_incarnation = ? "
            "AND acked = 0 AND kind = 'request'",
            (self.id, self.incarnation),
        )

    def receive(self, timeout: float | None = None, *, topic: str | None = None) -> Message | None:
        """The next message or request for this instance (only ``topic`` if given), waiting
        up to ``timeout`` seconds (None: forever; 0: don't wait). None when nothing came.

        Acknowledges what the previous receive() returned (see the module docstring).
        Answer a request with ``message.reply(payload)``.
        """
        if topic is not None:
            topic = _topic(topic)
        if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
            raise InvalidArgument(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        # One read per look: the next message for us, and whether earlier deliveries still
        # await their acknowledgement. CAST(?1 AS TEXT): with a bare parameter compared to
        # an indexed column and an ORDER BY, SQLite prepares the statement again at every
        # bind (12 µs a look instead of 3; see coord/queues.py's _PICK).
        sql = (
            "SELECT (SELECT id FROM messages WHERE recipient_id = CAST(?1 AS TEXT) AND acked = 0 "
            "AND kind <> 'reply' AND (delivered_incarnation IS NULL OR delivered_incarnation <> ?2) "
            "AND expires_mono > ?3 AND (?4 IS NULL OR topic = ?4) ORDER BY rowid LIMIT 1), "
            "EXISTS (SELECT 1 FROM messages WHERE recipient_id = ?1 AND acked = 0 "
            "AND delivered_incarnation = ?2)"
        )

        def deliver(mid: str | None, owed: bool) -> Callable[[apsw.Connection], Row | None]:
            def txn(c: apsw.Connection) -> Row | None:
                if owed:
                    self._check_me(c)
                    self._ack(c)
                if mid is None:
                    return None
                rows = fetch(
                    c,
                    "UPDATE messages SET delivered_incarnation = ?1 WHERE id = ?2 AND acked = 0 "
                    "AND (delivered_incarnation IS NULL OR delivered_incarnation <> ?1) "
                    "AND EXISTS (SELECT 1 FROM instances WHERE id = ?3 AND incarnation = ?1 "
                    "AND status = 'alive') RETURNING *",
                    (self.incarnation, mid, self.id),
                )
                if not rows:
                    self._check_me(c)  # raises if we are no longer registered
                return rows[0] if rows else None

            return txn

        def check() -> Message | None:
            while True:
                params = (self.id, self.incarnation, self.store.mono(), topic)
                with translated(str(self.store.path)):
                    found, owed = self.store.conn().execute(sql, params).fetchall()[0]
                if found is None and not owed:
                    return None
                row = self._write(deliver(None if found is None else str(found), bool(owed)))
                if row is None:
                    if found is None:
                        return None
                    continue  # taken by another receiver acting as this instance
                try:
                    return self._message(row)
                except PayloadError as e:
                    self._drop_bad(row, e)

        return nudge.wait_for(self.store, check, timeout, sock=self.sock)

    def ack(self, message_id: str) -> bool:
        """Acknowledge a message addressed to this instance: a plain message is deleted, a
        request is kept until it is answered. False when there was nothing to acknowledge."""

        def txn(c: apsw.Connection) -> bool:
            gone = c.execute(
                "DELETE FROM messages WHERE id = ? AND recipient_id = ? AND kind = 'message' "
                "RETURNING 1", (message_id, self.id)).fetchall()
            marked = c.execute(
                "UPDATE messages SET acked = 1, delivered_incarnation = "
                "coalesce(delivered_incarnation, ?) WHERE id = ? AND recipient_id = ? "
                "AND kind = 'request' AND acked = 0 RETURNING 1",
                (self.incarnation, message_id, self.id)).fetchall()
            return bool(gone or marked)

        return self._write(txn)

    # -- request and reply -----------------------------------------------------------------

    def reply(self, request_id: str, payload: Any, *, strict: bool = False) -> bool:
        """Answer request ``request_id`` (addressed to this instance).

        Returns False, and stores nothing, when nobody waits for the answer any more (the
        requester gave up, died, or was already answered); with ``strict`` that raises
        ``NotFound`` instead. Replying to a plain message raises ``InvalidArgument``.
        """
        text = self._encode(payload)
        rid = str(uuid.uuid4())

        def txn(c: apsw.Connection) -> tuple[bool, str | None]:
            self._check_me(c)
            got = fetch(
                c,
                "DELETE FROM messages WHERE id = ? AND recipient_id = ? AND kind = 'request' "
                "RETURNING sender_id, sender_incarnation, topic, correlation_id, expires_mono",
                (request_id, self.id),
            )
            if not got:
                other = c.execute("SELECT kind FROM messages WHERE id = ? AND recipient_id = ?",
                                  (request_id, self.id)).fetchall()
                if other:
                    raise InvalidArgument(f"message {request_id} is a {other[0][0]}, not a "
                                          "request: only requests take a reply")
                return False, None
            req = got[0]
            asker = c.execute(
                "SELECT nudge_path FROM instances WHERE id = ? AND incarnation = ? "
                "AND status = 'alive'",
                (req["sender_id"], req["sender_incarnation"]),
            ).fetchall()
            if not asker:
                return False, None
            ttl = max(req["expires_mono"] - self.store.mono(), 1.0)
            self._insert(c, id=rid, kind="reply", to=req["sender_id"], topic=req["topic"],
                         payload=text, correlation_id=req["correlation_id"] or request_id,
                         reply_to=None, ttl=ttl)
            return True, str(asker[0][0]) if asker[0][0] else None

        ok, path = self._write(txn)
        if not ok and strict:
            raise NotFound("pending request", request_id)
        if ok:
            nudge.nudge([path])
        return ok

    def _poll(self, request_ids: list[str], peers: list[_Peer]) -> tuple[list[Row], set[str] | None]:
        """The replies that have arrived for these requests (a cheap read) and, when none
        has, which of ``peers`` are still registered. A reply taken here is deleted by this
        instance's next write (at once when this mailbox acts for an instance elsewhere)."""
        conn = self.store.conn()
        with translated(str(self.store.path)):
            if len(request_ids) == 1:
                replies = fetch(
                    conn,
                    "SELECT * FROM messages WHERE correlation_id = ? AND recipient_id = ? "
                    "AND kind = 'reply'",
                    (request_ids[0], self.id),
                )
            else:
                replies = fetch(
                    conn,
                    "SELECT * FROM messages WHERE recipient_id = ? AND kind = 'reply' "
                    "AND correlation_id IN (SELECT value FROM json_each(?))",
                    (self.id, _ids_json(request_ids)),
                )
            if not replies:
                if len(peers) == 1:
                    found = conn.execute(
                        "SELECT id FROM instances WHERE id = ? AND incarnation = ? "
                        "AND status = 'alive'", (peers[0].id, peers[0].incarnation)).fetchall()
                else:
                    found = conn.execute(
                        "SELECT id FROM instances WHERE status = 'alive' AND (id, incarnation) "
                        "IN (SELECT value->>0, value->>1 FROM json_each(?))",
                        (json.dumps([[p.id, p.incarnation] for p in peers]),)).fetchall()
                return [], {str(r[0]) for r in found}
        spent = [r["id"] for r in replies]
        if self.sock is None:
            self.store.write(lambda c: self._drop_spent(c, spent))
        else:
            with _SPENT_LOCK:
                _SPENT.setdefault(self.store, {}).setdefault(
                    (self.id, self.incarnation), set()).update(spent)
        return replies, None

    def _drop_spent(self, c: apsw.Connection, ids: list[str]) -> None:
        c.execute(
            "DELETE FROM messages WHERE recipient_id = ? AND kind = 'reply' "
            "AND id IN (SELECT value FROM json_each(?))",
            (self.id, _ids_json(ids)),
        )

    def _write(self, fn: Callable[[apsw.Connection], T]) -> T:
        """``store.write(fn)``, also deleting the replies this instance has taken since its
        last write (saves a transaction per round trip)."""
        key = (self.id, self.incarnation)
        with _SPENT_LOCK:
            spent = list(_SPENT.get(self.store, {}).get(key, ()))
        if not spent:
            return self.store.write(fn)

        def txn(c: apsw.Connection) -> T:
            result = fn(c)
            self._drop_spent(c, spent)
            return result

        result = self.store.write(txn)
        with _SPENT_LOCK:
            mine = _SPENT.get(self.store, {})
            left = mine.get(key, set()).difference(spent)
            if left:
                mine[key] = left
            else:
                mine.pop(key, None)
        return result

    def _give_up(self, request_ids: list[str]) -> list[Row]:
        """Withdraw requests still unanswered; returns any reply that slipped in meanwhile."""
        ids = _ids_json(request_ids)

        def txn(c: apsw.Connection) -> list[Row]:
            c.execute(
                "DELETE FROM messages WHERE kind = 'request' AND sender_id = ? "
                "AND sender_incarnation = ? AND id IN (SELECT value FROM json_each(?))",
                (self.id, self.incarnation, ids),
            )
            return fetch(
                c,
                "DELETE FROM messages WHERE recipient_id = ? AND kind = 'reply' "
                "AND correlation_id IN (SELECT value FROM json_each(?)) RETURNING *",
                (self.id, ids),
            )

        return self._write(txn)

    def _ask(
        self, targets: list[InstanceInfo], text: str, topic: str, timeout: float
    ) -> dict[str, str]:
        """Store one request per target in one transaction; returns {request id: target id}."""
        asked = {str(uuid.uuid4()): t.id for t in targets}
        by_id = {t.id: t for t in targets}

        def txn(c: apsw.Connection) -> list[str | None]:
            self._check_me(c)
            paths: list[str | None] = []
            for mid, to in asked.items():
                self._insert(c, id=mid, kind="request", to=to, topic=topic, payload=text,
                             correlation_id=mid, reply_to=self.id, ttl=timeout)
                paths.append(by_id[to].nudge_path)
            return paths

        nudge.nudge(self._write(txn))
        return asked

    def request(
        self, to: str, payload: Any, *, timeout: float = DEFAULT_REQUEST_TIMEOUT, topic: str = ""
    ) -> Message:
        """Send a request to ``to`` and wait for its reply (a ``Message``).

        Raises ``NotFound`` for an unknown id, ``RecipientDead`` when the recipient is dead
        or dies before answering (at once, not at the timeout), ``TimeoutExpired`` when no
        reply came within ``timeout`` seconds. The request is withdrawn when this returns.
        """
        validate_id(to)
        topic = _topic(topic)
        timeout = _seconds(timeout, "timeout")
        text = self._encode(payload)
        mid = str(uuid.uuid4())

        def txn(c: apsw.Connection) -> Row:
            self._check_me(c)
            rows = fetch(c, "SELECT id, incarnation, status, pid, pidns, boot_id, start_token, "
                            "heartbeat_mono, ttl, nudge_path FROM instances WHERE id = ?", (to,))
            if not rows:
                raise NotFound("instance", to)
            if rows[0]["status"] != "alive":
                raise RecipientDead(to)
            self._insert(c, id=mid, kind="request", to=to, topic=topic, payload=text,
                         correlation_id=mid, reply_to=self.id, ttl=timeout)
            return rows[0]

        row = self._write(txn)
        nudge.nudge([row["nudge_path"]])
        peer = _Peer(self.store, row)
        try:
            def check() -> Row | bool | None:
                got, registered = self._poll([mid], [peer])
                if got:
                    return got[0]
                return True if peer.dead(registered is not None and peer.id in registered) else None

            found = nudge.wait_for(self.store, check, timeout, sock=self.sock, watch_pids=peer.pids)
        finally:
            peer.close()
        if found is True or found is None:
            late = self._give_up([mid])
            if not late:
                if found is True:
                    raise RecipientDead(to)
                raise TimeoutExpired(f"request to {to}", timeout)
            found = late[0]
        assert isinstance(found, dict)
        return self._message(found)

    def gather(
        self,
        payload: Any,
        *,
        topic: str = "",
        timeout: float = DEFAULT_GATHER_TIMEOUT,
        app: str | None = None,
    ) -> Gathered:
        """Ask every live instance of ``app`` (default: this one's app) except this one, and
        collect their replies until all have answered or died, or ``timeout`` passes."""
        topic = _topic(topic)
        timeout = _seconds(timeout, "timeout")
        text = self._encode(payload)
        targets = [i for i in list_instances(self.store, app=app or self.app) if i.id != self.id]
        if not targets:
            return Gathered([], [], [])
        order = [t.id for t in targets]
        peers = {t.id: _Peer(self.store, t, judged=True) for t in targets}
        try:
            asked = self._ask(list(targets), text, topic, timeout)
            pending = dict(asked)  # request id -> target id
            replies: dict[str, Message] = {}
            dead: list[str] = []

            def take(rows: list[Row]) -> None:
                for r in rows:
                    to = pending.pop(r["correlation_id"], None)
                    if to is None:
                        continue
                    try:
                        replies[to] = self._message(r)
                    except PayloadError as e:
                        log.warning("[%s] bad reply from %s dropped: %s", self.id, to, e)

            def check() -> bool | None:
                rows, registered = self._poll(list(pending), [peers[to] for to in pending.values()])
                take(rows)
                if registered is None:  # some answered: look at the others' health next time
                    return True if not pending else None
                for mid, to in list(pending.items()):
                    if peers[to].dead(to in registered):
                        del pending[mid]
                        dead.append(to)
                        peers[to].close()
                return True if not pending else None

            def pids() -> list[int]:
                return [p for to in pending.values() for p in peers[to].pids()]

            nudge.wait_for(self.store, check, timeout, sock=self.sock, watch_pids=pids)
            take(self._give_up(list(asked)))
            answered = set(replies)
            return Gathered(
                replies=[replies[i] for i in order if i in replies],
                silent=[i for i in order if i not in answered and i not in dead],
                dead=[i for i in order if i in dead and i not in answered],
            )
        finally:
            for p in peers.values():
                p.close()


def _get(target: Row | InstanceInfo, key: str) -> Any:
    return target[key] if isinstance(target, dict) else getattr(target, key)


# -- the same, as functions of an instance -------------------------------------------------


def mailbox(store: Store, instance_id: str | None = None) -> Mailbox:
    """A mailbox acting as the live instance ``instance_id`` (default ``COORD_INSTANCE_ID``),
    for a process that acts for an instance registered elsewhere (the CLI)."""
    info = require_live(store, instance_id)
    return Mailbox(store, info.id, info.incarnation, info.app)


def send(who: Instance | Mailbox, to: str, payload: Any, *, topic: str = "",
         ttl: float | None = None) -> str:
    """Send a message; see ``Mailbox.send``."""
    return Mailbox.of(who).send(to, payload, topic=topic, ttl=ttl)


def broadcast(who: Instance | Mailbox, payload: Any, *, topic: str = "", app: str | None = None,
              ttl: float | None = None) -> dict[str, str]:
    """Send to every other live instance of the app; see ``Mailbox.broadcast``."""
    return Mailbox.of(who).broadcast(payload, topic=topic, app=app, ttl=ttl)


def receive(who: Instance | Mailbox, timeout: float | None = None, *,
            topic: str | None = None) -> Message | None:
    """The next message or request, or None; see ``Mailbox.receive``."""
    return Mailbox.of(who).receive(timeout, topic=topic)


def request(who: Instance | Mailbox, to: str, payload: Any, *,
            timeout: float = DEFAULT_REQUEST_TIMEOUT, topic: str = "") -> Message:
    """Request and wait for the reply; see ``Mailbox.request``."""
    return Mailbox.of(who).request(to, payload, timeout=timeout, topic=topic)


def reply(who: Instance | Mailbox, request_id: str, payload: Any, *, strict: bool = False) -> bool:
    """Answer a request; see ``Mailbox.reply``."""
    return Mailbox.of(who).reply(request_id, payload, strict=strict)


def ack(who: Instance | Mailbox, message_id: str) -> bool:
    """Acknowledge a message; see ``Mailbox.ack``."""
    return Mailbox.of(who).ack(message_id)


def gather(who: Instance | Mailbox, payload: Any, *, topic: str = "",
           timeout: float = DEFAULT_GATHER_TIMEOUT, app: str | None = None) -> Gathered:
    """Scatter a request over the app's live instances and gather the replies; see
    ``Mailbox.gather``."""
    return Mailbox.of(who).gather(payload, topic=topic, timeout=timeout, app=app)


# -- invariants (``coord.check``) -----------------------------------------------------------


def problems(
    store: Store, instances: dict[str, Row], verdicts: dict[str, tuple[bool, str]]
) -> list[tuple[str, bool]]:
    """Broken message invariants as (detail, pending); pending ones await the reaper."""
    out: list[tuple[str, bool]] = []
    for r in store.rows(
        "SELECT id, kind FROM messages WHERE kind IN ('request', 'reply') AND correlation_id IS NULL"
    ):
        out.append((f"{r['kind']} {r['id']} has no correlation id", False))
    for r in store.rows(
        "SELECT id FROM messages WHERE kind = 'request' AND reply_to IS NOT sender_id"
    ):
        out.append((f"request {r['id']} does not reply to its sender", False))
    for r in store.rows("SELECT id FROM messages WHERE NOT json_valid(payload)"):
        out.append((f"message {r['id']}: payload is not valid JSON", False))
    for r in store.rows(
        "SELECT id FROM messages WHERE acked <> 0 AND delivered_incarnation IS NULL"
    ):
        out.append((f"message {r['id']} is acked but never delivered", False))
    for r in store.rows("SELECT id FROM messages WHERE expires_at < created_at"):
        out.append((f"message {r['id']} expires before it was created", False))
    n = store.value("SELECT count(*) FROM messages WHERE expires_mono < ?", (store.mono(),))
    if n:
        out.append((f"{n} expired messages, awaiting the reaper", True))

    def registered(id: str, inc: int | None) -> bool:
        row = instances.get(id)
        if row is not None and row["status"] == "alive" and inc in (None, row["incarnation"]):
            return True
        # Look again: it may have registered after the snapshot was taken.
        fresh = store.row("SELECT incarnation, status FROM instances WHERE id = ?", (id,))
        return (fresh is not None and fresh["status"] == "alive"
                and inc in (None, fresh["incarnation"]))

    # A dead sender's requests and the replies to a dead requester go with the death rule.
    for r in store.rows(
        "SELECT id, sender_id, sender_incarnation FROM messages WHERE kind = 'request'"
    ):
        who, inc = r["sender_id"], r["sender_incarnation"]
        if not registered(who, inc):
            out.append((f"request {r['id']} held by {who}#{inc}, which is not registered", False))
        elif who in verdicts and not verdicts[who][0]:
            out.append((f"request {r['id']} held by {who}#{inc}, {verdicts[who][1]}", True))
    for r in store.rows("SELECT id, recipient_id FROM messages WHERE kind = 'reply'"):
        who = r["recipient_id"]
        if not registered(who, None):
            out.append((f"reply {r['id']} is addressed to {who}, which is not registered", False))
        elif who in verdicts and not verdicts[who][0]:
            out.append((f"reply {r['id']} is addressed to {who}, {verdicts[who][1]}", True))
    return out
