"""The engine seam: what a storage engine must provide, as named operations per capability.

The capability modules (``coord.kv``, ``coord.messages``, ``coord.events`` so far) hold the
rules — validation, payload checks, waiting, the death rule's policy — and the public API;
an engine holds its SQL, its driver import and error translation, and three services that
differ per engine:

* ``clock`` — the time every expiry is computed and compared with. No operation takes the
  caller's time: the engine stamps expiry from its own clock and hands back durations, so an
  engine whose clock is the server's (compared only in SQL) fits without changing callers.
  SQLite: ``CLOCK_MONOTONIC`` of this boot, with the boot id as its epoch.
* ``liveness`` — proof of death. SQLite: the instance's record lock on its lock file, pid +
  start token, and a pidfd to hear of a death at once.
* ``wakeup`` — how a waiter learns that something it waits for was committed. SQLite: a
  datagram nudge to the instance's socket after commit, ``PRAGMA data_version`` polling
  between nudges. An engine nudges on its own after the writes that need it; callers only
  wait.

A ``Store`` owns its engine object (``store.backend``), made by the factory registered under
the engine's name (``register_engine``): ``coord/__init__`` imports the engines, so the core
(``coord.db``) depends on this protocol only and never on an engine — the engine depends on
the core. Each engine lives in its own folder, one file per capability
(``coord/backend/sqlite/``).

The plan, in steps that each keep the whole suite green:

1. (done) This protocol; the SQLite engine's clock, liveness, wake-up, instance reads,
   events, kv and messages; ``coord.kv``, ``coord.messages`` and ``coord.events`` hold no SQL.
2. (done) Instances (register, heartbeat, deregister, takeover, listing), the proof of life
   (``Proof``) and the verdict (``judge``/``Probe``, the own-lock set: the SQLite liveness
   file), the death rule's state changes (``DeathRule``: bury, release claims, release
   leases, expiry, tombstones, trim, checkpoint, boot rebase; ``coord.reaper`` keeps the
   policy), the recorded process trees (``TreeOps``), tracked processes (``ProcessOps``)
   and the invariant checks (``CheckOps``); opening a store (create, migrate, boot rebase)
   is the engine's ``open``, above ``Store``, which ended the ``db``/``migrate``/
   ``reaper``/``instances``/``tree`` circle. ``coord.queues`` and ``coord.leases`` still
   reach the engine's in-transaction ``bury``/``release_claims`` and ``judge``/``Probe``
   through ``coord.reaper`` and ``coord.instances`` until steps 3 and 4.
3. Leases (take, renew, release — also by an operator —, observe, fenced write, typed fenced
   kv set/cas and queue put) and the recorded process groups; ends ``leases``/``elect``/
   ``runner`` circle.
4. Queues: (done) put, claim, ack, fail, extend, release, cancel, stats, listing, dead
   letters, adopt, purge (``QueueOps``, in ``.queue_ops``; ``coord.queues`` keeps
   validation, waiting, retries and their backoff, and the death rule's policy for claims;
   a claim going back to ready is the death rule's one ``release_claims``) and the legacy
   import (``import_jobs``), the fenced queue put (``LeaseOps.fenced_queue_put``).
   (done) The schema ladder (``MetaOps``, ``backend.meta``; the SQLite files in
   ``schema/sqlite/``) and read-only ad-hoc SQL (``AdhocOps``, ``backend.adhoc``); the
   remaining writes of ``coord.events``, ``coord.demo`` and ``coord.metrics`` go through
   ``EventLog.record``, ``LeaseOps.forget`` and ``MessageOps.pending``. (done) The
   connections, pragmas, transactions, busy retry and fork rule (``sqlite/connection``,
   ``sqlite/retry``, ``sqlite/forking``): no module outside the engine folders uses apsw.
5. The PostgreSQL engine in ``coord/backend/postgresql/``: one file per capability, its
   clock the server's ``clock_timestamp()`` compared only in SQL, liveness a session advisory
   lock plus a death certificate from the holder's host, wake-up ``LISTEN/NOTIFY`` re-checked
   after every reconnect. One contract test suite runs against every registered engine.

What every engine must implement is the ``Backend`` protocol below (each operation says what
it guarantees). Only operations that callers route through today are declared; the later
steps add theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .lease_ops import Armed, LeaseOps  # step 3: leases
from .lifecycle import CheckOps, DeathRule, InstanceWrites, ProcessOps, Proof, TreeOps
from .queue_ops import JOB_FIELDS, QueueOps  # step 4: queues
from .records import (
    KvRecord,
    LeaseRecord,
    LeaseTaken,
    Member,
    MessageRecord,
    Problem,
    Seen,
)
from .store_ops import AdhocOps, AdhocResult, MetaOps

if TYPE_CHECKING:
    import socket

    from ..db import Row, Store
    from ..instances import InstanceInfo

T = TypeVar("T")

__all__ = [
    "AdhocOps",
    "AdhocResult",
    "Backend",
    "CheckOps",
    "DeathRule",
    "EventLog",
    "ExpiryClock",
    "InstanceOps",
    "InstanceReads",
    "InstanceWrites",
    "JOB_FIELDS",
    "KvOps",
    "KvRecord",
    "Armed",
    "LeaseOps",
    "LeaseRecord",
    "LeaseTaken",
    "Liveness",
    "Member",
    "MessageOps",
    "MessageRecord",
    "MetaOps",
    "Problem",
    "ProcessOps",
    "Proof",
    "QueueOps",
    "Seen",
    "TreeOps",
    "Wakeup",
    "Watch",
    "inbox_channel",
    "lease_channel",
    "open_backend",
    "queue_channel",
    "refuse_location",
    "register_engine",
]


# -- the three per-engine services -----------------------------------------------------------


class ExpiryClock(Protocol):
    """The clock every expiry of this engine is stamped and compared with."""

    def now(self) -> float:
        """The engine's time in seconds; comparable only with this engine's stamps of the
        same ``epoch``."""
        ...

    def epoch(self) -> str:
        """What ``now`` is counted within (SQLite: the boot id); stamps of another epoch are
        stale."""
        ...


class Watch(Protocol):
    """One instance watched for its death (see ``Liveness.watch``)."""

    def pids(self) -> list[int]:
        """The pids a waiter may select on (empty when this host cannot watch it)."""
        ...

    def exited(self) -> bool:
        """Its process has ended (seen at once, without a read)."""
        ...

    def pinned_alive(self) -> bool:
        """Proof of life that needs no probe of its lock: the watched process is the one
        that registered, and its heartbeat is current. False means "judge it"."""
        ...

    def close(self) -> None: ...


class Liveness(Protocol):
    """Proof of death. A dead verdict needs proof or an expired heartbeat, never age alone."""

    def look(self) -> object:
        """A fresh look shared by many verdicts (what the kernel says about each pid and
        lock file is asked once, and the clock read once). Make a new one for every fresh
        look."""
        ...

    def judge(self, row: Row, look: object | None = None) -> tuple[bool, str]:
        """(alive, status word) of an instance row: 'alive', else 'died', 'hung', 'reboot',
        or the tombstone's end reason."""
        ...

    def heartbeat_age(self, row: Row, look: object) -> float | None:
        """Seconds since the row's last heartbeat as of ``look`` (a ``look()``), by the
        engine's clock; None when its stamp is not comparable (SQLite: another boot)."""
        ...

    def prove(self, token: str, ttl: float = 15.0) -> Proof:
        """Start proving that this process lives, for a registration about to be made
        (``token`` names it uniquely; ``ttl`` is its TTL, which may bound what proves it);
        held until the ``Proof`` is released."""
        ...

    def forget(self, rows: Iterable[Row]) -> None:
        """After those instances were buried: remove what proved them alive (files beside
        the database, for SQLite)."""
        ...

    def watchable_pid(self, row: Row) -> int | None:
        """The pid whose exit this process can hear of at once for the instance, or None
        (another pid namespace; another host)."""
        ...

    def watch(self, row: Row | InstanceInfo) -> Watch:
        """Start watching an instance (a row, or an ``InstanceInfo``) for its death."""
        ...


