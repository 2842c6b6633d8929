"""PostgreSQL for the test run: ``pg_cluster`` is the server the suite runs against.

With ``COORD_TEST_PG`` set (CI's `.ci/run` starts a private cluster and exports it; a user
can point it at their own server) every PostgreSQL test uses that URL. Otherwise a private
cluster is started for the session in a temporary directory when the server programs are
installed, and stopped at the end. Where PostgreSQL or psycopg is missing the tests that need
them are skipped with the reason — except under ``CI=true``, where that is a failure: CI must
run them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest
from pgcluster import Cluster, ClusterUnavailable, new_cluster


def missing(reason: str) -> NoReturn:
    """Skip the test for ``reason``; under CI=true fail it instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test, but: {reason}", pytrace=False)
    pytest.skip(reason)


def import_psycopg() -> Any:
    """psycopg, for a test module that needs it: skipped without it (failed under CI=true)."""
    try:
        import psycopg
    except ImportError:
        reason = "psycopg is not installed (pip install -e '.[postgres]')"
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(reason, allow_module_level=True)
    return psycopg


@dataclass(frozen=True)
class PgServer:
    """The server under test: ``url`` (unix socket where private), ``tcp_url`` (a TCP URL,
    may equal ``url``), and the cluster when this session started it."""

    url: str
    tcp_url: str
    cluster: Cluster | None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install -e '.[postgres]')")
    url = os.environ.get("COORD_TEST_PG")
    if url:
        yield PgServer(url, os.environ.get("COORD_TEST_PG_TCP", url), None)
        return
    try:
        cluster = new_cluster()
    except ClusterUnavailable as e:
        missing(str(e))
    try:
        yield PgServer(cluster.url(), cluster.tcp_url(), cluster)
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgServer) -> str:
    """The URL of the PostgreSQL server under test (see ``pg_cluster``)."""
    return pg_cluster.url


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """The URL of a schema of its own on the test server, dropped after the test."""
    from contract_engines import fresh_schema

    with fresh_schema(pg_url) as url:
        yield url


@pytest.fixture
def pg_store(pg_schema_url: str) -> Iterator[Any]:
    """A store on a schema of its own (a module may define its own ``pg_store``)."""
    import coord

    with coord.Store(pg_schema_url) as store:
        try:
            yield store
        finally:
            coord.instances.close_all()


@contextmanager
def private_cluster(prefix: str) -> Iterator[Cluster]:
    """A cluster of the caller's own (never the COORD_TEST_PG server): for tests that crash,
    restart or otherwise harm the server. Stopped and removed after."""
    try:
        c = new_cluster(prefix=prefix)
    except ClusterUnavailable as e:
        missing(str(e))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def net(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The multi-host harness of a module of tests/multihost: one ``Net`` of ``HOSTS`` hosts
    (a module attribute; 2 unless the module says otherwise), closed after the module; where
    namespaces cannot be made, the reason (``missing``)."""
    from netns import HarnessUnavailable, Net  # tests/multihost, on the path for its modules

    try:
        harness = Net(hosts=getattr(request.module, "HOSTS", 2))
        harness.__enter__()
    except HarnessUnavailable as e:
        missing(str(e))
    try:
        yield harness
    finally:
        harness.close()



def make_version_1(pg_url: str, url: str, *statements: str) -> None:
    """Make in ``url``'s schema (which must not exist yet) what a coord of schema version 1
    made, then run ``statements`` there (the data it held)."""
    from urllib.parse import parse_qs, urlparse

    from coord.backend.postgresql.opening import migrations

    schema = parse_qs(urlparse(url).query)["schema"][0]
    with import_psycopg().connect(pg_url, autocommit=True) as c:
        c.execute(f'CREATE SCHEMA "{schema}"')
        c.execute(f'SET search_path = "{schema}"')
        c.execute(migrations()[0][2].encode())
        c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        for sql in statements:
            c.execute(sql.encode())


class Ran(subprocess.CompletedProcess[str]):
    pid: int


def run_keeping_pid(cmd: list[str], timeout: float) -> Ran:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that also tells the pid: a
    bench run names its schemas by it, and another test's run may have schemas of its own on
    the same server at the same time."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    ran = Ran(cmd, p.returncode, out, err)
    ran.pid = p.pid
    return ran
