"""The store: one SQLite database in WAL mode, one connection per thread and per process.

``Store`` is the only place that opens connections, sets pragmas and runs transactions.
Every write is one short ``BEGIN IMMEDIATE`` transaction run by ``Store.write(fn)``; reads run
outside transactions. apsw errors are translated to ``coord.errors`` here, at one boundary.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import apsw

from . import paths
from ._retry import on_busy
from .clock import SYSTEM, Clock, boot_id
from .config import Config
from .errors import CoordError, NotADatabase, StorageError

T = TypeVar("T")
Row = dict[str, Any]

#: PRAGMA application_id of a coord database: "coor".
APPLICATION_ID = 0x636F6F72

# Pragmas every connection gets, in one place (a test reads them back).
CONNECTION_PRAGMAS: tuple[tuple[str, str], ...] = (
    ("synchronous", "NORMAL"),  # WAL + NORMAL: durable across process crashes, fast commits
    ("foreign_keys", "ON"),
    ("journal_size_limit", str(64 << 20)),  # the WAL is truncated to this after checkpoints
    ("temp_store", "MEMORY"),
    ("cache_size", "-8000"),
    ("wal_autocheckpoint", "1000"),  # PASSIVE checkpoints only: they never block writers
)

# Connections inherited across fork are never used or closed in the child: closing one could
# checkpoint and delete the parent's WAL. They are parked here so no finalizer runs.
_INHERITED: list[apsw.Connection] = []


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
    return None


@contextmanager
def translated(path: str) -> Iterator[None]:
    """Turn apsw and OS errors into coord errors."""
    try:
        yield
    except (apsw.Error, OSError) as e:
        mapped = _translate(e, path)
        if mapped is None:
            raise
        raise mapped from e


class Store:
    """An open coord database.

    ``Store(path)`` resolves and checks the path (see ``coord.paths``), creates and migrates
    the database if needed, and is then safe to share between threads; each thread, and each
    process after fork, gets its own connection.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        clock: Clock = SYSTEM,
        config: Config | None = None,
    ) -> None:
        self.path = paths.prepare_db_path(paths.resolve_db_path(path))
        self.clock = clock
        self.config = config if config is not None else Config.from_env()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[tuple[int, apsw.Connection]] = []
        self._closed = False
        from .migrate import migrate
        from .reaper import rebase_boot

        with translated(str(self.path)):
            paths.create_db_file(self.path)
            migrate(self)
            rebase_boot(self)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- connections ----------------------------------------------------------------------

    def _open(self) -> apsw.Connection:
        path = str(self.path)
        with translated(path):
            conn = apsw.Connection(
                path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
            )
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
        """This thread's connection, opened on first use and reopened after fork."""
        pid = os.getpid()
        local = self._local
        c: apsw.Connection | None = getattr(local, "conn", None)
        if c is not None and local.pid == pid:
            return c
        if c is not None:
            _INHERITED.append(c)
        if self._closed:
            raise StorageError(str(self.path), "store is closed")
        c = self._open()
        with translated(str(self.path)):
            self.configure(c)
        local.conn, local.pid = c, pid
        with self._lock:
            self._all.append((pid, c))
        return c

    def close(self) -> None:
        """Close the connections this process opened (never those inherited across fork)."""
        self._closed = True
        pid = os.getpid()
        with self._lock:
            mine = [c for p, c in self._all if p == pid]
            others = [c for p, c in self._all if p != pid]
            self._all = []
        _INHERITED.extend(others)
        for c in mine:
            try:
                c.close()
            except apsw.Error:
                pass
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

        def attempt() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                if not conn.get_autocommit():
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        with translated(path):
            return on_busy(attempt, path=path)

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

    def side_dir(self, name: str) -> Path:
        """A private 0700 directory beside the database (locks, sockets, logs)."""
        return paths.private_dir(self.path, name)


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
