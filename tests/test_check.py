"""The invariant checker and doctor: a healthy database passes, a deliberately broken row
is reported, and what is merely waiting for the reaper counts only in strict mode."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import engine_sql as sql
import pytest
from conftest import INSTANCE_WORKER, spawn_python, wait_line

import coord
import coord.backend.sqlite.connection
import coord.check
from coord.check import Problem, check, doctor
from coord.db import Store

pytestmark = pytest.mark.contract


def test_fresh_database_is_healthy(store: Store) -> None:
    assert check(store) == []
    assert check(store, strict=True) == []
    report = doctor(store)
    assert report["ok"] is True
    assert report["schema_version"] == report["supported_schema_version"]
    if store.engine == "sqlite":
        assert report["journal_mode"] == "wal"
        assert report["application_id"] == coord.backend.sqlite.connection.APPLICATION_ID
    else:  # the server's side: what bounds a dead client's session, and who sits idle
        assert report["server_version"] and report["location"] == store.address_shown
        assert {"idle_session_timeout", "tcp_user_timeout", "synchronous_commit"} \
            <= set(report["settings"])
        assert report["idle_lock_holders"] == []
    assert report["problems"] == report["pending"] == report["permissions"] == []
    assert set(report["counts"]) >= {"instances", "leases", "jobs", "messages", "kv", "events"}


def test_database_with_a_live_instance_is_healthy(store: Store) -> None:
    inst = coord.register(store, app="checker", handle_signals=False)
    try:
        assert check(store, strict=True) == []
    finally:
        inst.close()
    assert check(store, strict=True) == []


def _sql(*statements: tuple[str, tuple[Any, ...]]) -> Callable[[Store], None]:
    """Statements run in one transaction of either engine (``tests/engine_sql.py``)."""
    def run(store: Store) -> None:
        def txn(t: sql.Txn) -> None:
            for text, params in statements:
                t(text, params)

        sql.txn(store, txn)

    return run


BROKEN: list[tuple[str, Callable[[Store], None], str, str]] = [
    (
        "lease held by an unknown instance",
        _sql(("INSERT INTO leases (name, holder_id, holder_incarnation, term, ttl, acquired_at) "
              "VALUES ('app/leader', 'ghost', 9, 5, 15, 1)", ()),
             ("INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at) "
              "VALUES ('app/leader', 5, 'ghost', 9, 1)", ())),
        "dead holders", "lease 'app/leader' held by ghost#9, which is not registered",
    ),
    (
        "two open terms of one lease",
        _sql(("INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at) "
              "VALUES ('l', 1, 'a', 1, 1), ('l', 2, 'b', 1, 2)", ())),
        "terms", "lease 'l' has 2 open terms",
    ),
    (
        "counter below a value already used",
        _sql(("INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at, "
              "released_at) VALUES ('l', 99999999999999, 'a', 1, 1, 2)", ())),
        "counters", "term counter",
    ),
    (
        "finished job without a finish time",
        _sql(("INSERT INTO queues (name, created_at) VALUES ('q', 1)", ()),
             ("INSERT INTO jobs (queue, state, payload, available_mono, created_at) "
              "VALUES ('q', 'done', '{}', 0, 1)", ())),
        "jobs", "is finished without a finish time",
    ),
]


@pytest.mark.parametrize(("what", "breakage", "check_name", "detail"), BROKEN,
                         ids=[b[0] for b in BROKEN])
def test_broken_row_is_reported(
    store: Store, what: str, breakage: Callable[[Store], None], check_name: str,
    detail: str,
) -> None:
    breakage(store)
    problems = check(store)
    assert any(p.check == check_name and detail in p.detail and not p.pending
               for p in problems), problems
    report = doctor(store)
    assert report["ok"] is False
    assert any(detail in p["detail"] for p in report["problems"])


def test_row_without_its_instance_is_reported(store: Store) -> None:
    # Foreign keys stop this in coord; a hand-edited database can still contain it (on
    # PostgreSQL: a superuser replicating with triggers off).
    insert = ("INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, "
              "name, started_at) VALUES ('ghost', 1, 1, 1, 'b', 'sh', 1)")
    if store.engine == "sqlite":
        import apsw

        c = apsw.Connection(str(store.path))
        c.execute("PRAGMA foreign_keys = OFF")
        c.execute(insert)
        c.close()
        expected = {"foreign keys", "processes"}
    else:
        _sql(("SET LOCAL session_replication_role = replica", ()), (insert, ()))(store)
        expected = {"processes"}  # the server enforces foreign keys itself
    problems = {p.check for p in check(store)}
    assert expected <= problems


def test_wrong_stamp_is_reported(store: Store) -> None:
    if store.engine == "postgresql":
        _sql(("UPDATE meta SET value = '0' WHERE key = 'schema_version'", ()))(store)
        assert Problem("schema", "schema version differs from this coord's") in check(store)
        return
    _sql(("PRAGMA user_version = 1", ()))(store)
    assert Problem("schema", "schema version differs from this coord's") in check(store)
    _sql(("PRAGMA application_id = 7", ()))(store)
    assert Problem("application_id", "not coord's") in check(store)


def test_dead_holder_is_pending_until_reaped(store: Store) -> None:
    p = spawn_python(INSTANCE_WORKER, "victim", db=store.address)  # type: ignore[arg-type]
    last_term = ("nextval('term_seq')" if store.engine == "postgresql"
                 else "(SELECT value FROM counters WHERE name = 'term')")
    try:
        _, id, inc = wait_line(p).split()
        _sql(
            ("INSERT INTO leases (name, holder_id, holder_incarnation, term, ttl, acquired_at, "
             f"expires_mono) VALUES ('l', ?, ?, {last_term}, 15, 1, 1e12)", (id, int(inc))),
            ("INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at) "
             "SELECT name, term, holder_id, holder_incarnation, 1 FROM leases", ()),
        )(store)
        assert check(store, strict=True) == []
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        assert p.stdout is not None
        p.stdout.close()
    assert check(store) == []  # a crash a moment ago is not a broken invariant ...
    pending = check(store, strict=True)
    assert pending and all(x.pending for x in pending)  # ... but it is pending work
    assert doctor(store)["pending"]
    coord.reap(store)
    assert check(store, strict=True) == []


@pytest.mark.sqlite_only("the permissions of the database's own files")
def test_doctor_reports_loose_permissions(store: Store) -> None:
    Path(store.path).chmod(0o666)
    try:
        report = doctor(store)
    finally:
        Path(store.path).chmod(0o600)
    assert report["ok"] is False
    assert report["permissions"] == [f"{store.path} is writable by group or others"]
