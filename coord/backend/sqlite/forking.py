"""The fork rule for SQLite files: every connection coord makes is opened and closed here.

SQLite keeps one table of POSIX locks per process. A child forked while this process has a
connection to a database inherits a copy of that table claiming locks the child does not
hold, so any SQLite call on that file in the child (a new connection included) can commit
into a WAL another process has deleted, or checkpoint a stale view over the file. So the
after-fork hook runs no SQLite code at all: it only records which databases had a connection
open at the fork, and keeps every inherited connection referenced for ever so it is never
closed (closing runs SQLite's unlock code on a lock table that is not ours). Every coord call
on such a database in the child — the inherited ``Store``, a new ``Store(path)`` on the same
file, the CLI — then raises ``UnsafeFork`` before touching it. A database this process had
*no* connection to at the fork (never opened, or every connection closed) is safe in the
child and may be used there; so is any database in a child started with the ``spawn`` or
``forkserver`` start method. The rule is inherited: a grandchild is refused what its parent
was refused.

No file of the database is ever opened and closed with plain ``open()`` while this process
has a connection to it: closing any descriptor of a file drops every POSIX lock the process
holds on it, SQLite's included (``FILE_OPEN_LOCK``, ``.migrations``). For the same reason
coord's database must never be opened by a second SQLite library (the stdlib ``sqlite3``,
SQLAlchemy, pandas) inside a process that uses coord.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from typing import Protocol

import apsw

from ...errors import UnsafeFork

#: Held while a connection is opened, and while ``.migrations`` reads a database header with
#: a plain open()/close(): closing that descriptor would drop every POSIX lock this process
#: holds on the file, so the header is read only when no descriptor is open on it, and no
#: other thread may open one (and then lock) in the meantime. Replaced in a forked child.
FILE_OPEN_LOCK = threading.Lock()

FileKey = tuple[int, int]  # (st_dev, st_ino) of a database file


class Locked(Protocol):
    """What holds a thread lock that a forked child must replace (another thread may have
    held it at the fork)."""

    _lock: threading.Lock


#: Every connection coord opened and has not closed, with its file's key and path. Weak, so a
#: connection dropped without close() (closed by its deallocation) leaves by itself.
_OPEN: weakref.WeakKeyDictionary[apsw.Connection, tuple[FileKey, str]] = weakref.WeakKeyDictionary()
#: Databases this process may not touch: they had a connection open in an ancestor when it
#: forked this process (or an ancestor of it). Key → (path, pid of the process that forked).
_POISONED: dict[FileKey, tuple[str, int]] = {}
#: Connections inherited across fork, kept referenced for ever so that they are never closed.
_ABANDONED: list[apsw.Connection] = []
_OPENING: list[str | None] = [None]  # the path a thread is opening a connection to, if any
_PID = [os.getpid()]  # this process's pid as of the last fork hook: the forking parent's, in a child
# Every open store's connections, so that a forked child can replace their thread locks.
_LOCKED: weakref.WeakSet[Locked] = weakref.WeakSet()


def relock_after_fork(holder: Locked) -> None:
    """Give ``holder`` a new ``_lock`` in every forked child of this process."""
    _LOCKED.add(holder)


def open_connection(path: str, flags: int) -> apsw.Connection:
    """Every SQLite connection coord makes is opened here (see ``FILE_OPEN_LOCK``), and
    refused in a forked child on a database its parent had open (see ``refuse_if_forked``)."""
    refuse_if_forked(path)
    with FILE_OPEN_LOCK:
        # Known before SQLite runs: a fork while this thread is inside the open must count
        # the file as open in the child (see _after_fork_in_child).
        _OPENING[0] = path
        try:
            conn = apsw.Connection(path, flags=flags)
            try:
                _OPEN[conn] = (_file_key(path), path)
            except OSError:  # removed meanwhile: the connection fails on first use instead
                pass
        finally:
            _OPENING[0] = None
    return conn


def close_connection(conn: apsw.Connection) -> None:
    """Close a connection coord opened (errors ignored: it is being thrown away). It stays
    counted as open until SQLite's close has returned, in case this process forks meanwhile."""
    try:
        conn.close()
    except apsw.Error:
        pass
    _OPEN.pop(conn, None)


def _file_key(path: str) -> FileKey:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _after_fork_in_child() -> None:
    """Mark this process; no SQLite call, nothing closed (see the module docstring)."""
    global FILE_OPEN_LOCK
    FILE_OPEN_LOCK = threading.Lock()  # another thread may have held it at the fork
    parent, _PID[0] = _PID[0], os.getpid()
    for conn, (key, path) in list(_OPEN.items()):
        _POISONED.setdefault(key, (path, parent))
        _ABANDONED.append(conn)
        # Also survives interpreter shutdown (sys.exit in the child), which clears module
        # globals: a connection that is never deallocated is never closed.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))
    _OPEN.clear()
    opening, _OPENING[0] = _OPENING[0], None
    if opening is not None:  # another thread was inside SQLite's open at the fork
        try:
            _POISONED.setdefault(_file_key(opening), (opening, parent))
        except OSError:
            pass
    for holder in list(_LOCKED):
        holder._lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def poisoned() -> dict[str, int]:
    """The databases this process may not use because it was forked while they were open:
    path → pid of the process that forked it. Empty in a process that may use them all."""
    return {path: pid for path, pid in _POISONED.values()}


def refuse_if_forked(path: str | os.PathLike[str]) -> None:
    """Raise ``UnsafeFork`` if ``path`` is a database this forked process inherited open."""
    if not _POISONED:
        return
    try:
        key = _file_key(os.fspath(path))
    except OSError:
        return  # no file: nothing can have been inherited
    if key in _POISONED:
        raise UnsafeFork(os.fspath(path), _POISONED[key][1])
