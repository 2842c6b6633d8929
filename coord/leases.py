"""Leases: leader election and mutual exclusion, fenced by terms.

A lease has a name, a holder (instance id + incarnation), a TTL and a term. The term is the
fencing token: every change of holder takes the next value of the ``term`` counter, so terms
strictly increase and are never reused (not even across lease names, nor after a wiped
database: the counter is seeded from the wall clock in milliseconds). ``lease_terms`` keeps one
row per term held, the history that proves one holder per term.

The rules, each applied inside one short transaction:

- **acquire** takes the lease when it is free, when its TTL has passed (a hung holder), or
  when its holder is dead (proof of death through ``instances.judge``, inside the takeover's
  transaction). ``acquire()`` returns as soon as the lease is taken; the whole death rule is
  applied to that holder just after, in the instance's lease keeper thread, as the reaper
  would (at once when the holder's process tree must be ended first; by the reaper when the
  instance closes before). A holder never
  re-acquires a lease it already holds (leases are not re-entrant).
- **renew** extends ``expires_mono`` only while the term is current and not yet expired. A
  holder renews every ``min(heartbeat, ttl/3)`` seconds and steps down by itself when it could
  not renew for ``min(renew_deadline, 2/3 ttl)`` — always before others may take the lease
  over by its TTL.
- **fenced writes** run the caller's SQL in the same transaction only while the term is
  current and unexpired; otherwise they raise ``LeaseLost(name, term)``.
- **release** hands over at once: the candidate that has waited longest is nudged.

Waiting is cheap and wakes fast (``coord.nudge.wait_for``): a candidate re-checks when the
database changes, when a releasing holder nudges it (on another host: when the engine
announces the lease free, PostgreSQL's NOTIFY), when the process it watches exits
(pidfd) or when the lease's TTL runs out. Only the candidate that has waited longest watches
the holder (and takes over the moment the holder's process ends, the takeover proving the
death); every other one watches that candidate, re-checks when the database changes and now
and then, and takes a takeable lease itself only when the first one has not within
``WAITER_DEFER``. Expiry is the engine's clock (SQLite: CLOCK_MONOTONIC).

A lease is a hint unless the work it guards is fenced: pass ``lease.term`` along and use
``lease.write()`` (or check ``lease.held`` before every step) so that a holder that was
paused past its TTL cannot act on stale leadership.

Usage::

    with acquire(inst, "app/cron", timeout=None) as lease:   # wait to become leader
        while lease.held:                                     # False once lost or stepped down
            lease.write("INSERT INTO kv ...", (...,))         # only while the term is current

``lease.set(key, value)`` and ``lease.cas(...)`` (``kv.set``/``kv.cas`` with ``fence=``) are
the fenced writes every engine has; ``lease.write(sql)`` runs the engine's own SQL.

``Candidate`` contends in a background thread and re-contends after a loss;
``serve_reaper`` makes an instance take part in electing the one instance that reaps;
``release_by_operator`` frees a lease whose holder is dead or hung (``coord lease release``).

This module is the public face. The rules (reading, taking, releasing, fencing, waking
waiters) are ``coord.lease_rules``, a held lease and its renewing thread
``coord.lease_keeper``; every state change is an operation of the store's engine
(``store.backend.leases``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from . import nudge
from .backend import LeaseTaken, Member, Seen, lease_channel
from .errors import CoordError, InvalidArgument, LeaseNotAcquired, NotRegistered
from .instances import Instance
from .lease_keeper import Lease, LostCallback, keep, keeper, later
from .lease_release import Released, end_tree, release_by_operator
from .lease_rules import (
    REAPER_LEASE,
    LeaseInfo,
    LeaseWatch,
    add_waiter,
    bury_previous,
    fenced_batch,
    fenced_write,
    first_waiter,
    get_lease,
    holder_of,
    list_leases,
    nudge_waiters,
    record_group,
    release,
    release_dead_holders,
    remove_waiter,
    renew_deadline,
    renew_interval,
    take,
    validate_name,
    waiter_prefix,
)

__all__ = [
    "REAPER_LEASE", "Candidate", "Lease", "LeaseInfo", "LostCallback", "Released", "acquire",
    "fenced_batch", "fenced_write", "get_lease", "list_leases", "nudge_waiters",
    "record_group", "release", "release_by_operator", "release_dead_holders",
    "renew_deadline", "renew_interval",
    "serve_reaper", "try_acquire", "validate_name",
]

log = logging.getLogger("coord.leases")

#: The waiters' file-name prefix of a lease (kept under its old name for the benchmark).
_waiter_prefix = waiter_prefix

#: How long a waiter that is not the first leaves a takeable lease to the first one before
#: it takes it itself (the first one may be stopped or slow; seconds).
WAITER_DEFER = 0.05
#: How long after a takeover the dead holder is buried (seconds): long enough that the new
#: holder's first steps do not share the interpreter with the burial's thread.
BURY_DELAY = 0.01
#: How often a waiter that is not the first re-checks without news (seconds).
BEHIND_RECHECK = 0.25

# -- acquiring --------------------------------------------------------------------------------


def _settle_previous_group(lease: Lease, group: tuple[int, int] | None,
                           tree: Member | None, grace: float | None) -> None:
    """A new holder first ends the previous term's whole tree, and takes over only when
    nothing of it runs."""
    outcome, left = end_tree(lease.store, group, tree, grace)
    if outcome != "gone":
        lease.instance.log.info("ended the previous term's processes of lease %r: %s",
                                lease.name, outcome)
    if left:
        raise CoordError(f"processes of the previous holder of lease {lease.name!r} could not "
                         f"be ended ({outcome}); not taking over")
    record_group(lease.store, lease.name, lease.term, None, None)


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
    return _try_acquire(inst, name, ttl, on_lost, renew, grace, None, None)


def _try_acquire(inst: Instance, name: str, ttl: float | None, on_lost: LostCallback | None,
                 renew: bool, grace: float | None, seen: Seen | None,
                 after: list[Callable[[], None]] | None,
                 taken: tuple[LeaseTaken, float] | None = None) -> Lease | None:
    """``try_acquire``, with what a waiter saw of the holder it watched end (``seen``), a
    list that takes the dead holder's burial to be run by the caller (``after``), and what
    a takeover sent ahead already took (``taken``, with ``store.mono()`` when it was sent:
    the term counts from then, as from any take's start)."""
    validate_name(name)
    store = inst.store
    ttl = store.config.lease_ttl if ttl is None else float(ttl)
    if ttl <= 0:
        raise InvalidArgument(f"lease ttl must be positive, got {ttl}")
    t0 = store.mono()
    got: LeaseTaken | str
    if taken is not None:
        got, t0 = taken
    else:
        got = take(store, inst, name, ttl, seen)
    if not isinstance(got, LeaseTaken):
        return None
    lease = Lease(inst, name, got.term, ttl, t0, on_lost=[on_lost] if on_lost else [],
                  previous_holder=got.previous_holder)
    if renew:
        keep(lease)
    settle = got.previous_group is not None or got.previous_tree is not None
    if got.dead is not None:
        if settle:  # the tree is ended from the dead holder's records: bury it first
            bury_previous(store, inst, got)
        else:  # off the caller's path: the lease is ours, readers see the holder dead
            def bury() -> None:
                later(inst, lambda: bury_previous(store, inst, got), BURY_DELAY)
            # ``acquire`` schedules it once its own clean-up is done: the keeper thread this
            # wakes would otherwise take the interpreter from the caller before it returns.
            if after is None:
                bury()
            else:
                after.append(bury)
    inst.log.info("acquired lease %r term %d", name, got.term)
    if settle:
        try:
            _settle_previous_group(lease, got.previous_group, got.previous_tree, grace)
        except BaseException:
            lease.release()
            raise
    return lease


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
    watch = LeaseWatch(store, name, on_wait)
    waiter: str | None = None
    after: list[Callable[[], None]] = []

    lease_ttl = store.config.lease_ttl if ttl is None else float(ttl)
    me = (inst.id, inst.incarnation)

    def watched_pids() -> list[int]:
        # Not while the takeover sent ahead is awaited: the exited holder's pidfd stays
        # readable, and selecting on it would spin.
        return [watch.pid] if watch.pid and not watch.armed_busy() else []

    def check() -> str | None:
        if cancel is not None and cancel.is_set():
            return "cancel"
        if waiter is not None:
            taken = watch.arm(me, lease_ttl)
            if taken is not None:
                watch.taken = taken
                return "go"  # taken by the takeover sent ahead, on the proof of the death
            if watch.armed_busy():
                return None  # its answer wakes this wait (a look of our own would race it)
        if watch.holder_gone() and waiter is not None and not watch.behind:
            return "go"  # the first waiter: take over now, the takeover proves the death
        takeable = watch.takeable()
        if waiter is None:
            return "go" if takeable else None
        first = first_waiter(store, name)
        watch.behind = first is not None and first[0] != waiter
        if first is None or not watch.behind:
            watch.defer_until = None
            return "go" if takeable else None
        # Another candidate waits longer: it is the one woken (by the holder's death, which
        # only it watches, or by the release nudge); this one watches that candidate instead.
        if first[1] != os.getpid():
            watch.pid = first[1]
        if not takeable:
            watch.defer_until = None
            return None
        now = store.mono()
        if watch.defer_until is None:
            watch.defer_until = now + WAITER_DEFER
            return "defer"
        return "go" if now >= watch.defer_until else None

    try:
        while True:
            now = store.mono()
            if inst.closed or inst.lost.is_set():
                raise NotRegistered(inst.id, "closed, declared dead or taken over")
            if deadline is not None and now >= deadline:
                raise LeaseNotAcquired(name, holder_of(store, name))
            if waiter is None:
                waiter = add_waiter(inst, name)
                keeper(inst)  # started now, so that taking over does not wait for it
                # A holder of this host is watched by its pid and nudges the first waiter
                # when it releases; one of another host is heard of through the lease's
                # channel (where the engine announces releases): a first look tells which.
                watch.takeable()
            # Wake at the latest when the TTL runs out (time alone moves no data_version).
            slice_ = 1.0 if deadline is None else min(1.0, deadline - now)
            if watch.expires is not None:
                slice_ = max(0.0005, min(slice_, watch.expires - now + 0.0005))
            if watch.behind:  # re-check now and then, in case the first one is stopped
                slice_ = min(slice_, BEHIND_RECHECK)
            if watch.defer_until is not None:
                slice_ = max(0.0005, min(slice_, watch.defer_until - now + 0.0005))
            why = store.backend.wakeup.wait_for(
                check, slice_, sock=inst.sock, watch_pids=watched_pids, watch_fds=watch.fds,
                channels=() if watch.pid else (lease_channel(name),))
            if why == "cancel":
                raise LeaseNotAcquired(name, holder_of(store, name))
            if why is None or why == "defer":
                continue
            seen, watch.seen = watch.seen, None
            taken, watch.taken = watch.taken, None
            if taken is None:
                watch.disarm()
            lease = _try_acquire(inst, name, ttl, on_lost, renew, grace, seen, after, taken)
            if lease is not None:
                return lease
    finally:
        remove_waiter(waiter)
        watch.close()
        for fn in after:
            fn()


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
            if not LeaseWatch(store, REAPER_LEASE).takeable():
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
