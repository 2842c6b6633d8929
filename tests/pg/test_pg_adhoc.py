"""`coord sql` on PostgreSQL: reads work; writes, advisory locks, ending backends, notifying,
changing settings (also the role) and everything but one query are refused with one line
and exit 1, and nothing changed — as a real subprocess against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import coord_env
from contract_engines import fresh_schema
from pg_fixtures import import_psycopg

import coord
from coord.backend.postgresql.adhoc import reader_role, run_readonly_all
from coord.errors import ReadOnlyViolation

psycopg = import_psycopg()


@pytest.fixture
def url(pg_url: str) -> Iterator[str]:
    with fresh_schema(pg_url) as u:
        s = coord.Store(u)
        coord.register(s, "a", app="t", heartbeat=False).close()
        coord.register(s, "b", app="t", heartbeat=False)
        yield u
        coord.instances.close_all()
        s.close()


def coord_sql(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coord", "sql", *args], env=coord_env(url),  # type: ignore[arg-type]
                          capture_output=True, text=True, timeout=120)


def state(pg_url: str, url: str) -> dict[str, Any]:
    """Every row of the schema, the server's advisory locks and its settings of note."""
    schema = url.rsplit("schema=", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as c:
        tables = [r[0] for r in c.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,))]
        out: dict[str, Any] = {t: c.execute(
            f'SELECT * FROM "{schema}"."{t}" ORDER BY 1').fetchall() for t in tables}
        # Only the keys the refused queries name: other tests' instances run beside this one.
        out["advisory locks"] = c.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND classid IN (0, 1) AND objid IN (1, 2, 3, 7)").fetchone()
        out["sequences"] = c.execute(
            "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = %s "
            "ORDER BY 1", (schema,)).fetchall()
    return out


REFUSED = [
    "DELETE FROM meta",
    "UPDATE meta SET value = 'x'",
    "INSERT INTO meta (key, value) VALUES ('a', 'b')",
    "WITH d AS (DELETE FROM meta RETURNING *) SELECT * FROM d",
    "TRUNCATE events",
    "DROP TABLE meta",
    "CREATE TABLE t (x int)",
    "CREATE TEMP TABLE t (x int)",
    "SELECT * FROM meta FOR UPDATE",
    "SELECT nextval('incarnation_seq')",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_try_advisory_lock(1, 2)",
    "SELECT pg_advisory_xact_lock(7)",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
    "SELECT pg_cancel_backend(pg_backend_pid())",
    "SELECT pg_notify('coord.x', 'boo')",
    "SELECT set_config('statement_timeout', '0', false)",
    "SELECT set_config('role', current_user, false)",
    "SELECT 1 WHERE pg_advisory_lock(3) IS NOT NULL",
    "SELECT * FROM pg_sleep(0.1)",
    "NOTIFY x",
    "LISTEN x",
    "SET ROLE NONE",
    "RESET ROLE",
    "SET statement_timeout = 0",
    "COPY meta TO STDOUT",
    "BEGIN",
    "COMMIT",
    "EXPLAIN ANALYZE DELETE FROM meta",
    "VACUUM meta",
    "LOCK TABLE meta",
]


@pytest.mark.parametrize("query", REFUSED)
def test_everything_but_a_read_is_refused(url: str, pg_url: str, query: str) -> None:
    before = state(pg_url, url)
    r = coord_sql(url, query)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("coord: read-only: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""
    assert state(pg_url, url) == before


def test_several_statements_are_a_usage_error(url: str, pg_url: str) -> None:
    before = state(pg_url, url)
    r = coord_sql(url, "SELECT 1; DELETE FROM meta")
    assert r.returncode == 2 and "one statement at a time" in r.stderr
    assert r.stderr.count("\n") == 1 and state(pg_url, url) == before


def test_reads_work(url: str) -> None:
    r = coord_sql(url, "--json", "SELECT id, incarnation > 0 AS ok, heartbeat_age_s < 60 AS "
                  "fresh, coord_now() > 0 AS now FROM live_instances")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"id": "b", "ok": True, "fresh": True, "now": True}]
    r = coord_sql(url, "--csv", "SELECT kind, instance_id FROM events WHERE instance_id = 'a' "
                  "ORDER BY id")
    assert r.stdout.splitlines() == ["kind,instance_id", "joined,a", "left,a"]
    r = coord_sql(url, "--json", "WITH x AS (SELECT count(*) AS n FROM instances) "
                  "SELECT n, to_timestamp(0) AS t, 1.5::numeric AS d FROM x")
    assert json.loads(r.stdout) == [{"n": 1, "t": "1970-01-01T00:00:00+00:00", "d": 1.5}]
    r = coord_sql(url, "--json", "SELECT * FROM recent_events LIMIT 0")
    assert (r.returncode, json.loads(r.stdout)) == (0, [])


def test_it_reads_as_the_schemas_reader_role(url: str, pg_url: str) -> None:
    schema = url.rsplit("schema=", 1)[1]
    r = coord_sql(url, "--json", "SELECT current_user AS who, "
                  "current_setting('transaction_read_only') AS ro")
    assert json.loads(r.stdout) == [{"who": reader_role(schema), "ro": "on"}]
    with psycopg.connect(pg_url, autocommit=True) as c:
        role = reader_role(schema)
        privs = c.execute(
            "SELECT bool_or(has_table_privilege(%s, format('%%I.%%I', schemaname, tablename), "
            "'INSERT,UPDATE,DELETE,TRUNCATE')) AS writes, bool_and(has_table_privilege(%s, "
            "format('%%I.%%I', schemaname, tablename), 'SELECT')) AS reads "
            "FROM pg_tables WHERE schemaname = %s", (role, role, schema)).fetchone()
        assert privs == (False, True)
    # Another deployment's schema is not its to read.
    with fresh_schema(pg_url) as other:
        coord.Store(other).close()
        r = coord_sql(url, f"SELECT count(*) FROM {other.rsplit('schema=', 1)[1]}.meta")
        assert r.returncode == 1 and "permission denied" in r.stderr


def test_a_long_query_is_cancelled(url: str) -> None:
    s = coord.Store(url)
    try:
        with pytest.raises(ReadOnlyViolation, match="ran longer than 0.2 s"):
            run_readonly_all(s, "SELECT count(*) FROM generate_series(1, 10000000000)",
                             timeout_ms=200)
    finally:
        s.close()
