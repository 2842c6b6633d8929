"""The CLI against a PostgreSQL location that cannot be used — a malformed URL, a server
that is not there, a wrong password, a database that does not exist, a schema newer than
this coord — says so in one line and exits 1, changing nothing; and a password given in the
URL never appears in what coord prints or records (output, events, command lines, `coord
path`, `coord sql`). Every case runs the CLI as a real subprocess against a real server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import coord_env, wait_line
from contract_engines import fresh_schema, with_schema
from pg_fixtures import PgServer, import_psycopg, missing

import coord

psycopg = import_psycopg()

#: A password that must never be printed (given wherever a test needs a wrong one).
WRONG = "not-the-password-7f3a"


def coord_cli(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coord", *args], env=coord_env(db),  # type: ignore[arg-type]
                          capture_output=True, text=True, timeout=120)


def secret_of(url: str) -> str:
    return urlsplit(url).password or ""


@pytest.fixture
def tcp(pg_cluster: PgServer) -> str:
    """The server's URL with a password in it."""
    if not secret_of(pg_cluster.tcp_url):
        missing("COORD_TEST_PG_TCP: a URL of the server under test with a password in it")
    return pg_cluster.tcp_url


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def one_line_exit_1(r: subprocess.CompletedProcess[str], *secrets: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr.startswith("coord: "), r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    for s in secrets:
        assert s not in r.stderr
    return r.stderr


def test_a_malformed_url(tcp: str) -> None:
    err = one_line_exit_1(coord_cli(f"postgresql://u:{WRONG}@host:notaport/db", "instances"),
                          WRONG)
    assert "malformed PostgreSQL URL" in err and "u:***@host" in err
    err = one_line_exit_1(coord_cli(with_schema(tcp, "Bad-Name"), "instances"), secret_of(tcp))
    assert "schema 'Bad-Name'" in err


def test_a_server_that_is_not_there() -> None:
    url = f"postgresql://u:{WRONG}@127.0.0.1:{closed_port()}/db?connect_timeout=5"
    err = one_line_exit_1(coord_cli(url, "instances"), WRONG)
    assert "cannot reach the server" in err


def test_a_wrong_password(tcp: str) -> None:
    bad = tcp.replace(f":{secret_of(tcp)}@", f":{WRONG}@")
    err = one_line_exit_1(coord_cli(with_schema(bad, "coord_t_auth"), "instances"), WRONG,
                          secret_of(tcp))
    assert "authentication failed" in err
    with psycopg.connect(tcp, autocommit=True) as c:
        assert c.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'coord_t_auth'"
                         ).fetchone() is None


def test_a_database_that_does_not_exist(tcp: str) -> None:
    url = urlunsplit(urlsplit(tcp)._replace(path="/coord_no_such_db"))
    err = one_line_exit_1(coord_cli(url, "instances"), secret_of(tcp))
    assert "the database does not exist" in err and "coord_no_such_db" in err
    with psycopg.connect(tcp, autocommit=True) as c:
        assert c.execute("SELECT 1 FROM pg_database WHERE datname = 'coord_no_such_db'"
                         ).fetchone() is None


def test_a_schema_newer_than_this_coord(tcp: str, pg_url: str) -> None:
    with fresh_schema(pg_url) as url:
        coord.Store(url).close()
        schema = url.rsplit("schema=", 1)[1]
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute(f"UPDATE {schema}.meta SET value = '99' WHERE key = 'schema_version'")

            def contents() -> Any:
                return [c.execute(f"SELECT * FROM {schema}.{t} ORDER BY 1").fetchall()
                        for t in ("meta", "events", "instances")]

            before = contents()
            for args in (("instances",), ("sql", "select 1"), ("path",)):
                err = one_line_exit_1(coord_cli(with_schema(tcp, schema), *args),
                                      secret_of(tcp))
                assert "schema version 99, newer than this coord supports" in err
            assert contents() == before


# -- the password is never shown -------------------------------------------------------------

REGISTER = """
import os, sys, coord
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, "with-url", app="t")
coord.events.record_event(store, "custom", inst.id, None, where=store.address_shown)
print("ready", store, flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def secret_url(tcp: str, pg_url: str) -> Iterator[str]:
    with fresh_schema(pg_url) as url:
        yield with_schema(tcp, url.rsplit("schema=", 1)[1])


def test_the_password_never_shows(secret_url: str, children: list[Any]) -> None:
    secret = secret_of(secret_url)
    # An instance whose own command line carries the URL (as `--db URL` would).
    p = subprocess.Popen([sys.executable, "-c", REGISTER, "--db", secret_url,
                          f"--db={secret_url}"], env=coord_env(secret_url), text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children.append(p)
    line = wait_line(p)
    assert secret not in line and "***" in line
    outputs = []
    for args in (("path",), ("instances", "--json"), ("instance", "with-url", "--json"),
                 ("events", "--json"), ("sql", "--json", "select * from instances"),
                 ("sql", "--json", "select * from events"), ("doctor",),
                 ("sql", "select no_such_column from instances")):
        r = coord_cli(secret_url, *args)
        assert secret not in r.stdout + r.stderr, args
        outputs.append(r)
    path = outputs[0]
    assert path.returncode == 0 and path.stdout.strip() == secret_url.replace(secret, "***")
    (row,) = [i for i in json.loads(outputs[1].stdout) if i["id"] == "with-url"]
    assert f"--db={secret_url.replace(secret, '***')}" in row["cmdline"]
    assert secret_url.replace(secret, "***") in row["cmdline"]
    assert p.stdin is not None
    p.stdin.close()
