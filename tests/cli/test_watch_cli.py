"""`coord watch` in a real terminal (tmux): it shows the instances, sees one die, follows a
queue, fits the window and quits on q; piped, it prints one snapshot."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import INSTANCE_WORKER, coord_env, spawn_python, wait_line, wait_until
from coord.cli.tables import width_of

import coord

Cli = Callable[..., subprocess.CompletedProcess[str]]
WIDTH, HEIGHT = 100, 40


def tmux_binary() -> str:
    found = shutil.which("tmux")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have tmux (.ci/run installs it)")
        pytest.skip("tmux is not installed (apt-get install tmux): no real terminal to test in")
    return found


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """tmux on a private socket; its server is ended afterwards."""
    binary = tmux_binary()
    sock = tmp_path / "tmux.sock"

    def tmux(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, "-S", str(sock), *args], capture_output=True, text=True,
                              timeout=30)

    yield tmux
    tmux("kill-server")


def _worker(db: Path, procs: list[Any], id: str) -> subprocess.Popen[str]:
    p = spawn_python(INSTANCE_WORKER, id, db=db, env={"APP": "watched"})
    procs.append(p)
    wait_line(p)
    return p


def test_watch_in_a_real_terminal(terminal: Any, db_path: Path, store: coord.Store,
                                  procs: list[Any]) -> None:
    _worker(db_path, procs, "watch-a")
    victim = _worker(db_path, procs, "watch-b")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in coord_env(db_path).items()
                   if k in ("COORD_DB", "PATH", "PYTHONPATH", "XDG_RUNTIME_DIR"))
    command = (f"env {env} {shlex.join([sys.executable, '-m', 'coord', 'watch'])}; "
               "echo WATCH-EXIT $?; sleep 60")
    r = terminal("new-session", "-d", "-s", "w", "-x", str(WIDTH), "-y", str(HEIGHT), command)
    assert r.returncode == 0, r.stderr

    def screen() -> str:
        return str(terminal("capture-pane", "-p", "-t", "w").stdout)

    def row(id: str) -> str:
        return next((line for line in screen().splitlines() if line.startswith(id + " ")), "")

    wait_until(lambda: "alive" in row("watch-a") and "alive" in row("watch-b"), timeout=30)
    shown = screen()
    assert "INSTANCES (2 alive)" in shown and "RECENT EVENTS" in shown and "(q quits)" in shown
    assert all(width_of(line) <= WIDTH for line in shown.splitlines())
    # A death is seen without any commit (the refresh at least once a second).
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_until(lambda: row("watch-b") and "alive" not in row("watch-b"), timeout=30)
    assert "INSTANCES (1 alive)" in screen()
    # A commit shows at once: a queue appears with its ready job.
    coord.queues.put(store, "watched/jobs", {"n": 1})
    wait_until(lambda: row("watched/jobs").split()[1:2] == ["1"], timeout=30)
    terminal("send-keys", "-t", "w", "q")
    wait_until(lambda: "WATCH-EXIT 0" in screen(), timeout=30)
    assert "INSTANCES" not in screen()  # the alternate screen is gone: the shell's is back


def test_watch_piped_prints_one_snapshot(cli: Cli, db_path: Path, store: coord.Store,
                                         procs: list[Any]) -> None:
    _worker(db_path, procs, "snap-a")
    r = cli("watch")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"coord watch  {db_path}"
    assert any(line.startswith("snap-a ") and " alive " in line for line in lines)
    assert {"INSTANCES (1 alive)", "LEASES (0 held)", "QUEUES (0)", "RECENT EVENTS"} <= set(lines)
