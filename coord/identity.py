"""Process identity beyond pid reuse, and proof of death.

A process is named by (boot id, pid, start token), the start token being field 22 of
``/proc/<pid>/stat`` (clock ticks after boot). psutil's ``create_time()`` is derived from the
wall clock and moves when the clock is set, so it is not used for identity.

Proof of death for instances is a POSIX record lock (``fcntl`` F_SETLK) that the instance
holds on its own lock file for its whole life: the kernel drops it the instant the process
dies, ``fork`` does not inherit it, and anyone can test it with F_GETLK without taking it —
which also works across pid namespaces. The trap: closing ANY descriptor of that file in the
owning process drops the lock, so the owner opens it exactly once and nobody in the owning
process ever opens it again (``lock_state`` refuses to probe the caller's own locks).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from .clock import boot_id


@dataclass(frozen=True)
class ProcIdentity:
    boot_id: str
    pid: int
    start_token: int


def stat_fields(pid: int) -> list[str] | None:
    # A reap checks thousands of pids that are gone: kill(pid, 0) says so three times faster
    # than a failing open of /proc/<pid>/stat. os.open/os.read: a buffered file object costs
    # several times more.
    if pid <= 0:
        return None  # kill(0 or -n, 0) would ask about process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # exists, someone else's
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        raw = os.read(fd, 4096).decode("utf-8", "replace")
    except ProcessLookupError:  # it ended between open and read
        return None
    finally:
        os.close(fd)
    if not raw:
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(start token, one-letter state) of ``pid`` from one read of /proc, or None if gone."""
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[19]), fields[0])


#: States of a process that has ended (a zombie is dead: its locks are already gone).
DEAD_STATES = frozenset(("Z", "X", "x"))


def start_token(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat, or None when there is no such process."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def ancestry(pid: int, depth: int = 128) -> list[tuple[int, int]]:
    """(pid, start token) of ``pid`` and each of its ancestors, nearest first."""
    out: list[tuple[int, int]] = []
    while pid > 0 and len(out) < depth:
        fields = stat_fields(pid)
        if fields is None:
            break
        out.append((pid, int(fields[19])))
        pid = int(fields[1])  # field 4: the parent's pid
    return out


def proc_state(pid: int) -> str | None:
    """The one-letter state (R, S, Z ...) or None when there is no such process."""
    fields = stat_fields(pid)
    return None if fields is None else fields[0]


def identify(pid: int) -> ProcIdentity | None:
    """The identity of a running process now, or None."""
    token = start_token(pid)
    return None if token is None else ProcIdentity(boot_id(), pid, token)


_PIDNS: tuple[int, str] = (0, "")


def pid_namespace() -> str:
    """This process's pid namespace (as ``readlink /proc/self/ns/pid``); it never changes for a
    process, so it is read once per pid."""
    global _PIDNS
    pid = os.getpid()
    if _PIDNS[0] != pid:
        try:
            ns = os.readlink("/proc/self/ns/pid")
        except OSError:
            ns = "unknown"
        _PIDNS = (pid, ns)
    return _PIDNS[1]


def still_running(ident: ProcIdentity) -> bool:
    """True only when the very same process (not a pid reuse) exists and is not a zombie."""
    if ident.boot_id != boot_id():
        return False
    fields = stat_fields(ident.pid)
    if fields is None:
        return False
    return int(fields[19]) == ident.start_token and fields[0] not in DEAD_STATES


# -- record locks --------------------------------------------------------------------------

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def hold_lock(path: str) -> int:
    """Create ``path`` (no symlinks followed) and hold a write record lock on it for as long
    as the returned descriptor stays open. Raises BlockingIOError if someone holds it."""
    fd = os.open(path, _OPEN_FLAGS, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PermissionError(f"{path} is owned by uid {st.st_uid}")
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = "hhqqi"


def lock_holder(path: str) -> int | None:
    """The pid holding a record lock on ``path`` (as seen from our pid namespace; 0 when the
    holder is in another namespace), or None when nobody holds it or the file is gone.

    Must not be called by the process that holds the lock: closing our probe descriptor would
    release it. Callers check ``pid != os.getpid()`` first.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    finally:
        os.close(fd)
    l_type, _, _, _, l_pid = struct.unpack(_FLOCK, answer)
    if l_type == fcntl.F_UNLCK:
        return None
    return int(l_pid)


# "Could I write-lock the whole file?" — F_GETLK answers with the conflicting lock, if any.
_WHOLE_FILE_WRITE = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)

#: What ``lock_state`` can say about a lock file.
HELD, FREE, MISSING, UNKNOWN = "held", "free", "missing", "unknown"


def lock_state(path: str) -> tuple[str, int | None]:
    """(HELD, holder pid) | (FREE, None) | (MISSING, None) | (UNKNOWN, None).

    Only FREE is proof of death: the file is there and nobody holds a lock on it. A MISSING
    file (someone cleaned the directory) or one that cannot be probed (UNKNOWN: a symlink,
    a permission error) proves nothing, and the caller falls back to pid and heartbeat.
    Same rule as ``lock_holder``: never call it on a lock held by the calling process.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return MISSING, None
    except OSError:
        return UNKNOWN, None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return UNKNOWN, None
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, _WHOLE_FILE_WRITE)
    except OSError:
        return UNKNOWN, None
    finally:
        os.close(fd)
    l_type, _, _, _, l_pid = struct.unpack(_FLOCK, answer)
    if l_type == fcntl.F_UNLCK:
        return FREE, None
    return HELD, int(l_pid)
