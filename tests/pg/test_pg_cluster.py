"""The PostgreSQL test server: reachable on its unix socket and on loopback TCP, a real
server (its own postmaster), and a private cluster started and stopped by tests/pgcluster.py
leaves nothing behind. psycopg is optional: SQLite users never import it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pg_fixtures import PgServer, import_psycopg
from pgcluster import Cluster, process_alive

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = ROOT / "tests" / "pgcluster.py"


def test_server_answers_on_socket_and_tcp(pg_cluster: PgServer) -> None:
    import psycopg

    for url in (pg_cluster.url, pg_cluster.tcp_url):
        with psycopg.connect(url, connect_timeout=10) as conn:
            row = conn.execute("select current_setting('server_version_num')::int, "
                               "inet_server_addr() is null").fetchone()
            assert row is not None and row[0] >= 130000
    # The TCP URL is really TCP (a server address) where this session has one.
    if pg_cluster.tcp_url != pg_cluster.url:
        with psycopg.connect(pg_cluster.tcp_url, connect_timeout=10) as conn:
            row = conn.execute("select inet_server_addr()::text").fetchone()
            assert row is not None and row[0].startswith("127.0.0.1")


def test_script_starts_and_stops_a_private_cluster(tmp_path: Path) -> None:
    """What .ci/run does: start prints the URLs for eval, stop ends the server and removes
    the directory; psycopg can use the printed URL in between."""
    psycopg = import_psycopg()
    base = Path(
        subprocess.run(["mktemp", "-d", "/tmp/coord-pgtest.XXXXXX"], capture_output=True,
                       text=True, check=True).stdout.strip())
    try:
        out = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "start", str(base)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0 and "not found" in out.stderr:
            from pg_fixtures import missing
            missing(out.stderr.strip())
        assert out.returncode == 0, out.stderr
        env = dict(line.removeprefix("export ").split("=", 1) for line in
                   out.stdout.splitlines())
        url = env["COORD_TEST_PG"].strip("'")
        assert "COORD_TEST_PG_TCP" in env
        pid = Cluster.load(base).postmaster_pid()
        assert pid is not None and process_alive(pid)
        with psycopg.connect(url, connect_timeout=10) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        # A second start on the same directory refuses and leaves the running server alone.
        again = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "start", str(base)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode != 0
        with psycopg.connect(url, connect_timeout=10) as conn:
            assert conn.execute("select 2").fetchone() == (2,)
    finally:
        subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "stop", str(base)], timeout=120,
                       check=True)
    assert not base.exists()
    assert not process_alive(pid)


def test_sqlite_users_never_import_psycopg() -> None:
    code = ("import sys, coord, coord.cli, coord.cli.main\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('psycopg', 'psycopg_binary', 'psycopg_c')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       check=True)
    assert p.stdout.strip() == "[]"
