"""The takeover a waiter sends ahead on PostgreSQL (``LeaseOps.arm``, ``.armed``), on a real
server with real processes:

- the holder SIGKILLed: the takeover pending on the server runs when the holder's liveness
  session ends and is committed on the proof of its lock file — the next term, its history
  row and events, the dead holder named for burial — with no pidfd involved;
- the holder's session ended by the server (``pg_terminate_backend``), the holder alive: the
  takeover runs, finds no proof and is rolled back; it stops (no loop of wake-ups), and the
  lease, its term and its history are untouched;
- a wait whose slice passes is sent again, and still takes over at the holder's death;
- an abandoned takeover ends on the server by itself, having changed nothing;
- a waiting candidate whose holder's session the server ended does not take the lease, and
  one whose holder is SIGKILLed holds it through its takeover sent ahead.
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
from typing import Any

import engine_sql as sql
import pytest
from conftest import wait_line, wait_until

import coord
from coord.backend import Armed
from coord.backend.postgresql import armed
from coord.config import Config
from coord.errors import LeaseNotAcquired
from coord.identity import HELD, lock_state
from coord.leases import acquire

HOLDER = """
import os, sys, time, coord
from coord import leases
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="test")
lease = leases.acquire(inst, "the/lease", timeout=10,
                       ttl=float(sys.argv[2]) if len(sys.argv) > 2 else None)
print("ready", lease.term, flush=True)
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


def start_holder(url: str, name: str, procs: list[subprocess.Popen[str]], *ttl: str
                 ) -> tuple[subprocess.Popen[str], int]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("COORD_")},
           "COORD_DB": url, "COORD_HEARTBEAT": "0.2"}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, name, *ttl], env=env,
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    return p, int(wait_line(p, "ready", timeout=60).split()[1])


def liveness_backend(store: coord.Store, name: str) -> int | None:
    return sql.value(store, "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l "
                            "ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted "
                            "AND l.objsubid = 1 WHERE a.application_name LIKE ?",
                     (f"coord live {name}#%",))


def arm(store: coord.Store, me: coord.Instance, holder: str, term: int) -> Armed:
    row = store.backend.instances.by_id(holder)
    assert row is not None
    got = store.backend.leases.arm((me.id, me.incarnation), "the/lease", 15.0, (term, dict(row)))
    assert got is not None
    return got


def armed_taker(store: coord.Store, url: str, holder: str,
                procs: list[subprocess.Popen[str]]
                ) -> tuple[subprocess.Popen[str], int, coord.Instance, Armed]:
    """A holder process of the lease, and a taker here with its takeover armed."""
    p, term = start_holder(url, holder, procs)
    me = coord.register(store, "taker", app="t", handle_signals=False)
    return p, term, me, arm(store, me, holder, term)


