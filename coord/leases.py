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
from typing import Any

import apsw

from . import nudge
from .clock import boot_id
from .db import Row, Store, fetch, next_counter, scalar
from .errors import CoordError, InvalidArgument, LeaseLost, LeaseNotAcquired, NotRegistered
from .events import log_event
from .identity import ProcIdentity, pid_namespace, start_token, still_running
from .instances import Instance, Probe, judge
from .instances import validate_name as _validate_name
from .reaper import bury

log = logging.getLogger("coord.leases")

#: The lease the live instances elect their reaper with.
REAPER_LEASE = "coord/reaper"

LostCallback = Callable[["Lease"], None]


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


def _info(store: Store, lease: Row, now: float, probe: Probe | None = None) -> LeaseInfo:
    """A lease row as readers see it: a holder proven dead (or hung past its TTL) holds
    nothing, so the lease shows free, as the death rule will make it — without waiting for
    that rule, or the ending of the holder's tree, to be applied. ``pgid`` stays shown while
    the dead holder's recorded group is not yet proven empty."""
    alive: bool | None = None
    pid: int | None = None
    held = lease["holder_id"] is not None
    if held:
        inst = store.row(
            "SELECT * FROM instances WHERE id = ? AND incarnation = ?",
            (lease["holder_id"], lease["holder_incarnation"]),
        )
        alive = inst is not None and judge(store, inst, now, probe=probe)[0]
        pid = inst["pid"] if inst is not None else None
        held = alive
    return LeaseInfo(
        name=lease["name"],
        holder=lease["holder_id"] if held else None,
        holder_incarnation=lease["holder_incarnation"] if held else None,
        term=lease["term"],
        ttl=lease["ttl"],
        since=lease["acquired_at"] if held else None,
        renewed_at=lease["renewed_at"] if held else None,
        expires_in=(lease["expires_mono"] - now) if held and lease["expires_mono"] is not None else None,
        alive=True if held else None,
        holder_pid=pid if held else None,
        pgid=lease["pgid"],
    )


def get_lease(store: Store, name: str) -> LeaseInfo:
    """The lease ``name`` now (free, with no term, if it was never taken)."""
    validate_name(name)
    row = store.row("SELECT * FROM leases WHERE name = ?", (name,))
    if row is None:
        return LeaseInfo(name, None, None, None, None, None, None, None, None, None, None)
    return _info(store, row, store.mono())


def list_leases(store: Store, *, held_only: bool = False) -> list[LeaseInfo]:
    """Every lease, free ones too unless ``held_only``, by name."""
    sql = "SELECT * FROM leases"
    if held_only:
        sql += " WHERE holder_id IS NOT NULL"
    now, probe = store.mono(), Probe()
    out = [_info(store, r, now, probe) for r in store.rows(sql + " ORDER BY name")]
    return [i for i in out if i.held] if held_only else out


# -- the rules, each one transaction --------------------------------------------------------


def _free(c: apsw.Connection, name: str, term: int, reason: str, now_wall: float,
          holder: tuple[str, int] | None = None) -> bool:
    """Make the lease free if it is still held in ``term`` (by ``holder`` when given)."""
    rows = fetch(c, "SELECT holder_id, holder_incarnation FROM leases WHERE name = ? AND term = ? "
                    "AND holder_id IS NOT NULL", (name, term))
    if not rows or (holder is not None and
                    (rows[0]["holder_id"], rows[0]["holder_incarnation"]) != tuple(holder)):
        return False
    c.execute("UPDATE leases SET holder_id = NULL, holder_incarnation = NULL, expires_mono = NULL "
              "WHERE name = ?", (name,))
    c.execute("UPDATE lease_terms SET released_at = ?, reason = ? WHERE name = ? AND term = ?",
              (now_wall, reason, name, term))
    kind = "lease expired" if reason == "expired" else "lease released"
    log_event(c, now_wall, kind, rows[0]["holder_id"], name, term=term, reason=reason)
    return True


@dataclass(frozen=True)
class _Taken:
    term: int
    previous_holder: str | None
    previous_group: tuple[int, int] | None  # (pgid, leader start token) to end first
    previous_tree: tuple[str, int] | None  # the instance whose tree runs in that group


