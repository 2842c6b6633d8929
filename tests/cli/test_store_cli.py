"""`coord path`, `coord sql`, `coord doctor`, and how every refusal looks from the command
line: exit status 1, one line on stderr naming the file, the file left untouched."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import NOBODY, run_cli
from test_adhoc import contents
from test_migrate import BAD_FILES, make_bad, snapshot

import coord.backend.sqlite.migrations
import coord.check
from coord import paths
from coord.errors import CoordError

Cli = Callable[..., subprocess.CompletedProcess[str]]


def one_line_error(r: Any, code: int = 1) -> str:
    """The error line of a failed command, after checking it is exactly one line."""
    assert r.returncode == code if hasattr(r, "returncode") else r.exit_code == code, r
    err = r.stderr
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("coord: ")
    return str(lines[0])


# -- path -----------------------------------------------------------------------------------


def test_path_prints_the_database_path(cli: Cli, db_path: Path) -> None:
    r = cli("path")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{db_path}\n", "")


def test_global_db_option_wins_over_the_environment(db_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "run" / "other.db"
    r = run_cli(db_path, "--db", str(other), "path")
    assert r.stdout == f"{other}\n"


def test_default_path_is_in_the_runtime_directory(tmp_path: Path) -> None:
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    r = subprocess.run([sys.executable, "-m", "coord", "path"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.stdout == f"{runtime}/coord/coord.db\n", r.stderr
    assert (runtime / "coord").stat().st_mode & 0o777 == 0o700
    assert (runtime / "coord" / "coord.db").stat().st_mode & 0o777 == 0o600


# -- sql ------------------------------------------------------------------------------------


@pytest.fixture
def with_rows(invoke: Callable[..., Any], db_path: Path) -> Path:
    assert invoke("path").exit_code == 0  # creates the database
    with coord.Store(db_path) as s:
        s.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('a', 'x,\"y\"'), "
                                    "('b', '[bold]z[/bold]')"))
    return db_path


QUERY = "SELECT key, value FROM meta WHERE key IN ('a', 'b') ORDER BY key"


def test_sql_json(invoke: Callable[..., Any], with_rows: Path) -> None:
    r = invoke("sql", QUERY, "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == [{"key": "a", "value": 'x,"y"'}, {"key": "b", "value": "[bold]z[/bold]"}]


def test_sql_csv(invoke: Callable[..., Any], with_rows: Path) -> None:
    r = invoke("sql", QUERY, "--csv")
    assert r.exit_code == 0
    assert r.stdout.splitlines() == ["key,value", 'a,"x,""y"""', "b,[bold]z[/bold]"]


def test_sql_table_shows_text_literally(invoke: Callable[..., Any], with_rows: Path) -> None:
    r = invoke("sql", QUERY)
    assert r.exit_code == 0
    assert "[bold]z[/bold]" in r.stdout  # never interpreted as markup
    assert r.stdout.split()[:2] == ["key", "value"]


def test_sql_empty_result_still_has_columns(invoke: Callable[..., Any], with_rows: Path) -> None:
    r = invoke("sql", "SELECT id, app FROM live_instances", "--csv")
    assert (r.exit_code, r.stdout.strip()) == (0, "id,app")
    assert json.loads(invoke("sql", "SELECT id FROM live_instances", "--json").stdout) == []


@pytest.mark.parametrize("query", [
    "DELETE FROM meta",
    "WITH x AS (SELECT 1) DELETE FROM meta",
    "ATTACH DATABASE '/tmp/x.db' AS x",
    "PRAGMA user_version = 5",
    "SELECT load_extension('x')",
])
def test_sql_refuses_writes(invoke: Callable[..., Any], with_rows: Path, query: str) -> None:
    with coord.Store(with_rows) as s:
        before = contents(s)
    line = one_line_error(invoke("sql", query))
    assert line.startswith("coord: read-only: only reads are allowed")
    with coord.Store(with_rows) as s:
        assert contents(s) == before


def test_sql_bad_query_and_flags_are_usage_errors(
    invoke: Callable[..., Any], with_rows: Path
) -> None:
    assert "SQL error" in one_line_error(invoke("sql", "SELEC 1"), 2)
    r = invoke("sql", "SELECT 1", "--json", "--csv")  # --json: the error is a JSON object
    assert r.exit_code == 2 and json.loads(r.stderr)["error"] == "choose one of --json and --csv"


