"""`coord doctor` against a PostgreSQL URL, as a subprocess: the server's and the schema's
versions, the settings that bound a dead client's session, and sessions long idle while
holding coord's advisory locks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from conftest import run_cli
from contract_engines import fresh_schema
from pg_fixtures import import_psycopg

import coord
from coord.backend.postgresql.opening import latest_version

psycopg = import_psycopg()


@pytest.fixture
def url(pg_url: str) -> Iterator[str]:
    with fresh_schema(pg_url) as u:
        yield u


def test_doctor_on_a_server(url: str) -> None:
    coord.Store(url).close()
    out = run_cli(url, "doctor")  # type: ignore[arg-type]
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("database       postgresql://")
    assert lines[1].startswith("server         PostgreSQL ")
    latest = latest_version()
    assert f"version {latest} (this coord: {latest})" in lines[2]
    assert "idle_session_timeout" in out.stdout and lines[-1] == "healthy"
    report = json.loads(run_cli(url, "doctor", "--json").stdout)  # type: ignore[arg-type]
    assert report["ok"] is True and report["engine"] == "postgresql"
    assert report["problems"] == report["pending"] == []
    assert report["idle_lock_holders"] == []


def test_an_idle_session_holding_an_advisory_lock_is_reported(url: str, pg_url: str) -> None:
    store = coord.Store(url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as idle:
            idle.execute("SELECT pg_advisory_lock(42)")
            pid = idle.info.backend_pid
            time.sleep(0.5)
            found = store.backend.checks.idle_lock_holders(idle=0.2)  # type: ignore[attr-defined]
            assert [(s["pid"], s["locks"]) for s in found] == [(pid, 1)]
            assert store.backend.checks.idle_lock_holders() == []  # type: ignore[attr-defined]
        time.sleep(0.2)
        assert store.backend.checks.idle_lock_holders(idle=0.0) == []  # type: ignore[attr-defined]
    finally:
        store.close()
