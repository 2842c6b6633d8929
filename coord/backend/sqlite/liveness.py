"""The SQLite engine's liveness: proof of death on one host.

An instance is dead when its boot is over, its pid is gone, reused (another start token) or
a zombie, or its record lock is free — or when its heartbeat is older than its TTL (hung).
Each live instance holds a POSIX record lock on its own lock file beside the database
(``LockProof``); the kernel drops it the instant the process dies. A pidfd pins a watched
process, so its exit is heard at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeGuard

from ... import nudge
from ...clock import boot_id
from ...identity import (
    DEAD_STATES,
    FREE,
    ProcIdentity,
    hold_lock,
    lock_state,
    pid_namespace,
    proc_stat,
    still_running,
)
from .clock import MonotonicClock

if TYPE_CHECKING:
    from ...db import Row, Store
    from ...instances import InstanceInfo

# The lock files this process holds (from before its row is committed until the descriptor
# is closed). A row with our own pid is judged from here: probing our own lock file would
# release it, and the set is filled before the row exists, so a reaper thread of ours never
# sees a registration of ours half-way.
_OWN_LOCKS: set[str] = set()
_OWN_LOCKS_LOCK = threading.Lock()


def holds_own_lock(path: str) -> bool:
    """Whether this process holds the lock file at ``path`` (see ``_OWN_LOCKS``)."""
    with _OWN_LOCKS_LOCK:
        return path in _OWN_LOCKS


class Probe:
    """What the kernel says about pids and lock files, asked once per pid and per lock file.

    One probe serves one listing or one reap, so a thousand rows that share a handful of
    processes cost a handful of /proc reads. Make a new one for every fresh look: a probe
    never forgets, and a process it saw alive may have died since.
    """

    def __init__(self) -> None:
        self.boot_id = boot_id()
        self.pidns = pid_namespace()
        self.pid = os.getpid()
        self._procs: dict[int, tuple[int, str] | None] = {}
        self._locks: dict[str, tuple[str, int | None]] = {}
        #: The expiry clock's reading this look judges heartbeats against (None: read it
        #: at each verdict).
        self.now: float | None = None

    def proc(self, pid: int) -> tuple[int, str] | None:
        """(start token, state) of ``pid``, or None when it does not exist."""
        try:
            return self._procs[pid]
        except KeyError:
            found = self._procs[pid] = proc_stat(pid)
            return found

    def lock(self, path: str) -> tuple[str, int | None]:
        try:
            return self._locks[path]
        except KeyError:
            found = self._locks[path] = lock_state(path)
            return found


def judge(
    store: Store, row: Row, now_mono: float | None = None, *, probe: Probe | None = None
) -> tuple[bool, str]:
    """Liveness verdict for an instance row: (alive, status word).

    Dead needs proof — another boot; the pid gone, reused (another start token) or a
    zombie; its lock file present and unlocked — or an expired heartbeat (status 'hung').
    Age alone never kills an instance whose heartbeat is current, and the wall clock is
    never read. ``row`` needs: id, incarnation, status, end_reason, boot_id, pidns, pid,
    start_token, lock_path, heartbeat_mono, ttl.
    """
    if row["status"] == "dead":
        return False, row["end_reason"] or "dead"
    pr = probe or Probe()
    if row["boot_id"] != pr.boot_id:
        return False, "reboot"
    same_ns = row["pidns"] == pr.pidns
    if same_ns:
        st = pr.proc(row["pid"])
        if st is None or st[0] != row["start_token"] or st[1] in DEAD_STATES:
            return False, "died"
    if same_ns and row["pid"] == pr.pid:
        # Our own process: never probe our own lock file (closing the probe would drop it).
        with _OWN_LOCKS_LOCK:
            held = row["lock_path"] in _OWN_LOCKS
        if not held:
            return False, "died"  # registered here once and closed, or never by us
    elif pr.lock(row["lock_path"])[0] == FREE:
        return False, "died"
    # HELD, or MISSING/UNKNOWN (no proof either way): the heartbeat decides.
    now = now_mono if now_mono is not None else pr.now if pr.now is not None else store.mono()
    if now - row["heartbeat_mono"] > row["ttl"]:
        return False, "hung"
    return True, "alive"


def is_file(p: str | None) -> TypeGuard[str]:
    """A path on disk — not an abstract-namespace socket name (``@coord-…``, see
    ``nudge.socket_path``), which has no file, and unlinked as a path would remove a file of
    that name from the current directory."""
    return bool(p) and not nudge.is_abstract(p)


def unlink_many(paths: Iterable[str | None]) -> None:
    """Remove dead instances' lock files and sockets (unlinking never drops a lock): one
    directory descriptor per directory, so each file costs an unlinkat without a path walk."""
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        if is_file(p):
            d, name = os.path.split(p)
            by_dir.setdefault(d, []).append(name)
    for d, names in by_dir.items():
        try:
            dfd = os.open(d or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for name in names:
                try:
                    os.unlink(name, dir_fd=dfd)
                except OSError:
                    pass
        finally:
            os.close(dfd)


def unlink(*paths: str | None) -> None:
    """``unlink_many`` for a few paths."""
    for p in paths:
        if is_file(p):
            try:
                os.unlink(p)
            except OSError:
                pass


class LockProof:
    """``coord.backend.Proof``: the record lock a live instance holds on its own lock file
    (its ``where``), from before its row is committed until ``release``."""

    def __init__(self, path: str) -> None:
        self.where = path
        self._fd = hold_lock(path)
        with _OWN_LOCKS_LOCK:
            _OWN_LOCKS.add(path)

    def release(self) -> None:
        """Give up the proof of life: the file goes, then the lock (closing its descriptor)."""
        unlink(self.where)
        with _OWN_LOCKS_LOCK:
            _OWN_LOCKS.discard(self.where)
        os.close(self._fd)


class SqliteLiveness:
    """``coord.backend.Liveness``."""

    def __init__(self, store: Store, clock: MonotonicClock) -> None:
        self._store = store
        self._clock = clock

    def look(self) -> Probe:
        probe = Probe()
        probe.now = self._clock.now()
        return probe

    def judge(self, row: Row, look: object | None = None) -> tuple[bool, str]:
        if isinstance(look, Probe):
            return judge(self._store, row, probe=look)
        return judge(self._store, row, self._clock.now())

    def heartbeat_age(self, row: Row, look: object) -> float | None:
        # Readings of CLOCK_MONOTONIC compare only within one boot.
        assert isinstance(look, Probe) and look.now is not None
        return look.now - row["heartbeat_mono"] if row["boot_id"] == look.boot_id else None

    def prove(self, token: str, ttl: float = 15.0) -> LockProof:
        return LockProof(str(self._store.side_dir("locks") / f"{token}.lock"))

    def forget(self, rows: Iterable[Row]) -> None:
        # A caller's row may carry only what judging needs: no path, nothing to remove.
        unlink_many(p for r in rows for p in (r.get("lock_path"), r.get("nudge_path")))

    def watchable_pid(self, row: Row) -> int | None:
        return int(row["pid"]) if row["pidns"] == pid_namespace() else None

    def watch(self, row: Row | InstanceInfo) -> PidWatch:
        return PidWatch(self._clock, row)


class PidWatch:
    """``coord.backend.Watch`` through a pidfd (none for another pid namespace: a death
    there is seen by judging)."""

    def __init__(self, clock: MonotonicClock, row: Row | InstanceInfo) -> None:
        self._clock = clock
        self._row = row if isinstance(row, dict) else None
        pidns, pid = (row["pidns"], row["pid"]) if isinstance(row, dict) else (row.pidns, row.pid)
        self._pid: int = pid if pidns == pid_namespace() else 0
        self._fd = nudge.pidfd(self._pid)

    def pids(self) -> list[int]:
        return [self._pid] if self._fd is not None else []

    def exited(self) -> bool:
        return self._fd is not None and bool(nudge.readable([self._fd], 0))

    def pinned_alive(self) -> bool:
        # Our pidfd pins the process, so a matching start token read after opening it proves
        # the very process that registered still runs; only a registration row (not an
        # InstanceInfo, whose heartbeat is not kept on the expiry clock) can say so.
        row = self._row
        if self._fd is None or row is None or row["status"] != "alive":
            return False
        if row["boot_id"] != self._clock.epoch() or self._clock.now() - row["heartbeat_mono"] > row["ttl"]:
            return False
        return still_running(ProcIdentity(row["boot_id"], row["pid"], row["start_token"]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
