"""Opening a PostgreSQL store: reach the server, refuse a transaction-mode pooler, create
the deployment's schema and bring it to this coord's version — once, under a transaction
advisory lock, however many hosts open a new schema at the same moment."""

from __future__ import annotations

import functools
import os
import re
import time
from importlib import resources
from typing import TYPE_CHECKING

import psycopg
from psycopg import pq, sql

from ...errors import SchemaTooNew, StorageError
from ...nudge import readable
from .adhoc import ensure_reader
from .connection import Conn, scalar, translated

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from .connection import PgDb

#: The key space of coord's advisory locks (the first of the two 32-bit keys).
LOCK_SPACE_MIGRATE = 0x636F6F72  # "coor"


@functools.cache
def _ladder() -> tuple[tuple[int, Traversable], ...]:
    """(number, file) of every ``schema/postgresql/NNN_*.sql``, in order."""
    found = []
    for entry in resources.files("coord.schema").joinpath("postgresql").iterdir():
        m = re.fullmatch(r"(\d{3})_\w+\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), entry))
    found.sort(key=lambda x: x[0])
    if [n for n, _ in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"schema/postgresql files must be numbered 001, 002 ... once each: "
                           f"{[n for n, _ in found]}")
    return tuple(found)


@functools.cache
def migrations() -> tuple[tuple[int, str, str], ...]:
    """(number, file name, SQL) of every ``schema/postgresql/NNN_*.sql``, in order."""
    return tuple((n, f.name, f.read_text(encoding="utf-8")) for n, f in _ladder())


def latest_version() -> int:
    # The names suffice: an open that finds the schema current reads no SQL file.
    return len(_ladder())


def schema_version(c: Conn) -> int:
    """The deployment's schema version (0: no coord schema there yet)."""
    if c.info.transaction_status == pq.TransactionStatus.IDLE:
        # Outside a transaction a failed statement costs nothing: one round trip, not two,
        # in the usual case (the table is there).
        try:
            return int(scalar(c, _VERSION) or 0)
        except psycopg.errors.UndefinedTable:
            return 0
    if scalar(c, "SELECT to_regclass('meta') IS NOT NULL") is not True:
        return 0
    return int(scalar(c, _VERSION) or 0)


_VERSION = "SELECT value FROM meta WHERE key = 'schema_version'"


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


#: Seconds a second session may take to answer the pooler probe (a pool that has no second
#: server session to give would make coord wait for ever later: refused as well).
PROBE_TIMEOUT = 5
_PROBE = ("SELECT pg_backend_pid()::text AS pid, "
          "current_setting('coord.session_probe', true) AS probe")
_POOLER = ("a transaction-mode connection pooler is in the way ({}); point coord at the server "
           "itself or at a session-mode pool")


def _answer(c: Conn, timeout: float) -> tuple[str, str | None] | None:
    """The probe's (pid, probe) on ``c``, or None when no answer came within ``timeout``.
    Sent through libpq directly so the wait is bounded: a pooler with no free server
    session queues the query instead of failing it."""
    pg = c.pgconn
    pg.send_query(_PROBE.encode())
    deadline = time.monotonic() + timeout
    while True:
        pg.consume_input()
        if not pg.is_busy():
            break
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable([pg.socket], left)
    answer: tuple[str, str | None] | None = None
    while (res := pg.get_result()) is not None:
        if res.status == pq.ExecStatus.TUPLES_OK and res.ntuples == 1:
            pid, probe = res.get_value(0, 0), res.get_value(0, 1)
            answer = ((pid or b"").decode(), None if probe is None else probe.decode())
        elif res.status != pq.ExecStatus.TUPLES_OK:
            raise psycopg.OperationalError((res.error_message or b"").decode().strip())
    return answer


def refuse_pooler(db: PgDb) -> None:
    """``StorageError`` when coord's sessions are not its own (a transaction-mode pooler
    such as PgBouncer): its session locks and LISTEN would be stranded there.

    A session is marked by a setting only it holds (a random token). Refused when this
    connection's next transactions run in another server session (the pid changed or the
    mark is gone), or when a second connection, opened while the first is idle, lands in the
    first one's server session (same pid or sees the mark). The second check catches a
    pooler that happens to give one client the same server session every time: an idle
    client's server goes back to the pool, and PgBouncer hands out the one used last. Nothing
    is locked by the probe, so nothing can be stranded by it; the mark is a custom setting."""
    c = db.conn()
    token = os.urandom(8).hex()
    row = c.execute("SELECT pg_backend_pid()::text AS pid, "
                    "set_config('coord.session_probe', %s, false) AS probe", (token,)).fetchone()
    assert row is not None
    mine = row["pid"]
    no_second = StorageError(db.where, (
        f"a second connection got no server session within {PROBE_TIMEOUT} s (a pool of "
        "one?); coord needs several sessions per process"))
    with translated(db.where):
        # Its own, plain connection: every statement on it must be bounded (a session pool
        # with no free server session queues them), and it needs no search_path.
        other: Conn = psycopg.connect(db.location.dsn, autocommit=True,
                                      connect_timeout=PROBE_TIMEOUT)
    try:
        for _ in range(2):
            with translated(db.where):
                seen = _answer(other, PROBE_TIMEOUT)
            if seen is None:
                raise no_second
            if seen[0] == mine or seen[1] == token:
                raise StorageError(db.where, _POOLER.format(
                    "a second connection was given the first one's server session"))
            again = c.execute(_PROBE).fetchone()
            if again is None or again["pid"] != mine or again["probe"] != token:
                raise StorageError(db.where, _POOLER.format(
                    "the session changed between two transactions of one connection"))
    finally:
        other.close()


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


class PgMeta:
    """``coord.backend.MetaOps``: this engine's ladder (``schema/postgresql/``) for one
    deployment."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    def migrate(self) -> None:
        open_schema(self._db)

    def version(self) -> int:
        return schema_version(self._db.conn())

    def latest(self) -> int:
        return latest_version()
