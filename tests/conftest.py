"""Shared fixtures: a file-backed database per test, the CLI as a subprocess or in-process,
and one helper that always reaps child processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from contract_engines import engines_under_test, fresh_schema
from typer.testing import CliRunner

import coord
from coord.clock import Clock
from coord.config import Config
from coord.identity import proc_stat

NOBODY = 65534

# The PostgreSQL server under test (tests/pg_fixtures.py): the `pg_cluster`/`pg_url` fixtures.
pytest_plugins = ["pg_fixtures"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Never let a developer's own instance or database leak into a test.
    monkeypatch.delenv("COORD_INSTANCE_ID", raising=False)
    monkeypatch.delenv("COORD_DB", raising=False)
    # pytest-xdist's workers claim an 80x24 terminal that is not there; the CLI's tables
    # must see what a pipe gives them, as in a serial run.
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


#: The engines the contract suite runs on (tests/contract_engines.py).
ENGINES = engines_under_test()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A contract module's tests run once per engine; those marked sqlite_only on SQLite alone.
    if "engine" in metafunc.fixturenames and metafunc.definition.get_closest_marker("contract"):
        only = metafunc.definition.get_closest_marker("sqlite_only")
        metafunc.parametrize("engine", ["sqlite"] if only else ENGINES, indirect=True)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The engine a test runs on: 'sqlite' outside the contract suite."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db_path(tmp_path: Path, engine: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Where the test's store lives: a file in a private directory, or — for the contract
    suite on PostgreSQL — a URL naming a fresh schema of the server under test (dropped
    after the test). Either works as ``coord.Store(db_path)`` and as ``COORD_DB``."""
    if engine == "postgresql":
        # The store's host-local files (locks, sockets, logs) go beside a name in the
        # runtime directory: a private one per test, never the machine's default.
        run = tmp_path / "xdg"
        run.mkdir(mode=0o700)
        request.getfixturevalue("monkeypatch").setenv("XDG_RUNTIME_DIR", str(run))
        url = request.getfixturevalue("pg_url")
        with fresh_schema(url) as schema_url:
            yield schema_url
        return
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    yield d / "coord.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[coord.Store]:
    s = coord.Store(db_path)
    yield s
    coord.instances.close_all()
    s.close()


@pytest.fixture
def fast_store(db_path: Path) -> Iterator[coord.Store]:
    """A store with short timings, for tests that wait for TTLs."""
    s = coord.Store(db_path, config=Config(instance_ttl=1.0, heartbeat=0.2, lease_ttl=1.0,
                                           renew_deadline=0.7, claim_lease=1.0))
    yield s
    coord.instances.close_all()
    s.close()


