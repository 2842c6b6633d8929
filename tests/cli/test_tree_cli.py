"""A program's whole process tree lives and dies with its `coord run`/`elect`/`lock`
instance: real wrappers, real shell scripts that daemonize and ignore SIGTERM, real SIGTERM
and SIGKILL, the elected reaper and `coord reap`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import engine_sql as sql
import pytest
from conftest import coord_env, run_cli, stop_outside_a_write, wait_line, wait_until

import coord
from coord.identity import ProcIdentity, identify, still_running
from coord.leases import get_lease

pytestmark = pytest.mark.contract

GRACE = 1.0
COORD = [sys.executable, "-m", "coord"]
ENV = {"COORD_KILL_GRACE": str(GRACE), "COORD_HEARTBEAT": "0.2"}

# Double fork + setsid: a daemon in a session of its own, whose parents have both exited.
DAEMON = """
import os, sys, time
d = sys.argv[1]
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(d + "/daemon.tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(d + "/daemon.tmp", d + "/daemon.pid")
while True:
    time.sleep(0.1)
"""

# CMD: a shell script with a member that ignores SIGTERM and a daemonized grandchild.
SCRIPT = """
d=$1
sh -c 'trap "" TERM; echo $$ > "$0/ignorer.tmp"; mv "$0/ignorer.tmp" "$0/ignorer.pid"
       while :; do sleep 0.1; done' "$d" &
"$2" -c "$3" "$d"
while ! test -e "$d/ignorer.pid" || ! test -e "$d/daemon.pid"; do sleep 0.01; done
echo "ready $$"
wait
"""


@pytest.fixture
def leftovers() -> Iterator[list[ProcIdentity]]:
    """Processes that are not our children: SIGKILLed at teardown, identity checked, so a
    failing test leaves nothing behind."""
    idents: list[ProcIdentity] = []
    yield idents
    for ident in idents:
        if still_running(ident):
            os.kill(ident.pid, signal.SIGKILL)


def _start(db: Path, procs: list[subprocess.Popen[str]], *args: str,
           env: dict[str, str] = ENV) -> subprocess.Popen[str]:
    p = subprocess.Popen([*COORD, *args], env=coord_env(db, **env), stdout=subprocess.PIPE,
                         text=True)
    procs.append(p)
    return p


def _wrapper_args(kind: str, name: str) -> list[str]:
    if kind == "run":
        return ["run", "--app", name.replace("/", "-"), "--grace", str(GRACE), "--"]
    if kind == "elect":
        return ["elect", name, "--grace", str(GRACE), "--"]
    return ["lock", name, "--"]


def _tree(db: Path, tmp: Path, procs: list[subprocess.Popen[str]], kind: str,
          leftovers: list[ProcIdentity]) -> tuple[subprocess.Popen[str], list[ProcIdentity]]:
    """Start the script under a wrapper; return it and the tree's processes once the
    daemon has been recorded."""
    p = _start(db, procs, *_wrapper_args(kind, f"tree/{kind}"), "sh", "-c", SCRIPT, "script",
               str(tmp), sys.executable, DAEMON)
    script = int(wait_line(p, timeout=60).split()[1])
    pids = [script, int((tmp / "ignorer.pid").read_text()), int((tmp / "daemon.pid").read_text())]
    idents = [i for i in (identify(pid) for pid in pids) if i is not None]
    leftovers += idents
    assert len(idents) == 3
    store = coord.Store(db)
    daemon = idents[2].pid
    wait_until(lambda: sql.value(store, "SELECT count(*) FROM processes WHERE pid = ? AND tree = 1 "
                                   "AND status = 'running'", (daemon,)), timeout=30)
    store.close()
    return p, idents


def _gone(idents: list[ProcIdentity]) -> bool:
    return not any(still_running(i) for i in idents)


def _reaper(db: Path, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """Another registered instance, elected reaper before the wrapper under test starts. Its
    heartbeat (and so its periodic reap, every three) keeps the default 5 s: what acts on a
    death within the second is its pidfd watch."""
    p = _start(db, procs, "run", "--app", "other", "--instance-id", "other", "--",
               "sh", "-c", "echo ready; exec sleep 600", env={"COORD_KILL_GRACE": str(GRACE)})
    wait_line(p, timeout=60)
    store = coord.Store(db)
    wait_until(lambda: get_lease(store, "coord/reaper").holder == "other", timeout=30)
    store.close()
    return p


# -- CMD ends, or the wrapper is told to stop: the wrapper ends the tree ------------------------


@pytest.mark.parametrize("kind", ["run", "elect", "lock"])
def test_term_to_the_wrapper_ends_the_whole_tree(db_path: Path, tmp_path: Path, kind: str,
                                                 procs: list[subprocess.Popen[str]],
                                                 leftovers: list[ProcIdentity]) -> None:
    p, tree = _tree(db_path, tmp_path, procs, kind, leftovers)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 128 + signal.SIGTERM  # CMD's status: sh ended by TERM
    assert _gone(tree)  # the daemon and the TERM-ignorer too, before the wrapper exited
    store = coord.Store(db_path)
    assert sql.value(store, "SELECT count(*) FROM processes WHERE status = 'running'") == 0
    assert run_cli(db_path, "orphans", "--json").stdout.strip() == "[]"
    store.close()


def test_cmd_exit_ends_what_it_left_behind(db_path: Path, tmp_path: Path,
                                           leftovers: list[ProcIdentity]) -> None:
    pidfile = tmp_path / "bg.pid"
    script = (f'"$0" -c "$1" {tmp_path}; while ! test -e {tmp_path}/daemon.pid; do sleep 0.01; '
              f'done; sleep 300 & echo "$(cat {tmp_path}/daemon.pid) $!" > {pidfile}; exit 3')
    r = subprocess.run([*COORD, "run", "--app", "t", "--", "sh", "-c", script, sys.executable,
                        DAEMON], env=coord_env(db_path, **ENV), timeout=60)
    assert r.returncode == 3
    for pid in map(int, pidfile.read_text().split()):  # the daemon, the background sleep
        assert _state(pid) in ("gone", "Z")


def test_keep_children_leaves_them_as_orphans(db_path: Path, tmp_path: Path,
                                              leftovers: list[ProcIdentity]) -> None:
    r = subprocess.run([*COORD, "run", "--app", "keep", "--keep-children", "--",
                        "sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
                       env=coord_env(db_path, **ENV), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    bg = identify(int(r.stdout))
    assert bg is not None
    leftovers.append(bg)
    orphans = json.loads(run_cli(db_path, "orphans", "--json").stdout)
    assert [(o["pid"], o["tree"]) for o in orphans] == [(bg.pid, False)]
    assert run_cli(db_path, "reap").returncode == 0
    assert still_running(bg)  # the death rule leaves what --keep-children kept
    ended = json.loads(run_cli(db_path, "orphans", "--kill", "--json").stdout)
    assert [e["pid"] for e in ended] == [bg.pid] and not still_running(bg)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


# -- the wrapper is SIGKILLed: the death rule ends the tree ------------------------------------


@pytest.mark.parametrize("kind", ["run", "elect", "lock"])
def test_sigkill_the_elected_reaper_ends_the_tree(db_path: Path, tmp_path: Path, kind: str,
                                                  procs: list[subprocess.Popen[str]],
                                                  leftovers: list[ProcIdentity]) -> None:
    """Another instance is alive (the elected reaper, watching by pidfd): nothing of the
    tree is left within 1 s + the grace period (plus a margin for a loaded machine)."""
    _reaper(db_path, procs)
    p, tree = _tree(db_path, tmp_path, procs, kind, leftovers)
    p.kill()
    p.wait()
    killed = time.monotonic()
    if kind != "run":
        # Readers apply proof of death at once: the lease is free, its group still recorded.
        lead = json.loads(run_cli(db_path, "leader", f"tree/{kind}", "--json").stdout)
        assert lead["holder"] is None and lead["alive"] is None
    wait_until(lambda: _gone(tree), timeout=1 + GRACE + 5)
    elapsed = time.monotonic() - killed
    assert elapsed < 1 + GRACE + 5, elapsed
    store = coord.Store(db_path)
    if kind != "run":
        # Proven empty: the lease row lets go of the dead holder's group.
        wait_until(lambda: get_lease(store, f"tree/{kind}").pgid is None, timeout=10)
    wait_until(lambda: sql.value(store, "SELECT count(*) FROM processes WHERE status = 'running' "
                                   "AND tree = 1 AND instance_id != 'other'") == 0, timeout=10)
    store.close()


@pytest.mark.parametrize("kind", ["run", "elect", "lock"])
def test_sigkill_then_one_reap_ends_the_tree(db_path: Path, tmp_path: Path, kind: str,
                                             procs: list[subprocess.Popen[str]],
                                             leftovers: list[ProcIdentity]) -> None:
    """No other instance is alive: `coord orphans` lists every live process of the tree
    (recorded or found in its groups), and one `coord reap` ends them all."""
    p, tree = _tree(db_path, tmp_path, procs, kind, leftovers)
    p.kill()
    p.wait()
    wait_until(lambda: not still_running(tree[0]), timeout=10)  # CMD: parent-death signal
    listed = {o["pid"] for o in json.loads(run_cli(db_path, "orphans", "--json").stdout)}
    assert {i.pid for i in tree[1:]} <= listed
    if kind != "run":
        rows = json.loads(run_cli(db_path, "leases", "--json").stdout)
        assert [r["holder"] for r in rows if r["name"] == f"tree/{kind}"] == [None]
    r = run_cli(db_path, "reap", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["trees_ended"] == 1
    assert _gone(tree)
    assert run_cli(db_path, "orphans", "--json").stdout.strip() == "[]"
    assert json.loads(run_cli(db_path, "instances", "--all", "--json").stdout) == []


# -- the measured cases, as a new user met them ------------------------------------------------


@pytest.mark.parametrize("args", [["elect", "ex/e"], ["lock", "demo/lk"]])
def test_measured_sigkill_of_elect_and_lock(db_path: Path, args: list[str],
                                            procs: list[subprocess.Popen[str]],
                                            leftovers: list[ProcIdentity]) -> None:
    p = _start(db_path, procs, *args, "--", "sh", "-c", "sleep 41; echo done")
    store = coord.Store(db_path)
    sleep = wait_until(lambda: sql.row(store, "SELECT pid, start_token, boot_id FROM processes "
                                         "WHERE name = 'sleep' AND status = 'running'"), timeout=30)
    ident = ProcIdentity(sleep["boot_id"], sleep["pid"], sleep["start_token"])
    leftovers.append(ident)
    p.kill()
    p.wait()
    lead = json.loads(run_cli(db_path, "leader", args[1], "--json").stdout)
    assert lead["holder"] is None  # free at once, not "ALIVE no" for 15 s
    orphans = json.loads(run_cli(db_path, "orphans", "--json").stdout)
    assert ident.pid in {o["pid"] for o in orphans}
    assert run_cli(db_path, "reap").returncode == 0
    assert not still_running(ident)  # the leader-only job does not run on without a leader
    store.close()


def test_measured_term_of_run_with_a_background_job(db_path: Path,
                                                    procs: list[subprocess.Popen[str]],
                                                    leftovers: list[ProcIdentity]) -> None:
    p = _start(db_path, procs, "run", "--app", "grp", "--", "bash", "-c",
               "sleep 120 & echo ready $!; wait")
    bg = identify(int(wait_line(p, timeout=60).split()[1]))
    assert bg is not None
    leftovers.append(bg)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 128 + signal.SIGTERM
    assert not still_running(bg)


# -- no Python between fork and exec -------------------------------------------------------------

# A threaded process (the CLI's own heartbeat thread, and one more of ours) with an at-fork
# hook that leaves a mark in every forked child that runs Python. It runs `coord elect`,
# `coord lock` and `coord run` in-process, as the CLI entry point does, then forks once itself
# to show that the hook works.
AT_FORK = """
import os, sys, threading, time
marks = sys.argv[1]
def mark():
    with open(marks, "a") as f:
        f.write("fork\\n")
os.register_at_fork(after_in_child=mark)
threading.Thread(target=lambda: time.sleep(60), daemon=True).start()
from coord.cli.main import app
codes = []
for args in (["elect", "gate/e", "--", "sh", "-c", "sleep 0.2 & exit 4"],
             ["lock", "gate/l", "--", "true"],
             ["run", "--app", "gate", "--", "sh", "-c", "exit 5"]):
    try:
        app(args)
    except SystemExit as e:
        codes.append(e.code)
print(*codes, flush=True)
before = open(marks).read() if os.path.exists(marks) else ""
print(repr(before), flush=True)
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(repr(open(marks).read()), flush=True)
"""


def test_no_python_runs_in_the_forked_child(db_path: Path, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    r = subprocess.run([sys.executable, "-c", AT_FORK, str(marks)], env=coord_env(db_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    codes, before, after = r.stdout.splitlines()
    assert codes.split() == ["4", "0", "5"]
    assert before == "''"  # the wrappers forked (through subprocess) and ran no Python there
    assert after == repr("fork\n")  # the hook itself works


# Orphans that exit at once are reparented to the wrapper (a subreaper): it reaps them, by
# pid, and still gets CMD's own status.
ZOMBIES = """
import os, time
for _ in range(5):
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(0.05)
            os._exit(0)
        os._exit(0)
    os.wait()
time.sleep(0.6)
wrapper = os.getppid()
zombies = 0
for name in os.listdir("/proc"):
    if name.isdigit():
        try:
            rest = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        zombies += rest[0] == "Z" and int(rest[1]) == wrapper
print(zombies, flush=True)
os._exit(7)
"""


def test_reparented_zombies_are_reaped_and_cmd_keeps_its_status(db_path: Path) -> None:
    r = subprocess.run([*COORD, "run", "--app", "z", "--", sys.executable, "-c", ZOMBIES],
                       env=coord_env(db_path, **ENV), capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (7, "0"), r.stderr


def test_a_stopped_holder_past_its_ttl_has_its_tree_ended_by_the_reaper(
        db_path: Path, tmp_path: Path, procs: list[subprocess.Popen[str]],
        leftovers: list[ProcIdentity]) -> None:
    """No candidate waits: a SIGSTOPped `coord elect` cannot end its own tree when its lease
    runs out, so `coord reap` does (its instance still lives: its term is over)."""
    p = _start(db_path, procs, "elect", "tree/stop", "--ttl", "1.5", "--grace", str(GRACE), "--",
               "sh", "-c", SCRIPT, "script", str(tmp_path), sys.executable, DAEMON)
    script = int(wait_line(p, timeout=60).split()[1])
    tree = [i for i in (identify(int(x)) for x in (
        script, (tmp_path / "ignorer.pid").read_text(), (tmp_path / "daemon.pid").read_text()))
        if i is not None]
    leftovers += tree
    store = coord.Store(db_path)
    wait_until(lambda: sql.value(store, "SELECT count(*) FROM processes WHERE pid = ? AND status = "
                                   "'running'", (tree[2].pid,)), timeout=30)
    stop_outside_a_write(store, p)
    try:
        wait_until(lambda: (get_lease(store, "tree/stop").expires_in or 0) < 0, timeout=30)
        assert run_cli(db_path, "reap").returncode == 0
        assert _gone(tree)
    finally:
        p.send_signal(signal.SIGCONT)
    assert p.wait(30) == 75  # it lost the lease while stopped, and says so
    store.close()


def test_the_heartbeat_goes_on_while_the_tree_is_ended(db_path: Path,
                                                       procs: list[subprocess.Popen[str]]) -> None:
    """Ending the tree (here a 4 s grace for a CMD that ignores SIGTERM) runs off the
    heartbeat thread: the instance stays alive (TTL 1.5 s) until the wrapper leaves."""
    from coord.instances import get_instance

    env = {"COORD_HEARTBEAT": "0.2", "COORD_INSTANCE_TTL": "1.5"}
    p = _start(db_path, procs, "run", "--app", "hb", "--instance-id", "hb", "--grace", "4", "--",
               "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done", env=env)
    wait_line(p, timeout=60)
    store = coord.Store(db_path)
    p.send_signal(signal.SIGTERM)
    time.sleep(2.5)  # past the instance TTL, inside the grace period
    info = get_instance(store, "hb")
    assert info.alive and p.poll() is None, info
    assert p.wait(30) == 128 + signal.SIGKILL  # CMD needed the KILL after the grace
    store.close()
