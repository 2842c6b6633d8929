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
The envelopes are stored by the store's engine (``store.backend.messages``), which wakes
the recipient after each commit; waiting is the engine's ``wakeup`` (no fixed sleep). On
SQLite: a nudge to the instance's socket, ``PRAGMA data_version`` for everything else. On
PostgreSQL: the nudge on the recipient's host, a NOTIFY on its inbox channel for waiters
elsewhere (or without a socket), polling as the fallback. The nudge socket is one per
instance: when several threads of one instance wait at once, one of them may wake by
polling (a millisecond or so on SQLite) instead of the nudge.

In a program the instance itself is the mailbox (``send(inst, ...)``); a process that acts
for an instance registered elsewhere (the CLI under ``coord run``) uses ``mailbox(store)``.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from .backend import Member, MessageRecord, Watch, inbox_channel
from .db import Row, Store
from .errors import InvalidArgument, NotFound, PayloadError, RecipientDead, TimeoutExpired
from .instances import Instance, InstanceInfo, list_instances, require_live, validate_id
from .payload import decode, encode

log = logging.getLogger("coord")

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
    """A peer we wait on. The engine's watch tells us at once when its process ends; each
    look also reads whether its registration is still there (a clean exit); a full verdict
    runs on news of an exit and now and then otherwise (a hung peer, or one the watch cannot
    see, whose death is seen at the next look)."""

    def __init__(self, store: Store, row: Row | InstanceInfo, *, judged: bool = False) -> None:
        self.store = store
        self.id: str = _get(row, "id")
        self.incarnation: int = _get(row, "incarnation")
        self.watch: Watch | None = store.backend.liveness.watch(row)
        self.next_judge = store.mono() + REJUDGE_INTERVAL if judged else 0.0

    def pids(self) -> list[int]:
        return self.watch.pids() if self.watch is not None else []

    def dead(self, registered: bool = True) -> bool:
        if not registered:
            return True
        exited = self.watch is not None and self.watch.exited()
        now = self.store.mono()
        if not exited and now < self.next_judge:
            return False
        first = self.next_judge == 0.0
        self.next_judge = now + REJUDGE_INTERVAL
        if first and not exited and self.watch is not None and self.watch.pinned_alive():
            return False
        backend = self.store.backend
        row = backend.instances.get((self.id, self.incarnation))
        return row is None or not backend.liveness.judge(row)[0]

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None


def _topic(topic: str) -> str:
    if not isinstance(topic, str) or len(topic) > TOPIC_MAX or "\x00" in topic:
        raise InvalidArgument(f"invalid topic {topic!r}: a string of at most {TOPIC_MAX} characters")
    return topic