def _take(store: Store, inst: Instance, name: str, ttl: float) -> _Taken | str:
    """One transaction: take the lease if it is free, expired, or its holder is dead.

    Returns the taken term, else the current holder's id; raises ``NotRegistered`` when
    ``inst`` is no longer a live registered instance."""

    dead: list[tuple[str, int, str]] = []  # a holder proven dead, buried right after

    def txn(c: apsw.Connection) -> _Taken | str:
        dead.clear()
        now_mono, now_wall = store.mono(), store.wall()
        me = fetch(c, "SELECT status FROM instances WHERE id = ? AND incarnation = ?",
                   (inst.id, inst.incarnation))
        if not me or me[0]["status"] != "alive":
            raise NotRegistered(inst.id, "closed, declared dead or taken over")
        rows = fetch(c, "SELECT * FROM leases WHERE name = ?", (name,))
        row = rows[0] if rows else None
        previous = None
        reason = "free"
        if row is not None and row["holder_id"] is not None:
            previous = row["holder_id"]
            holder = (row["holder_id"], row["holder_incarnation"])
            if holder == (inst.id, inst.incarnation) and row["expires_mono"] >= now_mono:
                return inst.id  # already ours: leases are not re-entrant
            hrow = fetch(c, "SELECT * FROM instances WHERE id = ? AND incarnation = ?", holder)
            alive, verdict = (judge(store, hrow[0], now_mono) if hrow else (False, "gone"))
            if hrow and hrow[0]["status"] == "alive" and not alive:
                # Proof of death (or a hung heartbeat): take the lease now; the rest of the
                # death rule follows in its own transaction, so failover does not wait for it.
                _free(c, name, row["term"], verdict, now_wall)
                dead.append((holder[0], holder[1], verdict))
                reason = verdict
            elif row["expires_mono"] is None or row["expires_mono"] < now_mono:
                _free(c, name, row["term"], "expired", now_wall)
                reason = "expired"
            elif not alive:
                _free(c, name, row["term"], verdict, now_wall)
                reason = verdict
            else:
                return str(row["holder_id"])
            # bury/_free released it; make sure (a holder row may have been inconsistent).
            _free(c, name, row["term"], reason, now_wall)
        term = next_counter(c, "term")
        expires = now_mono + ttl
        if row is None:
            c.execute(
                "INSERT INTO leases (name, holder_id, holder_incarnation, term, ttl, acquired_at, "
                "renewed_at, expires_mono) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, inst.id, inst.incarnation, term, ttl, now_wall, now_wall, expires),
            )
        else:
            # pgid/pg_start_token stay: the new holder ends that group before doing anything.
            c.execute(
                "UPDATE leases SET holder_id = ?, holder_incarnation = ?, term = ?, ttl = ?, "
                "acquired_at = ?, renewed_at = ?, expires_mono = ? WHERE name = ?",
                (inst.id, inst.incarnation, term, ttl, now_wall, now_wall, expires, name),
            )
        c.execute(
            "INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, term, inst.id, inst.incarnation, now_wall),
        )
        log_event(c, now_wall, "leader changed", inst.id, name, term=term, previous=previous,
                  reason=reason)
        group = tree = None
        if row is not None and row["pgid"] is not None and row["pg_start_token"] is not None:
            group = (int(row["pgid"]), int(row["pg_start_token"]))
        if row is not None and row["pg_holder_id"] is not None:
            tree = (str(row["pg_holder_id"]), int(row["pg_holder_incarnation"]))
        return _Taken(term, previous, group, tree)

    taken = store.write(txn)
    if dead:
        id, incarnation, verdict = dead[0]
        try:
            store.write(lambda c: bury(c, store, id, incarnation, reason=verdict))
        except CoordError as e:  # the reaper will do it; the lease is ours either way
            inst.log.warning("could not bury %s#%d: %s", id, incarnation, e)
    return taken


def _renew(store: Store, name: str, term: int, holder: tuple[str, int], ttl: float) -> bool:
    def txn(c: apsw.Connection) -> bool:
        now_mono, now_wall = store.mono(), store.wall()
        ok = fetch(
            c,
            "UPDATE leases SET renewed_at = ?, expires_mono = ? WHERE name = ? AND term = ? "
            "AND holder_id = ? AND holder_incarnation = ? AND expires_mono >= ? RETURNING 1",
            (now_wall, now_mono + ttl, name, term, *holder, now_mono),
        )
        if ok:
            return True
        _free(c, name, term, "expired", now_wall, holder)  # ours but expired: say so
        return False

    return store.write(txn)


def _release(store: Store, name: str, term: int, holder: tuple[str, int], reason: str) -> bool:
    return store.write(lambda c: _free(c, name, term, reason, store.wall(), holder))