class Wakeup(Protocol):
    """Waiting that costs almost nothing and wakes fast; the database stays the truth."""

    def wait_for(
        self,
        check: Callable[[], T | None],
        timeout: float | None,
        *,
        sock: socket.socket | None = None,
        watch_pids: Callable[[], Iterable[int]] | None = None,
        watch_fds: Callable[[], Iterable[int]] | None = None,
        channels: Iterable[str] = (),
        notified: bool = False,
    ) -> T | None:
        """Call ``check`` until it returns something other than None, or ``timeout``
        passes (None: never); again whenever another commit may have changed the answer,
        a nudge arrives on ``sock`` (the waiting instance's own), a watched pid exits or
        one of ``watch_fds`` (an ``Armed``'s) becomes readable.
        ``channels`` name what the waiter waits for (``inbox_channel``, ``queue_channel``):
        an engine that announces commits per channel (PostgreSQL's NOTIFY) wakes the
        waiter on their writes; the others ignore them. ``notified``: every nudge on
        ``sock`` that matters to this wait comes with an announcement on ``channels``, so
        such an engine may leave ``sock`` unwatched while it hears them all."""
        ...


def inbox_channel(instance_id: str) -> str:
    """The wake-up channel of an instance's messages (see ``Wakeup.wait_for``)."""
    return f"inbox:{instance_id}"


