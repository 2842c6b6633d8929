"""coord's PostgreSQL connections bound a silent link on both ends (see
``coord.backend.postgresql.connection``): the client's keepalives and user timeout unless the
URL sets its own, and the server's side of the session with an idle-in-transaction bound.
What those bounds do on a cut link is shown in tests/multihost/test_partition.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from contract_engines import fresh_schema
from pg_fixtures import PgServer, import_psycopg, missing

import coord
from coord.backend.postgresql.connection import CLIENT_TIMEOUTS, SERVER_TIMEOUTS

import_psycopg()


@pytest.fixture
def tcp_url(pg_cluster: PgServer) -> Iterator[str]:
    if pg_cluster.tcp_url == pg_cluster.url:
        missing("the server under test (COORD_TEST_PG) has no TCP URL (COORD_TEST_PG_TCP)")
    with fresh_schema(pg_cluster.tcp_url) as url:
        yield url


def settings(store: coord.Store) -> dict[str, str]:
    db = store.backend.db  # type: ignore[attr-defined]
    return {k: db.value("SELECT current_setting(%s)", (k,)) for k in SERVER_TIMEOUTS}


def test_every_connection_bounds_a_silent_link(tcp_url: str) -> None:
    s = coord.Store(tcp_url)
    try:
        server = settings(s)
        assert server["idle_in_transaction_session_timeout"] == "5s"
        assert server["tcp_user_timeout"] == SERVER_TIMEOUTS["tcp_user_timeout"]
        assert server["tcp_keepalives_idle"] == SERVER_TIMEOUTS["tcp_keepalives_idle"]
        options = {o.keyword.decode(): (o.val or b"").decode()
                   for o in s.backend.db.conn().pgconn.info}  # type: ignore[attr-defined]
        for k, v in CLIENT_TIMEOUTS.items():
            assert options[k] == v, (k, options[k])
    finally:
        s.close()


def test_a_url_s_own_client_timeouts_win(tcp_url: str) -> None:
    s = coord.Store(tcp_url.replace("?", "?keepalives_idle=7&tcp_user_timeout=3000&", 1))
    try:
        options = {o.keyword.decode(): (o.val or b"").decode()
                   for o in s.backend.db.conn().pgconn.info}  # type: ignore[attr-defined]
        assert options["keepalives_idle"] == "7"
        assert options["tcp_user_timeout"] == "3000"
        assert options["keepalives_count"] == CLIENT_TIMEOUTS["keepalives_count"]
    finally:
        s.close()
