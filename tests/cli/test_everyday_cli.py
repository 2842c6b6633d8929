"""What the operator's everyday tools all have: --version, shell completion, --db after the
command, kv strings, `queue show`, `logs`, an honest `--scan`, a word on stderr
when elect/lock wait, and doctor counting orphans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from conftest import coord_env, spawn_python, wait_line, wait_until

import coord

Cli = Callable[..., subprocess.CompletedProcess[str]]
COORD = [sys.executable, "-m", "coord"]


def test_version(cli: Cli) -> None:
    r = cli("--version")
    assert (r.returncode, r.stdout) == (0, f"coord {version('coord')}\n")


def test_shell_completion(cli: Cli, db_path: Path, tmp_path: Path) -> None:
    r = cli("--show-completion", "bash")
    assert r.returncode == 0, r.stderr
    assert "_coord_completion" in r.stdout and "complete " in r.stdout
    # What the completion script asks: the words that complete `coord qu`, `coord queue cl`.
    for words, cword, want in (("coord qu", "1", "queue"), ("coord queue cl", "2", "claim")):
        env = coord_env(db_path, _COORD_COMPLETE="complete_bash", COMP_WORDS=words,
                        COMP_CWORD=cword)
        got = subprocess.run(COORD[:1] + ["-c", "from coord.cli.main import main; main()"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert got.returncode == 0 and want in got.stdout.split(), (got.stdout, got.stderr)
    home = tmp_path / "home"
    home.mkdir()
    r = cli("--install-completion", "bash", env=coord_env(db_path, HOME=str(home),
                                                          SHELL="/bin/bash"))
    assert r.returncode == 0, r.stderr
    assert "_coord_completion" in (home / ".bash_completions" / "coord.sh").read_text()
    assert "coord.sh" in (home / ".bashrc").read_text()


def test_db_after_the_command(db_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "run" / "other.db"
    env = coord_env(db_path)
    for args in (["path", "--db", str(other)], ["path", f"--db={other}"]):
        r = subprocess.run([*COORD, *args], env=env, capture_output=True, text=True, timeout=60)
        assert r.stdout == f"{other}\n", r.stderr
    r = subprocess.run([*COORD, "queue", "put", "q", "1", "--db", str(other)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [s.id for s in coord.queues.stats(coord.Store(other))] == ["q"]
    # A CMD's own --db is its own.
    r = subprocess.run([*COORD, "run", "--app", "w", "--", "sh", "-c", 'echo "$@"', "sh",
                        "--db", "x"], env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "--db x\n"), r.stderr


def test_kv_string(cli: Cli, store: coord.Store) -> None:
    r = cli("kv", "set", "web/name", "bare-string")
    assert r.returncode == 2 and "add --string" in r.stderr and r.stderr.count("\n") == 1
    assert cli("kv", "set", "web/name", "bare-string", "--string").returncode == 0
    assert cli("kv", "get", "web/name").stdout == '"bare-string"\n'
    assert cli("kv", "set", "web/raw", "-", "--string", input="[1, 2]\n").returncode == 0
    assert coord.kv.get(store, "web/raw").value == "[1, 2]"  # type: ignore[union-attr]
    v = coord.kv.get(store, "web/name").version  # type: ignore[union-attr]
    assert cli("kv", "cas", "web/name", str(v), "new name", "--string").returncode == 0
    assert coord.kv.get(store, "web/name").value == "new name"  # type: ignore[union-attr]


def test_queue_show(cli: Cli, store: coord.Store) -> None:
    inst = coord.register(store, "w", app="t", heartbeat=False)
    job_id = coord.queues.put(store, "q", {"n": 1}, max_attempts=1)
    job = coord.queues.claim(store, "q", inst)
    assert job is not None
    coord.queues.fail(store, job, "disk full")
    r = cli("queue", "show", str(job_id))
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert fields["state"] == "dead" and fields["attempts"] == "1/1"
    assert fields["last_error"] == "disk full" and fields["payload"] == '{"n":1}'
    got = json.loads(cli("queue", "show", str(job_id), "--json").stdout)
    assert (got["id"], got["state"], got["last_error"]) == (job_id, "dead", "disk full")


def test_logs_of_a_process_started_with_log(db_path: Path, cli: Cli, store: coord.Store,
                                            procs: list[Any]) -> None:
    p = subprocess.Popen([*COORD, "run", "--log", "--app", "w", "--", "sh", "-c",
                          "echo first; read x; echo second"], env=coord_env(db_path),
                         stdin=subprocess.PIPE, text=True)
    procs.append(p)
    rows = wait_until(lambda: [r for r in coord.list_processes(store, all_=True) if r.log_path
                               and Path(r.log_path).exists() and Path(r.log_path).read_text()],
                      timeout=20)
    proc_id = rows[0].id
    assert cli("logs", str(proc_id)).stdout == "first\n"
    follower = subprocess.Popen([*COORD, "logs", str(proc_id), "-f"], env=coord_env(db_path),
                                stdout=subprocess.PIPE, text=True)
    procs.append(follower)
    assert follower.stdout is not None and follower.stdout.readline() == "first\n"
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.close()
    out, _ = follower.communicate(timeout=30)  # -f ends when the process has ended
    assert out == "second\n" and follower.returncode == 0
    p.wait(30)
    inst = coord.register(store, "nolog", app="t", heartbeat=False)
    plain = coord.processes.spawn(inst, ["sleep", "30"])
    try:
        r = cli("logs", str(plain.id))
        assert r.returncode == 1 and "was not started with --log" in r.stderr
    finally:
        coord.processes.stop(inst, plain.id, grace=0.1)


def test_scan_does_not_call_tracked_children_unregistered(cli: Cli, db_path: Path,
                                                          store: coord.Store,
                                                          procs: list[Any]) -> None:
    p = subprocess.Popen([*COORD, "run", "--app", "w", "--", "sleep", "31.4159"],
                         env=coord_env(db_path))
    procs.append(p)
    wait_until(lambda: coord.list_processes(store, all_=True), timeout=20)
    other = subprocess.Popen(["sleep", "31.4159"])  # matches too, and nobody tracks it
    procs.append(other)
    rows = json.loads(cli("instances", "--scan", "sleep 31\\.4159", "--json").stdout)
    unregistered = {r["pid"] for r in rows if r["status"] == "unregistered"}
    assert unregistered == {other.pid}


def test_elect_says_it_waits_and_for_whom(db_path: Path, procs: list[Any],
                                          store: coord.Store) -> None:
    holder = subprocess.Popen([*COORD, "elect", "app/x", "--", "sleep", "60"],
                              env=coord_env(db_path))
    procs.append(holder)
    info = wait_until(lambda: (i := coord.leases.get_lease(store, "app/x")).holder and i,
                      timeout=20)
    master, slave = os.openpty()
    try:
        r = subprocess.run([*COORD, "lock", "app/x", "--wait", "0.3", "--", "true"],
                           env=coord_env(db_path), stderr=slave, timeout=60)
        os.close(slave)
        err = os.read(master, 65536).decode()
    finally:
        os.close(master)
    assert r.returncode == 75
    assert f"waiting for 'app/x' (for up to 0.3s): held by {info.holder}" in err
    # Not on a terminal: nothing about waiting.
    r2 = subprocess.run([*COORD, "lock", "app/x", "--wait", "0.3", "--", "true"],
                        env=coord_env(db_path), capture_output=True, text=True, timeout=60)
    assert r2.returncode == 75 and "waiting for" not in r2.stderr


# A worker that spawns a child in its own session (it outlives the worker when killed).
SPAWNER = """
import os, sys, time, coord
from coord.processes import spawn
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, "orphaner", app="t")
child = spawn(inst, ["sleep", "60"])
print("ready", child.id, flush=True)
time.sleep(120)
"""


def test_doctor_reports_orphans_as_a_problem(cli: Cli, db_path: Path, store: coord.Store,
                                             procs: list[Any]) -> None:
    assert cli("doctor").returncode == 0
    w = spawn_python(SPAWNER, db=db_path)
    procs.append(w)
    wait_line(w)
    w.kill()
    w.wait()
    assert cli("reap").returncode == 0
    r = cli("doctor")
    assert r.returncode == 1 and "UNHEALTHY" in r.stdout
    assert "PROBLEM        orphans: process" in r.stdout and "orphaner" in r.stdout
    report = json.loads(cli("doctor", "--json").stdout)
    assert not report["ok"] and [p["check"] for p in report["problems"]] == ["orphans"]
    assert cli("orphans", "--kill", "--grace", "1").returncode == 0
    assert cli("doctor").returncode == 0


def test_doctor_expects_the_orphans_of_keep_children(cli: Cli, db_path: Path,
                                                     store: coord.Store) -> None:
    """`coord run --keep-children` records the choice: what it leaves running is listed as
    orphans, but doctor stays healthy; without the option the same script's child is ended."""
    r = cli("run", "--keep-children", "--app", "keep", "--", "sh", "-c",
            "sleep 60 >/dev/null 2>&1 & echo started")
    assert r.returncode == 0 and "started" in r.stdout
    # The script's child may still be a forked `sh` that has not yet become `sleep`.
    deadline = time.monotonic() + 10
    while True:
        left = json.loads(cli("orphans", "--json").stdout)
        if [o["name"] for o in left] == ["sleep"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [o["name"] for o in left] == ["sleep"]
    assert cli("doctor").returncode == 0
    owner = store.backend.instances.by_id(left[0]["instance_id"])
    assert owner is not None and json.loads(owner["labels"]) == {"coord/keep_children": True}
    assert cli("orphans", "--kill", "--grace", "1").returncode == 0
    assert cli("run", "--app", "nokeep", "--", "sh", "-c", "sleep 60 >/dev/null 2>&1 & echo started").returncode == 0
    assert json.loads(cli("orphans", "--json").stdout) == []


def test_orphans_name_what_a_recorded_child_runs_now(cli: Cli) -> None:
    """A child recorded before its exec (here a shell that execs `sleep` once the wrapper
    has gone) is listed under what it runs now, not the name it had when first seen."""
    r = cli("run", "--keep-children", "--app", "keep", "--", "sh", "-c",
            'sh -c "sleep 0.5; exec sleep 60" >/dev/null 2>&1 & echo started')
    assert r.returncode == 0 and "started" in r.stdout
    try:
        deadline = time.monotonic() + 10
        while True:
            left = json.loads(cli("orphans", "--json").stdout)
            if [o["cmdline"] for o in left] == [["sleep", "60"]] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [(o["name"], o["cmdline"]) for o in left] == [("sleep", ["sleep", "60"])]
        assert left[0]["id"] > 0  # recorded while it was still the shell
    finally:
        assert cli("orphans", "--kill", "--grace", "1").returncode == 0


def test_hoist_db_moves_only_coords_own_option() -> None:
    from coord.cli.main import hoist_db

    assert hoist_db(["queue", "ls", "--db", "x"]) == ["--db", "x", "queue", "ls"]
    assert hoist_db(["--db", "a", "path", "--db=b"]) == ["--db", "a", "--db=b", "path"]
    # CMD's words are CMD's: after `--`, and for `run` from CMD's first word on.
    assert hoist_db(["elect", "n", "--db", "x", "--", "c", "--db", "z"]) == [
        "--db", "x", "elect", "n", "--", "c", "--db", "z"]
    assert hoist_db(["run", "--app", "w", "--db", "x", "sh", "--db", "y"]) == [
        "--db", "x", "run", "--app", "w", "sh", "--db", "y"]
    assert hoist_db(["run", "sh", "--db", "y"]) == ["run", "sh", "--db", "y"]
