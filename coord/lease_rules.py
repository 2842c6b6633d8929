"""The lease rules: names, renewal timing, what a lease looks like to readers, taking,
releasing (also of a dead holder), fenced writes, the recorded process group, and waking
the candidates that wait. Each rule is one operation of the store's engine
(``store.backend.leases``); ``coord.leases`` is the public face (see its docstring)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import nudge
from .backend import Armed, LeaseRecord, LeaseTaken, Member, Seen, Watch
from .clock import boot_id
from .db import Row, Store
from .errors import CoordError
from .identity import ProcIdentity, start_token, still_running
from .instances import Instance
from .instances import validate_name as _validate_name
from .reaper import bury_dead

log = logging.getLogger("coord.leases")

#: The lease the live instances elect their reaper with.
REAPER_LEASE = "coord/reaper"
#: Seconds the first waiter waits, after its holder's process exited, for the takeover it
#: sent ahead (``LeaseOps.arm``) to hear that the holder's session ended, before it looks
#: for itself.
ARMED_GRACE = 0.05


def validate_name(name: str) -> str:
    return _validate_name(name, "lease name")


def renew_interval(store: Store, ttl: float) -> float:
    """How often a holder renews a lease of this TTL."""
    return min(store.config.heartbeat, ttl / 3)


def renew_deadline(store: Store, ttl: float) -> float:
    """How long a holder keeps a lease it could not renew before stepping down (< ttl)."""
    return store.config.renew_deadline_for(ttl)


# -- observing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as seen now. ``holder`` is None when free; ``expires_in`` is negative for a
    lease whose TTL has passed but that nobody has taken over yet."""

    name: str
    holder: str | None
    holder_incarnation: int | None
    term: int | None
    ttl: float | None
    since: float | None  # wall clock: when the current holder took it
    renewed_at: float | None  # wall clock
    expires_in: float | None  # seconds
    alive: bool | None  # is the holder alive (None when free)
    holder_pid: int | None
    pgid: int | None  # process group of a `coord elect`/`coord lock` command (kept after the
    #                   holder's end until the group is proven empty)

    @property
    def held(self) -> bool:
        return self.holder is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.name, "name": self.name, "holder": self.holder,
            "instance_id": self.holder, "holder_incarnation": self.holder_incarnation,
            "term": self.term, "ttl": self.ttl, "since": self.since,
            "renewed_at": self.renewed_at, "expires_in": self.expires_in,
            "alive": self.alive, "holder_pid": self.holder_pid, "pgid": self.pgid,
        }


def info_of(store: Store, lease: LeaseRecord, look: object | None = None) -> LeaseInfo:
    """A lease as readers see it: a holder proven dead (or hung past its TTL) holds
    nothing, so the lease shows free, as the death rule will make it — without waiting for
    that rule, or the ending of the holder's tree, to be applied. ``pgid`` stays shown while
    the dead holder's recorded group is not yet proven empty."""
    backend = store.backend
    pid: int | None = None
    held = lease.holder is not None
    if lease.holder is not None:
        inst = backend.instances.get(lease.holder)
        held = inst is not None and backend.liveness.judge(inst, look)[0]
        pid = inst["pid"] if inst is not None else None
    return LeaseInfo(
        name=lease.name,
        holder=lease.holder[0] if held and lease.holder else None,
        holder_incarnation=lease.holder[1] if held and lease.holder else None,
        term=lease.term,
        ttl=lease.ttl,
        since=lease.acquired_at if held else None,
        renewed_at=lease.renewed_at if held else None,
        expires_in=lease.expires_in if held else None,
        alive=True if held else None,
        holder_pid=pid if held else None,
        pgid=lease.pgid,
    )


def get_lease(store: Store, name: str) -> LeaseInfo:
    """The lease ``name`` now (free, with no term, if it was never taken)."""
    validate_name(name)
    rec = store.backend.leases.get(name)
    if rec is None:
        return LeaseInfo(name, None, None, None, None, None, None, None, None, None, None)
    return info_of(store, rec)


