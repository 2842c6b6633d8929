"""Leases: leader election and mutual exclusion, fenced by terms.

A lease has a name, a holder (instance id + incarnation), a TTL and a term. The term is the
fencing token: every change of holder takes the next value of the ``term`` counter, so terms
strictly increase and are never reused (not even across lease names, nor after a wiped
database: the counter is seeded from the wall clock in milliseconds). ``lease_terms`` keeps one
row per term held, the history that proves one holder per term.

The rules, each applied inside one short transaction:

- **acquire** takes the lease when it is free, when its TTL has passed (a hung holder), or
  when its holder is dead (proof of death through ``instances.judge``: the whole death rule is
  then applied to that holder at once, as the reaper would). A holder never re-acquires a
  lease it already holds (leases are not re-entrant).
- **renew** extends ``expires_mono`` only while the term is current and not yet expired. A
  holder renews every ``min(heartbeat, ttl/3)`` seconds and steps down by itself when it could
  not renew for ``min(renew_deadline, 2/3 ttl)`` — always before others may take the lease
  over by its TTL.
- **fenced writes** run the caller's SQL in the same transaction only while the term is
  current and unexpired; otherwise they raise ``LeaseLost(name, term)``.
- **release** hands over at once: waiting candidates are nudged.

Waiting is cheap and wakes fast (``coord.nudge.wait_for``): a candidate re-checks when the
database changes, when a releasing holder nudges it, when the holder's process exits (pidfd)
or when the lease's TTL runs out. Expiry uses CLOCK_MONOTONIC only (``store.mono()``).

A lease is a hint unless the work it guards is fenced: pass ``lease.term`` along and use
``lease.write()`` (or check ``lease.held`` before every step) so that a holder that was
paused past its TTL cannot act on stale leadership.

Usage::

    with acquire(inst, "app/cron", timeout=None) as lease:   # wait to become leader
        while lease.held:                                     # False once lost or stepped down
            lease.write("INSERT INTO kv ...", (...,))         # only while the term is current

``Candidate`` contends in a background thread and re-contends after a loss;
``serve_reaper`` makes an instance take part in electing the one instance that reaps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from . import kv, nudge
from .backend import LeaseRecord, LeaseTaken, Member
from .clock import boot_id
from .db import Row, Store
from .errors import CoordError, InvalidArgument, LeaseLost, LeaseNotAcquired, NotRegistered
from .identity import ProcIdentity, start_token, still_running
from .instances import Instance
from .instances import validate_name as _validate_name
from .reaper import bury_dead

log = logging.getLogger("coord.leases")

#: The lease the live instances elect their reaper with.
REAPER_LEASE = "coord/reaper"

LostCallback = Callable[["Lease"], None]
T = TypeVar("T")


def validate_name(name: str) -> str:
    return _validate_name(name, "lease name")


def renew_interval(store: Store, ttl: float) -> float:
    """How often a holder renews a lease of this TTL."""
    return min(store.config.heartbeat, ttl / 3)


def renew_deadline(store: Store, ttl: float) -> float:
    """How long a holder keeps a lease it could not renew before stepping down (< ttl)."""
    return min(store.config.renew_deadline, ttl * 2 / 3)


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


def _info(store: Store, lease: LeaseRecord, look: object | None = None) -> LeaseInfo:
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
    return _info(store, rec)


def list_leases(store: Store, *, held_only: bool = False) -> list[LeaseInfo]:
    """Every lease, free ones too unless ``held_only``, by name."""
    backend = store.backend
    look = backend.liveness.look()
    out = [_info(store, r, look) for r in backend.leases.every(held_only=held_only)]
    return [i for i in out if i.held] if held_only else out


# -- the rules, each one transaction --------------------------------------------------------


def _take(store: Store, inst: Instance, name: str, ttl: float) -> LeaseTaken | str:
    """Take the lease if it is free, expired, or its holder is dead (one transaction).

    Returns the taken term, else the current holder's id; raises ``NotRegistered`` when
    ``inst`` is no longer a live registered instance. A holder proven dead is buried right
    after (the death rule), so failover does not wait for it."""
    backend = store.backend
    taken = backend.leases.take((inst.id, inst.incarnation), name, ttl)
    if isinstance(taken, LeaseTaken) and taken.dead is not None:
        id, incarnation, verdict = taken.dead
        try:
            row = backend.instances.get((id, incarnation))
            if row is not None:
                bury_dead(store, [row], verdict)
        except CoordError as e:  # the reaper will do it; the lease is ours either way
            inst.log.warning("could not bury %s#%d: %s", id, incarnation, e)
    return taken


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
    (proven dead) and wake the waiting candidates. Returns how many were freed."""
    return store.backend.leases.release_dead_holders(members, reason)


