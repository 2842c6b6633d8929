"""The SQLite engine's schema ladder: numbered ``schema/sqlite/NNN_*.sql`` files under
``PRAGMA user_version`` (``coord.backend.MetaOps``).

A file at the database path is identified before anything is written to it. It must be
empty, a blank SQLite database, or a coord database (``PRAGMA application_id`` is coord's)
whose schema is not newer than this code. Anything else is refused and left byte-for-byte
untouched:

1. The 100-byte header is read with a plain ``open()``: garbage bytes, a truncated file,
   another program's ``application_id`` and a newer coord's schema are refused without
   SQLite ever opening the file. That happens only while this process has no descriptor
   open on the file, because closing any descriptor of a file drops every POSIX lock the
   process holds on it — SQLite's too.
2. A read-only connection that never checkpoints on close reads ``application_id``,
   ``user_version`` and whether there are tables. (A read-write connection would, on close,
   checkpoint another program's pending WAL into its database file.)
3. Only then does a read-write connection switch to WAL and run every pending migration in
   one ``BEGIN IMMEDIATE`` transaction that re-reads the version first, so many processes
   opening a new database at once migrate it exactly once. Each migration logs a
   ``migrated`` event.
"""

from __future__ import annotations

import functools
import os
import re
from typing import TYPE_CHECKING, Any

import apsw

from ...errors import NotADatabase, SchemaTooNew
from . import forking
from .connection import APPLICATION_ID, scalar
from .events import log_event
from .forking import close_connection, open_connection
from .retry import on_busy

if TYPE_CHECKING:
    from ...db import Store

__all__ = ["SqliteMeta", "latest_version", "migrate", "migrations"]

_HEADER = b"SQLite format 3\x00"


@functools.cache
def _migrations() -> tuple[tuple[int, str, str], ...]:
    from importlib import resources

    found = []
    for entry in resources.files("coord.schema.sqlite").iterdir():
        m = re.fullmatch(r"(\d{3})_\w+\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [n for n, _, _ in found]
    # Numbered 001, 002 ... without gaps: a database stamped with a number skips every file
    # below it, so a gap would hide a file added later below a released number.
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"schema files must be numbered 001, 002 ... once each, no gaps: "
                           f"{numbers}")
    return tuple(found)


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every schema file, in order."""
    return list(_migrations())


@functools.cache
def latest_version() -> int:
    """The schema version this code writes: the number of the last schema file. Read from
    the file names alone where the package is a directory: every open asks, and only an
    upgrade needs the SQL (and importlib.resources, slow to load)."""
    from importlib.util import find_spec

    spec = find_spec("coord.schema.sqlite")
    where = os.path.dirname(spec.origin) if spec is not None and spec.origin else ""
    try:
        names = os.listdir(where) if where else None
    except OSError:
        names = None
    if names is None:
        return _migrations()[-1][0]
    numbers = sorted(int(n[:3]) for n in names if re.fullmatch(r"\d{3}_\w+\.sql", n))
    if numbers != list(range(1, len(numbers) + 1)):
        return _migrations()[-1][0]  # raises, naming the numbers
    return numbers[-1]


def _open_here(st: os.stat_result) -> bool:
    """Whether this process has a descriptor open on the file (then it may hold SQLite's
    locks on it, and must not open and close it). Falls back to "yes" without /proc."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            other = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _check_file(path: str) -> None:
    """Refuse, from its header alone, a file that cannot be a coord database.

    Skipped while this process has the file open: closing our descriptor would drop the
    POSIX locks SQLite holds on it (the next steps still identify the file through SQLite).
    """
    with forking.FILE_OPEN_LOCK:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if st.st_size == 0 or _open_here(st):
            return
        with open(path, "rb") as f:
            head = f.read(100)
    if not head.startswith(_HEADER):
        raise NotADatabase(path, "not an SQLite database file")
    if len(head) < 100:
        raise NotADatabase(path, f"truncated: {st.st_size} bytes")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise NotADatabase(path, f"corrupt header: page size {page_size}")
    if st.st_size % page_size:
        raise NotADatabase(path, f"truncated: {st.st_size} bytes is not a whole number of pages")
    # The header can lag the WAL, but these two only ever move forward in a coord database,
    # so a value seen here is proof enough.
    app_id = int.from_bytes(head[68:72], "big")
    _refuse_foreign(path, app_id)
    if app_id == APPLICATION_ID:
        _refuse_too_new(path, int.from_bytes(head[60:64], "big"))


