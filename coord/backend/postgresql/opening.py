"""Opening a PostgreSQL store: reach the server, refuse a transaction-mode pooler, create
the deployment's schema and bring it to this coord's version — once, under a transaction
advisory lock, however many hosts open a new schema at the same moment."""

from __future__ import annotations

import functools
import os
import re
from importlib import resources
from typing import TYPE_CHECKING

from psycopg import sql

from ...errors import SchemaTooNew, StorageError
from .adhoc import ensure_reader
from .connection import Conn, scalar

if TYPE_CHECKING:
    from .connection import PgDb

#: The key space of coord's advisory locks (the first of the two 32-bit keys).
LOCK_SPACE_MIGRATE = 0x636F6F72  # "coor"


@functools.cache
def migrations() -> tuple[tuple[int, str, str], ...]:
    """(number, file name, SQL) of every ``schema/postgresql/NNN_*.sql``, in order."""
    found = []
    for entry in resources.files("coord.schema").joinpath("postgresql").iterdir():
        m = re.fullmatch(r"(\d{3})_\w+\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    if [n for n, _, _ in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"schema/postgresql files must be numbered 001, 002 ... once each: "
                           f"{[n for n, _, _ in found]}")
    return tuple(found)


def latest_version() -> int:
    return len(migrations())


def schema_version(c: Conn) -> int:
    """The deployment's schema version (0: no coord schema there yet)."""
    if scalar(c, "SELECT to_regclass('meta') IS NOT NULL") is not True:
        return 0
    return int(scalar(c, "SELECT value FROM meta WHERE key = 'schema_version'") or 0)


def _migrate(c: Conn, schema: str, where: str) -> list[int]:
    c.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_SPACE_MIGRATE, schema))
    c.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    found = schema_version(c)
    latest = latest_version()
    if found > latest:
        raise SchemaTooNew(found, latest, where)
    done = []
    for number, _name, text in migrations()[found:]:
        c.execute(text.encode())  # several statements: the simple query protocol
        c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                  "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(number),))
        if number == 1:
            c.execute("INSERT INTO meta (key, value) VALUES ('created_at', "
                      "extract(epoch FROM clock_timestamp())::text)")
        c.execute("INSERT INTO events (at, kind, detail) VALUES "
                  "(extract(epoch FROM clock_timestamp()), 'migrated', %s)",
                  (f'{{"version": {number}}}',))
        done.append(number)
    if done:
        ensure_reader(c, schema)  # and its grants on the tables just made
    return done


def refuse_pooler(db: PgDb) -> None:
    """``StorageError`` when consecutive transactions of one connection run in different
    server sessions (a transaction-mode pooler such as PgBouncer): coord's session locks
    and LISTEN would be stranded there."""
    c = db.conn()
    token = os.urandom(8).hex()
    first = scalar(c, "SELECT pg_backend_pid()")
    c.execute("SELECT set_config('coord.session_probe', %s, false)", (token,))
    for _ in range(3):
        row = c.execute("SELECT pg_backend_pid() AS pid, "
                        "current_setting('coord.session_probe', true) AS probe").fetchone()
        if row is None or row["pid"] != first or row["probe"] != token:
            raise StorageError(db.where, (
                "a transaction-mode connection pooler is in the way (the session changed "
                "between transactions); point coord at the server itself or a session-mode "
                "pool"))


def open_schema(db: PgDb) -> list[int]:
    """Make the deployment usable; returns the migrations applied (usually none)."""
    refuse_pooler(db)
    c = db.conn()
    if schema_version(c) == latest_version():
        return []
    return db.write(lambda c: _migrate(c, db.location.schema, db.where))


def server_epoch(c: Conn) -> str:
    """What the server's clock is counted within: its start time and the token of its
    UNLOGGED epoch row (emptied by crash recovery, also when the start time stays)."""
    row = c.execute(
        "WITH new AS (INSERT INTO server_epoch (token, since) "
        "VALUES (md5(random()::text), extract(epoch FROM clock_timestamp())) "
        "ON CONFLICT (one) DO NOTHING RETURNING token) "
        "SELECT coalesce((SELECT token FROM new), (SELECT token FROM server_epoch)) AS token, "
        "extract(epoch FROM pg_postmaster_start_time())::text AS started").fetchone()
    assert row is not None
    return f"{row['started']}/{row['token']}"