def list_leases(store: Store, *, held_only: bool = False) -> list[LeaseInfo]:
    """Every lease, free ones too unless ``held_only``, by name."""
    backend = store.backend
    look = backend.liveness.look()
    out = [info_of(store, r, look) for r in backend.leases.every(held_only=held_only)]
    return [i for i in out if i.held] if held_only else out


class LeaseWatch:
    """What a waiting candidate re-checks: can the lease be taken now? And who holds it."""

    def __init__(self, store: Store, name: str,
                 on_wait: Callable[[LeaseInfo], None] | None = None) -> None:
        self.store, self.name = store, name
        self.pid: int | None = None
        self.expires: float | None = None  # store.mono() when the holder's TTL runs out
        self._on_wait = on_wait
        self._told: tuple[Member, int | None] | None = None
        #: store.mono() until which a waiter that is not the first leaves a takeable lease
        #: to the first one (None: not deferring).
        self.defer_until: float | None = None
        self.behind = False  # another candidate has waited longer
        # The engine's watch on the live holder last seen, and who that was.
        self._holder_watch: Watch | None = None
        self._watched: Member | None = None
        #: The term and holder row of the holder watched, once ``holder_gone()`` said it
        #: ended (the takeover's hint); None otherwise.
        self.seen: Seen | None = None
        self._seen: Seen | None = None
        # The takeover of the watched holder's term sent ahead (``arm``), if any.
        self._armed: Armed | None = None
        self._armed_tried = False
        self._armed_for: int | None = None  # the term it takes over from
        #: What the armed takeover took, for the waiter to hold (see ``arm``).
        self.taken: tuple[LeaseTaken, float] | None = None
        self._exited_at: float | None = None  # store.mono() when its exit was first seen

    def holder_gone(self) -> bool:
        """Whether the holder last seen alive has ended since (its watch says so), so that
        the takeover's own proof of death may decide at once. Once only: the next look
        reads the lease afresh."""
        w = self._holder_watch
        if w is None or not w.exited():
            return False
        seen = self._seen
        self.close()
        self.seen = seen
        return True

    def arm(self, me: Member, ttl: float) -> tuple[LeaseTaken, float] | None:
        """For the first waiter on a holder of this host: the takeover of the term it saw,
        sent ahead when the engine can (``LeaseOps.arm``); what it took once it has, with
        ``store.mono()`` when it was sent (its term counts from then)."""
        seen = self._seen
        if self._armed is not None and seen is not None and self._armed_for != seen[0]:
            self.disarm()  # the holder took another term since
        if self._armed is None:
            if self._armed_tried or self.behind or self.pid is None or seen is None:
                return None
            self._armed_tried, self._armed_for = True, seen[0]
            self._armed = self.store.backend.leases.arm(me, self.name, ttl, seen)
            if self._armed is None:
                return None
        # Polled whatever the last look said: once its wait is granted, the takeover holds
        # its rows locked until this waiter commits or ends it.
        taken = self._armed.poll()
        return None if taken is None else (taken, self._armed.sent_at)

    def disarm(self) -> None:
        """End the takeover sent ahead (the server rolls back whatever it did), before a
        take of the waiter's own, which would otherwise wait on its row locks; it is sent
        again at the next look that finds the holder alive."""
        if self._armed is not None:
            self._armed.close()
        self._armed, self._armed_tried, self._exited_at = None, False, None

    def armed_busy(self) -> bool:
        """Whether to wait for the takeover sent ahead rather than look: it runs on the
        server now, or the holder's process has exited and its session is about to end
        (it does within ``ARMED_GRACE``, unless a forked child kept that session's socket)."""
        armed, w = self._armed, self._holder_watch
        if armed is None:
            return False
        if armed.running:
            return True
        if not armed.fds() or w is None or not w.exited():
            return False
        now = self.store.mono()
        if self._exited_at is None:
            self._exited_at = now
        return now < self._exited_at + ARMED_GRACE

    def fds(self) -> list[int]:
        """What the first waiter selects on besides the holder's pid (an armed takeover's)."""
        return self._armed.fds() if self._armed is not None and not self.behind else []

    def close(self) -> None:
        if self._holder_watch is not None:
            self._holder_watch.close()
        self.disarm()
        self._holder_watch = self._watched = self._seen = self.seen = None

    def takeable(self) -> bool:
        store = self.store
        backend = store.backend
        rec = backend.leases.get(self.name)
        self.pid = self.expires = None
        if rec is None or rec.holder is None:
            return True
        if rec.expires_in is None or rec.expires_in < 0:
            return True
        self.expires = store.mono() + rec.expires_in
        inst = backend.instances.get(rec.holder)
        if inst is None or not backend.liveness.judge(inst)[0]:
            return True
        pid = backend.liveness.watchable_pid(inst)
        if pid is not None and pid != os.getpid():
            self.pid = pid
            if self._watched != rec.holder:
                self.close()
                self._holder_watch, self._watched = backend.liveness.watch(inst), rec.holder
            self._seen = None if rec.term is None else (rec.term, dict(inst))
        if self._on_wait is not None and self._told != (rec.holder, rec.term):
            self._told = (rec.holder, rec.term)  # say it again when the holder changes
            self._on_wait(LeaseInfo(
                rec.name, rec.holder[0], rec.holder[1], rec.term, rec.ttl, rec.acquired_at,
                rec.renewed_at, rec.expires_in, True, inst["pid"], rec.pgid))
        return False