def _seconds(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


class Mailbox:
    """Messaging as one instance (id, incarnation). Cheap to make; one per call is fine.

    ``sock`` is the instance's nudge socket when the instance lives in this process (then
    waits wake within microseconds of a send); without it, waits rely on the engine's other
    wake-ups (SQLite: ``data_version`` polling; PostgreSQL: NOTIFY).
    """

    def __init__(
        self, store: Store, id: str, incarnation: int, app: str, *, sock: Any = None
    ) -> None:
        self.store, self.id, self.incarnation, self.app, self.sock = store, id, incarnation, app, sock
        self._me: Member = (id, incarnation)
        self._inbox = (inbox_channel(id),)  # what its waits listen to (on engines that can)

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

    def _message(self, rec: MessageRecord) -> Message:
        cfg = self.store.config
        value = decode(rec.payload, limit=cfg.payload_limit, max_depth=cfg.payload_max_depth)
        return Message(
            id=rec.id, kind=rec.kind, sender=rec.sender_id,
            sender_incarnation=rec.sender_incarnation, recipient=rec.recipient_id,
            topic=rec.topic, payload=value, correlation_id=rec.correlation_id,
            reply_to=rec.reply_to, created_at=rec.created_at, expires_at=rec.expires_at,
            _mailbox=self,
        )

    def _ttl(self, ttl: float | None) -> float:
        return _seconds(self.store.config.message_ttl if ttl is None else ttl, "ttl")

    # -- sending ---------------------------------------------------------------------------

    def send(self, to: str, payload: Any, *, topic: str = "", ttl: float | None = None) -> str:
        """Send ``payload`` to instance ``to``; returns the message id.

        ``to`` must be registered (alive, or a tombstone that a restart would take over):
        an unknown id raises ``NotFound`` and nothing is stored. The message is kept for
        ``ttl`` seconds (default ``config.message_ttl``) until received.
        """
        validate_id(to)
        topic = _topic(topic)
        ttl = self._ttl(ttl)
        text = self._encode(payload)
        mid = str(uuid.uuid4())
        self.store.backend.messages.send(self._me, mid, to, topic, text, ttl)
        return mid

    def broadcast(
        self, payload: Any, *, topic: str = "", app: str | None = None, ttl: float | None = None
    ) -> dict[str, str]:
        """Send ``payload`` to every live instance of ``app`` (default: this instance's app)
        except this one: one message per recipient. Returns {recipient id: message id}."""
        topic = _topic(topic)
        ttl = self._ttl(ttl)
        text = self._encode(payload)
        targets = [i for i in list_instances(self.store, app=app or self.app) if i.id != self.id]
        sends = {i.id: ((i.id, i.incarnation), str(uuid.uuid4())) for i in targets}
        return self.store.backend.messages.broadcast(self._me, sends, topic, text, ttl)

    # -- receiving -------------------------------------------------------------------------

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
        backend = self.store.backend

        def check() -> Message | None:
            while True:
                rec = backend.messages.receive(self._me, topic)
                if rec is None:
                    return None
                try:
                    return self._message(rec)
                except PayloadError as e:
                    # A stored payload that fails validation (written around coord) is
                    # dropped, with an event, rather than left to block the inbox.
                    log.warning("[%s] dropped message %s: %s", self.id, rec.id, e)
                    backend.messages.drop(self._me, rec, str(e))

        # Each write that nudges for a message also announces it on the inbox (``notified``).
        return backend.wakeup.wait_for(check, timeout, sock=self.sock, channels=self._inbox,
                                       notified=True)

    def ack(self, message_id: str) -> bool:
        """Acknowledge a message addressed to this instance: a plain message is deleted, a
        request is kept until it is answered. False when there was nothing to acknowledge."""
        return self.store.backend.messages.ack(self._me, message_id)

    # -- request and reply -----------------------------------------------------------------

    def reply(self, request_id: str, payload: Any, *, strict: bool = False) -> bool:
        """Answer request ``request_id`` (addressed to this instance).

        Returns False, and stores nothing, when nobody waits for the answer any more (the
        requester gave up, died, or was already answered); with ``strict`` that raises
        ``NotFound`` instead. Replying to a plain message raises ``InvalidArgument``.
        """
        text = self._encode(payload)
        ok = self.store.backend.messages.reply(self._me, request_id, str(uuid.uuid4()), text)
        if not ok and strict:
            raise NotFound("pending request", request_id)
        return ok

    def _poll(
        self, request_ids: list[str], peers: list[_Peer]
    ) -> tuple[list[MessageRecord], set[str] | None]:
        """The replies that have arrived for these requests (a cheap read) and, when none
        has, which of ``peers`` are still registered. A reply taken here is deleted by this
        instance's next write (at once when this mailbox acts for an instance elsewhere)."""
        return self.store.backend.messages.replies(
            self._me, request_ids, [(p.id, p.incarnation) for p in peers],
            defer=self.sock is not None)

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
        backend = self.store.backend
        row = backend.messages.request(self._me, mid, to, topic, text, timeout)
        peer = _Peer(self.store, row)
        first = [True]  # the request's own transaction has just seen the recipient registered
        try:
            def check() -> MessageRecord | bool | None:
                got, registered = self._poll([mid], [] if first[0] else [peer])
                if got:
                    return got[0]
                seen = first[0] or (registered is not None and peer.id in registered)
                first[0] = False
                return True if peer.dead(seen) else None

            found = backend.wakeup.wait_for(check, timeout, sock=self.sock,
                                            watch_pids=peer.pids, channels=self._inbox,
                                            notified=True)
        finally:
            peer.close()
        if found is True or found is None:
            late = backend.messages.give_up(self._me, [mid])
            if not late:
                if found is True:
                    raise RecipientDead(to)
                raise TimeoutExpired(f"request to {to}", timeout)
            found = late[0]
        assert isinstance(found, MessageRecord)
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
        backend = self.store.backend
        order = [t.id for t in targets]
        peers = {t.id: _Peer(self.store, t, judged=True) for t in targets}
        try:
            asked = {str(uuid.uuid4()): t.id for t in targets}
            backend.messages.ask(self._me, asked, topic, text, timeout)
            pending = dict(asked)  # request id -> target id
            replies: dict[str, Message] = {}
            dead: list[str] = []

            def take(recs: list[MessageRecord]) -> None:
                for r in recs:
                    to = pending.pop(r.correlation_id or "", None)
                    if to is None:
                        continue
                    try:
                        replies[to] = self._message(r)
                    except PayloadError as e:
                        log.warning("[%s] bad reply from %s dropped: %s", self.id, to, e)

            def check() -> bool | None:
                recs, registered = self._poll(list(pending), [peers[to] for to in pending.values()])
                take(recs)
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

            backend.wakeup.wait_for(check, timeout, sock=self.sock, watch_pids=pids,
                                    channels=self._inbox, notified=True)
            take(backend.messages.give_up(self._me, list(asked)))
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
