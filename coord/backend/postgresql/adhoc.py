"""Read-only ad-hoc SQL on PostgreSQL (``coord sql``): ``run_readonly_all(store, sql)``.

A ``READ ONLY`` transaction alone is not read-only enough: it still lets a session take
advisory locks, notify, end other sessions' backends and change settings. So a query runs
only when all of these hold, each enforced by the server, never by matching the SQL text:

1. It is one query (``SELECT``, ``VALUES``, ``TABLE``, ``WITH … SELECT``): the server must
   accept it as the body of a temporary view (``CREATE TEMP VIEW … AS SELECT 1 FROM (query)``,
   rolled back at once), which refuses every other statement and data-modifying ``WITH``.
2. The functions and operators it calls directly are not volatile, but for a few that only
   read (``ALLOWED_VOLATILE``): that view's query tree, as the server stored it, names them.
   This refuses ``pg_advisory_lock``, ``pg_terminate_backend``, ``pg_notify``,
   ``set_config``, ``nextval``, ``pg_sleep`` … (views of coord's schema are trusted).
3. It runs as ``coord_reader_<schema>`` (``SET LOCAL ROLE``), a role with USAGE on the
   deployment's schema and SELECT on its tables and views and nothing else, which the
   migration creates when the connecting user may create roles (``ensure_reader``). Without
   that role the query runs as the connecting user, protected by 1, 2 and 4 alone.
4. In a ``READ ONLY`` transaction that is always rolled back, with ``statement_timeout``,
   sent with the extended protocol (one statement; no ``; …`` after it), on a connection of
   its own that is closed after.

A refusal is ``ReadOnlyViolation`` (exit 1); SQL the server rejects as malformed is
``InvalidArgument`` (exit 2). Values are given back as SQLite's would be: numbers, text,
bytes, None (timestamps as ISO 8601 text, numerics as floats).
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.rows import tuple_row

from ...errors import InvalidArgument, ReadOnlyViolation
from .connection import Conn, scalar, translated

if TYPE_CHECKING:
    from ...db import Store
    from .connection import PgDb

#: How long one query may run (milliseconds).
STATEMENT_TIMEOUT_MS = 60_000
#: Volatile functions that only read (or make up) values.
ALLOWED_VOLATILE = frozenset({"coord_now", "clock_timestamp", "timeofday", "random",
                              "gen_random_uuid", "statement_timestamp"})

Result = tuple[list[str], list[tuple[Any, ...]]]

# The volatile functions the checked view calls, read from its stored query tree (the
# server's own serialisation, not the user's text): functions, aggregates and window
# functions by oid, operators by their implementing function. pg_depend would not do: it
# records no dependency on built-in objects.
_VOLATILE_USED = r"""
WITH tree AS (
    SELECT ev_action::text AS t FROM pg_rewrite
    WHERE ev_class = 'pg_temp.coord_sql_check'::regclass
), refs AS (
    SELECT m[1] AS field, m[2]::oid AS ref
    FROM tree, regexp_matches(tree.t, ':(funcid|opfuncid|aggfnoid|winfnoid|opno) (\d+)', 'g')
        AS m
), procs AS (
    SELECT ref AS oid FROM refs WHERE field <> 'opno'
    UNION SELECT o.oprcode::oid FROM refs JOIN pg_operator o ON o.oid = refs.ref
    WHERE refs.field = 'opno'
)
SELECT DISTINCT p.proname AS name, p.oid::regprocedure::text AS signature
FROM procs JOIN pg_proc p ON p.oid = procs.oid
WHERE p.provolatile = 'v'
ORDER BY 2
"""


def reader_role(schema: str) -> str:
    """The SELECT-only role of a deployment's schema."""
    name = f"coord_reader_{schema}"
    if len(name) <= 63:
        return name
    return f"coord_reader_{hashlib.sha256(schema.encode()).hexdigest()[:24]}"


def ensure_reader(c: Conn, schema: str) -> bool:
    """Inside the migration's transaction: create the schema's reader role when this user
    may (superuser or CREATEROLE) and grant it what reading needs; False when it cannot be
    had (``coord sql`` then runs as the connecting user, see the module docstring)."""
    role = reader_role(schema)
    exists = scalar(c, "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)) is not None
    may = bool(scalar(c, "SELECT rolsuper OR rolcreaterole FROM pg_roles "
                         "WHERE rolname = current_user"))
    try:
        with c.transaction():  # a savepoint: a refusal leaves the migration intact
            if not exists:
                if not may:
                    return False
                c.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(
                    sql.Identifier(role)))
            if not scalar(c, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
                c.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role)))
            for stmt in ("GRANT USAGE ON SCHEMA {s} TO {r}",
                         "GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {r}",
                         "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT ON TABLES TO {r}"):
                c.execute(sql.SQL(stmt).format(s=sql.Identifier(schema), r=sql.Identifier(role)))
    except (pgerrors.InsufficientPrivilege, pgerrors.DuplicateObject,
            pgerrors.InvalidGrantOperation):
        return False
    return True


