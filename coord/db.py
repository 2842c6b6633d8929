"""The store: one SQLite database in WAL mode, one connection per thread and per process.

``Store`` is the only place that opens connections, sets pragmas and runs transactions.
Every write is one short ``BEGIN IMMEDIATE`` transaction run by ``Store.write(fn)``; reads run
outside transactions. apsw errors are translated to ``coord.errors`` here, at one boundary.

Connections and processes:

- Each thread gets its own connection on first use (``Store.conn()``), checked against the
  pid on every use; connections of threads that ended are closed by the next new one.
- fork: SQLite keeps one table of POSIX locks per process. A child forked while this process
  has a connection to a database inherits a copy of that table claiming locks the child does
  not hold, so any SQLite call on that file in the child (a new connection included) can
  commit into a WAL another process has deleted, or checkpoint a stale view over the file.
  So the after-fork hook runs no SQLite code at all: it only records which databases had a
  connection open at the fork, and keeps every inherited connection referenced for ever so
  it is never closed (closing runs SQLite's unlock code on a lock table that is not ours).
  Every coord call on such a database in the child — the inherited ``Store``, a new
  ``Store(path)`` on the same file, the CLI — then raises ``UnsafeFork`` before touching it.
  A database this process had *no* connection to at the fork (never opened, or every
  connection closed) is safe in the child and may be used there; so is any database in a
  child started with the ``spawn`` or ``forkserver`` start method. The rule is inherited:
  a grandchild is refused what its parent was refused.
- No file of the database is ever opened and closed with plain ``open()`` while this process
  has a connection to it: closing any descriptor of a file drops every POSIX lock the
  process holds on it, SQLite's included (``FILE_OPEN_LOCK``, ``coord.backend.sqlite.migrations``). For the
  same reason coord's database must never be opened by a second SQLite library (the stdlib
  ``sqlite3``, SQLAlchemy, pandas) inside a process that uses coord.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import apsw

from . import paths
from ._retry import on_busy
from .backend import Backend, open_backend
from .backend.postgresql.url import PgLocation
from .backend.postgresql.url import parse as parse_pg_url
from .clock import SYSTEM, Clock, boot_id
from .config import Config
from .errors import CoordError, NotADatabase, StorageError, UnsafeFork, UnsafePath
from .locations import is_url

T = TypeVar("T")
Row = dict[str, Any]

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

#: Held while a connection is opened, and while coord.backend.sqlite.migrations reads a database header with
#: a plain open()/close(): closing that descriptor would drop every POSIX lock this process
#: holds on the file, so the header is read only when no descriptor is open on it, and no
#: other thread may open one (and then lock) in the meantime.
FILE_OPEN_LOCK = threading.Lock()


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


# -- fork ---------------------------------------------------------------------------------

FileKey = tuple[int, int]  # (st_dev, st_ino) of a database file

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
# Every open Store, so that a forked child can replace their thread locks.
_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


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
    for store in list(_STORES):
        store._lock = threading.Lock()  # another thread may have held it at the fork


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


class Store:
    """An open coord database.

    ``Store(path)`` resolves and checks the path (see ``coord.paths``), creates and migrates
    the database if needed, and is then safe to share between threads; each thread gets its
    own connection. A forked child may not use a database its parent had open: it raises
    ``UnsafeFork`` (see the module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        clock: Clock = SYSTEM,
        config: Config | None = None,
    ) -> None:
        given = os.fspath(path) if path is not None else ""
        if not given:
            given = os.environ.get("COORD_DB", "")
        #: The PostgreSQL location when this store is on a server, else None.
        self.location: PgLocation | None = None
        if is_url(given):
            self.engine = "postgresql"
            self.location = parse_pg_url(given)
            #: What a child process is given as COORD_DB to reach the same store.
            self.address = given
            #: How messages name the store (never a secret).
            self.address_shown = self.location.redacted
            # Host-local files of this deployment (lock files, sockets, logs) live beside
            # a name in the runtime directory, as an SQLite database's do beside it.
            local = paths.default_db_path(
                {k: v for k, v in os.environ.items() if k != "COORD_DB"}).parent
            self.path = paths.prepare_db_path(local / f"pg-{self.location.key()}")
        else:
            self.engine = "sqlite"
            resolved = paths.resolve_db_path(path)
            refuse_if_forked(resolved)  # before anything touches the file
            self.path = paths.prepare_db_path(resolved)
            self.address = self.address_shown = str(self.path)
        self.clock = clock
        self.config = config if config is not None else Config.from_env()
        self._local = threading.local()
        self._lock = threading.Lock()
        # (pid, thread, connection) of every connection this store opened.
        self._all: list[tuple[int, threading.Thread, apsw.Connection]] = []
        self._closed = False
        self._commits = 0
        _STORES.add(self)
        #: This store's engine: its operations per capability and its services (``coord.backend``).
        self.backend: Backend = open_backend(self.engine, self)
        # The engine creates, migrates and rebases: opening sits above Store (the engine
        # imports this module; this module knows the protocol only).
        try:
            with translated(str(self.path)):
                self.backend.open()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Store({self.address_shown!r})"

    # -- connections ----------------------------------------------------------------------

    def _open(self) -> apsw.Connection:
        if self.engine != "sqlite":
            raise RuntimeError(f"an SQLite connection asked of a {self.engine} store")
        path = str(self.path)
        with translated(path):
            conn = open_connection(path, apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
            conn.set_busy_timeout(self.config.busy_timeout_ms)
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
            raise StorageError(str(self.path), "store is closed")
        c = self._open()
        try:
            with translated(str(self.path)):
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
        """Roll back this thread's open transaction, if any. For the SIGTERM handler only: it
        interrupts the main thread anywhere, deregisters, and then the process ends, so the
        interrupted transaction never resumes."""
        if self.engine != "sqlite":
            self.backend.abandon_transaction()  # type: ignore[attr-defined]
            return
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
        closer = getattr(getattr(self, "backend", None), "close", None)
        if closer is not None:
            closer()
        pid = os.getpid()
        with self._lock:
            mine = [c for p, _, c in self._all if p == pid]
            self._all = []
        for c in mine:
            close_connection(c)
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and reads -----------------------------------------------------------

    def write(self, fn: Callable[[apsw.Connection], T]) -> T:
        """Run ``fn(conn)`` in one BEGIN IMMEDIATE transaction; retried whole on busy.

        ``fn`` must only touch the database: it may run more than once, and no user code
        runs inside it.
        """
        conn = self.conn()
        path = str(self.path)
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
            conn.set_busy_timeout(self.config.busy_timeout_ms)

    def rows(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """Run a read and return its rows as dicts."""
        with translated(str(self.path)):
            return fetch(self.conn(), sql, params)

    def row(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Row | None:
        found = self.rows(sql, params)
        return found[0] if found else None

    def value(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        with translated(str(self.path)):
            for r in self.conn().execute(sql, params):
                return r[0]
        return None

    def data_version(self) -> int:
        """Changes when another connection commits; cheap enough to poll (about 5 µs)."""
        return int(scalar(self.conn(), "PRAGMA data_version"))

    # -- time -----------------------------------------------------------------------------

    def mono(self) -> float:
        return self.clock.mono()

    def wall(self) -> float:
        return self.clock.wall()

    @property
    def boot_id(self) -> str:
        return boot_id()

    def refuse_own_file(self, path: str | os.PathLike[str]) -> None:
        """Raise ``UnsafePath`` when ``path`` is the database or its ``-wal``/``-shm`` (by
        inode: a link or another spelling counts). For commands that read a file the user
        names, before they open it: closing any descriptor of those files drops every lock
        this process's connections hold on them."""
        try:
            st = os.stat(path)
        except OSError:
            return  # the reader reports what is wrong with it
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                own = os.stat(f"{self.path}{suffix}")
            except OSError:
                continue
            if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
                raise UnsafePath(os.fspath(path), (
                    f"it is this coord database's own file ({self.path}{suffix}); reading it "
                    "here would drop SQLite's locks — copy it elsewhere first, or use "
                    "`coord sql` to read the database"))

    def side_dir(self, name: str) -> Path:
        """A private 0700 directory beside the database (locks, sockets, logs)."""
        return paths.private_dir(self.path, name)


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