def fenced_write(
    store: Store, name: str, term: int, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
) -> list[Row]:
    """Run one SQL statement only while ``term`` is the current, unexpired term of ``name``,
    in the same transaction; returns its rows. Raises ``LeaseLost(name, term)`` otherwise.
    The statement is the engine's (SQLite SQL here): for what every engine can do, use the
    typed fenced operations (``kv.set``/``kv.cas`` with ``fence=``, ``Lease.set``/``cas``)."""
    return fenced_batch(store, name, term, [(sql, params)])[0]


def fenced_batch(
    store: Store, name: str, term: int,
    statements: Sequence[tuple[str, tuple[Any, ...] | dict[str, Any]]],
) -> list[list[Row]]:
    """Run several statements in one transaction, only while ``term`` is current.
    Engine-specific (SQLite's SQL): ``kv.set``/``kv.cas`` with ``fence=`` work on every
    engine."""
    return store.backend.leases.fenced(name, term, statements)


def record_group(store: Store, name: str, term: int, pgid: int | None, token: int | None,
                 *, holder: tuple[str, int] | None = None) -> None:
    """Record (or clear) the process group that runs for ``term``, and ``holder``, the
    instance whose tree it is; ``LeaseLost`` if the term is no longer current. Done before
    the group's command runs."""

    store.backend.leases.record_group(name, term, pgid, token, holder)


# -- waking waiting candidates --------------------------------------------------------------
# A waiter leaves a symlink to its nudge socket in <db>.d/waiters, named after the lease; a
# releasing holder nudges them. Only a hint: waiters also poll data_version.


def _waiter_prefix(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:20] + "."


def _add_waiter(inst: Instance, name: str) -> str | None:
    pid = os.getpid()
    tok = start_token(pid)
    path = str(inst.store.side_dir("waiters") /
               f"{_waiter_prefix(name)}{pid}.{tok}.{secrets.token_hex(4)}")
    try:
        os.symlink(inst.nudge_path, path)
    except OSError:
        return None
    return path


