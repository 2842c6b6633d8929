"""`coord ps`, `coord stop`, `coord orphans`, `coord top`, and `coord run`'s tracked child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import coord_env, reap_children, spawn_python, wait_line, wait_until

import coord
from coord import processes as P
from coord.identity import ProcIdentity, still_running

pytestmark = pytest.mark.contract

Cli = Callable[..., subprocess.CompletedProcess[str]]

# An instance that spawns N sleeping children through coord (own sessions, so they outlive
# it), then waits; prints "ready <id> <proc ids ...>".
SPAWNER = """
import os, sys, time, coord
from coord.processes import spawn
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="test")
kids = [spawn(inst, [sys.executable, "-c", "import time; time.sleep(120)", *sys.argv[3:]])
        for _ in range(int(sys.argv[2]))]
print("ready", inst.id, *[k.id for k in kids], flush=True)
while True:
    time.sleep(0.5)
"""


@pytest.fixture
def spawner(db_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[str], list[int]]]]:
    """Start a SPAWNER instance; everything it started is ended at teardown."""
    procs: list[subprocess.Popen[str]] = []
    idents: list[ProcIdentity] = []
    store = coord.Store(db_path)

    def start(id: str, n: int, *extra: str) -> tuple[subprocess.Popen[str], list[int]]:
        w = spawn_python(SPAWNER, id, str(n), *extra, db=db_path)
        procs.append(w)
        ids = [int(x) for x in wait_line(w).split()[2:]]
        idents.extend(P.get_process(store, i).identity for i in ids)
        return w, ids

    yield start
    reap_children(procs)
    for p in procs:
        if p.stdout is not None:
            p.stdout.close()
    for ident in idents:
        if still_running(ident):
            os.kill(ident.pid, signal.SIGKILL)
    store.close()


def _json(r: Any) -> Any:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _alive(db: Path, proc_id: int) -> bool:
    with coord.Store(db) as s:
        return P.get_process(s, proc_id).alive


def test_two_instances_each_see_and_stop_only_their_own(cli: Cli, db_path: Path, spawner: Any) -> None:
    _, a_ids = spawner("inst-a", 2)
    _, b_ids = spawner("inst-b", 1)
    as_a = coord_env(db_path, COORD_INSTANCE_ID="inst-a")
    rows = _json(cli("ps", "--json", env=as_a))
    assert sorted(r["id"] for r in rows) == sorted(a_ids)
    assert {r["instance_id"] for r in rows} == {"inst-a"}
    r0 = rows[0]
    assert {"id", "instance_id", "pid", "name", "status", "rss", "cpu_percent", "cmdline",
            "alive", "started_at", "uptime"} <= set(r0)
    assert r0["alive"] and r0["rss"] > 0 and r0["cmdline"][-1] == "import time; time.sleep(120)"
    assert sorted(r["id"] for r in _json(cli("ps", "--json", "--instance", "inst-b"))) == b_ids
    both = _json(cli("ps", "--all", "--json", env=as_a))
    assert sorted(r["id"] for r in both) == sorted(a_ids + b_ids)
    assert sorted(r["id"] for r in _json(cli("ps", "--json"))) == sorted(a_ids + b_ids)

    # An operator's shell names the owner; signals still go only to that owner's processes.
    denied = cli("stop", str(b_ids[0]), "--grace", "0.1", "--instance", "inst-a")
    assert denied.returncode == 1
    assert denied.stderr.count("\n") == 1 and "not permitted" in denied.stderr
    assert "inst-b" in denied.stderr and "Traceback" not in denied.stderr
    assert _alive(db_path, b_ids[0])

    ok = cli("stop", str(a_ids[0]), "--grace", "10", "--instance", "inst-a")
    assert ok.returncode == 0, ok.stderr
    assert "terminated" in ok.stdout
    assert not _alive(db_path, a_ids[0]) and _alive(db_path, a_ids[1])
    again = _json(cli("stop", str(a_ids[0]), "--json", "--instance", "inst-a"))
    assert again == {"id": a_ids[0], "how": "gone"}
    # The event log names the operator instance that stopped it, and the owner.
    events = [e for e in _json(cli("events", "--json")) if e["kind"] == "operator stopped"]
    assert [(e["subject"], e["detail"]["process"], e["detail"]["how"]) for e in events] == [
        ("inst-a", a_ids[0], "terminated"), ("inst-a", a_ids[0], "gone")]
    assert all(e["instance_id"].startswith("cli-") for e in events)
    # COORD_INSTANCE_ID copied from elsewhere (not an instance this command runs under).
    elsewhere = cli("stop", str(a_ids[1]), env=as_a)
    assert elsewhere.returncode == 1 and "pass --as inst-a" in elsewhere.stderr


def test_stop_needs_a_live_instance(cli: Cli, db_path: Path, spawner: Any) -> None:
    w, ids = spawner("inst-c", 1)
    r = cli("stop", str(ids[0]))
    assert r.returncode == 1 and "COORD_INSTANCE_ID" in r.stderr
    w.kill()
    w.wait()
    r = cli("stop", str(ids[0]), env=coord_env(db_path, COORD_INSTANCE_ID="inst-c"))
    assert r.returncode == 1 and "not a live registered instance" in r.stderr
    assert _alive(db_path, ids[0])


def test_orphans_listed_killed_and_tombstone_reaped(cli: Cli, db_path: Path, spawner: Any) -> None:
    victim, ids = spawner("doomed", 2)
    _, keep = spawner("steady", 1)
    assert _json(cli("orphans", "--json")) == []
    victim.kill()
    victim.wait()
    found = _json(cli("orphans", "--json"))
    assert sorted(o["id"] for o in found) == sorted(ids)
    assert all(o["instance_id"] == "doomed" and o["alive"] and o["orphan"] for o in found)
    table = cli("orphans")
    assert table.returncode == 0 and "(orphan)" in table.stdout and "doomed" in table.stdout
    assert cli("reap").returncode == 0
    tomb = [i for i in _json(cli("instances", "--all", "--json")) if i["id"] == "doomed"]
    assert tomb and tomb[0]["tombstone"]
    ended = _json(cli("orphans", "--kill", "--grace", "5", "--json"))
    assert sorted(e["id"] for e in ended) == sorted(ids)
    assert {e["how"] for e in ended} == {"terminated"}
    assert _alive(db_path, keep[0])
    assert cli("orphans", "--kill").stdout.strip() == "no orphans"
    assert cli("reap").returncode == 0
    assert "doomed" not in {i["id"] for i in _json(cli("instances", "--all", "--json"))}


def test_command_lines_print_literally(cli: Cli, spawner: Any) -> None:
    spawner("markup", 1, "[/red]", "[bold]x[/bold]", "[link=http://e]y")
    out = cli("ps", "--all")
    assert out.returncode == 0, out.stderr
    # Literal (never markup) and quoted as a shell would, so it can be pasted back.
    assert "'[/red]' '[bold]x[/bold]' '[link=http://e]y'" in out.stdout
    assert "ID" in out.stdout and "INSTANCE" in out.stdout and "markup" in out.stdout


def test_top_json_sorted_by_rss(cli: Cli) -> None:
    rows = _json(cli("top", "-n", "5", "--json"))
    assert len(rows) == 5
    assert [r["rss"] for r in rows] == sorted((r["rss"] for r in rows), reverse=True)
    assert all(set(r) == {"pid", "user", "rss", "memory_percent", "name", "cmdline"} for r in rows)
    assert all(isinstance(r["rss"], int) for r in rows)
    text = cli("top", "-n", "3")
    assert text.returncode == 0 and "RSS" in text.stdout
    assert cli("top", "-n", "0").returncode == 2


def test_coord_run_tracks_its_child(cli: Cli, db_path: Path) -> None:
    code = "import sys, time; print('up', flush=True); sys.stdin.readline(); sys.exit(7)"
    run = subprocess.Popen(
        [sys.executable, "-m", "coord", "run", "--app", "runner", "--instance-id", "runner-1",
         "--", sys.executable, "-c", code],
        env=coord_env(db_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        wait_line(run, "up")
        rows = wait_until(lambda: [r for r in _json(cli("ps", "--all", "--json"))
                                   if r["instance_id"] == "runner-1"], timeout=30)
        assert len(rows) == 1
        child = rows[0]
        assert child["alive"] and child["cmdline"][-1] == code and child["pid"] != run.pid
        assert run.stdin is not None
        run.stdin.write("go\n")
        run.stdin.flush()
        assert run.wait(timeout=60) == 7
    finally:
        reap_children([run])
        for f in (run.stdin, run.stdout):
            if f is not None:
                f.close()


def test_every_process_command_has_help(invoke: Any) -> None:
    for cmd in ("ps", "stop", "orphans", "top"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and len(r.output) > 100, cmd
