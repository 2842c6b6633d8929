"""Process identity and proof of death: start tokens, zombies, record locks, the clock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_line, wait_until

import coord
from coord.clock import Clock, boot_id
from coord.identity import (
    FREE,
    HELD,
    MISSING,
    UNKNOWN,
    ProcIdentity,
    hold_lock,
    identify,
    lock_holder,
    lock_state,
    pid_namespace,
    proc_stat,
    start_token,
    still_running,
)

# Holds a record lock on argv[1]; with argv[2] == "fork", forks a child that outlives it.
LOCKER = """
import os, sys, time
from coord.identity import hold_lock
fd = hold_lock(sys.argv[1])
if len(sys.argv) > 2 and sys.argv[2] == "fork":
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    print("ready", pid, flush=True)
else:
    print("ready", flush=True)
time.sleep(60)
"""


def spawn_locker(path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", LOCKER, str(path), *extra],
                            stdout=subprocess.PIPE, text=True)


def end(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.wait()
    if p.stdout is not None:
        p.stdout.close()


def test_start_token_is_field_22_of_proc_stat() -> None:
    me = os.getpid()
    raw = Path(f"/proc/{me}/stat").read_text()
    expected = int(raw[raw.rindex(")") + 2 :].split()[19])
    assert start_token(me) == expected
    assert proc_stat(me) == (expected, "R")
    assert identify(me) == ProcIdentity(boot_id(), me, expected)
    assert still_running(ProcIdentity(boot_id(), me, expected))


def test_a_pid_with_another_start_token_or_boot_is_not_the_same_process() -> None:
    me = os.getpid()
    token = start_token(me)
    assert token is not None
    assert not still_running(ProcIdentity(boot_id(), me, token + 1))
    assert not still_running(ProcIdentity("another-boot", me, token))


def test_a_missing_process_has_no_identity() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    assert start_token(p.pid) is None or start_token(p.pid) != 0  # reaped: gone (or reused)
    assert proc_stat(2**22 + 7) is None  # above pid_max: never exists
    assert identify(2**22 + 7) is None


def test_a_zombie_is_not_running() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        ident = identify(p.pid)
        assert ident is not None and still_running(ident)
        os.kill(p.pid, signal.SIGKILL)
        # Not waited for: it is a zombie, and a zombie is dead.
        wait_until(lambda: (proc_stat(p.pid) or (0, "?"))[1] == "Z", timeout=10)
        assert not still_running(ident)
    finally:
        p.kill()
        p.wait()


def test_a_stopped_process_is_still_running() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        ident = identify(p.pid)
        assert ident is not None
        os.kill(p.pid, signal.SIGSTOP)
        wait_until(lambda: (proc_stat(p.pid) or (0, "?"))[1] == "T", timeout=10)
        assert still_running(ident)
    finally:
        p.kill()
        p.wait()


def test_comm_with_spaces_and_parentheses_is_parsed(tmp_path: Path) -> None:
    exe = tmp_path / "a b) (c"
    exe.symlink_to("/bin/sleep")
    p = subprocess.Popen([str(exe), "30"])
    try:
        wait_until(lambda: "a b) (c" in Path(f"/proc/{p.pid}/stat").read_text(), timeout=10)
        st = proc_stat(p.pid)
        assert st is not None and st[1] in "RSD"
    finally:
        p.kill()
        p.wait()


def test_record_lock_is_proof_of_death(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    p = spawn_locker(path)
    try:
        wait_line(p)
        assert lock_state(str(path)) == (HELD, p.pid)
        assert lock_holder(str(path)) == p.pid
        with pytest.raises(BlockingIOError):
            hold_lock(str(path))
        p.kill()
        p.wait()
        # The kernel dropped the lock when the process died: no waiting for any TTL.
        assert lock_state(str(path)) == (FREE, None)
        assert lock_holder(str(path)) is None
    finally:
        end(p)


def test_fork_does_not_inherit_the_record_lock(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    p = spawn_locker(path, "fork")
    grandchild = 0
    try:
        grandchild = int(wait_line(p).split()[1])
        assert lock_holder(str(path)) == p.pid
        p.kill()
        p.wait()
        assert proc_stat(grandchild) is not None  # the forked child still lives ...
        assert lock_state(str(path)) == (FREE, None)  # ... and does not hold the lock
    finally:
        end(p)
        if grandchild:
            try:
                os.kill(grandchild, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_lock_state_without_proof(tmp_path: Path) -> None:
    assert lock_state(str(tmp_path / "missing.lock")) == (MISSING, None)
    target = tmp_path / "real.lock"
    target.touch()
    link = tmp_path / "link.lock"
    link.symlink_to(target)
    assert lock_state(str(link)) == (UNKNOWN, None)  # never followed
    assert lock_state(str(tmp_path)) == (UNKNOWN, None)  # not a regular file
    assert lock_state(str(target)) == (FREE, None)


def test_hold_lock_refuses_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.touch()
    link = tmp_path / "link.lock"
    link.symlink_to(target)
    with pytest.raises(OSError):
        hold_lock(str(link))


def test_pid_namespace_is_this_process_s() -> None:
    assert pid_namespace() == os.readlink("/proc/self/ns/pid")
    assert pid_namespace().startswith("pid:[")


def test_clock_is_injectable(db_path: Path) -> None:
    wall = [1_000_000.0]
    mono = [50.0]
    s = coord.Store(db_path, clock=Clock(mono=lambda: mono[0], wall=lambda: wall[0]))
    try:
        assert (s.mono(), s.wall()) == (50.0, 1_000_000.0)
        wall[0] += 86400
        mono[0] += 1
        assert (s.mono(), s.wall()) == (51.0, 1_086_400.0)
    finally:
        s.close()
    # The system clock is CLOCK_MONOTONIC: it never goes backwards.
    a = coord.clock.SYSTEM.mono()
    time.sleep(0.001)
    assert coord.clock.SYSTEM.mono() > a
