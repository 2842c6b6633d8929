"""A lease holder's liveness session watched from the server (``session_watch``), on a real
server with real processes:

- a watched holder SIGKILLed: the watch's socket becomes readable, the session is seen to
  have ended and the process's exit is proved by its lock file, with no pidfd involved;
- its session ended by the server (``pg_terminate_backend``), the holder alive: the watch
  wakes, proves nothing, and stops watching the session (no loop of wake-ups);
- an abandoned watch's pending wait ends on the server by itself, and its connection is
  used again by the next watch;
- a waiting candidate whose holder's session is ended by the server does not take the lease.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import engine_sql as sql
import pytest
from conftest import wait_line, wait_until

import coord
from coord.backend.postgresql import session_watch
from coord.config import Config
from coord.errors import LeaseNotAcquired
from coord.identity import FREE, HELD, lock_state
from coord.leases import acquire

HOLDER = """
import os, sys, time, coord
from coord import leases
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="test")
lease = leases.acquire(inst, "the/lease", timeout=10)
print("ready", inst.id, flush=True)
time.sleep(120)
"""


@pytest.fixture
def url(pg_schema_url: str) -> str:
    return pg_schema_url


@pytest.fixture
def pg_store(url: str) -> Iterator[coord.Store]:
    with coord.Store(url, config=Config(heartbeat=0.2)) as s:
        try:
            yield s
        finally:
            coord.instances.close_all()


def start_holder(url: str, name: str, procs: list[subprocess.Popen[str]]
                 ) -> subprocess.Popen[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("COORD_")},
           "COORD_DB": url, "COORD_HEARTBEAT": "0.2"}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, name], env=env,
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    wait_line(p, "ready", timeout=60)
    return p


def liveness_backend(store: coord.Store, name: str) -> int | None:
    return sql.value(store, "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l "
                            "ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted "
                            "AND l.objsubid = 1 WHERE a.application_name LIKE ?",
                     (f"coord live {name}#%",))


def readable(fds: list[int], timeout: float) -> bool:
    return bool(fds) and bool(select.select(fds, [], [], timeout)[0])


def test_a_killed_holder_s_session_end_is_heard_and_its_lock_file_proves_the_exit(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    p = start_holder(url, "holder", procs)
    row = pg_store.backend.instances.by_id("holder")
    assert row is not None
    watch = pg_store.backend.liveness._sessions.watch(row["lock_path"])  # type: ignore[attr-defined]
    try:
        fds = watch.fds()
        assert fds and not readable(fds, 0.3)  # waiting on the server while the holder lives
        assert not watch.ended()
        os.kill(p.pid, signal.SIGKILL)
        assert readable(fds, 10)
        wait_until(watch.ended, timeout=5)
        assert lock_state(row["lock_path"])[0] == FREE
        assert watch.fds() == []
    finally:
        watch.close()
    p.wait()
    # The engine's watch of that row says exited; here its pidfd would too, so a watch of a
    # holder whose pidfd this process cannot have (another pid namespace, as it would say)
    # shows that the session alone suffices.
    q = start_holder(url, "holder2", procs)
    row2 = pg_store.backend.instances.by_id("holder2")
    assert row2 is not None
    w = pg_store.backend.liveness.watch({**row2, "pidns": "pid:[0]"})
    try:
        assert w.pids() == [] and not w.exited()
        fds = w.fds()
        assert fds
        os.kill(q.pid, signal.SIGKILL)
        assert readable(fds, 10)
        wait_until(w.exited, timeout=5)
    finally:
        w.close()


def test_a_session_ended_by_the_server_wakes_the_watch_but_proves_nothing(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    p = start_holder(url, "alive", procs)
    row = pg_store.backend.instances.by_id("alive")
    assert row is not None
    w = pg_store.backend.liveness.watch({**row, "pidns": "pid:[0]"})  # no pidfd: the session
    try:
        fds = w.fds()
        assert fds
        first = wait_until(lambda: liveness_backend(pg_store, "alive"), timeout=10)
        assert sql.value(pg_store, "SELECT pg_terminate_backend(?)", (first,)) is True
        assert readable(fds, 10)
        assert not w.exited()  # its lock file is held: the holder lives
        assert lock_state(row["lock_path"])[0] == HELD
        assert w.fds() == []  # the session is not watched again: no loop of wake-ups
        assert not w.exited()
    finally:
        w.close()
    assert p.poll() is None
    # The holder took its session's lock again at its next heartbeat.
    again = wait_until(lambda: liveness_backend(pg_store, "alive"), timeout=10)
    assert again != first


def test_an_abandoned_watch_ends_on_the_server_and_its_connection_is_used_again(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    start_holder(url, "long", procs)
    row = pg_store.backend.instances.by_id("long")
    assert row is not None
    sessions = pg_store.backend.liveness._sessions  # type: ignore[attr-defined]
    me = f"coord pid {os.getpid()}"

    def waiting() -> int:
        return int(sql.value(
            pg_store, "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "AND l.locktype = 'advisory' AND NOT l.granted WHERE a.application_name = ?", (me,)))

    first = sessions.watch(row["lock_path"])
    assert first.fds()
    wait_until(lambda: waiting() == 1, timeout=5)
    first.close()  # abandoned while its wait is pending on the server
    # Its wait ends by itself within one slice: nothing of ours waits on the lock after.
    wait_until(lambda: waiting() == 0, timeout=session_watch.WAIT_SLICE + 5, interval=0.1)
    before = int(sql.value(pg_store, "SELECT count(*) FROM pg_stat_activity "
                                     "WHERE application_name = ?", (me,)))
    for _ in range(3):
        w = sessions.watch(row["lock_path"])
        assert w.fds()
        w.close()
        time.sleep(session_watch.WAIT_SLICE + 0.2)
    after = int(sql.value(pg_store, "SELECT count(*) FROM pg_stat_activity "
                                    "WHERE application_name = ?", (me,)))
    assert after <= before + 1  # the drained connection served the next watches


def test_a_candidate_whose_holder_s_session_the_server_ended_does_not_take_over(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    p = start_holder(url, "leader", procs)
    first = wait_until(lambda: liveness_backend(pg_store, "leader"), timeout=10)
    inst = coord.register(pg_store, "candidate", app="t", handle_signals=False)
    outcome: list[object] = []

    def contend() -> None:
        try:
            outcome.append(acquire(inst, "the/lease", timeout=3.0))
        except LeaseNotAcquired as e:
            outcome.append(e)

    t = threading.Thread(target=contend)
    t.start()
    time.sleep(0.5)  # waiting, the holder's session watched
    assert sql.value(pg_store, "SELECT pg_terminate_backend(?)", (first,)) is True
    t.join(10)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], LeaseNotAcquired)
    assert p.poll() is None
    holder = sql.value(pg_store, "SELECT holder_id FROM leases WHERE name = 'the/lease'")
    assert holder == "leader"
    inst.close()
