"""What PostgreSQL does that coord's design on it depends on, shown on a real server:

- a free advisory lock is not proof of death: when any backend crashes the server
  reinitialises, ending every session and freeing every advisory lock, while
  ``pg_postmaster_start_time()`` stays the same; an UNLOGGED table is emptied by that crash
  recovery (so a row in one marks a server epoch), committed rows survive;
- ``pg_ctl stop -m immediate`` and a start do the same, with a new postmaster start time;
- ``pg_terminate_backend`` frees a session's lock while its client lives on;
- a READ ONLY transaction still lets a session take advisory locks, notify, and end other
  backends (so read-only SQL for users needs a role of its own, not just READ ONLY).

The crash tests kill backends, so they run on a private cluster of their own, never on a
server given in COORD_TEST_PG."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pg_fixtures import PgServer, import_psycopg, private_cluster
from pgcluster import Cluster

psycopg = import_psycopg()


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    with private_cluster("coord-pgfacts-") as c:
        yield c


def connect_when_ready(url: str, timeout: float = 60.0) -> Any:
    """A new connection once the server accepts them again (it recovers after a crash)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def epoch_setup(conn: Any) -> None:
    conn.execute("create unlogged table epoch (started timestamptz)")
    conn.execute("insert into epoch values (clock_timestamp())")
    conn.execute("create table kept (x int)")
    conn.execute("insert into kept values (1)")
    conn.execute("checkpoint")  # an unlogged table only has its init fork on disk after one


def advisory_held(conn: Any, key: int) -> bool:
    row = conn.execute("select count(*) from pg_locks where locktype = 'advisory' and granted "
                       "and objid = %s", (key,)).fetchone()
    return bool(row[0])


def test_a_backend_crash_frees_every_lock_with_the_same_postmaster(own_cluster: Cluster) -> None:
    url = own_cluster.url()
    setup = psycopg.connect(url, autocommit=True)
    epoch_setup(setup)
    started = setup.execute("select pg_postmaster_start_time()").fetchone()[0]
    holder = psycopg.connect(url, autocommit=True)
    holder.execute("select pg_advisory_lock(4242)")
    assert advisory_held(setup, 4242)
    victim = psycopg.connect(url, autocommit=True)
    backend = victim.execute("select pg_backend_pid()").fetchone()[0]
    os.kill(backend, signal.SIGKILL)  # a backend of this test's own cluster
    # Every session ends, not only the victim's: the holder is alive but has lost its lock.
    with pytest.raises(psycopg.OperationalError):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            holder.execute("select 1")
            time.sleep(0.05)
    for c in (setup, holder, victim):
        c.close()
    after = connect_when_ready(url)
    try:
        assert not advisory_held(after, 4242)
        assert after.execute("select pg_postmaster_start_time()").fetchone()[0] == started
        assert after.execute("select count(*) from epoch").fetchone()[0] == 0
        assert after.execute("select x from kept").fetchall() == [(1,)]
    finally:
        after.close()
    assert "terminated by signal 9" in (own_cluster.base / "server.log").read_text()


def test_an_immediate_stop_keeps_commits_and_drops_locks(own_cluster: Cluster) -> None:
    url = own_cluster.url()
    conn = psycopg.connect(url, autocommit=True)
    epoch_setup(conn)
    started = conn.execute("select pg_postmaster_start_time()").fetchone()[0]
    conn.execute("select pg_advisory_lock(77)")
    conn.execute("insert into kept values (2)")
    own_cluster.crash()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    own_cluster.run_server()
    after = connect_when_ready(url)
    try:
        assert not advisory_held(after, 77)
        assert after.execute("select pg_postmaster_start_time()").fetchone()[0] > started
        assert after.execute("select count(*) from epoch").fetchone()[0] == 0
        assert after.execute("select x from kept order by x").fetchall() == [(1,), (2,)]
    finally:
        after.close()


def test_a_terminated_session_frees_its_lock_while_its_client_lives(
        pg_cluster: PgServer) -> None:
    """pg_terminate_backend ends the holder's session and frees its lock; the client process
    is alive and learns of it only at its next statement."""
    holder = psycopg.connect(pg_cluster.url, autocommit=True)
    admin = psycopg.connect(pg_cluster.url, autocommit=True)
    try:
        key = 800_000 + os.getpid() % 100_000
        holder.execute("select pg_advisory_lock(%s)", (key,))
        backend = holder.execute("select pg_backend_pid()").fetchone()[0]
        assert admin.execute("select pg_terminate_backend(%s, 10000)", (backend,)).fetchone()[0]
        assert not advisory_held(admin, key)
        assert not holder.closed  # nothing has told the client yet
        with pytest.raises(psycopg.OperationalError):
            holder.execute("select 1")
    finally:
        holder.close()
        admin.close()


def test_read_only_transactions_still_lock_notify_and_signal(pg_cluster: PgServer) -> None:
    conn = psycopg.connect(pg_cluster.url, autocommit=True)
    victim = psycopg.connect(pg_cluster.url, autocommit=True)
    try:
        backend = victim.execute("select pg_backend_pid()").fetchone()[0]
        key = 900_000 + os.getpid() % 100_000
        with conn.transaction():
            conn.execute("set transaction read only")
            conn.execute("select pg_advisory_lock(%s)", (key,))
            conn.execute("select pg_notify('coord_test_ro', 'x')")
            conn.execute("notify coord_test_ro")
            ended = conn.execute("select pg_terminate_backend(%s)", (backend,)).fetchone()[0]
        assert ended is True
        assert advisory_held(conn, key)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), conn.transaction():
            conn.execute("set transaction read only")
            conn.execute("create temp table coord_ro_probe (x int)")
        conn.execute("select pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()
        victim.close()
