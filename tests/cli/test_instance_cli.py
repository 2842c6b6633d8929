"""`coord instances`, `coord instance`, `coord reap`: output, help, errors (`coord events`:
test_events_cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import engine_sql as sql
import pytest
import typer
from conftest import coord_env, wait_line
from coord.cli import instance_cmds
from coord.cli.main import app

import coord

pytestmark = pytest.mark.contract

Cli = Callable[..., subprocess.CompletedProcess[str]]
COMMANDS = ["instances", "instance", "run", "reap", "events"]
KEYS = {"id", "app", "pid", "user", "alive", "status", "incarnation", "started_at", "cmdline"}

WORKER = """
import os, sys, time, coord
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app=sys.argv[2])
print("ready", flush=True)
time.sleep(60)
"""


def worker(db: Path, procs: list[subprocess.Popen[str]], id: str, app_name: str = "test",
           *extra: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", WORKER, id, app_name, *extra],
                         env=coord_env(db), stdout=subprocess.PIPE, text=True)
    procs.append(p)
    wait_line(p, timeout=60)
    return p


def one_line_error(out: subprocess.CompletedProcess[str], code: int) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("coord: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_every_command_and_option_has_help() -> None:
    cmd = typer.main.get_command(app)
    for name in COMMANDS:
        sub = cmd.commands[name]  # type: ignore[attr-defined]
        assert sub.help and sub.help.strip(), name
        for param in sub.params:
            if param.name != "help":
                assert getattr(param, "help", None), f"{name} {param.name} has no help"
    assert {c for c in COMMANDS} <= set(cmd.commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_runs(invoke: Callable[..., Any], name: str) -> None:
    r = invoke(name, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


def test_instance_errors_are_one_line(cli: Cli) -> None:
    one_line_error(cli("instance", "no-such-id"), 1)
    one_line_error(cli("instance"), 2)
    err = cli("instance", "no-such-id", "--json")  # with --json: one JSON object
    assert err.returncode == 1 and json.loads(err.stderr)["kind"] == "NotFound"
    one_line_error(cli("instances", "--scan", "(unclosed"), 2)


def test_instances_lists_alive_by_default_and_all_with_tombstones(
    cli: Cli, store: coord.Store, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    worker(db_path, procs, "web-1", "web")
    victim = worker(db_path, procs, "web-2", "web")
    worker(db_path, procs, "db-1", "db")
    victim.kill()
    victim.wait()
    sql.execute(store,
        "INSERT INTO instances (id, incarnation, app, status, pid, start_token, boot_id, pidns, "
        'uid, "user", host, lock_path, ttl, started_at, heartbeat_at, heartbeat_mono, ended_at, '
        "end_reason) VALUES ('old-1', 999, 'web', 'dead', 1, 1, 'b', 'n', 0, 'u', 'h', '/x', 15, "
        "1, 1, 1, 2, 'died')")

    rows = json.loads(cli("instances", "--json").stdout)
    assert sorted(r["id"] for r in rows) == ["db-1", "web-1"]
    for r in rows:
        assert KEYS <= set(r)
        assert r["alive"] is True and r["status"] == "alive"
        assert r["user"] and isinstance(r["cmdline"], list) and isinstance(r["started_at"], float)
        assert r["rss"] > 0 and r["uptime"] is not None

    every = {r["id"]: r for r in json.loads(cli("instances", "--all", "--json").stdout)}
    assert set(every) == {"db-1", "web-1", "web-2", "old-1"}
    assert (every["web-2"]["alive"], every["web-2"]["status"], every["web-2"]["tombstone"]) == (
        False, "died", False)
    assert (every["old-1"]["alive"], every["old-1"]["tombstone"]) == (False, True)

    web = json.loads(cli("instances", "--all", "--app", "web", "--json").stdout)
    assert sorted(r["id"] for r in web) == ["old-1", "web-1", "web-2"]

    table = cli("instances", "--all").stdout
    assert "ID" in table and "STATUS" in table and "tombstone (died)" in table
    assert "web-1" in table and "alive" in table


def test_scan_shows_unregistered_processes(cli: Cli, db_path: Path,
                                           procs: list[subprocess.Popen[str]]) -> None:
    marker = f"scanmark{os.getpid()}x{time.monotonic_ns()}"
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        worker(db_path, procs, "reg-1", "test", marker)
        rows = json.loads(cli("instances", "--scan", marker, "--json").stdout)
        unregistered = [r for r in rows if r["status"] == "unregistered"]
        assert [r["pid"] for r in unregistered] == [stray.pid]
        assert unregistered[0]["id"] is None and unregistered[0]["alive"] is True
        assert KEYS <= set(unregistered[0])
        assert "reg-1" in [r["id"] for r in rows]  # registered: listed as itself, once
        assert "unregistered" in cli("instances", "--scan", marker).stdout
    finally:
        stray.kill()
        stray.wait()


def test_instance_detail(cli: Cli, store: coord.Store, db_path: Path,
                         procs: list[subprocess.Popen[str]]) -> None:
    w = worker(db_path, procs, "one", "test")
    worker(db_path, procs, "two", "test")
    obj = json.loads(cli("instance", "one", "--json").stdout)
    assert KEYS <= set(obj)
    assert (obj["id"], obj["pid"], obj["alive"]) == ("one", w.pid, True)
    assert [o["id"] for o in obj["others"]] == ["two"]
    text = cli("instance", "one").stdout
    assert "one" in text and "incarnation" in text and "two" in text
    # The id defaults to COORD_INSTANCE_ID.
    env = coord_env(db_path, COORD_INSTANCE_ID="two")
    out = subprocess.run([sys.executable, "-m", "coord", "instance", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["id"] == "two"


def test_reap_json(cli: Cli, db_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    w = worker(db_path, procs, "gone", "test")
    w.kill()
    w.wait()
    dry = json.loads(cli("reap", "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True and [d["id"] for d in dry["dead"]] == ["gone"]
    done = json.loads(cli("reap", "--json").stdout)
    assert [d["id"] for d in done["dead"]] == ["gone"] and done["dead"][0]["reason"] == "died"
    assert cli("reap").stdout == ""


def test_instances_empty_is_fine(cli: Cli) -> None:
    assert json.loads(cli("instances", "--json").stdout) == []
    out = cli("instances")
    assert out.returncode == 0 and out.stderr == ""


def test_module_registers_its_commands() -> None:
    t = typer.Typer()
    instance_cmds.register(t)
    names = {c.name or c.callback.__name__ for c in t.registered_commands}  # type: ignore[union-attr]
    assert names == set(COMMANDS)

