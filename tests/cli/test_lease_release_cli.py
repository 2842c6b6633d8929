"""`coord lease release NAME`: an operator frees a lease whose holder is dead or hung — the
holder's process tree ends first, the event log says who released it, the next term is
higher — and refuses a healthy holder unless forced. And `coord elect`/`lock` on a terminal
say whom they wait for, again each time the holder changes."""

from __future__ import annotations

import json
import os
import pwd
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import coord_env, spawn_python, stop_outside_a_write, wait_line, wait_until

import coord
from coord.identity import proc_state

Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.contract
COORD = [sys.executable, "-m", "coord"]


def _running(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X", "x")


def _elect(db: Path, name: str, pidfile: Path, procs: list[Any],
           *extra: str) -> subprocess.Popen[str]:
    """A real `coord elect` holder whose CMD starts a child (it writes that child's pid): a
    SIGKILLed wrapper's CMD dies with it, what CMD started does not."""
    p = subprocess.Popen([*COORD, "elect", name, *extra, "--", "sh", "-c",
                          f"sleep 300 & echo $! > {pidfile}; wait"], env=coord_env(db))
    procs.append(p)
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=30)
    return p


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def test_release_of_a_sigkilled_holder_ends_its_tree_and_the_next_term_is_higher(
        cli: Cli, db_path: Path, store: coord.Store, procs: list[Any], tmp_path: Path) -> None:
    pidfile = tmp_path / "cmd.pid"
    holder = _elect(db_path, "ops/job", pidfile, procs)
    cmd = int(pidfile.read_text())
    before = coord.leases.get_lease(store, "ops/job")
    assert before.holder is not None and before.term is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(10)
    time.sleep(0.2)
    assert _running(cmd)  # nobody else is there to end what the dead wrapper's CMD started

    r = cli("lease", "release", "ops/job", "--json", "--grace", "2")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["released"] is True and done["term"] == before.term
    assert done["instance_id"] == before.holder and done["holder_state"] == "died"
    assert done["processes"] in ("terminated", "killed") and done["by"] == _me()
    wait_until(lambda: not _running(cmd), timeout=10)

    ev = [e for e in coord.events.list_events(store, kinds=["lease released"])
          if e["subject"] == "ops/job"]
    assert ev and ev[-1]["detail"]["by"] == _me()
    assert ev[-1]["detail"]["reason"] == "released by operator"
    assert ev[-1]["detail"]["term"] == before.term
    # The dead holder got the rest of the death rule too.
    reg = store.backend.instances.registration(before.holder)
    assert reg is None or reg[1] != "alive"

    assert cli("elect", "ops/job", "--wait", "5", "--", "true").returncode == 0
    assert (coord.leases.get_lease(store, "ops/job").term or 0) > before.term

    again = cli("lease", "release", "ops/job")
    assert again.returncode == 0 and "was not held" in again.stdout
    missing = cli("lease", "release", "ops/nosuch")
    assert missing.returncode == 1 and "no such lease" in missing.stderr


def test_release_refuses_a_healthy_holder_frees_a_stopped_one_and_force_frees_any(
        cli: Cli, db_path: Path, store: coord.Store, procs: list[Any], tmp_path: Path) -> None:
    pidfile = tmp_path / "cmd.pid"
    holder = _elect(db_path, "ops/stop", pidfile, procs)
    cmd = int(pidfile.read_text())
    term = coord.leases.get_lease(store, "ops/stop").term

    r = cli("lease", "release", "ops/stop")
    assert r.returncode == 1 and "--force" in r.stderr and "alive" in r.stderr
    held = coord.leases.get_lease(store, "ops/stop")
    assert held.term == term and held.holder is not None and _running(cmd)

    stop_outside_a_write(store, holder)  # hung: it can neither renew nor end its CMD
    try:
        r = cli("lease", "release", "ops/stop", "--json", "--grace", "2")
        assert r.returncode == 0, r.stderr
        done = json.loads(r.stdout)
        assert done["released"] is True and done["holder_state"] == "stopped"
        wait_until(lambda: not _running(cmd), timeout=10)
        assert coord.leases.get_lease(store, "ops/stop").holder is None
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    # Woken, the wrapper finds its CMD ended by TERM (143), or its term gone first (75).
    assert holder.wait(30) in (75, 128 + signal.SIGTERM)
    assert coord.leases.get_lease(store, "ops/stop").holder is None

    pidfile2 = tmp_path / "cmd2.pid"
    holder2 = _elect(db_path, "ops/stop", pidfile2, procs)
    cmd2 = int(pidfile2.read_text())
    r = cli("lease", "release", "ops/stop", "--force", "--json", "--grace", "2")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["holder_state"] == "alive" and done["released"] is True
    assert (done["term"] or 0) > (term or 0)
    wait_until(lambda: not _running(cmd2), timeout=10)
    assert holder2.wait(30) in (75, 128 + signal.SIGTERM)
    assert coord.leases.get_lease(store, "ops/stop").holder is None


# Holds lease NAME as instance x, then hands it to instance y (release, take at once) when
# told on stdin: the holder changes while a third party keeps waiting.
HANDOVER = """
import os, sys, coord
from coord.leases import acquire, try_acquire
store = coord.Store(os.environ["COORD_DB"])
x = coord.register(store, app="hand-x")
y = coord.register(store, app="hand-y")
lease = acquire(x, sys.argv[1], timeout=10)
print("ready", x.id, y.id, flush=True)
sys.stdin.readline()
lease.release()
got = try_acquire(y, sys.argv[1])
print("handed" if got is not None else "lost", flush=True)
sys.stdin.readline()
"""


def _read_until(fd: int, want: list[str], timeout: float) -> str:
    out, deadline = "", time.monotonic() + timeout
    while not all(w in out for w in want) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                out += os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
    return out


def test_a_waiting_lock_follows_the_holder_on_a_terminal(db_path: Path, procs: list[Any]) -> None:
    for _ in range(5):  # the waiter may win the handover's race: then try again
        hand = spawn_python(HANDOVER, "ops/w", db=db_path, stdin=subprocess.PIPE)
        procs.append(hand)
        _, x, y = wait_line(hand).split()
        master, slave = os.openpty()
        try:
            waiter = subprocess.Popen([*COORD, "lock", "ops/w", "--", "true"],
                                      env=coord_env(db_path), stderr=slave)
            procs.append(waiter)
            os.close(slave)
            first = _read_until(master, [f"held by {x}"], 30)
            assert f"coord: waiting for 'ops/w': held by {x}" in first, first
            assert hand.stdin is not None
            hand.stdin.write("go\n")
            hand.stdin.flush()
            if wait_line(hand, "") != "handed":
                waiter.wait(30)
                hand.kill()
                continue
            second = _read_until(master, [f"now held by {y}"], 30)
            assert f"coord: waiting for 'ops/w': now held by {y}" in second, second
            hand.kill()  # y's process dies: the waiter takes over and runs `true`
            code = waiter.wait(30)
            assert code == 0, _read_until(master, ["\0"], 0.5)
        finally:
            os.close(master)
        return
    raise AssertionError("the waiter won the handover five times")