def _remove_waiter(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def nudge_waiters(store: Store, name: str) -> None:
    """Wake the candidates waiting for ``name``; forget those whose process is gone."""
    try:
        d = store.side_dir("waiters")
        prefix = _waiter_prefix(name)
        live: list[str] = []
        with os.scandir(d) as it:
            for entry in it:
                if not entry.name.startswith(prefix):
                    continue
                try:
                    _, pid, tok, _ = entry.name.split(".")
                    ok = still_running(ProcIdentity(boot_id(), int(pid), int(tok)))
                except ValueError:
                    ok = False
                if ok:
                    live.append(entry.path)
                else:
                    _remove_waiter(entry.path)
        nudge.nudge(live)
    except OSError as e:  # a hint only
        log.debug("nudging waiters of %r failed: %s", name, e)


# -- a held lease ---------------------------------------------------------------------------


class Lease:
    """A lease this instance holds, in one term. Use ``acquire``/``try_acquire`` to get one.

    ``held`` is True until the lease is lost, released, or the renew deadline passed;
    ``lost`` (an Event) is set at that moment and the ``on_lost`` callbacks run (not for a
    voluntary release). Renewal runs in a per-instance keeper thread unless ``renew=False``
    was asked, in which case the owner calls ``renew()`` itself (every ``renew_interval``).
    Leaving a ``with`` block releases the lease.
    """

    def __init__(self, inst: Instance, name: str, term: int, ttl: float, taken_mono: float,
                 *, on_lost: Iterable[LostCallback] = (), previous_holder: str | None = None) -> None:
        self.instance = inst
        self.store = inst.store
        self.name = name
        self.term = term
        self.ttl = ttl
        self.previous_holder = previous_holder
        self.lost = threading.Event()
        self.lost_reason: str | None = None
        self.interval = renew_interval(self.store, ttl)
        self.deadline_span = renew_deadline(self.store, ttl)
        self._deadline = taken_mono + self.deadline_span
        self._next = taken_mono + self.interval
        self._callbacks = list(on_lost)
        self._lock = threading.Lock()
        self._released = False
        self._keeper: _Keeper | None = None

    def __repr__(self) -> str:
        state = "held" if self.held else f"lost ({self.lost_reason})"
        return f"<Lease {self.name!r} term {self.term} {state}>"

    @property
    def holder(self) -> tuple[str, int]:
        return (self.instance.id, self.instance.incarnation)

    @property
    def held(self) -> bool:
        """Still ours: not lost, not released, our instance still registered, and renewed
        within the renew deadline."""
        return (not self.lost.is_set() and not self.instance.closed
                and self.store.mono() < self._deadline)

    @property
    def deadline_in(self) -> float:
        """Seconds until this holder steps down unless a renewal succeeds."""
        return self._deadline - self.store.mono()

    def add_callback(self, fn: LostCallback) -> None:
        """Call ``fn(lease)`` when the lease is lost (at once if it already is)."""
        with self._lock:
            if not self.lost.is_set():
                self._callbacks.append(fn)
                return
        if self.lost_reason != "released":
            fn(self)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the lease is still held."""
        if not self._still_held():
            raise LeaseLost(self.name, self.term)

    def renew(self) -> bool:
        """Renew now. False (and the lease is lost) when it could not be renewed."""
        if not self._still_held():
            return False
        t0 = self.store.mono()
        if self.store.backend.leases.renew(self.name, self.term, self.holder, self.ttl):
            with self._lock:
                self._deadline = max(self._deadline, t0 + self.deadline_span)
                self._next = t0 + self.interval
            return True
        self._lose("taken over or expired")
        return False

    def write(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """A fenced write: run ``sql`` only while this term is current (else ``LeaseLost``)."""
        return self.write_many([(sql, params)])[0]

    def write_many(self, statements: Sequence[tuple[str, tuple[Any, ...] | dict[str, Any]]]) -> list[list[Row]]:
        """Several fenced statements in one transaction (engine-specific: SQLite's SQL)."""
        return self._fenced(lambda: fenced_batch(self.store, self.name, self.term, statements))

    def set(self, key: str, value: Any, *, owner: kv.Owner | None = None) -> int:
        """A fenced ``kv.set``: only while this term is current (else ``LeaseLost``); works
        on every engine."""
        return self._fenced(lambda: kv.set(self.store, key, value, owner=owner, fence=self))

    def cas(self, key: str, value: Any, *, version: int, owner: kv.Owner | None = None) -> int:
        """A fenced ``kv.cas``: only while this term is current (else ``LeaseLost``)."""
        return self._fenced(lambda: kv.cas(self.store, key, value, version=version,
                                           owner=owner, fence=self))

    def _fenced(self, op: Callable[[], T]) -> T:
        self.check()
        try:
            return op()
        except LeaseLost:
            self._lose("fenced write refused: term no longer current")
            raise

    def release(self) -> None:
        """Give the lease up now; waiting candidates are woken at once."""
        with self._lock:
            if self._released:
                return
            self._released = True
            was_lost = self.lost.is_set()
            if not was_lost:
                self.lost_reason = "released"
                self.lost.set()
        self._detach()
        if was_lost:
            return
        try:
            release(self.store, self.name, self.term, self.holder, "released")
        except CoordError as e:
            log.warning("releasing lease %r term %d failed: %s", self.name, self.term, e)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals ------------------------------------------------------------------------

    def _due(self) -> float:
        with self._lock:
            return min(self._next, self._deadline)

    def _tick(self) -> None:
        """One keeper step: step down at the deadline, else renew when due."""
        if self.lost.is_set():
            self._detach()
            return
        now = self.store.mono()
        if now >= self._deadline:
            self._step_down()
            return
        if now < self._next:
            return
        if self.instance.stuck:
            return  # a watchdog says the app is stuck: no renewal, so it steps down in time
        try:
            self.renew()
        except Exception as e:  # busy, disk: retry soon; the deadline still applies
            log.warning("renewing lease %r failed: %s", self.name, e)
            with self._lock:
                self._next = self.store.mono() + min(self.interval / 4, 0.25)

    def _still_held(self) -> bool:
        """``held``, and when it is not, make the loss official (event, callbacks, and a
        step-down when the renew deadline passed)."""
        if self.held:
            return True
        if not self.lost.is_set():
            if self.instance.closed:
                self._lose("instance closed")
            else:
                self._step_down()
        return False

    def _step_down(self) -> None:
        """The renew deadline passed: give up before anyone may take over by TTL."""
        if not self._lose("renew deadline passed"):
            return
        try:
            release(self.store, self.name, self.term, self.holder, "stepped down")
        except Exception as e:
            log.warning("stepping down from lease %r failed: %s", self.name, e)

    def _lose(self, reason: str) -> bool:
        with self._lock:
            if self.lost.is_set():
                return False
            self.lost_reason = reason
            self.lost.set()
            callbacks = list(self._callbacks)
        self._detach()
        self.instance.log.warning("lost lease %r term %d: %s", self.name, self.term, reason)
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("on_lost callback for lease %r failed", self.name)
        return True

    def _detach(self) -> None:
        k, self._keeper = self._keeper, None
        if k is not None:
            k.remove(self)


class _Keeper:
    """Renews every held lease of one instance in one thread (one connection), and makes
    holders step down at their renew deadline. Ends when the instance closes."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.leases: list[Lease] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"coord-leases-{inst.id}")
        self.done = False

    def add(self, lease: Lease) -> None:
        with self.cond:
            self.leases.append(lease)
            lease._keeper = self
            self.cond.notify()

    def remove(self, lease: Lease) -> None:
        with self.cond:
            if lease in self.leases:
                self.leases.remove(lease)
            self.cond.notify()

    def _run(self) -> None:
        store = self.inst.store
        while True:
            with self.cond:
                if self.inst.closed:
                    self.done = True
                    left = list(self.leases)
                    break
                now = store.mono()
                due = [lease for lease in self.leases if lease._due() <= now]
                if not due:
                    nxt = min((lease._due() for lease in self.leases), default=now + 1.0)
                    self.cond.wait(timeout=min(max(nxt - now, 0.001), 1.0))
                    continue
            for lease in due:
                lease._tick()
        for lease in left:  # closing the instance released them (the death rule)
            lease._lose("instance closed")


_KEEPERS: weakref.WeakKeyDictionary[Instance, _Keeper] = weakref.WeakKeyDictionary()
_KEEPERS_LOCK = threading.Lock()


def _keep(lease: Lease) -> None:
    inst = lease.instance
    with _KEEPERS_LOCK:
        k = _KEEPERS.get(inst)
        if k is None or k.done or not k.thread.is_alive():
            k = _Keeper(inst)
            _KEEPERS[inst] = k
            k.thread.start()
    k.add(lease)


# -- acquiring --------------------------------------------------------------------------------


def _settle_previous_group(lease: Lease, group: tuple[int, int] | None,
                           tree: tuple[str, int] | None, grace: float | None) -> None:
    """A new holder first ends the previous term's whole tree: the recorded process group
    and every recorded descendant of the instance that ran it (identity checked: TERM,
    grace, KILL), and takes over only when nothing of it runs."""
    from dataclasses import replace

    from .tree import DeadTree, left_of, settle, tree_of

    store = lease.store
    found = tree_of(store, tree) if tree is not None else DeadTree(("", 0), (), (), (), ())
    groups = list(found.groups)
    if group is not None:
        groups.append(ProcIdentity(boot_id(), *group))
    todo = replace(found, groups=tuple(dict.fromkeys(groups)))
    g = store.config.kill_grace if grace is None else grace
    outcome = settle(store, [todo], g)
    if outcome != "gone":
        lease.instance.log.info("ended the previous term's processes of lease %r: %s",
                                lease.name, outcome)
    if left_of(todo):
        raise CoordError(f"processes of the previous holder of lease {lease.name!r} could not "
                         f"be ended ({outcome}); not taking over")
    record_group(store, lease.name, lease.term, None, None)


def try_acquire(
    inst: Instance,
    name: str,
    *,
    ttl: float | None = None,
    on_lost: LostCallback | None = None,
    renew: bool = True,
    grace: float | None = None,
) -> Lease | None:
    """Take ``name`` now if it is free, expired, or its holder is dead; else None.
    Raises ``NotRegistered`` when ``inst`` is closed or was declared dead.

    ``renew=False``: the caller renews (``lease.renew()`` every ``lease.interval``), as with
    an injected clock. ``grace``: for ending a previous holder's process group (TERM, then
    KILL after this many seconds; default ``config.kill_grace``).
    """
    validate_name(name)
    store = inst.store
    ttl = store.config.lease_ttl if ttl is None else float(ttl)
    if ttl <= 0:
        raise InvalidArgument(f"lease ttl must be positive, got {ttl}")
    t0 = store.mono()
    got = _take(store, inst, name, ttl)
    if not isinstance(got, LeaseTaken):
        return None
    lease = Lease(inst, name, got.term, ttl, t0, on_lost=[on_lost] if on_lost else [],
                  previous_holder=got.previous_holder)
    inst.log.info("acquired lease %r term %d", name, got.term)
    if renew:
        _keep(lease)
    if got.previous_group is not None or got.previous_tree is not None:
        try:
            _settle_previous_group(lease, got.previous_group, got.previous_tree, grace)
        except BaseException:
            lease.release()
            raise
    return lease


def _holder_of(store: Store, name: str) -> str | None:
    rec = store.backend.leases.get(name)
    return rec.holder[0] if rec is not None and rec.holder is not None else None


class _Watch:
    """What a waiting candidate re-checks: can the lease be taken now? And who holds it."""

    def __init__(self, store: Store, name: str,
                 on_wait: Callable[[LeaseInfo], None] | None = None) -> None:
        self.store, self.name = store, name
        self.pid: int | None = None
        self.expires: float | None = None  # store.mono() when the holder's TTL runs out
        self._on_wait = on_wait
        self._told: tuple[Member, int | None] | None = None

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
        if self._on_wait is not None and self._told != (rec.holder, rec.term):
            self._told = (rec.holder, rec.term)  # say it again when the holder changes
            self._on_wait(LeaseInfo(
                rec.name, rec.holder[0], rec.holder[1], rec.term, rec.ttl, rec.acquired_at,
                rec.renewed_at, rec.expires_in, True, inst["pid"], rec.pgid))
        return False


def acquire(
    inst: Instance,
    name: str,
    *,
    ttl: float | None = None,
    timeout: float | None = None,
    on_lost: LostCallback | None = None,
    renew: bool = True,
    grace: float | None = None,
    cancel: threading.Event | None = None,
    on_wait: Callable[[LeaseInfo], None] | None = None,
) -> Lease:
    """Become the holder of ``name``: wait up to ``timeout`` seconds (None: for ever, 0: try
    once) and return the ``Lease``; raise ``LeaseNotAcquired`` when it was not obtained
    (also when ``cancel`` is set — wake the waiter by nudging ``inst.nudge_path``), and
    ``NotRegistered`` when ``inst`` is closed or declared dead meanwhile.

    A waiting candidate takes over the moment the holder dies (its pid is watched), releases
    (it is nudged) or its TTL passes. ``on_wait(info)`` is called (in this thread) when it
    starts waiting for a live holder, and again whenever the holder it waits for changes.
    """
    store = inst.store
    deadline = None if timeout is None else store.mono() + max(0.0, timeout)
    lease = try_acquire(inst, name, ttl=ttl, on_lost=on_lost, renew=renew, grace=grace)
    if lease is not None:
        return lease
    watch = _Watch(store, name, on_wait)
    waiter = None

    def check() -> str | None:
        if cancel is not None and cancel.is_set():
            return "cancel"
        return "go" if watch.takeable() else None

    try:
        while True:
            now = store.mono()
            if inst.closed or inst.lost.is_set():
                raise NotRegistered(inst.id, "closed, declared dead or taken over")
            if deadline is not None and now >= deadline:
                raise LeaseNotAcquired(name, _holder_of(store, name))
            if waiter is None:
                waiter = _add_waiter(inst, name)
            # Wake at the latest when the TTL runs out (time alone moves no data_version).
            slice_ = 1.0 if deadline is None else min(1.0, deadline - now)
            if watch.expires is not None:
                slice_ = max(0.0005, min(slice_, watch.expires - now + 0.0005))
            why = store.backend.wakeup.wait_for(
                check, slice_, sock=inst.sock, watch_pids=lambda: [watch.pid] if watch.pid else [])
            if why == "cancel":
                raise LeaseNotAcquired(name, _holder_of(store, name))
            if why is None:
                continue
            lease = try_acquire(inst, name, ttl=ttl, on_lost=on_lost, renew=renew, grace=grace)
            if lease is not None:
                return lease
    finally:
        _remove_waiter(waiter)


# -- re-contending ---------------------------------------------------------------------------


class Candidate:
    """Contend for ``name`` in a background thread; with ``recontend`` (the default), contend
    again whenever leadership is lost, until ``stop()``.

    ``on_elected(lease)`` runs in that thread when elected; ``on_lost(lease)`` when lost.
    ``lease`` is the current Lease (None when not leader); ``wait_leader()`` blocks until
    elected. Use as a context manager to start and stop (releasing the lease).
    """

    def __init__(self, inst: Instance, name: str, *, ttl: float | None = None,
                 on_elected: Callable[[Lease], None] | None = None,
                 on_lost: LostCallback | None = None, recontend: bool = True) -> None:
        self.instance, self.name, self.ttl = inst, validate_name(name), ttl
        self.on_elected, self.on_lost, self.recontend = on_elected, on_lost, recontend
        self.elected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lease: Lease | None = None
        self._thread: threading.Thread | None = None

    @property
    def lease(self) -> Lease | None:
        lease = self._lease
        return lease if lease is not None and lease.held else None

    @property
    def is_leader(self) -> bool:
        return self.lease is not None

    def start(self) -> Candidate:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"coord-candidate-{self.name}")
            self._thread.start()
        return self

    def wait_leader(self, timeout: float | None = None) -> Lease | None:
        """The Lease once elected, or None after ``timeout``."""
        self.elected.wait(timeout)
        return self.lease

    def stop(self, timeout: float = 5.0) -> None:
        """Stop contending and release the lease if held."""
        self._stop.set()
        self._wake.set()
        nudge.nudge([self.instance.nudge_path])
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def __enter__(self) -> Candidate:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _lost(self, lease: Lease) -> None:
        self.elected.clear()
        self._wake.set()
        if self.on_lost is not None:
            self.on_lost(lease)

    def _run(self) -> None:
        inst = self.instance
        while not self._stop.is_set() and not inst.closed:
            try:
                lease = acquire(inst, self.name, ttl=self.ttl, timeout=None,
                                on_lost=self._lost, cancel=self._stop)
            except LeaseNotAcquired:
                continue
            except NotRegistered:
                return  # our instance is gone: nothing to contend with
            except CoordError as e:
                log.warning("contending for %r failed: %s", self.name, e)
                self._stop.wait(1.0)
                continue
            self._lease = lease
            self._wake.clear()
            self.elected.set()
            if self.on_elected is not None:
                try:
                    self.on_elected(lease)
                except Exception:
                    log.exception("on_elected for %r failed", self.name)
            while lease.held and not self._stop.is_set():
                self._wake.wait(1.0)
            if self._stop.is_set():
                return
            self._lease = None
            self.elected.clear()
            if not self.recontend:
                return


# -- the reaper lease ------------------------------------------------------------------------


class _ReaperDuty:
    """A heartbeat hook: contend for ``coord/reaper``; while holding it, reap every
    ``every`` seconds, and keep a ``DeathWatch`` running that acts on every death of this
    host at once. Renewal rides on the heartbeat (the lease TTL is the config's). The
    ending of dead instances' trees (a grace period each) runs in threads of its own, never
    in the heartbeat's."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.lease: Lease | None = None
        self.last = float("-inf")
        self.watch: Any = None

    def _on_duty(self) -> bool:
        lease = self.lease
        return lease is not None and lease.held

    def __call__(self, inst: Instance) -> None:
        from .deathwatch import DeathWatch
        from .reaper import reap

        store = inst.store
        if self.lease is not None and not self.lease.renew():
            self.lease = None
        if self.lease is None:
            # A cheap read first: only contend (a write) when it looks takeable.
            if not _Watch(store, REAPER_LEASE).takeable():
                return
            self.lease = try_acquire(inst, REAPER_LEASE, renew=False)
            if self.lease is None:
                return
        if self.watch is None or not self.watch.running:
            self.watch = DeathWatch(inst, self._on_duty).start()
        now = store.mono()
        if now - self.last >= self.every:
            self.last = now
            report = reap(store, trees=False)
            self.watch.end_trees()
            if report.did_something:
                inst.log.info("reaped: %d dead, %d leases expired", len(report.dead),
                              report.leases_expired)


def serve_reaper(inst: Instance, every: float | None = None) -> None:
    """Take part in electing the one live instance that reaps (every ``every`` seconds,
    default three heartbeats). Runs in the instance's heartbeat thread."""
    every = inst.store.config.heartbeat * 3 if every is None else every
    if not any(isinstance(h, _ReaperDuty) for h in inst.hooks):
        inst.hooks.append(_ReaperDuty(every))