def _value(v: Any) -> Any:
    if v is None or isinstance(v, (int, float, str, bytes)):
        return v
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, datetime.timedelta):
        return v.total_seconds()
    if isinstance(v, memoryview):
        return bytes(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    return str(v)


def _refuse(e: psycopg.Error) -> ReadOnlyViolation:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ReadOnlyViolation(f"only reads are allowed ({first})")


def _parse(c: Conn, query: str) -> None:
    """The server's parser alone (the protocol's Parse, nothing runs): ``InvalidArgument``
    unless ``query`` is one well-formed statement."""
    res = c.pgconn.prepare(b"", query.encode())
    if res.status == psycopg.pq.ExecStatus.FATAL_ERROR:
        text = (res.error_message or b"").decode(errors="replace").strip()
        text = text.removeprefix("ERROR:").strip().splitlines()[0] if text else "syntax error"
        if "multiple commands" in text:
            raise InvalidArgument("SQL error: one statement at a time on PostgreSQL")
        raise InvalidArgument(f"SQL error: {text}")


def _check(c: Conn, query: str) -> None:
    """Steps 1 and 2 of the module docstring (in a transaction rolled back at once)."""
    with c.transaction(force_rollback=True):
        try:
            with c.transaction():
                c.execute(sql.SQL("CREATE TEMP VIEW coord_sql_check AS SELECT 1 FROM (")
                          + sql.SQL(query) + sql.SQL("\n) AS q"), prepare=True)
        except pgerrors.SyntaxError as e:
            # It parsed alone (``_parse``): a statement that is not a query.
            raise _refuse(e) from None
        except (pgerrors.FeatureNotSupported, pgerrors.InsufficientPrivilege,
                pgerrors.ReadOnlySqlTransaction) as e:
            raise _refuse(e) from None
        except (pgerrors.ProgrammingError, pgerrors.DataError) as e:
            raise InvalidArgument(f"SQL error: {str(e).strip().splitlines()[0]}") from None
        used = c.execute(_VOLATILE_USED).fetchall()
        bad = [r["signature"] for r in used if r["name"] not in ALLOWED_VOLATILE]
        if bad:
            raise ReadOnlyViolation(
                f"only reads are allowed (calls {', '.join(bad)}, which may change state)")


def run_readonly_all(store: Store, query: str, *,
                     timeout_ms: int = STATEMENT_TIMEOUT_MS) -> list[Result]:
    """(column names, rows) of ``query``: one query on PostgreSQL (see the module
    docstring), cancelled after ``timeout_ms``; ``ReadOnlyViolation`` for anything but a
    read."""
    if not query.strip():
        raise InvalidArgument("empty query")
    db: PgDb = store.backend.db  # type: ignore[attr-defined]
    role = reader_role(db.location.schema)
    with translated(db.where):
        conn = db.connect(statement_timeout=str(int(timeout_ms)))
    try:
        with translated(db.where):
            _parse(conn, query)
            _check(conn, query)
            can_set = bool(scalar(conn, "SELECT pg_has_role(current_user, %s, 'MEMBER') "
                                        "FROM pg_roles WHERE rolname = %s", (role, role)))
            with conn.transaction(force_rollback=True):
                conn.execute("SET TRANSACTION READ ONLY")
                if can_set:
                    conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                cur = conn.cursor(row_factory=tuple_row)
                try:
                    cur.execute(sql.SQL(query), prepare=True)
                except (pgerrors.InsufficientPrivilege, pgerrors.ReadOnlySqlTransaction,
                        pgerrors.FeatureNotSupported) as e:
                    raise _refuse(e) from None
                except pgerrors.QueryCanceled:
                    raise ReadOnlyViolation(
                        f"the query ran longer than {timeout_ms / 1000:g} s") from None
                except (pgerrors.ProgrammingError, pgerrors.DataError) as e:
                    raise InvalidArgument(
                        f"SQL error: {str(e).strip().splitlines()[0]}") from None
                if cur.description is None:
                    return []
                cols = [d.name for d in cur.description]
                rows = [tuple(_value(v) for v in r) for r in cur.fetchall()]
                return [(cols, rows)]
    finally:
        db.discard(conn)


class PgAdhoc:
    """``coord.backend.AdhocOps`` on PostgreSQL (see the module docstring). Bound
    parameters are not taken: one query, checked as written."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def run(self, query: str, params: tuple[Any, ...] = ()) -> list[Result]:
        if params:
            raise InvalidArgument("parameters are not taken on PostgreSQL: write the values "
                                  "into the query")
        return run_readonly_all(self._store, query)