def test_sql_refusal_end_to_end(cli: Cli, with_rows: Path) -> None:
    line = one_line_error(cli("sql", "WITH x AS (SELECT 1) DELETE FROM meta"))
    assert line.startswith("coord: read-only: only reads are allowed")


# -- doctor ---------------------------------------------------------------------------------


def test_doctor_healthy(cli: Cli, invoke: Callable[..., Any]) -> None:
    r = cli("doctor")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "healthy"
    report = json.loads(invoke("doctor", "--json").stdout)
    assert report["ok"] is True and report["journal_mode"] == "wal"


def test_doctor_unhealthy_exits_1(invoke: Callable[..., Any], db_path: Path) -> None:
    with coord.Store(db_path) as s:
        s.write(lambda c: c.execute("INSERT INTO lease_terms (name, term, holder_id, "
                                    "holder_incarnation, acquired_at) VALUES "
                                    "('l', 1, 'a', 1, 1), ('l', 2, 'b', 1, 2)"))
    r = invoke("doctor")
    assert r.exit_code == 1
    assert "PROBLEM        terms: lease 'l' has 2 open terms" in r.stdout
    assert r.stdout.splitlines()[-1] == "UNHEALTHY"
    r = invoke("doctor", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False


# -- refusals: files that are not coord databases ---------------------------------------------


@pytest.mark.parametrize(("maker", "error", "words"), BAD_FILES, ids=[m.__name__ for m, _, _ in BAD_FILES])
def test_cli_refuses_what_is_not_a_coord_database(
    invoke: Callable[..., Any], db_path: Path, maker: Callable[[Path], None],
    error: type[CoordError], words: str,
) -> None:
    before = make_bad(maker, db_path)
    for command in (["doctor"], ["sql", "SELECT 1"], ["path"]):
        line = one_line_error(invoke(*command))
        assert str(db_path) in line and words in line
    assert snapshot(db_path) == before


@pytest.mark.parametrize("maker", [BAD_FILES[0][0], BAD_FILES[-1][0]], ids=lambda m: m.__name__)
def test_refusal_end_to_end(cli: Cli, db_path: Path, maker: Callable[[Path], None]) -> None:
    before = make_bad(maker, db_path)
    line = one_line_error(cli("doctor"))
    assert str(db_path) in line
    assert snapshot(db_path) == before


# -- refusals: unsafe paths -------------------------------------------------------------------


def tree(d: Path) -> dict[str, tuple[int, int, str]]:
    """(uid, mode, sha256 or link target) of everything under d, and of d itself."""
    out = {}
    for p in [d, *sorted(d.rglob("*"))]:
        st = os.lstat(p)
        if p.is_symlink():
            content = "-> " + os.readlink(p)
        elif p.is_file():
            content = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            content = ""
        out[str(p)] = (st.st_uid, st.st_mode, content)
    return out


def _dir_owned_by_nobody(d: Path) -> None:
    os.chown(d, NOBODY, -1)


def _dir_group_writable(d: Path) -> None:
    d.chmod(0o770)


def _dir_world_writable(d: Path) -> None:
    d.chmod(0o777)


def _file_owned_by_nobody(d: Path) -> None:
    (d / "coord.db").touch(mode=0o600)
    os.chown(d / "coord.db", NOBODY, -1)


def _file_writable_by_others(d: Path) -> None:
    (d / "coord.db").touch()
    (d / "coord.db").chmod(0o666)


def _symlink_at_path(d: Path) -> None:
    (d / "target.db").touch(mode=0o600)
    (d / "coord.db").symlink_to(d / "target.db")


def _fifo_at_path(d: Path) -> None:
    os.mkfifo(d / "coord.db", 0o600)


def _socket_at_path(d: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "coord.db"))
    s.close()


def _wal_owned_by_nobody(d: Path) -> None:
    (d / "coord.db-wal").touch(mode=0o600)
    os.chown(d / "coord.db-wal", NOBODY, -1)


