"""The schema ladder: numbered ``schema/NNN_*.sql`` files under ``PRAGMA user_version``.

A file at the database path is checked before anything is written to it: it must be empty,
or an SQLite file whose ``application_id`` is coord's (or a blank new database). Another
program's database, garbage bytes or a truncated file are refused and left byte-for-byte
untouched. All pending migrations run in one IMMEDIATE transaction that re-reads the version
first, so many processes opening a new database at once migrate it exactly once.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from typing import TYPE_CHECKING

import apsw

from ._retry import on_busy
from .db import scalar
from .errors import NotADatabase, SchemaTooNew

if TYPE_CHECKING:
    from .db import Store  # noqa: F401

_HEADER = b"SQLite format 3\x00"


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every schema file, in order."""
    found = []
    for entry in resources.files("coord.schema").iterdir():
        m = re.fullmatch(r"(\d{3})_\w+\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def latest_version() -> int:
    return migrations()[-1][0]


# Files this process has already validated. The header is read with a plain open()/close(),
# and closing a descriptor drops this process's POSIX locks on the file — SQLite's included —
# so it is read only before this process has any connection to the file.
_VALIDATED: set[tuple[int, int]] = set()


def _check_file(path: str) -> None:
    """Refuse a file that is not (or not yet) a coord database, without writing to it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) in _VALIDATED:
        return
    _check_header(path)


def _check_header(path: str) -> None:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb") as f:
        head = f.read(100)
    if not head.startswith(_HEADER):
        raise NotADatabase(path, "not an SQLite database file")
    if len(head) < 100:
        raise NotADatabase(path, f"truncated: {size} bytes")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or size % page_size:
        raise NotADatabase(path, f"truncated: {size} bytes is not a whole number of pages")


def migrate(store: Store) -> None:
    """Create or upgrade the database at ``store.path``; refuse anything else."""
    from .db import APPLICATION_ID

    path = str(store.path)
    _check_file(path)
    conn = store.raw_connection()
    try:
        app_id, version = _ident(conn)
        if app_id not in (0, APPLICATION_ID):
            raise NotADatabase(path, f"application_id {app_id:#x} belongs to another program")
        latest = latest_version()
        if version > latest:
            raise SchemaTooNew(version, latest, path)
        if app_id == 0 and _has_tables(conn):
            raise NotADatabase(path, "an SQLite database of another program")
        mode = on_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0], path=path)
        if str(mode).lower() != "wal":
            raise NotADatabase(path, f"could not switch to WAL (journal_mode={mode})")
        if version < latest:
            on_busy(lambda: _apply(store, conn), path=path)
        st = os.stat(path)
        _VALIDATED.add((st.st_dev, st.st_ino))
    finally:
        conn.close()


def _ident(conn: apsw.Connection) -> tuple[int, int]:
    app_id = int(scalar(conn, "PRAGMA application_id"))
    version = int(scalar(conn, "PRAGMA user_version"))
    return app_id, version


def _has_tables(conn: apsw.Connection) -> bool:
    return bool(scalar(conn, "SELECT count(*) FROM sqlite_schema"))


def _apply(store: Store, conn: apsw.Connection) -> None:
    from .db import APPLICATION_ID

    conn.execute("BEGIN IMMEDIATE")
    try:
        app_id, version = _ident(conn)
        latest = latest_version()
        if version > latest:
            raise SchemaTooNew(version, latest, store.path)
        if version == 0 and (app_id != 0 and app_id != APPLICATION_ID or _has_tables(conn)):
            raise NotADatabase(store.path, "an SQLite database of another program")
        first = version == 0
        for number, _name, sql in migrations():
            if number > version:
                conn.execute(sql)
        if first:
            wall = store.wall()
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
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={int(latest)}")
        conn.execute("COMMIT")
    except BaseException:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
        raise