def queue_channel(queue: str) -> str:
    """The wake-up channel of a queue's jobs (see ``Wakeup.wait_for``)."""
    return f"queue:{queue}"


def lease_channel(name: str) -> str:
    """The wake-up channel of a lease: announced when it is made free (``Wakeup.wait_for``)."""
    return f"lease:{name}"


# -- operations per capability -----------------------------------------------------------------


class InstanceReads(Protocol):
    """Reads of the registry that other capabilities need (rows are dicts until the
    instances capability itself moves behind the seam)."""

    def get(self, member: Member) -> Row | None:
        """The row of that incarnation, whatever its status."""
        ...

    def by_ids(self, ids: Iterable[str]) -> dict[str, Row]:
        """The rows of these ids (any incarnation, any status)."""
        ...

    def registration(self, id: str) -> tuple[int, str] | None:
        """(incarnation, status) of ``id``, or None when it has no row."""
        ...


class EventLog(Protocol):
    """The bounded history of what happened."""

    def list(
        self, *, after: int, limit: int, oldest_first: bool,
        kinds: Sequence[str] | None = None, instance_id: str | None = None,
        since: float | None = None,
    ) -> list[Row]:
        """Events with id above ``after`` in id order (newest ``limit``, or the first
        ``limit`` with ``oldest_first``); ``detail`` decoded. Optionally only those of
        ``kinds``, of ``instance_id``, or recorded at or after ``since`` (wall clock)."""
        ...

    def record(self, kind: str, instance_id: str | None = None, subject: str | None = None,
               **detail: Any) -> None:
        """Record one event, stamped with the engine's wall clock, in a transaction of its
        own (for callers outside one); ``detail`` is stored as JSON."""
        ...


class KvOps(Protocol):
    """The key-value table. Every write takes the next value of one global counter as the
    key's version. An ephemeral key whose owner is proven dead is gone: a write that meets
    one applies the death rule to the owner in the same transaction."""

    def get(self, key: str) -> KvRecord | None: ...

    def prefixed(self, prefix: str) -> list[KvRecord]:
        """Every key starting with ``prefix``, in key order."""
        ...

    def set(self, key: str, value: str, owner: Member | None) -> int:
        """Write whatever was there; returns the new version. ``NotRegistered`` when
        ``owner`` is not a live incarnation."""
        ...

    def cas(self, key: str, value: str, version: int, owner: Member | None) -> int:
        """Write only while the key's version is ``version`` (0: absent), else
        ``VersionConflict``."""
        ...

    def delete(self, key: str, version: int | None) -> bool:
        """False when absent; with ``version``, ``VersionConflict`` unless it matches."""
        ...

    def drop_orphaned(self, entries: Iterable[tuple[str, int]]) -> None:
        """Delete these (key, version) ephemeral entries, whose owner incarnation has no
        live row any more."""
        ...

    def problems(self) -> list[Problem]: ...


