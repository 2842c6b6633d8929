"""The store: where coord's state lives, and the engine that keeps it.

``Store(location)`` resolves the location — an SQLite database path (``coord.paths``) or a
PostgreSQL URL (``coord.locations``) — and opens its engine (``store.backend``, see
``coord.backend``), which holds the SQL, the driver and its error translation. This module
knows the protocol only: the SQLite engine's connections, pragmas, transactions and fork rule
are ``coord.backend.sqlite.connection`` and ``coord.backend.sqlite.forking``; the methods
below that hand out SQLite connections or run SQL (``write``, ``rows``, ``conn``...) are that
engine's, for its modules and the tests, and refuse on another engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import paths
from .backend import Backend, open_backend, refuse_location
from .backend.postgresql.url import PgLocation
from .backend.postgresql.url import parse as parse_pg_url
from .clock import SYSTEM, Clock, boot_id
from .config import Config
from .errors import InvalidArgument, UnsafePath
from .locations import is_url

if TYPE_CHECKING:
    from .backend.sqlite.connection import Connection, SqliteDb

T = TypeVar("T")
Row = dict[str, Any]


class Store:
    """An open coord database.

    ``Store(path)`` resolves and checks the path (see ``coord.paths``), creates and migrates
    the database if needed, and is then safe to share between threads; on SQLite each thread
    gets its own connection. A forked child may not use an SQLite database its parent had
    open: it raises ``UnsafeFork`` (see ``coord.backend.sqlite.forking``).
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
            if given.startswith(("&schema=", "?schema=")):
                # What `--db "$URL&schema=x"` becomes when $URL is empty: not a file to create.
                raise InvalidArgument(f"database {given!r} is the end of a PostgreSQL URL with "
                                      "nothing before it (is the variable holding the URL empty?)")
            self.engine = "sqlite"
            resolved = paths.resolve_db_path(path)
            refuse_location(self.engine, str(resolved))  # UnsafeFork, before anything touches it
            self.path = paths.prepare_db_path(resolved)
            self.address = self.address_shown = str(self.path)
        self.clock = clock
        self.config = config if config is not None else Config.from_env()
        #: This store's engine: its operations per capability and its services (``coord.backend``).
        self.backend: Backend = open_backend(self.engine, self)
        # The SQLite engine's connections and transactions, behind the methods below.
        self._sqlite_db: SqliteDb | None = getattr(self.backend, "db", None) \
            if self.engine == "sqlite" else None
        # The engine creates, migrates and rebases: opening sits above Store (the engine
        # imports this module; this module knows the protocol only).
        try:
            self.backend.open()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Store({self.address_shown!r})"

    def close(self) -> None:
        """Close the engine's connections this process opened; those an SQLite store
        inherited across fork are left alone (the fork hook keeps them, unclosed, for ever)."""
        closer = getattr(getattr(self, "backend", None), "close", None)
        if closer is not None:
            closer()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the SQLite engine's connections, transactions and reads ---------------------------

    def _sqlite(self) -> SqliteDb:
        db = self._sqlite_db
        if db is None:
            raise RuntimeError(f"an SQLite connection asked of a {self.engine} store")
        return db

    def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in one BEGIN IMMEDIATE transaction; retried whole on busy.

        ``fn`` must only touch the database: it may run more than once, and no user code
        runs inside it. SQLite only.
        """
        return self._sqlite().write(fn)

    def conn(self) -> Connection:
        """This thread's SQLite connection, opened on first use (never one inherited across
        fork: ``UnsafeFork``). SQLite only."""
        return self._sqlite().conn()

    def configure(self, conn: Connection) -> None:
        """Apply the pragmas to a connection whose database is known to be ours."""
        self._sqlite().configure(conn)

    def raw_connection(self) -> Connection:
        """A fresh, unconfigured connection (used by migrate before the file is trusted)."""
        return self._sqlite().raw_connection()

    def abandon_transaction(self) -> None:
        """Roll back this thread's open transaction, if any. For the SIGTERM handler only: it
        interrupts the main thread anywhere, deregisters, and then the process ends, so the
        interrupted transaction never resumes."""
        self.backend.abandon_transaction()

    def checkpoint(self, mode: str = "PASSIVE", wait_ms: int = 0) -> tuple[int, int, int]:
        """Run one WAL checkpoint (PASSIVE, RESTART or TRUNCATE), waiting at most ``wait_ms``
        for readers and writers; returns SQLite's (busy, log frames, checkpointed frames),
        or (1, -1, -1) when it could not start."""
        return self._sqlite().checkpoint(mode, wait_ms)

    def rows(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """Run a read and return its rows as dicts."""
        return self._sqlite().rows(sql, params)

    def row(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Row | None:
        """A read's first row, or None."""
        found = self._sqlite().rows(sql, params)
        return found[0] if found else None

    def value(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        """The first column of a read's first row, or None."""
        return self._sqlite().value(sql, params)

    def data_version(self) -> int:
        """Changes when another connection commits; cheap enough to poll (about 5 µs)."""
        return self._sqlite().data_version()

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