# -- the rules, each one transaction --------------------------------------------------------


def take(store: Store, inst: Instance, name: str, ttl: float, seen: Seen | None = None
         ) -> LeaseTaken | str:
    """Take the lease if it is free, expired, or its holder is dead (one transaction).

    Returns the taken term, else the current holder's id; raises ``NotRegistered`` when
    ``inst`` is no longer a live registered instance. A holder proven dead is named in the
    result (``dead``) and buried by ``bury_previous`` after, so failover does not wait for it.
    ``seen``: the term and holder row a waiter watched end (``LeaseWatch.seen``)."""
    return store.backend.leases.take((inst.id, inst.incarnation), name, ttl, seen)


def bury_previous(store: Store, inst: Instance, taken: LeaseTaken) -> None:
    """Apply the death rule to the previous holder that ``take`` proved dead (its own
    transaction, which re-checks the death); the reaper does it when this fails."""
    if taken.dead is None:
        return
    id, incarnation, verdict = taken.dead
    try:
        row = store.backend.instances.get((id, incarnation))
        if row is not None:
            bury_dead(store, [row], verdict)
    except CoordError as e:  # the reaper will do it; the lease is ours either way
        inst.log.warning("could not bury %s#%d: %s", id, incarnation, e)


def release(store: Store, name: str, term: int, holder: Member | None, reason: str,
            **detail: Any) -> bool:
    """Free ``name`` if it is still held in ``term`` (by ``holder`` when given) and wake
    the candidates waiting for it. ``detail`` joins the 'lease released' event. False
    when it was not held so."""
    freed = store.backend.leases.release(name, term, holder, reason, **detail)
    if freed:
        nudge_waiters(store, name)
    return freed


def release_dead_holders(store: Store, members: Sequence[Member], reason: str) -> int:
    """The death rule's lease part on its own: free every lease held by one of ``members``
    (proven dead); waiting candidates hear of the death through its pid. Returns how many
    were freed."""
    return store.backend.leases.release_dead_holders(members, reason)


def fenced_write(
    store: Store, name: str, term: int, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
) -> list[Row]:
    """Run one SQL statement only while ``term`` is the current, unexpired term of ``name``,
    in the same transaction; returns its rows. Raises ``LeaseLost(name, term)`` otherwise.
    The statement is the engine's (SQLite's SQL with ``?``, PostgreSQL's with ``%s``; no
    parameters: run as written): for what every engine can do, use the
    typed fenced operations (``kv.set``/``kv.cas`` with ``fence=``, ``Lease.set``/``cas``)."""
    return fenced_batch(store, name, term, [(sql, params)])[0]


