"""A pooler between coord and the server, with a real PgBouncer (Debian's ``pgbouncer``): a
transaction-mode pool is refused with one line naming the (redacted) URL and nothing is
changed on the server — also when the pool has one server session to give (the same backend
every time) and while other clients keep the pool busy; a session-mode pool is accepted and
works; a pool with no second session to give is refused in bounded time.

PgBouncer runs in the foreground as the cluster's user (it refuses root), with its own
configuration in a private directory, in front of a private cluster of this module."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import coord_env
from pg_fixtures import import_psycopg, missing, private_cluster
from pgcluster import SERVER_USER, Cluster, free_port

import coord
from coord.errors import StorageError

psycopg = import_psycopg()

SECRET = "not-shown-3f9c"
#: The pools: name -> (pool_mode, pool_size).
POOLS = {"tx1": ("transaction", 1), "tx4": ("transaction", 4), "sess": ("session", 8),
         "sess1": ("session", 1)}


def pgbouncer_program() -> str:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer"
                                          if os.path.exists("/usr/sbin/pgbouncer") else None)
    if found is None:
        missing("pgbouncer is not installed (Debian's `pgbouncer` package; .ci/postgres.sh "
                "installs it)")
    return found


class Bouncer:
    """One PgBouncer process of this test module, listening on a loopback port."""

    def __init__(self, cluster: Cluster, base: Path) -> None:
        self.port = free_port()
        self.base = base
        lines = ["[databases]"]
        for name, (mode, size) in POOLS.items():
            lines.append(f"{name} = host={cluster.base} port={cluster.port} dbname=postgres "
                         f"user={SERVER_USER} pool_mode={mode} pool_size={size}")
        lines += ["[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {self.port}",
                  "unix_socket_dir =", "auth_type = any", f"logfile = {base}/pgbouncer.log",
                  "query_wait_timeout = 60"]
        ini = base / "pgbouncer.ini"
        ini.write_text("\n".join(lines) + "\n")
        argv = [pgbouncer_program(), str(ini)]
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(base, user.pw_uid, user.pw_gid)
            # setpriv execs: the pid is PgBouncer's own, ended by pid at teardown.
            argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                    "--init-groups", *argv]
        with open(base / "pgbouncer.out", "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not start: {self.log()}") from None
                time.sleep(0.05)

    def url(self, pool: str, schema: str) -> str:
        return f"postgresql://{SERVER_USER}:{SECRET}@127.0.0.1:{self.port}/{pool}?schema={schema}"

    def log(self) -> str:
        try:
            return "".join((self.base / f).read_text()[-2000:]
                           for f in ("pgbouncer.out", "pgbouncer.log") if (self.base / f).exists())
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # PgBouncer: immediate shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with private_cluster("coord-pgpool-") as c:
        yield c


@pytest.fixture(scope="module")
def bouncer(cluster: Cluster) -> Iterator[Bouncer]:
    pgbouncer_program()
    # Under /tmp itself: pytest's own temporary directories are closed to the server's user.
    base = Path(tempfile.mkdtemp(prefix="coord-pgbouncer-", dir="/tmp"))
    try:
        b = Bouncer(cluster, base)
        try:
            yield b
        finally:
            b.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def schema_exists(cluster: Cluster, schema: str) -> bool:
    with psycopg.connect(cluster.url(), autocommit=True) as c:
        return bool(c.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,)).fetchone()[0])


def assert_refused(e: StorageError, url: str) -> str:
    text = str(e)
    assert "\n" not in text
    assert SECRET not in text
    assert text.startswith(url.replace(SECRET, "***") + ": "), text  # names the redacted URL
    return text


@pytest.mark.parametrize("pool", ["tx1", "tx4"])
def test_a_transaction_pool_is_refused_and_nothing_is_changed(
        bouncer: Bouncer, cluster: Cluster, pool: str) -> None:
    """tx1 gives one client the same backend every time: only the second connection shows it
    is not a session of its own."""
    for trial in range(10):
        schema = f"pool_{pool}_{trial}"
        url = bouncer.url(pool, schema)
        with pytest.raises(StorageError) as caught:
            coord.Store(url)
        text = assert_refused(caught.value, url)
        assert "transaction-mode connection pooler" in text, text
        assert not schema_exists(cluster, schema)


def test_a_transaction_pool_is_refused_while_other_clients_keep_it_busy(
        bouncer: Bouncer, cluster: Cluster) -> None:
    """Under load PgBouncer moves an idle client's transactions between server sessions:
    either way the probe sees a session that is not its own."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            # Prepared statements cannot cross server sessions: none here.
            with psycopg.connect(bouncer.url("tx4", "x").split("?")[0], autocommit=True,
                                 prepare_threshold=None) as c:
                while not stop.is_set():
                    c.execute("SELECT pg_sleep(0.002)")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=busy) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for trial in range(20):
            schema = f"pool_busy_{trial}"
            with pytest.raises(StorageError, match="transaction-mode connection pooler"):
                coord.Store(bouncer.url("tx4", schema))
            assert not schema_exists(cluster, schema)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not errors, errors


def test_a_session_pool_is_accepted_and_works(bouncer: Bouncer, cluster: Cluster) -> None:
    url = bouncer.url("sess", "pool_sess")
    for _ in range(3):  # the first opening creates the schema, the others find it
        s = coord.Store(url)
        try:
            inst = coord.register(s, "via-pool", app="pooled", heartbeat=False,
                                  handle_signals=False)
            assert inst.heartbeat()
            assert [i.id for i in coord.instances.list_instances(s)] == ["via-pool"]
            inst.close()
        finally:
            s.close()
    assert schema_exists(cluster, "pool_sess")


def test_a_pool_of_one_session_is_refused_in_bounded_time(bouncer: Bouncer) -> None:
    """coord needs several sessions (its heartbeat thread has its own): a pool that cannot
    give a second one would make it wait; it is refused after the probe's bound."""
    from coord.backend.postgresql.opening import PROBE_TIMEOUT

    url = bouncer.url("sess1", "pool_sess1")
    t = time.monotonic()
    with pytest.raises(StorageError) as caught:
        coord.Store(url)
    took = time.monotonic() - t
    text = assert_refused(caught.value, url)
    assert "no server session" in text, text
    assert PROBE_TIMEOUT <= took < PROBE_TIMEOUT + 5, took


@pytest.mark.parametrize("pool", ["tx1", "tx4"])
def test_the_cli_refuses_a_transaction_pool_with_one_line(
        bouncer: Bouncer, cluster: Cluster, pool: str, tmp_path: Path) -> None:
    url = bouncer.url(pool, f"pool_cli_{pool}")
    r = subprocess.run([sys.executable, "-m", "coord", "instances", "--db", url],
                       env=coord_env(tmp_path / "unused.db"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("coord: postgresql://postgres:***@127.0.0.1:"), lines[0]
    assert SECRET not in r.stderr
    assert "transaction-mode connection pooler" in lines[0]
    assert not schema_exists(cluster, f"pool_cli_{pool}")
