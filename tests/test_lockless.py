"""coord doctor finds processes that use the database without SQLite's locks: real processes
(a stdlib sqlite3 connection that loses its locks, a fork child of a coord process, an idle
sqlite3 shell), read from /proc as doctor reads them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli, spawn_python, wait_line, wait_until

import coord
import coord.check
from coord.lockless import lockless_users

# A foreign SQLite library in its own process: reads (so it has the -wal/-shm open and holds
# its DMS lock), then on a line from stdin opens and closes a second descriptor of the -shm,
# which drops every POSIX lock the process holds on it.
STDLIB = """
import os, sqlite3, sys
db = sys.argv[1]
c = sqlite3.connect(db)
c.execute("SELECT count(*) FROM meta").fetchall()
print("reading", flush=True)
sys.stdin.readline()
os.close(os.open(db + "-shm", os.O_RDONLY))
print("dropped", flush=True)
sys.stdin.readline()
"""

# A coord process (heartbeat thread) that forks a child which only sleeps: the child inherits
# the -wal/-shm descriptors and mappings, but no lock.
FORKER = """
import os, sys, time, coord
store = coord.Store(sys.argv[1])
inst = coord.register(store, "forker", app="lockless")
pid = os.fork()
if pid == 0:
    time.sleep(120)
    os._exit(0)
print("child", pid, flush=True)
sys.stdin.readline()
os.kill(pid, 9)
os.waitpid(pid, 0)
"""

# A coord process that also opens its database with the stdlib sqlite3 and closes it: that
# close drops apsw's locks too (the rule this breaks is in the README).
MIXED = """
import sqlite3, sys, time, coord
store = coord.Store(sys.argv[1])
inst = coord.register(store, "mixed", app="lockless")
c = sqlite3.connect(sys.argv[1])
c.execute("SELECT count(*) FROM meta").fetchall()
c.close()
print("ready", flush=True)
time.sleep(120)
"""


def _pids(db: Path) -> list[int]:
    return [u.pid for u in lockless_users(db)]


def test_a_connection_that_lost_its_locks_is_reported(store: coord.Store, db_path: Path,
                                                      procs: list[subprocess.Popen[str]]) -> None:
    p = spawn_python(STDLIB, str(db_path), db=db_path, stdin=subprocess.PIPE)
    procs.append(p)
    assert p.stdin is not None
    wait_line(p, "reading")
    assert _pids(db_path) == []  # it holds its lock: a proper (if foreign) user
    p.stdin.write("\n")
    p.stdin.flush()
    wait_line(p, "dropped")
    users = lockless_users(db_path)
    assert [u.pid for u in users] == [p.pid]
    assert any(f.endswith("coord.db-shm") for f in users[0].files)
    report = coord.check.doctor(store)
    assert not report["ok"]
    locks = [x["detail"] for x in report["problems"] if x["check"] == "locks"]
    assert len(locks) == 1 and f"pid {p.pid} " in locks[0] and "'spawn'" in locks[0]
    r = run_cli(db_path, "doctor")
    assert r.returncode == 1 and f"PROBLEM        locks: pid {p.pid} " in r.stdout


def test_a_fork_child_of_a_coord_process_is_reported(store: coord.Store, db_path: Path,
                                                     procs: list[subprocess.Popen[str]]) -> None:
    p = spawn_python(FORKER, str(db_path), db=db_path, stdin=subprocess.PIPE)
    procs.append(p)
    try:
        child = int(wait_line(p, "child").split()[1])
        assert _pids(db_path) == [child]  # the coord parent holds its locks; the child none
    finally:
        p.communicate("\n", timeout=30)  # the parent ends its forked child before it goes


def test_a_coord_process_that_used_a_second_sqlite_library_is_reported(
    store: coord.Store, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    p = spawn_python(MIXED, str(db_path), db=db_path)
    procs.append(p)
    wait_line(p)
    assert _pids(db_path) == [p.pid]


def test_an_idle_sqlite3_shell_and_coord_users_are_not_reported(
    store: coord.Store, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """``sqlite3 "$(coord path)"`` waiting at its prompt has only coord.db open; this test's
    own store and a registered instance in another process hold their locks."""
    shell = shutil.which("sqlite3")
    if shell is None:
        pytest.skip("the sqlite3 shell is not installed")
    coord.register(store, "here", app="lockless")
    idle = subprocess.Popen([shell, str(db_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(idle)
    other = spawn_python("import sys, time, coord\n"
                         "inst = coord.register(coord.Store(sys.argv[1]), 'there', app='x')\n"
                         "print('ready', flush=True)\ntime.sleep(120)\n", str(db_path),
                         db=db_path)
    procs.append(other)
    wait_line(other)
    wait_until(lambda: str(db_path) in _open_files(idle.pid))  # the shell opened it ...
    assert not any(f.endswith(("-wal", "-shm")) for f in _open_files(idle.pid))  # ... only it
    assert _pids(db_path) == []
    assert [x for x in coord.check.doctor(store)["problems"] if x["check"] == "locks"] == []


def _open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out
