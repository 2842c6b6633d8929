"""Processes: tracking, isolation, stopping (TERM, grace, KILL), pid reuse, orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import engine_sql as sql
import pytest
from conftest import spawn_python, wait_line, wait_until

import coord
from coord import process_ending
from coord import processes as P
from coord.check import check
from coord.identity import ProcIdentity, identify, still_running
from coord.instances import get_instance

pytestmark = pytest.mark.contract

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# Ignores SIGTERM: only SIGKILL ends it.
STUBBORN = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('armed', flush=True); time.sleep(120)"]

# An instance that spawns N sleeping children through coord, each in its own session, so
# they outlive it; prints "ready <id> <proc ids ...>".
SPAWNER = """
import os, sys, time, coord
from coord.processes import spawn
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="test")
kids = [spawn(inst, [sys.executable, "-c", "import time; time.sleep(120)"])
        for _ in range(int(sys.argv[2]))]
print("ready", inst.id, *[k.id for k in kids], flush=True)
while True:
    time.sleep(0.5)
"""


@pytest.fixture
def leftovers() -> Iterator[list[ProcIdentity]]:
    """Processes that are not our children (an instance's grandchildren): SIGKILLed at
    teardown, identity checked, so a failing test leaves nothing behind."""
    idents: list[ProcIdentity] = []
    yield idents
    for ident in idents:
        if still_running(ident):
            os.kill(ident.pid, signal.SIGKILL)


def _read(path: str | None) -> str:
    if path is None:
        return ""
    with open(path) as f:
        return f.read()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _ident(store: coord.Store, proc_id: int) -> ProcIdentity:
    return P.get_process(store, proc_id).identity


def _sigkill(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.wait()


def _spawner(db: Any, procs: list[Any], leftovers: list[ProcIdentity], store: coord.Store,
             id: str, n: int) -> tuple[subprocess.Popen[str], list[int]]:
    w = spawn_python(SPAWNER, id, str(n), db=db)
    procs.append(w)
    ids = [int(x) for x in wait_line(w).split()[2:]]
    leftovers.extend(_ident(store, i) for i in ids)
    return w, ids


# -- tracking and exit codes ------------------------------------------------------------------


def test_spawn_records_rows_and_own_exit_codes(store: coord.Store) -> None:
    inst = coord.register(store, "a", app="t", heartbeat=False)
    ok = P.spawn(inst, [sys.executable, "-c", "import sys; sys.exit(3)"], labels={"role": "x"})
    killed = P.spawn(inst, SLEEPER)
    assert killed.popen is not None and ok.popen is not None
    killed.popen.send_signal(signal.SIGKILL)
    ok.popen.wait(timeout=30)
    killed.popen.wait(timeout=30)
    assert sorted(P.poll_children(inst)) == sorted([ok.id, killed.id])
    rows = {p.id: p for p in P.list_processes(store, "a", live=False)}
    assert (rows[ok.id].exit_code, rows[ok.id].signal, rows[ok.id].status) == (3, None, "exited")
    assert (rows[killed.id].exit_code, rows[killed.id].signal) == (None, signal.SIGKILL)
    assert rows[ok.id].labels == {"role": "x"} and rows[ok.id].cmdline[-1] == "import sys; sys.exit(3)"
    assert rows[ok.id].pgid == rows[ok.id].pid  # own process group
    assert not rows[ok.id].alive and rows[ok.id].ended_at is not None
    assert check(store, strict=True) == []


def test_heartbeat_records_exit_of_own_children(fast_store: coord.Store) -> None:
    inst = coord.register(fast_store, "a", app="t")
    t = P.spawn(inst, [sys.executable, "-c", "import sys; sys.exit(5)"])
    wait_until(lambda: P.get_process(fast_store, t.id).exit_code == 5, timeout=30)


def test_spawn_log_file_beside_database(store: coord.Store) -> None:
    inst = coord.register(store, "a", app="t", heartbeat=False)
    t = P.spawn(inst, [sys.executable, "-c", "print('hello from child')"], log=True)
    assert t.popen is not None and t.popen.wait(timeout=30) == 0
    info = P.get_process(store, t.id)
    assert info.log_path is not None and info.log_path.startswith(str(store.path.parent) + os.sep)
    assert "hello from child" in _read(info.log_path)
    assert os.stat(info.log_path).st_mode & 0o077 == 0


def test_track_pid_and_popen(store: coord.Store, children: list[Any]) -> None:
    inst = coord.register(store, "a", app="t", heartbeat=False)
    p = subprocess.Popen(SLEEPER)
    children.append(p)
    t = P.track(inst, p, labels={"k": 1})
    info = P.get_process(store, t.id)
    assert info.alive and info.pid == p.pid and info.cmdline == tuple(SLEEPER)
    assert info.pgid == os.getpgrp()  # it shares our group: stop must signal it alone
    wait_until(lambda: b"time.sleep" in _read_bytes(f"/proc/{p.pid}/cmdline"))
    by_pid = P.get_process(store, P.track(inst, p.pid).id)
    assert by_pid.cmdline == tuple(SLEEPER)  and by_pid.name.startswith("python")
    with pytest.raises(coord.NotFound):
        P.track(inst, 2**22 + 12345)


# -- isolation ---------------------------------------------------------------------------------


def test_each_instance_sees_and_signals_only_its_own(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t", heartbeat=False)
    b = coord.register(store, "b", app="t", heartbeat=False)
    pa = [P.spawn(a, SLEEPER) for _ in range(2)]
    pb = P.spawn(b, SLEEPER)
    try:
        assert {p.id for p in P.list_processes(store, "a")} == {t.id for t in pa}
        assert {p.id for p in P.list_processes(store, "b")} == {pb.id}
        every = P.list_processes(store, all_=True)
        assert {p.id for p in every} == {pa[0].id, pa[1].id, pb.id}
        assert {p.instance_id for p in every} == {"a", "b"}
        assert all(p.alive and p.rss and p.cpu_percent is not None for p in every)
        with pytest.raises(coord.PermissionDenied, match="belongs to instance 'b'"):
            P.stop(a, pb.id, grace=0.1)
        with pytest.raises(coord.PermissionDenied):
            P.stop_as(store, pb.id, instance_id="a", grace=0.1)
        assert pb.popen is not None and pb.popen.poll() is None
        assert P.get_process(store, pb.id).alive
        with pytest.raises(coord.InvalidArgument):
            P.list_processes(store)
    finally:
        for t in (*pa, pb):
            assert t.popen is not None
            t.popen.kill()
            t.popen.wait()


def test_stop_as_needs_a_live_instance(store: coord.Store) -> None:
    with pytest.raises(coord.NotRegistered):
        P.stop_as(store, 1)
    with pytest.raises(coord.NotRegistered):
        P.stop_as(store, 1, instance_id="nobody-here")


# -- stopping: TERM, grace, KILL ---------------------------------------------------------------


def test_stop_terminates_then_kills(store: coord.Store) -> None:
    inst = coord.register(store, "a", app="t", heartbeat=False)
    polite = P.spawn(inst, SLEEPER)
    stubborn = P.spawn(inst, STUBBORN, log=True)
    wait_until(lambda: "armed" in _read(P.get_process(store, stubborn.id).log_path), timeout=30)
    assert P.stop(inst, polite.id, grace=10) == P.TERMINATED
    assert P.stop(inst, stubborn.id, grace=0.3) == P.KILLED
    got = {p.id: p for p in P.list_processes(store, "a", live=False)}
    assert got[polite.id].signal == signal.SIGTERM and not got[polite.id].alive
    assert got[stubborn.id].signal == signal.SIGKILL
    assert P.stop(inst, polite.id) == P.GONE  # already ended: nothing to do
    with pytest.raises(coord.NotFound):
        P.stop(inst, 10**9)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_stop_group_of_own_child_with_and_without_pidfd(store: coord.Store, pidfd: bool,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        leftovers: list[ProcIdentity]) -> None:
    # The leader exits on SIGTERM; its child (same group) ignores SIGTERM and must get SIGKILL.
    # With pidfd the group is reached after the leader has gone; without, signals re-check the
    # leader's start token, and our own exited child stays a zombie until we reap it, which
    # keeps its group nameable until SIGKILL.
    monkeypatch.setattr(process_ending, "_USE_PIDFD", pidfd)
    script = ("import subprocess, sys, time\n"
              f"c = subprocess.Popen({STUBBORN!r})\n"
              "print(c.pid, flush=True)\n"
              "time.sleep(120)\n")
    inst = coord.register(store, "a", app="t", heartbeat=False)
    t = P.spawn(inst, [sys.executable, "-c", script], log=True)
    text = wait_until(lambda: "armed" in (s := _read(P.get_process(store, t.id).log_path)) and s,
                      timeout=30)
    child = identify(int(text.split()[0]))
    assert child is not None
    leftovers.append(child)
    assert os.getpgid(child.pid) == t.pid
    assert P.stop(inst, t.id, grace=0.3) == P.KILLED
    assert not still_running(child)
    assert P.get_process(store, t.id).signal == signal.SIGTERM  # the leader's real status


def test_a_process_in_our_own_group_is_stopped_alone(store: coord.Store, children: list[Any]) -> None:
    inst = coord.register(store, "a", app="t", heartbeat=False)
    target = subprocess.Popen(SLEEPER)
    sibling = subprocess.Popen(SLEEPER)  # same group as us and the target
    children += [target, sibling]
    t = P.track(inst, target)
    assert P.stop(inst, t.id, grace=5) == P.TERMINATED
    assert target.poll() == -signal.SIGTERM
    assert sibling.poll() is None
    assert P.get_process(store, t.id).signal == signal.SIGTERM


def test_end_group_api(children: list[Any]) -> None:
    p = subprocess.Popen(SLEEPER, start_new_session=True)
    children.append(p)
    ident = identify(p.pid)
    assert ident is not None
    with pytest.raises(coord.InvalidArgument):
        P.end_group(p.pid + 1, ident, 1)
    with pytest.raises(coord.InvalidArgument):
        P.end_group(os.getpgrp(), ProcIdentity(ident.boot_id, os.getpgrp(), 1), 1)
    assert P.end_group(p.pid, ident, 5) == P.TERMINATED
    assert p.wait(timeout=30) == -signal.SIGTERM
    assert P.end_group(p.pid, ident, 5) == P.GONE


# -- pid reuse -----------------------------------------------------------------------------------


def test_reused_pid_is_reported_exited_and_never_signalled(store: coord.Store, children: list[Any]) -> None:
    a = coord.register(store, "a", app="t", heartbeat=False)
    p = subprocess.Popen(SLEEPER, start_new_session=True)
    children.append(p)
    t = P.track(a, p)
    # The row now names an earlier process that had this pid: the one running is someone else.
    sql.execute(store, "UPDATE processes SET start_token = start_token - 7 WHERE id = ?", (t.id,))
    info = P.get_process(store, t.id)
    assert (info.alive, info.status, info.orphan) == (False, "exited", False)
    listed = P.list_processes(store, "a")
    assert listed[0].status == "exited" and listed[0].rss is None
    assert P.stop(a, t.id, grace=0.1) == P.GONE
    assert P.end_group(p.pid, info.identity, 0.1) == P.GONE
    a.close()  # its instance is gone: the row would be an orphan if it still matched
    assert P.orphans(store) == []
    assert P.kill_orphans(store, grace=0.1) == []
    coord.reap(store)
    assert p.poll() is None  # never signalled
    assert [pr for pr in check(store, strict=True) if pr.check == "processes"] == []


def test_reaper_marks_rows_whose_process_no_longer_matches(store: coord.Store, children: list[Any]) -> None:
    a = coord.register(store, "a", app="t", heartbeat=False)
    p = subprocess.Popen(SLEEPER)
    children.append(p)
    t = P.track(a, p)
    sql.execute(store, "UPDATE processes SET start_token = start_token + 1 WHERE id = ?", (t.id,))
    assert any(pr.pending and pr.check == "processes" for pr in check(store, strict=True))
    assert coord.reap(store).processes_exited == 1
    assert sql.value(store, "SELECT status FROM processes WHERE id = ?", (t.id,)) == "exited"
    assert p.poll() is None
    assert check(store, strict=True) == []


# -- orphans ------------------------------------------------------------------------------------


def test_orphans_of_a_killed_instance(store: coord.Store, db_path: Any, children: list[Any],
                                      procs: list[Any], leftovers: list[ProcIdentity]) -> None:
    live = coord.register(store, "survivor", app="t", heartbeat=False)
    mine = P.spawn(live, SLEEPER)
    bystander = subprocess.Popen(SLEEPER, start_new_session=True)
    children.append(bystander)
    worker, ids = _spawner(db_path, procs, leftovers, store, "victim", 2)
    _spawner(db_path, procs, leftovers, store, "healthy", 1)
    assert P.orphans(store) == []
    _sigkill(worker)
    found = P.orphans(store)
    assert sorted(o.id for o in found) == sorted(ids)
    assert all(o.instance_id == "victim" and o.alive and o.orphan for o in found)
    coord.reap(store)  # buries the victim: a tombstone, kept for its running processes
    assert get_instance(store, "victim").tombstone
    assert sorted(o.id for o in P.orphans(store)) == sorted(ids)
    ended = P.kill_orphans(store, grace=5)
    assert sorted(e["id"] for e in ended) == sorted(ids)
    assert {e["how"] for e in ended} == {P.TERMINATED}
    assert not any(still_running(i) for i in leftovers[:2])
    # Nothing else was touched.
    assert bystander.poll() is None and mine.popen is not None and mine.popen.poll() is None
    assert all(p.alive for p in P.list_processes(store, "healthy"))
    assert P.orphans(store) == []
    report = coord.reap(store)
    assert report.tombstones_removed == 1
    with pytest.raises(coord.NotFound):
        get_instance(store, "victim")
    assert check(store, strict=True) == []
    P.stop(live, mine.id, grace=5)


def test_processes_of_an_older_incarnation_are_orphans(store: coord.Store, db_path: Any,
                                                       procs: list[Any],
                                                       leftovers: list[ProcIdentity]) -> None:
    worker, ids = _spawner(db_path, procs, leftovers, store, "phoenix", 1)
    _sigkill(worker)
    again = coord.register(store, "phoenix", app="t", heartbeat=False)  # takes the id over
    assert [o.id for o in P.orphans(store)] == ids
    assert [p.id for p in P.list_processes(store, "phoenix", running=True)] == ids
    assert [e["how"] for e in P.kill_orphans(store, grace=5)] == [P.TERMINATED]
    assert P.list_processes(store, "phoenix", running=True) == []
    again.close()
    assert check(store, strict=True) == []


def test_stopped_orphan_is_continued_and_terminated(store: coord.Store, db_path: Any,
                                                    procs: list[Any],
                                                    leftovers: list[ProcIdentity]) -> None:
    worker, ids = _spawner(db_path, procs, leftovers, store, "frozen", 1)
    os.kill(leftovers[0].pid, signal.SIGSTOP)
    _sigkill(worker)
    assert [e["how"] for e in P.kill_orphans(store, grace=5)] == [P.TERMINATED]
    assert not still_running(leftovers[0])


# -- top ------------------------------------------------------------------------------------------


def test_top_by_memory() -> None:
    rows = P.top(5)
    assert len(rows) == 5
    assert [r["rss"] for r in rows] == sorted((r["rss"] for r in rows), reverse=True)
    assert set(rows[0]) == {"pid", "user", "rss", "memory_percent", "name", "cmdline"}
    with pytest.raises(coord.InvalidArgument):
        P.top(0)
