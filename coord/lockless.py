"""Processes that use the database without holding SQLite's locks.

Every SQLite connection to a WAL database holds a shared POSIX lock on byte 128 of the
``-shm`` file (the "DMS" byte) for as long as it has the shared memory open: that lock is how
the last connection to close knows it is the last, and may checkpoint and delete the ``-wal``
and ``-shm``. A process that has the ``-wal`` or ``-shm`` open or mapped but holds no lock on
that byte is using the database on someone else's locks — a child forked from a coord user,
or a coord process that opened the database with a second SQLite library and closed it
(closing any descriptor of a file drops all of the process's POSIX locks on it). Its commits
can go into a WAL another process deletes. ``coord doctor`` reports such processes.

Read from ``/proc/<pid>/fd``, ``/proc/<pid>/maps`` and ``/proc/locks`` for the processes of
this user, twice, ``interval`` apart: a connection that is opening or closing at the moment of
one look is not reported. An idle ``sqlite3 "$(coord path)"`` shell that has not yet run a
query has only the database file itself open and is not a suspect.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .identity import start_token

#: SQLite's unix VFS: the shared lock every connection holds on its -shm (UNIX_SHM_DMS).
DMS_BYTE = 128
_DELETED = " (deleted)"


@dataclass(frozen=True)
class LocklessUser:
    pid: int
    start_token: int
    files: tuple[str, ...]  # the -wal/-shm it has open or mapped (" (deleted)" when unlinked)
    command: str

    def describe(self) -> str:
        return (
            f"pid {self.pid} ({self.command}) has {', '.join(self.files)} open without "
            "SQLite's lock on the -shm: a process forked from a coord user, or a second SQLite "
            "library inside a coord process; its writes can be lost — restart it (use the "
            "'spawn' or 'forkserver' start method)"
        )


def _dms_lockers() -> set[tuple[int, int]]:
    """(pid, inode) of every POSIX lock in /proc/locks that covers the DMS byte. Inodes only:
    the device numbers there and in stat() differ on some filesystems (btrfs subvolumes)."""
    out: set[tuple[int, int]] = set()
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or parts[1] != "POSIX":  # "->" marks a waiter, not a holder
            continue
        try:
            pid, ino = int(parts[4]), int(parts[5].rsplit(":", 1)[1])
            start = int(parts[6])
            end = DMS_BYTE if parts[7] == "EOF" else int(parts[7])
        except (ValueError, IndexError):
            continue
        if start <= DMS_BYTE <= end:
            out.add((pid, ino))
    return out


def _files_of(pid: int, names: dict[str, str]) -> tuple[dict[str, int], bool]:
    """The database's -wal/-shm that ``pid`` has open or mapped: shown name → inode, and
    whether any of them is a -shm."""
    found: dict[str, int] = {}
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return found, False
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.removesuffix(_DELETED) in names:
            try:
                found[target] = os.stat(f"{fd_dir}/{fd}").st_ino
            except OSError:
                pass
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    target = parts[5].rstrip("\n")
                    if target.removesuffix(_DELETED) in names:
                        found.setdefault(target, int(parts[4]))
    except OSError:
        pass
    shm = any(names[t.removesuffix(_DELETED)] == "-shm" for t in found)
    return found, shm


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        return " ".join(a.decode("utf-8", "replace") for a in args if a)[:120] or "?"
    except OSError:
        return "?"


def _look(db: str) -> dict[tuple[int, int], LocklessUser]:
    names = {f"{db}-wal": "-wal", f"{db}-shm": "-shm"}
    lockers = _dms_lockers()
    uid = os.getuid()
    out: dict[tuple[int, int], LocklessUser] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        files, has_shm = _files_of(pid, names)
        if not files:
            continue
        shm_inodes = {ino for t, ino in files.items() if names[t.removesuffix(_DELETED)] == "-shm"}
        if has_shm and any((pid, ino) in lockers for ino in shm_inodes):
            continue  # holds its DMS lock: a proper user
        token = start_token(pid)
        if token is not None:
            out[(pid, token)] = LocklessUser(pid, token, tuple(sorted(files)), _command(pid))
    return out


def lockless_users(db_path: str | os.PathLike[str], interval: float = 0.1) -> list[LocklessUser]:
    """Processes of this user that have the database's ``-wal`` or ``-shm`` open or mapped
    but hold no lock on the ``-shm``'s DMS byte, seen in two looks ``interval`` apart."""
    db = os.path.realpath(Path(db_path))
    first = _look(db)
    if not first:
        return []
    time.sleep(interval)
    second = _look(db)
    return [second[k] for k in sorted(first.keys() & second.keys())]