def fenced_batch(
    store: Store, name: str, term: int,
    statements: Sequence[tuple[str, tuple[Any, ...] | dict[str, Any]]],
) -> list[list[Row]]:
    """Run several statements in one transaction, only while ``term`` is current.
    Engine-specific (the engine's own SQL): ``kv.set``/``kv.cas`` with ``fence=`` work on every
    engine."""
    return store.backend.leases.fenced(name, term, statements)


def record_group(store: Store, name: str, term: int, pgid: int | None, token: int | None,
                 *, holder: tuple[str, int] | None = None) -> None:
    """Record (or clear) the process group that runs for ``term``, and ``holder``, the
    instance whose tree it is; ``LeaseLost`` if the term is no longer current. Done before
    the group's command runs."""

    store.backend.leases.record_group(name, term, pgid, token, holder)


# -- waking waiting candidates --------------------------------------------------------------
# A waiter leaves a symlink to its nudge socket in <db>.d/waiters, named after the lease and
# stamped with CLOCK_MONOTONIC (one clock for every process of the host): the live waiter
# with the oldest stamp is the one a release wakes and the one that takes over from a dead
# holder; the others watch it and re-check when the database changes. Only a hint: waiters
# also poll data_version.


def waiter_prefix(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:20] + "."


def add_waiter(inst: Instance, name: str) -> str | None:
    pid = os.getpid()
    tok = start_token(pid)
    stamp = f"{time.monotonic_ns():016x}{os.urandom(2).hex()}"
    where = inst.store.side_dir("waiters")
    path = str(where / f"{waiter_prefix(name)}{pid}.{tok}.{stamp}")
    target = inst.nudge_path
    if not nudge.is_abstract(target):
        # Relative, so short: a target that fits in the inode (ext4: under 60 bytes) needs
        # no block, and unlinking the symlink at takeover then frees none (an absolute one
        # cost 0.1 to 1.5 ms there, on the path of a failover).
        target = os.path.relpath(target, where)
    try:
        os.symlink(target, path)
    except OSError:
        return None
    return path


def remove_waiter(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def first_waiter(store: Store, name: str) -> tuple[str, int] | None:
    """The live waiter of ``name`` that has waited longest: (its path, its pid), or None.
    Waiters whose process is gone are forgotten on the way."""
    d = store.side_dir("waiters")
    prefix = waiter_prefix(name)
    found: list[tuple[str, str, int, int]] = []
    try:
        with os.scandir(d) as it:
            for entry in it:
                if entry.name.startswith(prefix):
                    parts = entry.name.split(".")
                    try:
                        found.append((parts[3], entry.path, int(parts[1]), int(parts[2])))
                    except (IndexError, ValueError):
                        remove_waiter(entry.path)
    except OSError as e:  # a hint only: every waiter then acts as the first
        log.debug("listing the waiters of %r failed: %s", name, e)
        return None
    me = os.getpid()
    for _, path, pid, tok in sorted(found):
        if pid == me or still_running(ProcIdentity(boot_id(), pid, tok)):
            return path, pid
        remove_waiter(path)
    return None


def nudge_waiters(store: Store, name: str) -> None:
    """Wake the candidate that has waited longest for ``name`` (the others see the change
    and re-check); forget those whose process is gone."""
    first = first_waiter(store, name)
    if first is None:
        return
    try:
        target = os.readlink(first[0])
    except OSError:
        return  # gone meanwhile: it has stopped waiting
    # Sent to the socket the link names, not through the link: the link's own path may be
    # too long for a socket address, and an abstract socket has no file to lead to.
    if not nudge.is_abstract(target):
        target = os.path.normpath(os.path.join(os.path.dirname(first[0]), target))
    nudge.nudge([target])


def holder_of(store: Store, name: str) -> str | None:
    rec = store.backend.leases.get(name)
    return rec.holder[0] if rec is not None and rec.holder is not None else None