def _refuse_foreign(path: str, app_id: int) -> None:
    if app_id not in (0, APPLICATION_ID):
        raise NotADatabase(path, f"its application_id {app_id:#x} belongs to another program")


def _refuse_too_new(path: str, version: int) -> None:
    latest = latest_version()
    if version > latest:
        raise SchemaTooNew(version, latest, path)


def _ident(conn: apsw.Connection) -> tuple[int, int, bool]:
    """(application_id, user_version, has any table or view), from one snapshot: one
    statement, so a migration committed by another process is seen whole or not at all."""
    row: tuple[Any, ...] = conn.execute(
        "SELECT (SELECT application_id FROM pragma_application_id), "
        "(SELECT user_version FROM pragma_user_version), "
        "(SELECT count(*) FROM sqlite_schema)"
    ).fetchall()[0]
    return int(row[0]), int(row[1]), bool(row[2])


def _identify(store: Store) -> tuple[int, int, bool] | None:
    """Identify the file through a read-only connection that cannot change it.

    None when a read-only connection cannot read it (a hot journal to roll back, or no way
    to create the shared-memory file): the caller then identifies it read-write.
    """
    path = str(store.path)
    try:
        conn = open_connection(path, apsw.SQLITE_OPEN_READONLY)
    except apsw.CantOpenError:
        return None
    try:
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        conn.set_busy_timeout(store.config.busy_timeout_ms)
        return on_busy(lambda: _ident(conn), path=path)
    except (apsw.ReadOnlyError, apsw.CantOpenError):
        return None
    finally:
        close_connection(conn)


def _refuse(path: str, app_id: int, version: int, has_tables: bool) -> None:
    _refuse_foreign(path, app_id)
    _refuse_too_new(path, version)
    if app_id == 0 and (version != 0 or has_tables):
        raise NotADatabase(path, "it is an SQLite database of another program")


def migrate(store: Store) -> None:
    """Create or upgrade the database at ``store.path``; refuse anything else.

    Raises ``NotADatabase`` or ``SchemaTooNew`` and leaves the file untouched when it is
    not a coord database this code can use.
    """
    path = str(store.path)
    _check_file(path)
    ident = _identify(store)
    if ident is not None:
        _refuse(path, *ident)
    conn = store.raw_connection()
    try:
        if ident is None:
            _refuse(path, *on_busy(lambda: _ident(conn), path=path))
        mode = on_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0], path=path)
        if str(mode).lower() != "wal":
            raise NotADatabase(path, f"could not switch it to WAL (journal_mode={mode})")
        if int(scalar(conn, "PRAGMA user_version")) < latest_version():
            on_busy(lambda: _apply(store, conn), path=path)
    finally:
        close_connection(conn)


def _apply(store: Store, conn: apsw.Connection) -> None:
    """Run every pending migration in one IMMEDIATE transaction; a no-op when another
    process got there first."""
    path = str(store.path)
    conn.execute("BEGIN IMMEDIATE")
    try:
        app_id, version, has_tables = _ident(conn)
        _refuse(path, app_id, version, has_tables)
        latest = _migrations()[-1][0]
        if version == latest:
            conn.execute("ROLLBACK")
            return
        for number, _name, sql in _migrations():
            if number > version:
                conn.execute(sql).fetchall()  # iterate: runs every statement in the file
        wall = store.wall()
        if version == 0:
            conn.execute(
                "INSERT INTO counters (name, value) VALUES ('incarnation', 0), "
                "('term', ?), ('revision', 0)",
                # Terms start at the wall clock in ms so a recreated database's terms exceed
                # every term the database it replaced ever handed out.
                (int(wall * 1000),),
            )
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('boot_id', ?), ('created_at', ?)",
                (store.boot_id, repr(wall)),
            )
        log_event(conn, wall, "migrated", None, None, from_version=version, to_version=latest,
                  pid=os.getpid())
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={int(latest)}")
        conn.execute("COMMIT")
    except BaseException:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
        raise


class SqliteMeta:
    """``coord.backend.MetaOps``: this ladder, for one store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def migrate(self) -> None:
        migrate(self._store)

    def version(self) -> int:
        return int(self._store.value("PRAGMA user_version"))

    def latest(self) -> int:
        return latest_version()
