"""A held lease and its keeper: ``Lease`` (one term of one holder: held, renew, fenced
writes, release, stepping down at the renew deadline) and the per-instance thread that
renews every lease of one instance."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from . import kv, queue_put
from .db import Row
from .errors import CoordError, LeaseLost
from .instances import Instance
from .lease_rules import fenced_batch, release, renew_deadline, renew_interval
from .queue_jobs import NewJob

log = logging.getLogger("coord.leases")

LostCallback = Callable[["Lease"], None]
T = TypeVar("T")

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
        self._stepped_down = False
        self._keeper: _Keeper | None = None
        #: Free the term in the store as soon as the renew deadline passes. A holder that
        #: must first end what it guards (``coord elect``: CMD's tree) sets it False and
        #: frees it with ``release()`` once that is done: until then no other holder can
        #: take the lease before its TTL, by which time the step-down has completed.
        self.free_at_step_down = True

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
                and self.store.mono() < self._deadline_at())

    @property
    def deadline_in(self) -> float:
        """Seconds until this holder steps down unless a renewal succeeds."""
        return self._deadline_at() - self.store.mono()

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
        """Several fenced statements in one transaction (engine-specific: SQLite's SQL with
        ``?``, PostgreSQL's with ``%s``)."""
        return self._fenced(lambda: fenced_batch(self.store, self.name, self.term, statements))

    def set(self, key: str, value: Any, *, owner: kv.Owner | None = None) -> int:
        """A fenced ``kv.set``: only while this term is current (else ``LeaseLost``); works
        on every engine."""
        return self._fenced(lambda: kv.set(self.store, key, value, owner=owner, fence=self))

    def cas(self, key: str, value: Any, *, version: int, owner: kv.Owner | None = None) -> int:
        """A fenced ``kv.cas``: only while this term is current (else ``LeaseLost``)."""
        return self._fenced(lambda: kv.cas(self.store, key, value, version=version,
                                           owner=owner, fence=self))

    def put(self, queue: str, payload: Any, *, priority: int = 0, delay: float = 0.0,
            dedupe_key: str | None = None, max_attempts: int | None = None) -> int:
        """A fenced ``queues.put``: the job is added only while this term is current (else
        ``LeaseLost``, and nothing stored), in the same transaction; works on every
        engine."""
        return self._fenced(lambda: queue_put.put(
            self.store, queue, payload, priority=priority, delay=delay,
            dedupe_key=dedupe_key, max_attempts=max_attempts, fence=self))

    def put_many(self, queue: str, jobs: Iterable[NewJob | Any]) -> list[int]:
        """A fenced ``queues.put_many`` (all or none, only while this term is current)."""
        return self._fenced(lambda: queue_put.put_many(self.store, queue, jobs, fence=self))

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
            if self.lost_reason == "renew deadline passed" and not self.free_at_step_down:
                self._free_stepped_down(deferred=True)
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
            nxt = self._next
        return min(nxt, self._deadline_at())

    def _deadline_at(self) -> float:
        """The step-down deadline: the lease's own (its last renewal sent + the renew
        deadline), or the instance's when that comes first — a holder whose heartbeat
        cannot get through may be buried as hung, and its leases taken, a TTL after its
        last heartbeat even while the lease's renewals still succeed."""
        with self._lock:
            own = self._deadline
        inst = self.instance.renew_deadline_at
        return own if inst is None else min(own, inst)

    def _tick(self) -> None:
        """One keeper step: step down at the deadline, else renew when due."""
        if self.lost.is_set():
            self._detach()
            return
        now = self.store.mono()
        if now >= self._deadline_at():
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
        if self._lose("renew deadline passed"):
            self._free_stepped_down()

    def _free_stepped_down(self, *, deferred: bool = False) -> None:
        """Free the term in the store after a step-down (once; with ``free_at_step_down``
        False only from ``release()``, when what the lease guarded has ended)."""
        with self._lock:
            if self._stepped_down or not (deferred or self.free_at_step_down):
                return
            self._stepped_down = True
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
    holders step down at their renew deadline — from a second thread that only reads the
    clock, so a renewal stuck in the driver (a server that stopped answering) cannot hold a
    step-down back; also runs the work a takeover leaves for after it has returned
    (``later``). Ends when the instance closes."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.leases: list[Lease] = []
        self.tasks: list[tuple[float, Callable[[], object]]] = []  # (when, what)
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"coord-leases-{inst.id}")
        self.watchdog = threading.Thread(target=self._watch, daemon=True,
                                         name=f"coord-lease-deadlines-{inst.id}")
        self.done = False
        self._wake_at = float("-inf")  # when the thread wakes by itself next

    def _notify(self, when: float) -> None:
        # Wake the thread only when it would otherwise sleep past ``when``: a takeover's
        # caller then does not share the interpreter with a thread that has nothing to do.
        if when < self._wake_at:
            self.cond.notify()

    def start(self) -> None:
        self.thread.start()
        self.watchdog.start()

    def add(self, lease: Lease) -> None:
        with self.cond:
            self.leases.append(lease)
            lease._keeper = self
            self._notify(lease._due())

    def remove(self, lease: Lease) -> None:
        with self.cond:
            if lease in self.leases:
                self.leases.remove(lease)
            self.cond.notify()

    def later(self, fn: Callable[[], object], delay: float) -> None:
        """Run ``fn`` in this thread ``delay`` seconds from now (errors are logged)."""
        with self.cond:
            when = self.inst.store.mono() + delay
            self.tasks.append((when, fn))
            self._notify(when)

    def _run_tasks(self, tasks: list[tuple[float, Callable[[], object]]]) -> None:
        for _, fn in tasks:
            if self.inst.closed:  # its store may be closed too: the reaper does the rest
                log.debug("%s closed: %d deferred lease tasks left to the reaper",
                          self.inst.id, len(tasks))
                return
            try:
                fn()
            except Exception:
                log.exception("deferred lease work for %s failed", self.inst.id)

    def _run(self) -> None:
        store = self.inst.store
        while True:
            with self.cond:
                if self.inst.closed:
                    self.done = True
                    left = list(self.leases)
                    break
                now = store.mono()
                tasks = [t for t in self.tasks if t[0] <= now]
                if tasks:
                    self.tasks = [t for t in self.tasks if t[0] > now]
                due = [lease for lease in self.leases if lease._due() <= now]
                if not due and not tasks:
                    nxt = min([lease._due() for lease in self.leases]
                              + [t[0] for t in self.tasks], default=now + 1.0)
                    timeout = min(max(nxt - now, 0.001), 1.0)
                    self._wake_at = now + timeout
                    self.cond.wait(timeout=timeout)
                    self._wake_at = float("-inf")
                    continue
            self._run_tasks(tasks)
            for lease in due:
                lease._tick()
        for lease in left:  # closing the instance released them (the death rule)
            lease._lose("instance closed")

    def _watch(self) -> None:
        """Step down every lease whose renew deadline passed, on time: no database here
        (the step-down's release runs in a thread of its own)."""
        store = self.inst.store
        while True:
            with self.cond:
                if self.done or self.inst.closed:
                    return
                now = store.mono()
                late = [lease for lease in self.leases if lease._deadline_at() <= now]
                if not late:
                    nxt = min((lease._deadline_at() for lease in self.leases),
                              default=now + 1.0)
                    self.cond.wait(timeout=min(max(nxt - now, 0.001), 1.0))
                    continue
            for lease in late:
                if lease._lose("renew deadline passed"):
                    threading.Thread(target=lease._free_stepped_down, daemon=True,
                                     name=f"coord-step-down-{lease.name}").start()
                else:
                    lease._detach()  # lost meanwhile: nothing left to watch


_KEEPERS: weakref.WeakKeyDictionary[Instance, _Keeper] = weakref.WeakKeyDictionary()
_KEEPERS_LOCK = threading.Lock()


def keeper(inst: Instance) -> _Keeper:
    """The instance's keeper, started if it is not running (a waiting candidate starts it
    before it takes over, so that the takeover does not wait for a thread to start)."""
    with _KEEPERS_LOCK:
        k = _KEEPERS.get(inst)
        if k is None or k.done or not k.thread.is_alive():
            k = _Keeper(inst)
            _KEEPERS[inst] = k
            k.start()
    return k


def keep(lease: Lease) -> None:
    keeper(lease.instance).add(lease)


def later(inst: Instance, fn: Callable[[], object], delay: float = 0.0) -> None:
    """Run ``fn`` in the instance's keeper thread ``delay`` seconds from now, off the
    caller's path."""
    keeper(inst).later(fn, delay)