def reap_children(procs: list[subprocess.Popen[Any]], timeout: float = 5.0) -> None:
    """Terminate, wait, then kill: no test leaves a child behind."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
                p.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[Any]]]:
    procs: list[subprocess.Popen[Any]] = []
    yield procs
    reap_children(procs)


@pytest.fixture
def procs(children: list[subprocess.Popen[Any]]) -> list[subprocess.Popen[Any]]:
    """The same as ``children``: started processes, always reaped and their pipes closed."""
    return children


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory under /tmp that nobody can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="coord-test-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d)


def coord_env(db: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    env["COORD_DB"] = str(db)
    env.update(extra)
    return env


def run_cli(db: Path, *args: str, input: str | bytes | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `coord` command as a subprocess."""
    e = coord_env(db) if env is None else env
    data = input.decode() if isinstance(input, bytes) else input
    return subprocess.run([sys.executable, "-m", "coord", *args], env=e, input=data,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(db_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    return lambda *a, **kw: run_cli(db_path, *a, **kw)


@pytest.fixture
def invoke(db_path: Path) -> Callable[..., Any]:
    """Run the CLI in-process (fast) with --db set to this test's database."""
    from coord.cli.main import app

    runner = CliRunner()

    def go(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
        return runner.invoke(app, ["--db", str(db_path), *args], input=input, env=env)

    return go


def parse_json(text: str) -> Any:
    return json.loads(text)


def spawn_python(code: str, *args: str, db: Path, env: dict[str, str] | None = None,
                 **kw: Any) -> subprocess.Popen[str]:
    """Start `python -c code` with COORD_DB set; stdout is a text pipe."""
    e = coord_env(db, **(env or {}))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=e, stdout=subprocess.PIPE,
                            text=True, **kw)


def wait_line(p: subprocess.Popen[str], expect: str = "ready", timeout: float = 20) -> str:
    """Read lines from a child until one starts with ``expect``."""
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"child {p.pid} exited ({p.poll()}) before printing {expect!r}")
        if line.startswith(expect):
            return line.strip()
    raise AssertionError(f"child {p.pid} did not print {expect!r} in time")


def wait_until(pred: Callable[[], Any], timeout: float = 10, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


# A worker that registers as an instance and waits; prints "ready <id> <incarnation>".
INSTANCE_WORKER = """
import os, sys, time, coord
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None,
                      app=os.environ.get("APP", "test"))
print("ready", inst.id, inst.incarnation, flush=True)
while True:
    time.sleep(0.5)
"""


# -- a store on a manual clock, for the queue tests ------------------------------------------


class ManualClock:
    """A clock tests move by hand (``clock.now += 5``). On PostgreSQL, where every expiry is
    the server's, moving it moves the schema's ``coord_now()`` alike (see ``cstore``)."""

    def __init__(self) -> None:
        self._now = 1000.0
        self.moved: list[Callable[[float], None]] = []

    @property
    def now(self) -> float:
        return self._now

    @now.setter
    def now(self, value: float) -> None:
        step, self._now = value - self._now, value
        for hook in self.moved:
            hook(step)

    def mono(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1.7e9 + self.now


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def cstore(db_path: Path, clock: ManualClock) -> Iterator[coord.Store]:
    """A store on a manual clock (instances registered here must not heartbeat)."""
    s = coord.Store(db_path, clock=Clock(mono=clock.mono, wall=clock.wall),
                    config=Config(instance_ttl=1e9, claim_lease=30.0))
    if s.engine == "postgresql":
        clock.moved.append(lambda step: move_server_clock(s, step))
    yield s
    coord.instances.close_all()
    s.close()


def move_server_clock(store: coord.Store, step: float) -> None:
    """Move a PostgreSQL schema's ``coord_now()`` by ``step`` seconds (its test offset)."""
    store.backend.db.write(lambda c: c.execute(  # type: ignore[attr-defined]
        "UPDATE clock_offset SET offset_s = offset_s + %s", (step,)))


def reg(store: coord.Store, id: str) -> coord.Instance:
    return coord.register(store, id, app="test", heartbeat=False, handle_signals=False)


def stop_outside_a_write(store: coord.Store, p: subprocess.Popen[Any]) -> None:
    """SIGSTOP ``p`` at a moment it holds no write lock (a process stopped in the middle of
    its heartbeat's transaction would block every writer until it resumes)."""
    if store.engine == "postgresql":
        _stop_outside_a_pg_transaction(store, p)
        return
    probe = store.raw_connection()
    probe.set_busy_timeout(0)
    try:
        for _ in range(200):
            os.kill(p.pid, signal.SIGSTOP)
            wait_until(lambda: (proc_stat(p.pid) or (0, "T"))[1] == "T", timeout=10)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
                return
            except apsw.BusyError:
                os.kill(p.pid, signal.SIGCONT)
                time.sleep(0.05)
        raise AssertionError(f"could not stop {p.pid} outside a write transaction")
    finally:
        probe.close()


def _stop_outside_a_pg_transaction(store: coord.Store, p: subprocess.Popen[Any]) -> None:
    # On PostgreSQL a stopped writer holds its row locks: stop it when none of its sessions
    # is inside a transaction (coord names each session after its process's pid).
    db = store.backend.db  # type: ignore[attr-defined]
    for _ in range(200):
        os.kill(p.pid, signal.SIGSTOP)
        wait_until(lambda: (proc_stat(p.pid) or (0, "T"))[1] == "T", timeout=10)
        busy = db.value("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                        "'client backend' AND xact_start IS NOT NULL AND pid <> pg_backend_pid() "
                        "AND application_name LIKE %s", (f"coord% pid {p.pid}",))
        if not busy:
            return
        os.kill(p.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"could not stop {p.pid} outside a transaction")


def invariants(store: coord.Store, *, strict: bool = False) -> list[Any]:
    """``coord.check``'s findings (no integrity scan)."""
    from coord.check import check

    return check(store, strict=strict, integrity=False)


def set_job_payload(store: coord.Store, job_id: int, text: str) -> None:
    """Overwrite a stored job's payload behind the API (to test what a worker meets)."""
    if store.engine == "postgresql":
        store.backend.db.write(lambda c: c.execute(  # type: ignore[attr-defined]
            "UPDATE jobs SET payload = %s WHERE id = %s", (text, job_id)))
    else:
        store.write(lambda c: c.execute("UPDATE jobs SET payload = ? WHERE id = ?",
                                        (text, job_id)))