def _shm_symlink(d: Path) -> None:
    (d / "coord.db-shm").symlink_to("/tmp/elsewhere")


UNSAFE: list[tuple[Callable[[Path], None], str]] = [
    (_dir_owned_by_nobody, f"owned by uid {NOBODY}"),
    (_dir_group_writable, "writable by group or others"),
    (_dir_world_writable, "writable by group or others"),
    (_file_owned_by_nobody, f"owned by uid {NOBODY}"),
    (_file_writable_by_others, "writable by group or others"),
    (_symlink_at_path, "symlink planted"),
    (_fifo_at_path, "a FIFO, not a regular file"),
    (_socket_at_path, "a socket, not a regular file"),
    (_wal_owned_by_nobody, f"owned by uid {NOBODY}"),
    (_shm_symlink, "symlink planted"),
]


@pytest.mark.parametrize(("arrange", "words"), UNSAFE, ids=[f.__name__.strip("_") for f, _ in UNSAFE])
def test_cli_refuses_unsafe_paths(
    invoke: Callable[..., Any], db_path: Path, arrange: Callable[[Path], None], words: str
) -> None:
    d = db_path.parent
    arrange(d)
    before = tree(d)
    line = one_line_error(invoke("doctor"))
    assert line.startswith("coord: refusing ") and words in line
    assert str(d) in line
    assert tree(d) == before


def test_unsafe_path_end_to_end(cli: Cli, db_path: Path) -> None:
    _symlink_at_path(db_path.parent)
    before = tree(db_path.parent)
    line = one_line_error(cli("path"))
    assert line.startswith(f"coord: refusing {db_path}: symlink planted")
    assert tree(db_path.parent) == before


def test_cli_refuses_a_network_filesystem(
    invoke: Callable[..., Any], db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No NFS mount is possible in a test: a mountinfo that puts the directory on one.
    fake = tmp_path / "mountinfo"
    fake.write_text("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    f"2 1 0:50 / {db_path.parent} rw - nfs4 srv:/export rw\n")
    monkeypatch.setattr(paths, "_MOUNTINFO", fake)
    before = tree(db_path.parent)
    line = one_line_error(invoke("doctor"))
    assert str(db_path) in line and "nfs4 filesystem" in line and "use a local disk" in line
    assert tree(db_path.parent) == before


def _main_as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run the CLI's main() in a forked child that dropped to nobody; (status, stderr).

    Allowed by the fork rule only because this process never had ``argv``'s database open
    (a forked child is refused a database its parent had open: tests/test_fork.py)."""
    # Import now what the child would import lazily (nobody cannot read the interpreter's
    # own directory here).
    import importlib.readers  # noqa: F401
    import importlib.resources.readers  # noqa: F401

    from coord.cli.main import main

    coord.backend.sqlite.migrations.migrations()
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            os.dup2(w, 2)
            sys.stderr = open(2, "w", closefd=False)  # pytest has replaced sys.stderr
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    err = b""
    while chunk := os.read(r, 65536):
        err += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err.decode()


def test_cli_read_only_directory(reachable_dir: Path) -> None:
    d = reachable_dir / "ro"
    d.mkdir(mode=0o500)
    os.chown(d, NOBODY, NOBODY)
    before = tree(d)
    code, err = _main_as_nobody(["--db", str(d / "coord.db"), "doctor"])
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"coord: {d / 'coord.db'}: permission denied")
    assert tree(d) == before


# -- usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "words"), [
    (["sql"], "Missing argument 'QUERY'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["doctor", "--bogus"], "No such option: --bogus"),
])
def test_usage_errors_are_one_line_exit_2(cli: Cli, args: list[str], words: str) -> None:
    line = one_line_error(cli(*args), 2)
    assert words in line and "--help" in line


def test_console_script_and_module_agree(db_path: Path) -> None:
    script = Path(sys.executable).parent / "coord"
    if not script.exists():
        pytest.skip("no coord console script beside this interpreter")
    env = {**os.environ, "COORD_DB": str(db_path)}
    a = subprocess.run([str(script), "path"], env=env, capture_output=True, text=True, timeout=60)
    b = subprocess.run([sys.executable, "-m", "coord", "path"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout == f"{db_path}\n"