def _current(c: apsw.Connection, store: Store, name: str, term: int) -> bool:
    return bool(scalar(
        c,
        "SELECT 1 FROM leases WHERE name = ? AND term = ? AND holder_id IS NOT NULL "
        "AND expires_mono >= ?",
        (name, term, store.mono()),
    ))


def fenced_write(
    store: Store, name: str, term: int, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
) -> list[Row]:
    """Run one SQL statement only while ``term`` is the current, unexpired term of ``name``,
    in the same transaction; returns its rows. Raises ``LeaseLost(name, term)`` otherwise."""
    return fenced_batch(store, name, term, [(sql, params)])[0]


def fenced_batch(
    store: Store, name: str, term: int,
    statements: Sequence[tuple[str, tuple[Any, ...] | dict[str, Any]]],
) -> list[list[Row]]:
    """Run several statements in one transaction, only while ``term`` is current."""

    def txn(c: apsw.Connection) -> list[list[Row]]:
        if not _current(c, store, name, term):
            raise LeaseLost(name, term)
        return [fetch(c, sql, params) for sql, params in statements]

    return store.write(txn)


def record_group(store: Store, name: str, term: int, pgid: int | None, token: int | None,
                 *, holder: tuple[str, int] | None = None) -> None:
    """Record (or clear) the process group that runs for ``term``, and ``holder``, the
    instance whose tree it is; ``LeaseLost`` if the term is no longer current. Done before
    the group's command runs."""

    def txn(c: apsw.Connection) -> None:
        if not _current(c, store, name, term):
            raise LeaseLost(name, term)
        hid, hinc = holder if holder is not None else (None, None)
        c.execute("UPDATE leases SET pgid = ?, pg_start_token = ?, pg_holder_id = ?, "
                  "pg_holder_incarnation = ? WHERE name = ? AND term = ?",
                  (pgid, token, hid, hinc, name, term))

    store.write(txn)


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
        if _renew(self.store, self.name, self.term, self.holder, self.ttl):
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
        """Several fenced statements in one transaction."""
        self.check()
        try:
            return fenced_batch(self.store, self.name, self.term, statements)
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
            if _release(self.store, self.name, self.term, self.holder, "released"):
                nudge_waiters(self.store, self.name)
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
            if _release(self.store, self.name, self.term, self.holder, "stepped down"):
                nudge_waiters(self.store, self.name)
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
    if not isinstance(got, _Taken):
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
    return store.value("SELECT holder_id FROM leases WHERE name = ?", (name,))  # type: ignore[no-any-return]


class _Watch:
    """What a waiting candidate re-checks: can the lease be taken now?"""

    def __init__(self, store: Store, name: str) -> None:
        self.store, self.name = store, name
        self.pid: int | None = None
        self.expires: float | None = None

    def takeable(self) -> bool:
        store = self.store
        now = store.mono()
        row = store.row("SELECT holder_id, holder_incarnation, expires_mono FROM leases "
                        "WHERE name = ?", (self.name,))
        self.pid = self.expires = None
        if row is None or row["holder_id"] is None:
            return True
        if row["expires_mono"] is None or row["expires_mono"] < now:
            return True
        self.expires = row["expires_mono"]
        inst = store.row("SELECT * FROM instances WHERE id = ? AND incarnation = ?",
                         (row["holder_id"], row["holder_incarnation"]))
        if inst is None or not judge(store, inst, now)[0]:
            return True
        if inst["pidns"] == pid_namespace() and inst["pid"] != os.getpid():
            self.pid = int(inst["pid"])
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
) -> Lease:
    """Become the holder of ``name``: wait up to ``timeout`` seconds (None: for ever, 0: try
    once) and return the ``Lease``; raise ``LeaseNotAcquired`` when it was not obtained
    (also when ``cancel`` is set — wake the waiter by nudging ``inst.nudge_path``), and
    ``NotRegistered`` when ``inst`` is closed or declared dead meanwhile.

    A waiting candidate takes over the moment the holder dies (its pid is watched), releases
    (it is nudged) or its TTL passes.
    """
    store = inst.store
    deadline = None if timeout is None else store.mono() + max(0.0, timeout)
    lease = try_acquire(inst, name, ttl=ttl, on_lost=on_lost, renew=renew, grace=grace)
    if lease is not None:
        return lease
    watch = _Watch(store, name)
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
            why = nudge.wait_for(store, check, slice_, sock=inst.sock,
                                 watch_pids=lambda: [watch.pid] if watch.pid else [])
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
