"""The PostgreSQL ladder on a real server: a deployment made by an older coord is brought
to this coord's version when opened, keeping what it holds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from contract_engines import fresh_schema
from pg_fixtures import import_psycopg

import coord
from coord import kv
from coord.backend.postgresql.opening import latest_version, migrations

psycopg = import_psycopg()


@pytest.fixture
def url(pg_url: str) -> Iterator[str]:
    with fresh_schema(pg_url) as u:
        yield u


def _language(store: coord.Store) -> str:
    return str(store.backend.meta._db.value(  # type: ignore[attr-defined]
        "SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
        "WHERE p.proname = 'coord_now' AND p.pronamespace = current_schema()::regnamespace"))


def test_a_version_1_deployment_gets_coord_now_in_plpgsql(url: str) -> None:
    assert latest_version() >= 3 and migrations()[2][1] == "003_now_plpgsql.sql"
    store = coord.Store(url)
    kv.set(store, "kept", 1)
    # Back to what version 1 made: its coord_now() and its version number.
    first = migrations()[0][2]
    start = first.index("CREATE FUNCTION coord_now()")
    old = first[start:first.index("$$;", start) + 3].replace("CREATE", "CREATE OR REPLACE", 1)
    db = store.backend.meta._db  # type: ignore[attr-defined]
    db.write(lambda c: (c.execute(old),
                        c.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")))
    assert _language(store) == "sql"
    store.close()
    again = coord.Store(url)
    assert again.backend.meta.version() == latest_version()
    assert _language(again) == "plpgsql"
    assert kv.get(again, "kept").value == 1
    now = again.backend.meta._db.value("SELECT coord_now() - extract(epoch FROM clock_timestamp())")  # type: ignore[attr-defined]
    assert abs(float(now)) < 5
    again.close()
