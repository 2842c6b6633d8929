"""The PostgreSQL ladder on a real server: a deployment made by an older coord is brought
to this coord's version when opened, keeping what it holds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from contract_engines import fresh_schema
from pg_fixtures import import_psycopg, make_version_1

import coord
from coord import kv
from coord.backend.postgresql.opening import latest_version, migrations

psycopg = import_psycopg()


@pytest.fixture
def url(pg_url: str) -> Iterator[str]:
    with fresh_schema(pg_url) as u:
        yield u


def _language(store: coord.Store, function: str) -> str:
    return str(store.backend.meta._db.value(  # type: ignore[attr-defined]
        "SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
        "WHERE p.proname = %s AND p.pronamespace = current_schema()::regnamespace",
        (function,)))


def test_a_version_1_deployment_gets_coord_now_in_plpgsql(url: str, pg_url: str) -> None:
    assert latest_version() >= 3 and migrations()[2][1] == "003_now_plpgsql.sql"
    make_version_1(pg_url, url, "INSERT INTO kv (key, value, version, created_at, updated_at) "
                   "VALUES ('kept', '1', 1, 0, 0)")
    again = coord.Store(url)
    assert again.backend.meta.version() == latest_version()
    assert _language(again, "coord_now") == _language(again, "coord_expiry") == "plpgsql"
    assert kv.get(again, "kept").value == 1
    now = again.backend.meta._db.value("SELECT coord_now() - extract(epoch FROM clock_timestamp())")  # type: ignore[attr-defined]
    assert abs(float(now)) < 5
    again.close()
