"""The SQLite engine's connections and transactions: one database in WAL mode, one connection
per thread and per process.

``SqliteDb`` is the only place that opens connections for a store, sets pragmas and runs
transactions. Every write is one short ``BEGIN IMMEDIATE`` transaction run by
``SqliteDb.write(fn)``; reads run outside transactions. apsw errors are translated to
``coord.errors`` here, at one boundary (``translated``).

Each thread gets its own connection on first use (``SqliteDb.conn()``), checked against the
pid on every use; connections of threads that ended are closed by the next new one. A forked
child never uses a connection or a database its parent had open (``.forking``).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import apsw

from ...errors import CoordError, NotADatabase, StorageError
from .forking import close_connection, open_connection, relock_after_fork
from .retry import on_busy

if TYPE_CHECKING:
    from ...db import Row, Store

T = TypeVar("T")
#: The connection ``Store.write`` hands to its function (named here so the store, which
#: knows no engine, can type it).
Connection = apsw.Connection

#: PRAGMA application_id of a coord database: "coor".
APPLICATION_ID = 0x636F6F72

# Pragmas every connection gets, in one place (a test reads them back).
CONNECTION_PRAGMAS: tuple[tuple[str, str], ...] = (
    ("synchronous", "NORMAL"),  # WAL + NORMAL: durable across process crashes, fast commits
    ("foreign_keys", "ON"),
    ("journal_size_limit", str(4 << 20)),  # the WAL is truncated to this when it restarts
    ("temp_store", "MEMORY"),
    ("cache_size", "-8000"),
    ("wal_autocheckpoint", "1000"),  # PASSIVE checkpoints only: they never block writers
)

#: A WAL larger than this is restarted by a short-waiting checkpoint (see _keep_wal_small).
WAL_RESTART_BYTES = 16 << 20
#: How long that checkpoint may hold writers back, waiting for readers to drain.
WAL_RESTART_WAIT_MS = 50
_WAL_CHECK_EVERY = 64  # commits of one store between looks at the WAL size
_WAL_LAST_RESTART = [0.0]  # per process: at most one attempt a second


def _translate(e: apsw.Error | OSError, path: str) -> CoordError | None:
    if isinstance(e, apsw.FullError) or (isinstance(e, OSError) and e.errno == errno.ENOSPC):
        return StorageError(path, "disk full: free some space, nothing committed was lost")
    if isinstance(e, apsw.ReadOnlyError):
        return StorageError(path, "database is read-only: check the file and directory permissions")
    if isinstance(e, apsw.CantOpenError):
        return StorageError(path, "cannot open the database file: check the directory exists and is writable")
    if isinstance(e, (apsw.NotADBError, apsw.CorruptError)):
        return NotADatabase(path, "corrupt or not an SQLite file; run `coord doctor` or restore it")
    if isinstance(e, apsw.IOError):
        return StorageError(path, f"I/O error: {e}")
    if isinstance(e, apsw.PermissionsError):
        return StorageError(path, "permission denied")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
        return StorageError(path, "permission denied: the directory or file is not writable by you")
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return StorageError(path, "read-only filesystem: point --db/COORD_DB at a writable place")
    return None


class translated:
    """Turn apsw and OS errors raised in the block into coord errors.

    A plain class, not @contextmanager: it wraps every write and read, and a generator-based
    context manager costs several microseconds each time.
    """

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None,
                 tb: object) -> None:
        if isinstance(e, (apsw.Error, OSError)):
            mapped = _translate(e, self.path)
            if mapped is not None:
                raise mapped from e


class SqliteDb:
    """The connections and transactions of one store's SQLite database; safe to share
    between threads, each of which gets its own connection."""

    def __init__(self, store: Store) -> None:
        self.path = str(store.path)
        self._store = store
        self._local = threading.local()
        self._lock = threading.Lock()
        # (pid, thread, connection) of every connection this store opened.
        self._all: list[tuple[int, threading.Thread, apsw.Connection]] = []
        self._closed = False
        self._commits = 0
        relock_after_fork(self)

    # -- connections ----------------------------------------------------------------------

    def _open(self) -> apsw.Connection:
        with translated(self.path):
            conn = open_connection(self.path, apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
            conn.set_busy_timeout(self._store.config.busy_timeout_ms)
        return conn

    def configure(self, conn: apsw.Connection) -> None:
        """Apply the pragmas to a connection whose database is known to be ours."""
        for name, value in CONNECTION_PRAGMAS:
            conn.execute(f"PRAGMA {name}={value}")

    def raw_connection(self) -> apsw.Connection:
        """A fresh, unconfigured connection (used by migrate before the file is trusted)."""
        return self._open()

    def conn(self) -> apsw.Connection:
        """This thread's connection, opened on first use.

        Checked on every use: a connection is only ever used by the thread and the process
        that opened it; in a forked child the inherited one is never used (``UnsafeFork``).
        """
        pid = os.getpid()
        local = self._local
        c: apsw.Connection | None = getattr(local, "conn", None)
        if c is not None and local.pid == pid:
            return c
        if self._closed:
            raise StorageError(self.path, "store is closed")
        c = self._open()
        try:
            with translated(self.path):
                self.configure(c)
        except BaseException:
            close_connection(c)
            raise
        local.conn, local.pid = c, pid
        with self._lock:
            # Connections of threads that have ended are closed here, by their own process,
            # so a server that churns threads does not collect open connections.
            # The main thread counts as ended while atexit handlers run; its connection is
            # still in use then (deregistration), so it is never closed here.
            main = threading.main_thread()
            ended = [x for p, t, x in self._all if p == pid and t is not main and not t.is_alive()]
            self._all = [e for e in self._all if e[2] not in ended]
            self._all.append((pid, threading.current_thread(), c))
        for x in ended:
            close_connection(x)
        return c

    def abandon_transaction(self) -> None:
        """Roll back this thread's open transaction, if any (see ``Store.abandon_transaction``)."""
        c = getattr(self._local, "conn", None)
        if c is not None and getattr(self._local, "pid", None) == os.getpid() and not c.get_autocommit():
            try:
                c.execute("ROLLBACK")
            except apsw.Error:
                pass

    def close(self) -> None:
        """Close the connections this process opened; those inherited across fork are left
        alone (the fork hook keeps them, unclosed, for ever)."""
        self._closed = True
        pid = os.getpid()
        with self._lock:
            mine = [c for p, _, c in self._all if p == pid]
            self._all = []
        for c in mine:
            close_connection(c)
        self._local = threading.local()

    # -- transactions and reads -----------------------------------------------------------

    def write(self, fn: Callable[[apsw.Connection], T]) -> T:
        """Run ``fn(conn)`` in one BEGIN IMMEDIATE transaction; retried whole on busy.

        ``fn`` must only touch the database: it may run more than once, and no user code
        runs inside it.
        """
        conn = self.conn()
        path = self.path
        if not conn.get_autocommit():
            raise RuntimeError("Store.write() called inside a transaction of the same thread; "
                               "do the work in the outer write's function instead")

        tries = 0

        def attempt() -> T:
            nonlocal tries
            tries += 1
            conn.execute("BEGIN IMMEDIATE")
            try:
                if tries > 1:  # the slow path only: count writes that had to wait (doctor)
                    conn.execute(_COUNT_BUSY)
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                # Whatever failed (fn, or COMMIT on a full disk), leave no transaction open.
                if not conn.get_autocommit():
                    try:
                        conn.execute("ROLLBACK")
                    except apsw.Error:
                        pass
                raise
            return result

        with translated(path):
            result = on_busy(attempt, path=path)
        self._commits += 1
        if self._commits % _WAL_CHECK_EVERY == 0:
            self._keep_wal_small()
        return result

    def _keep_wal_small(self) -> None:
        # Under constant traffic some reader always pins old frames, so the PASSIVE
        # autocheckpoints never finish and the WAL grows without end. When it is large, a
        # RESTART checkpoint that waits a few ms lets the short readers drain, completes, and
        # makes the next writer start the log over (cut back to journal_size_limit). It
        # holds writers back for at most WAL_RESTART_WAIT_MS, never behind a long reader.
        now = time.monotonic()
        if now - _WAL_LAST_RESTART[0] < 1.0:
            return
        try:
            size = os.stat(f"{self.path}-wal").st_size  # stat only: never open SQLite's files
        except OSError:
            return
        if size < WAL_RESTART_BYTES:
            return
        _WAL_LAST_RESTART[0] = now
        # Another connection's autocheckpoint makes ours fail at once (SQLite does not wait
        # for a running checkpoint), so try a few times within the budget.
        for _ in range(10):
            busy, frames, done = self.checkpoint("RESTART", WAL_RESTART_WAIT_MS)
            if frames >= 0 and (not busy or frames == done):
                return
            time.sleep(0.005)

    def checkpoint(self, mode: str = "PASSIVE", wait_ms: int = 0) -> tuple[int, int, int]:
        """Run one WAL checkpoint (PASSIVE, RESTART or TRUNCATE), waiting at most ``wait_ms``
        for readers and writers; returns SQLite's (busy, log frames, checkpointed frames),
        or (1, -1, -1) when it could not start."""
        if mode not in ("PASSIVE", "RESTART", "TRUNCATE"):
            raise ValueError(f"checkpoint mode {mode!r}")
        conn = self.conn()
        conn.set_busy_timeout(wait_ms)
        try:
            row: Any = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0]
            return int(row[0]), int(row[1]), int(row[2])
        except apsw.BusyError:
            return 1, -1, -1
        finally:
            conn.set_busy_timeout(self._store.config.busy_timeout_ms)

    def rows(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """Run a read and return its rows as dicts."""
        with translated(self.path):
            return fetch(self.conn(), sql, params)

    def value(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        """The first column of a read's first row, or None."""
        with translated(self.path):
            for r in self.conn().execute(sql, params):
                return r[0]
        return None

    def data_version(self) -> int:
        """Changes when another connection commits; cheap enough to poll (about 5 µs)."""
        return int(scalar(self.conn(), "PRAGMA data_version"))


#: Counts writes that were retried after a busy error, in the same transaction.
_COUNT_BUSY = ("INSERT INTO counters (name, value) VALUES ('busy_retries', 1) "
               "ON CONFLICT (name) DO UPDATE SET value = value + 1")


def fetch(conn: apsw.Connection, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
    """Rows of a query as dicts (column name → value)."""
    cur = conn.cursor()
    out: list[Row] = []
    names: list[str] | None = None
    for r in cur.execute(sql, params):
        if names is None:
            names = [d[0] for d in cur.get_description()]
        out.append(dict(zip(names, r, strict=True)))
    return out


def next_counter(conn: apsw.Connection, name: str) -> int:
    """Bump and return a never-decreasing counter (inside the caller's transaction)."""
    return int(scalar(conn, "UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value", (name,)))


def scalar(conn: apsw.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row, or None."""
    for r in conn.execute(sql, params):
        return r[0]
    return None
