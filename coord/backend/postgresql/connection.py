"""Connections to the PostgreSQL server: one per thread and process, in autocommit (a read
is one statement), every write one short transaction run by ``PgDb.write(fn)``, and the
translation of the driver's errors to ``coord.errors`` at this one boundary.

- READ COMMITTED does not serialise writers as SQLite's single writer does: a write that
  must see a stable row locks it (``SELECT … FOR UPDATE``) or is one statement. A write that
  fails with a serialization failure or a deadlock was rolled back whole and is retried.
- A lost connection is dropped and the error surfaces as one ``StorageError``; the next
  call connects again. A write is never retried after a lost connection: its COMMIT may have
  been applied, and running it twice could apply it twice.
- fork: a child must never use, nor close, a connection it inherited — closing sends the
  server a Terminate message on the socket the parent still uses, ending the parent's
  session. So the after-fork hook keeps every inherited connection referenced for ever, and
  the child opens its own.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from ...errors import CoordError, NotADatabase, StorageError

if TYPE_CHECKING:
    from .url import PgLocation

T = TypeVar("T")
Row = dict[str, Any]
Conn = psycopg.Connection[Row]

#: Seconds to wait for the server when connecting.
CONNECT_TIMEOUT = 10
#: The client's side of a link that went silent (a cut cable, a partition): without these a
#: statement waits for TCP's retransmissions, about 15 minutes, with the caller's thread. A
#: statement whose data stays unacknowledged for 10 s, or an idle connection whose keepalive
#: probes go unanswered (5 s idle, then 3 probes 2 s apart), fails instead. A URL's own values
#: win; on a unix socket libpq ignores them.
CLIENT_TIMEOUTS = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
                   "keepalives_count": "3", "tcp_user_timeout": "10000"}
#: The server's side of the same: it ends a session whose client went silent (its locks go
#: with it) after the same bounds, and a session idle inside a transaction for 5 s — coord's
#: transactions run statement after statement, so that is a client stopped or cut off in
#: the middle of a write, holding row locks every other host would wait for.
SERVER_TIMEOUTS = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
                   "tcp_keepalives_count": "3", "tcp_user_timeout": "10000",
                   "idle_in_transaction_session_timeout": "5s"}
#: Writes retried after a serialization failure or deadlock (each rolled back whole).
RETRIES = 50

# Every connection opened in this process and not closed: (pid, connection).
_OPEN: list[tuple[int, Conn]] = []
# The deployment schema of each open connection (by id), for ``close_schema``, and the
# schemas closed by it in this process (nothing connects to them again).
_SCHEMA_OF: dict[int, str] = {}
_CLOSED_SCHEMAS: set[str] = set()
_OPEN_LOCK = threading.Lock()
# Connections inherited across fork: never used, never closed (see the module docstring).
_ABANDONED: list[Conn] = []


def _after_fork_in_child() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()
    _ABANDONED.extend(c for _, c in _OPEN)
    _OPEN.clear()
    _SCHEMA_OF.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def translate(e: BaseException, where: str) -> CoordError | None:
    """The coord error for a driver error (one line, no secret), or None to let it be."""
    if not isinstance(e, psycopg.Error):
        return None
    state = getattr(e, "sqlstate", None) or ""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if state == "28P01" or state == "28000":
        return StorageError(where, f"authentication failed: {first}")
    if state == "3D000":
        return StorageError(where, f"the database does not exist: {first}")
    if state == "42501":
        return StorageError(where, f"permission denied: {first}")
    if state == "53100":
        return StorageError(where, "the server's disk is full; nothing committed was lost")
    if isinstance(e, psycopg.OperationalError) and not state:
        # A failed connect carries no SQLSTATE: libpq's message says which failure it was.
        reason = first.rpartition("FATAL:")[2].strip() if "FATAL:" in first else first
        if "authentication failed" in reason or "no password supplied" in reason:
            return StorageError(where, f"authentication failed: {reason}")
        if re.search(r'database ".*" does not exist', reason):
            return StorageError(where, f"the database does not exist: {reason}")
    if state.startswith("40"):
        # Serialization failures and deadlocks are OperationalErrors too, but the server is
        # there: the transaction lost a race (PgDb.write retries those itself).
        return StorageError(where, f"a write conflicted with another: {first}")
    if state in ("57P01", "57P02", "57P03") or isinstance(e, psycopg.OperationalError):
        return StorageError(where, f"cannot reach the server: {first}")
    if state.startswith("XX") or state == "58030":
        return NotADatabase(where, f"server error: {first}")
    return None


class translated:
    """Turn driver errors raised in the block into coord errors."""

    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None,
                 tb: object) -> None:
        if e is not None:
            mapped = translate(e, self.where)
            if mapped is not None:
                raise mapped from e


class PgDb:
    """The connections of one store to one deployment (a schema on one server)."""

    def __init__(self, location: PgLocation, *, application: str = "coord") -> None:
        self.location = location
        self.where = location.redacted
        self._application = application
        self._local = threading.local()
        self._closed = False
        self.retries = 0  # writes retried after a serialization failure or deadlock
        self._mine: list[Conn] = []  # the connections this store opened (other stores' stay)

    # -- connections ------------------------------------------------------------------------

    def connect(self, *, client: dict[str, Any] | None = None, **settings: str) -> Conn:
        """A new connection in autocommit whose search_path is the deployment's schema alone,
        with extra session ``settings`` (GUC name → value) applied at connect and extra libpq
        ``client`` parameters (e.g. the client's own keepalives), which win over the
        defaults."""
        # Set by a statement, not the startup packet's ``options``: PgBouncer refuses
        # connections that send ``options`` ("unsupported startup parameter"), and a
        # session-mode pool in front of the server is a supported deployment.
        if self.location.schema in _CLOSED_SCHEMAS:
            raise StorageError(self.where, "its schema was closed here (about to be dropped)")
        gucs = {"search_path": self.location.schema, **SERVER_TIMEOUTS, **settings}
        with translated(self.where):
            given = conninfo_to_dict(self.location.dsn)
            params: dict[str, Any] = {k: v for k, v in CLIENT_TIMEOUTS.items()
                                      if k not in given}
            params.update(client or {})
            conn: Conn = psycopg.connect(
                self.location.dsn, autocommit=True, row_factory=dict_row,
                connect_timeout=CONNECT_TIMEOUT, **params,
                # The pid names the process behind a session in pg_stat_activity.
                application_name=f"{self._application} pid {os.getpid()}")
            try:
                conn.execute("SELECT " + ", ".join(["set_config(%s, %s, false)"] * len(gucs)),
                             [x for kv in gucs.items() for x in kv])
            except BaseException:
                conn.close()
                raise
        with _OPEN_LOCK:
            _OPEN.append((os.getpid(), conn))
            _SCHEMA_OF[id(conn)] = self.location.schema
            self._mine.append(conn)
        return conn

    def conn(self) -> Conn:
        """This thread's connection: opened on first use, and again after it was lost."""
        local = self._local
        c: Conn | None = getattr(local, "conn", None)
        pid = os.getpid()
        if c is not None and local.pid == pid and not c.closed and not c.broken:
            return c
        if self._closed:
            raise StorageError(self.where, "store is closed")
        if c is not None and local.pid == pid:
            self.discard(c)
        c = self.connect()
        local.conn, local.pid = c, pid
        return c

    def discard(self, c: Conn) -> None:
        """Close a connection of this process (a lost one, or at close)."""
        with _OPEN_LOCK:
            _OPEN[:] = [(p, x) for p, x in _OPEN if x is not c]
            _SCHEMA_OF.pop(id(c), None)
            self._mine[:] = [x for x in self._mine if x is not c]
        try:
            c.close()
        except psycopg.Error:
            pass

    def _drop_current(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None and self._local.pid == os.getpid():
            self._local.conn = None
            self.discard(c)

    def abandon_transaction(self) -> None:
        """End this thread's open transaction by cutting its connection (the server rolls it
        back). For the SIGTERM handler only: it may interrupt the main thread inside the
        driver, holding the connection's lock, so the connection is not used again (a ROLLBACK
        on it could wait for ever) and no lock of this module is taken."""
        c: Conn | None = getattr(self._local, "conn", None)
        if c is None or getattr(self._local, "pid", None) != os.getpid():
            return
        if c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return
        self._local.conn = None
        c.pgconn.finish()

    def close(self) -> None:
        """Close the connections this store opened in this process."""
        self._closed = True
        pid = os.getpid()
        with _OPEN_LOCK:
            mine = [c for p, c in _OPEN if p == pid and any(c is x for x in self._mine)]
        for c in mine:
            self.discard(c)
        self._local = threading.local()

    # -- transactions and reads -------------------------------------------------------------

    def write(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn(conn)`` in one transaction; retried whole after a serialization failure
        or a deadlock. ``fn`` must only touch the database (it may run more than once)."""

        def txn(conn: Conn) -> T:
            with conn.transaction():
                return fn(conn)

        return self._retried(txn, "write")

    def statement(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """Run one writing statement as its own transaction (autocommit: one round trip, no
        BEGIN/COMMIT) and return its rows; retried like ``write`` after a serialization
        failure or a deadlock, never after a lost connection."""
        return self._retried(
            lambda conn: conn.execute(sql, params).fetchall(),  # type: ignore[arg-type]
            "statement")

    def _retried(self, run: Callable[[Conn], T], what: str) -> T:
        conn = self.conn()
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise RuntimeError(f"PgDb.{what}() called inside a transaction of the same thread")
        for attempt in range(RETRIES):
            try:
                with translated(self.where):
                    return run(conn)
            except (StorageError, psycopg.OperationalError) as e:
                # Translated on the way out (by ``translated`` here or one inside ``run``): a
                # lost race is known by the driver error it came from.
                cause = e.__cause__ if isinstance(e, StorageError) else e
                if isinstance(cause, (pgerrors.SerializationFailure, pgerrors.DeadlockDetected)):
                    self.retries += 1
                    time.sleep(min(0.001 * (attempt + 1), 0.02))
                    continue
                if conn.closed or conn.broken:
                    self._drop_current()
                raise
        raise StorageError(self.where, f"a write kept conflicting with others ({RETRIES} tries)")

    def rows(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """Run one read and return its rows as dicts."""
        conn = self.conn()
        try:
            with translated(self.where):
                return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]
        except StorageError:
            if conn.closed or conn.broken:
                self._drop_current()
            raise

    def row(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Row | None:
        found = self.rows(sql, params)
        return found[0] if found else None

    def value(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        found = self.rows(sql, params)
        return next(iter(found[0].values())) if found else None


def fetch(c: Conn, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
    """Rows of a statement run inside the caller's transaction."""
    return c.execute(sql, params).fetchall()  # type: ignore[arg-type]


def scalar(c: Conn, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
    """The first column of the first row, or None."""
    found = c.execute(sql, params).fetchall()  # type: ignore[arg-type]
    return next(iter(found[0].values())) if found else None


def close_schema(schema: str) -> int:
    """Close every connection this process opened to the deployment ``schema`` and has not
    closed (a store dropped without ``close``); how many. For a schema about to be dropped:
    what still uses it would fail at its next statement anyway."""
    pid = os.getpid()
    with _OPEN_LOCK:
        _CLOSED_SCHEMAS.add(schema)
        doomed = [c for p, c in _OPEN if p == pid and _SCHEMA_OF.get(id(c)) == schema]
        _OPEN[:] = [(p, c) for p, c in _OPEN if not any(c is d for d in doomed)]
        for c in doomed:
            _SCHEMA_OF.pop(id(c), None)
    for c in doomed:
        try:
            c.close()
        except psycopg.Error:
            pass
    return len(doomed)