def poll_until_over(a: Armed, timeout: float = 10) -> Any:
    """Poll as a waiter does, on its socket, until it took (its LeaseTaken) or is over."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fds = a.fds()
        if not fds:
            return None
        select.select(fds, [], [], 0.5)
        if (taken := a.poll()) is not None:
            return taken
    raise AssertionError("the takeover sent ahead neither took nor ended")


def lease_row(store: coord.Store) -> dict[str, Any]:
    row = sql.rows(store, "SELECT holder_id, term FROM leases WHERE name = 'the/lease'")[0]
    return dict(row)


def test_a_killed_holder_s_lease_is_taken_by_the_takeover_sent_ahead(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    p, term, me, a = armed_taker(pg_store, url, "holder", procs)
    try:
        fds = a.fds()
        assert fds and not select.select(fds, [], [], 0.3)[0]  # pending while it lives
        assert a.poll() is None and lease_row(pg_store)["holder_id"] == "holder"
        os.kill(p.pid, signal.SIGKILL)
        taken = poll_until_over(a)
    finally:
        a.close()
    assert taken is not None and taken.term > term
    assert taken.previous_holder == "holder" and taken.dead[:1] == ("holder",)
    assert taken.dead[2] == "died"
    assert lease_row(pg_store) == {"holder_id": "taker", "term": taken.term}
    history = sql.rows(pg_store, "SELECT term, holder_id, released_at IS NOT NULL AS ended, "
                                 "reason FROM lease_terms ORDER BY term")
    assert [(h["term"], h["holder_id"], h["ended"], h["reason"]) for h in history] == [
        (term, "holder", True, "died"), (taken.term, "taker", False, None)]
    kinds = [r["kind"] for r in sql.rows(
        pg_store, "SELECT kind FROM events WHERE subject = 'the/lease' ORDER BY id")]
    assert kinds[-2:] == ["lease released", "leader changed"]
    assert pg_store.backend.leases._spares._idle  # type: ignore[attr-defined]  # given back
    me.close()


def test_a_session_the_server_ended_is_no_proof_and_the_takeover_is_rolled_back(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    p, term, me, a = armed_taker(pg_store, url, "alive", procs)
    row = pg_store.backend.instances.by_id("alive")
    assert row is not None
    try:
        assert a.fds()
        first = wait_until(lambda: liveness_backend(pg_store, "alive"), timeout=10)
        assert sql.value(pg_store, "SELECT pg_terminate_backend(?)", (first,)) is True
        assert poll_until_over(a) is None  # it ran, found the lock file held, rolled back
        assert a.fds() == [] and a.poll() is None  # over: no loop of wake-ups
    finally:
        a.close()
    assert lock_state(row["lock_path"])[0] == HELD and p.poll() is None
    assert lease_row(pg_store) == {"holder_id": "alive", "term": term}
    assert sql.value(pg_store, "SELECT count(*) FROM lease_terms") == 1
    assert sql.value(pg_store, "SELECT count(*) FROM events WHERE kind = 'leader changed' "
                               "AND instance_id = 'taker'") == 0
    # The holder took its session's lock again at its next heartbeat.
    assert wait_until(lambda: liveness_backend(pg_store, "alive"), timeout=10) != first
    me.close()


def test_a_wait_whose_slice_passed_is_sent_again_and_still_takes_over(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    p, term, me, a = armed_taker(pg_store, url, "slow", procs)
    try:
        first_sent = a.sent_at
        deadline = time.monotonic() + armed.WAIT_SLICE + 1.5
        while time.monotonic() < deadline:  # through one lock_timeout
            fds = a.fds()
            assert fds
            select.select(fds, [], [], 0.2)
            assert a.poll() is None
        assert a.sent_at > first_sent  # sent again
        os.kill(p.pid, signal.SIGKILL)
        taken = poll_until_over(a)
    finally:
        a.close()
    assert taken is not None and lease_row(pg_store)["holder_id"] == "taker"
    me.close()


def test_an_abandoned_takeover_ends_on_the_server_having_changed_nothing(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    _, term, me, a = armed_taker(pg_store, url, "long", procs)

    def waiting() -> int:
        return int(sql.value(
            pg_store, "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "AND l.locktype = 'advisory' AND NOT l.granted WHERE a.application_name = ?",
            (f"coord pid {os.getpid()}",)))

    assert a.fds()
    wait_until(lambda: waiting() == 1, timeout=5)
    a.close()  # abandoned while pending on the server
    wait_until(lambda: waiting() == 0, timeout=armed.WAIT_SLICE + 5, interval=0.1)
    assert lease_row(pg_store) == {"holder_id": "long", "term": term}
    me.close()


def test_candidates_take_over_from_a_killed_holder_but_not_from_an_ended_session(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    p, _ = start_holder(url, "leader", procs)
    first = wait_until(lambda: liveness_backend(pg_store, "leader"), timeout=10)
    inst = coord.register(pg_store, "candidate", app="t", handle_signals=False)
    outcome: list[object] = []

    def contend(timeout: float) -> None:
        try:
            outcome.append(acquire(inst, "the/lease", timeout=timeout))
        except LeaseNotAcquired as e:
            outcome.append(e)

    t = threading.Thread(target=contend, args=(3.0,))
    t.start()
    time.sleep(0.5)  # waiting, its takeover sent ahead
    assert sql.value(pg_store, "SELECT pg_terminate_backend(?)", (first,)) is True
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], LeaseNotAcquired)
    assert p.poll() is None and lease_row(pg_store)["holder_id"] == "leader"
    t = threading.Thread(target=contend, args=(10.0,))
    t.start()
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    t.join(15)
    lease = outcome[1]
    assert isinstance(lease, coord.leases.Lease) and lease.held
    assert lease_row(pg_store) == {"holder_id": "candidate", "term": lease.term}
    lease.release()
    inst.close()


def test_a_short_lease_taken_by_the_takeover_sent_ahead_is_kept(
        pg_store: coord.Store, url: str, procs: list[subprocess.Popen[str]]) -> None:
    # The new term counts from when the wait was last sent: that must not be so long before
    # the takeover ran that a lease of a 1 s TTL has passed its renew deadline on arrival.
    p, _ = start_holder(url, "brief", procs, "1.0")
    inst = coord.register(pg_store, "candidate", app="t", handle_signals=False)
    got: list[coord.leases.Lease] = []
    t = threading.Thread(target=lambda: got.append(acquire(inst, "the/lease", ttl=1.0,
                                                            timeout=10)))
    t.start()
    time.sleep(1.5)  # waiting, through many slices of its wait
    os.kill(p.pid, signal.SIGKILL)
    t.join(10)
    assert got and got[0].held
    lease = got[0]
    time.sleep(1.5)  # more than the TTL: renewed all along
    assert lease.held and lease.lost_reason is None
    assert lease_row(pg_store) == {"holder_id": "candidate", "term": lease.term}
    lease.release()
    inst.close()