class MessageOps(Protocol):
    """Envelopes between instances. ``me`` is the acting incarnation: every write checks
    it is still registered and alive (``NotRegistered`` otherwise) and wakes the
    recipients after commit. Expiry is stamped from the engine's clock, ``ttl`` seconds on."""

    def send(self, me: Member, id: str, to: str, topic: str, payload: str, ttl: float) -> None:
        """``NotFound`` when ``to`` has no row (alive or tombstone)."""
        ...

    def broadcast(
        self, me: Member, sends: dict[str, tuple[Member, str]], topic: str, payload: str,
        ttl: float,
    ) -> dict[str, str]:
        """``sends`` maps recipient id → (its incarnation, message id); recipients no longer
        alive in that incarnation are skipped. Returns {recipient id: message id} sent."""
        ...

    def request(self, me: Member, id: str, to: str, topic: str, payload: str,
                ttl: float) -> Row:
        """Store one request to ``to`` and return its instance row; ``NotFound`` for an
        unknown id, ``RecipientDead`` when it is a tombstone."""
        ...

    def ask(self, me: Member, asked: dict[str, str], topic: str, payload: str,
            ttl: float) -> None:
        """Store one request per {request id: recipient id}, in one transaction."""
        ...

    def receive(self, me: Member, topic: str | None) -> MessageRecord | None:
        """Deliver the oldest unexpired message or request for ``me`` (of ``topic``) not yet
        given to this incarnation, acknowledging what it was given before."""
        ...

    def ack(self, me: Member, message_id: str) -> bool: ...

    def reply(self, me: Member, request_id: str, id: str, payload: str) -> bool:
        """Replace the request with its reply, expiring when the request would have. False
        when nobody waits any more; ``InvalidArgument`` when it is not a request."""
        ...

    def replies(
        self, me: Member, request_ids: list[str], peers: list[Member], *, defer: bool
    ) -> tuple[list[MessageRecord], set[str] | None]:
        """The replies arrived for these requests — taken: deleted now, or with ``defer``
        by ``me``'s next write — and, when none has, the ids of ``peers`` still alive."""
        ...

    def give_up(self, me: Member, request_ids: list[str]) -> list[MessageRecord]:
        """Withdraw the requests; returns replies that slipped in meanwhile (taken)."""
        ...

    def drop(self, me: Member, message: MessageRecord, error: str) -> None:
        """Delete a stored message that failed validation, with a 'message dropped' event."""
        ...

    def pending(self) -> int:
        """How many stored messages and requests are not yet acknowledged."""
        ...

    def problems(self) -> list[Problem]:
        """The envelopes' own invariants (liveness-free)."""
        ...

    def holders(self) -> tuple[list[tuple[str, Member]], list[tuple[str, str]]]:
        """(request id, its sender) of every request and (reply id, its recipient id) of
        every reply: what the death rule must clear."""
        ...


# -- step 2: the registry (its reads above, its writes in ``.lifecycle``) -----------------------


class InstanceOps(InstanceReads, InstanceWrites, Protocol):
    """The registry: the reads other capabilities need and its own writes."""


class Backend(Protocol):
    """One engine bound to one store."""

    name: str
    clock: ExpiryClock
    liveness: Liveness
    wakeup: Wakeup
    instances: InstanceOps
    events: EventLog
    kv: KvOps
    messages: MessageOps
    leases: LeaseOps  # step 3
    death: DeathRule
    trees: TreeOps
    processes: ProcessOps
    checks: CheckOps
    queues: QueueOps  # step 4
    meta: MetaOps
    adhoc: AdhocOps

    def open(self) -> None:
        """Make the store usable: create the database if needed, migrate it to this
        coord's schema (``meta.migrate``), rebase a new boot. ``Store`` calls it once, when
        constructed."""
        ...

    def close(self) -> None:
        """Close the connections this store opened in this process (never one inherited
        across fork)."""
        ...

    def abandon_transaction(self) -> None:
        """Give up this thread's open transaction, if any, without waiting for a lock (the
        SIGTERM handler's: the process deregisters and ends next)."""
        ...


# -- engines by name ---------------------------------------------------------------------------

_ENGINES: dict[str, Callable[[Store], Backend]] = {}
_REFUSERS: dict[str, Callable[[str], None]] = {}


def register_engine(name: str, factory: Callable[[Store], Backend],
                    refuse: Callable[[str], None] | None = None) -> None:
    """Make ``factory(store)`` the engine called ``name``; ``refuse(location)``, if given,
    raises when this process may not use the store at ``location`` at all (SQLite: a
    database inherited open across fork), before anything touches it."""
    _ENGINES[name] = factory
    if refuse is not None:
        _REFUSERS[name] = refuse


def refuse_location(name: str, location: str) -> None:
    """Run the engine ``name``'s ``refuse`` on ``location`` (see ``register_engine``)."""
    refuse = _REFUSERS.get(name)
    if refuse is not None:
        refuse(location)


def open_backend(name: str, store: Store) -> Backend:
    """The engine ``name`` bound to ``store``."""
    try:
        factory = _ENGINES[name]
    except KeyError:
        raise LookupError(f"no coord engine named {name!r} (known: {sorted(_ENGINES)})") from None
    return factory(store)
