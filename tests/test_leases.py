"""Leases: acquire, renew, release, observe, fencing, failover — with real processes,
real SIGKILL and SIGSTOP."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import engine_sql
import pytest
from conftest import spawn_python, stop_outside_a_write, wait_line, wait_until

import coord
from coord import nudge
from coord.backend import LeaseTaken
from coord.check import check
from coord.errors import InvalidArgument, LeaseLost, LeaseNotAcquired
from coord.lease_rules import add_waiter, nudge_waiters, remove_waiter
from coord.leases import (
    REAPER_LEASE,
    Candidate,
    acquire,
    fenced_write,
    get_lease,
    list_leases,
    serve_reaper,
    try_acquire,
)
from coord.reaper import reap

pytestmark = pytest.mark.contract

#: A fenced write both engines speak (literal values: placeholders differ).
UPSERT = "INSERT INTO meta (key, value) VALUES ({}, {}) ON CONFLICT (key) DO UPDATE SET value = excluded.value"

# A candidate: registers, waits for the lease, reports when it got it (CLOCK_MONOTONIC).
CANDIDATE = """
import os, sys, time, coord
from coord.leases import acquire
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, app="cand")
print("ready", inst.id, flush=True)
lease = acquire(inst, sys.argv[1])
print("acquired", lease.term, time.clock_gettime(time.CLOCK_MONOTONIC), os.getpid(), flush=True)
while True:
    time.sleep(1)
"""

# A holder driven through stdin: each line asks for one fenced write.
DRIVEN_HOLDER = """
import os, sys, time, coord
from coord.errors import LeaseLost
from coord.leases import acquire
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, app="holder")
lease = acquire(inst, sys.argv[1])
mark = "%s" if store.engine == "postgresql" else "?"
print("acquired", lease.term, flush=True)
for line in sys.stdin:
    try:
        lease.write("INSERT INTO meta (key, value) VALUES ('test/w', " + mark + ") "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (line.strip(),))
        print("wrote", flush=True)
    except LeaseLost as e:
        print("lost", e.term, lease.lost.is_set(), lease.lost_reason, flush=True)
"""


def _register(store: coord.Store, id: str | None = None) -> coord.Instance:
    return coord.register(store, id, app="t", handle_signals=False)


# -- in-process: the API ---------------------------------------------------------------------


def test_acquire_observe_release(store: coord.Store) -> None:
    a, b = _register(store, "a"), _register(store, "b")
    assert get_lease(store, "app/x").holder is None
    lease = acquire(a, "app/x", timeout=0)
    info = get_lease(store, "app/x")
    assert (info.holder, info.term, info.alive) == ("a", lease.term, True)
    assert 0 < (info.expires_in or 0) <= store.config.lease_ttl
    assert info.to_json()["instance_id"] == "a"
    assert try_acquire(b, "app/x") is None
    assert try_acquire(a, "app/x") is None  # not re-entrant
    with pytest.raises(LeaseNotAcquired) as e:
        acquire(b, "app/x", timeout=0)
    assert e.value.exit_code == 75 and e.value.holder == "a"
    assert lease.held and lease.renew()
    lease.release()
    assert not lease.held and lease.lost.is_set() and lease.lost_reason == "released"
    assert get_lease(store, "app/x").holder is None
    with pytest.raises(LeaseLost):
        lease.write("SELECT 1")
    again = acquire(b, "app/x", timeout=0)
    assert again.term > lease.term
    assert [i.name for i in list_leases(store)] == ["app/x"]
    assert [i.holder for i in list_leases(store, held_only=True)] == ["b"]
    again.release()
    assert list_leases(store, held_only=True) == []
    terms = engine_sql.rows(store, "SELECT term, holder_id, reason FROM lease_terms ORDER BY term")
    assert [(t["holder_id"], t["reason"]) for t in terms] == [("a", "released"), ("b", "released")]
    assert check(store) == []


def test_forgetting_a_free_lease_deletes_its_row_and_history_and_terms_still_rise(
        store: coord.Store) -> None:
    a = _register(store, "a")
    lease = acquire(a, "app/f", timeout=0)
    assert not store.backend.leases.forget("app/f")  # held: nothing deleted
    assert [i.name for i in list_leases(store)] == ["app/f"]
    lease.release()
    assert store.backend.leases.forget("app/f")
    assert list_leases(store) == []
    assert engine_sql.rows(store, "SELECT term FROM lease_terms WHERE name = ?", ("app/f",)) == []
    assert not store.backend.leases.forget("app/f")  # none left
    again = acquire(a, "app/f", timeout=0)
    assert again.term > lease.term
    again.release()


def test_invalid_names_and_ttl(store: coord.Store) -> None:
    a = _register(store)
    with pytest.raises(InvalidArgument):
        try_acquire(a, "")
    with pytest.raises(InvalidArgument):
        try_acquire(a, "x", ttl=0)


def test_fenced_write_runs_only_in_the_current_term(store: coord.Store) -> None:
    a, b = _register(store, "a"), _register(store, "b")
    la = acquire(a, "f")
    rows = la.write(UPSERT.format("'t/f'", "'a'") + " RETURNING value")
    assert rows == [{"value": "a"}]
    la.release()
    lb = acquire(b, "f")
    with pytest.raises(LeaseLost) as e:
        fenced_write(store, "f", la.term, UPSERT.format("'t/f'", "'stale'"))
    assert (e.value.name, e.value.term, e.value.exit_code) == ("f", la.term, 75)
    assert engine_sql.value(store, "SELECT value FROM meta WHERE key = 't/f'") == "a"
    lb.write_many([(UPSERT.format("'t/f'", "'b'"), ()), (UPSERT.format("'t/g'", "'b'"), ())])
    assert engine_sql.value(store, "SELECT value FROM meta WHERE key = 't/g'") == "b"
    lb.release()


def test_a_release_nudges_the_first_waiter_even_at_an_abstract_socket(
        store: coord.Store, tmp_path: Path) -> None:
    # A store deep in the tree gives its instances abstract sockets (a file path would be
    # too long for an address); the waiter's link then names the socket instead of leading
    # to it, and the nudge must still arrive. On SQLite both kinds are tried; the test's
    # own path is long enough that the waiter's link could not be an address itself.
    stores = [store]
    if store.engine == "sqlite":
        deep = tmp_path.joinpath(*["d" * 40] * 3)
        deep.mkdir(parents=True, mode=0o700)
        stores.append(coord.Store(deep / "coord.db"))
    try:
        kinds = set()
        for db in stores:
            inst = coord.register(db, "waiting", app="test")
            kinds.add(nudge.is_abstract(inst.nudge_path))
            path = add_waiter(inst, "nudged")
            assert path is not None
            while select.select([inst.sock], [], [], 0)[0]:
                inst.sock.recv(64)  # what registering left
            nudge_waiters(db, "nudged")
            assert select.select([inst.sock], [], [], 2)[0], inst.nudge_path
            remove_waiter(path)
            inst.close()
        assert True in kinds
    finally:
        for db in stores[1:]:
            db.close()


def test_context_manager_and_waiting_candidate_wakes_on_release(store: coord.Store) -> None:
    a, b = _register(store, "a"), _register(store, "b")
    got: list[Any] = []
    with acquire(a, "ctx") as lease:
        t = threading.Thread(target=lambda: got.append(acquire(b, "ctx", timeout=30)))
        t.start()
        wait_until(lambda: list((store.side_dir("waiters")).iterdir()))  # b is waiting
        assert lease.held
        if not nudge.is_abstract(b.nudge_path):
            # The waiter's entry leads to b's socket (a release nudges through it) by a
            # short relative link: no disk block to free when it is removed at takeover.
            [entry] = store.side_dir("waiters").iterdir()
            target = os.readlink(entry)
            assert not os.path.isabs(target) and len(target) < 60, target
            assert os.path.samefile(entry, b.nudge_path)
    t.join(30)
    assert got and got[0].term > lease.term and got[0].held
    assert not list(store.side_dir("waiters").iterdir())  # the waiter cleaned up
    got[0].release()


def test_closing_the_instance_releases_and_marks_lost(store: coord.Store) -> None:
    a, b = _register(store, "a"), _register(store, "b")
    seen: list[str] = []
    lease = acquire(a, "c", on_lost=lambda ls: seen.append(ls.lost_reason or ""))
    a.close()
    wait_until(lambda: seen)
    assert not lease.held and seen == ["instance closed"]
    assert try_acquire(b, "c") is not None


def test_candidate_recontends_and_stops(fast_store: coord.Store) -> None:
    a, b = _register(fast_store, "a"), _register(fast_store, "b")
    elected: list[int] = []
    lost: list[int] = []
    ca = Candidate(a, "cand", on_elected=lambda ls: elected.append(ls.term),
                   on_lost=lambda ls: lost.append(ls.term)).start()
    first = ca.wait_leader(10)
    assert first is not None and ca.is_leader
    with Candidate(b, "cand") as cb:
        assert not cb.is_leader
        # Someone takes a's term away (as a TTL takeover would): a loses, b gets it, a waits.
        engine_sql.execute(fast_store, "UPDATE leases SET expires_mono = 0 WHERE name = 'cand'")
        wait_until(lambda: lost == [first.term])
        lb = cb.wait_leader(10)
        assert lb is not None and lb.term > first.term
        wait_until(lambda: not ca.is_leader)
    # b stopped and released: a re-contends and wins a new term.
    wait_until(lambda: ca.is_leader and len(elected) == 2, timeout=10)
    assert elected[1] > lb.term
    ca.stop()
    assert get_lease(fast_store, "cand").holder is None


def test_renewal_keeps_a_short_lease(fast_store: coord.Store) -> None:
    a = _register(fast_store, "a")
    lease = acquire(a, "short", ttl=0.6)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:  # > 3 TTLs: only renewals keep it
        assert lease.held
        time.sleep(0.05)
    assert get_lease(fast_store, "short").holder == "a"
    lease.release()


def test_step_down_at_the_renew_deadline(fast_store: coord.Store) -> None:
    a = _register(fast_store, "a")
    lease = acquire(a, "deadline", renew=False)  # nobody renews it
    assert lease.deadline_span < lease.ttl
    wait_until(lambda: not lease.held, timeout=5)
    with pytest.raises(LeaseLost):
        lease.check()
    assert lease.lost_reason == "renew deadline passed"
    # It stepped down: free at once, well before its TTL.
    assert get_lease(fast_store, "deadline").holder is None
    reason = engine_sql.value(fast_store, "SELECT reason FROM lease_terms WHERE name = 'deadline'")
    assert reason == "stepped down"


def test_expired_lease_is_taken_over(fast_store: coord.Store) -> None:
    a, b = _register(fast_store, "a"), _register(fast_store, "b")
    la = acquire(a, "exp", renew=False, ttl=0.3)
    lb = acquire(b, "exp", timeout=5)  # waits the TTL out (not the renew deadline)
    assert lb.term > la.term
    assert not la.renew() and la.lost.is_set()
    lb.release()


# -- processes: failover --------------------------------------------------------------------


def _parse_acquired(line: str) -> tuple[int, float, int]:
    _, term, t, pid = line.split()
    return int(term), float(t), int(pid)


def test_five_candidates_thirty_kills(db_path: Path, tmp_path: Path,
                                      children: list[subprocess.Popen[Any]]) -> None:
    """The holder is SIGKILLed 30 times: every term has exactly one holder, terms strictly
    increase, and no two holders' intervals overlap."""
    store = coord.Store(db_path)
    procs: dict[int, subprocess.Popen[str]] = {}
    errors = tmp_path / "candidates.err"

    def spawn() -> None:
        with open(errors, "a") as err:
            p = spawn_python(CANDIDATE, "chaos/L", db=db_path, stderr=err)
        children.append(p)
        procs[p.pid] = p

    def next_holder(last: int) -> Any:
        try:
            return wait_until(lambda: (i := get_lease(store, "chaos/L")).alive
                              and (i.term or 0) > last and i,
                              timeout=max(1.0, deadline - time.monotonic()))
        except AssertionError:
            raise AssertionError(f"no new holder after term {last}; {get_lease(store, 'chaos/L')}; "
                                 f"candidates' stderr: {errors.read_text()[-3000:]}") from None

    for _ in range(5):
        spawn()
    held: list[tuple[int, float, int, float]] = []  # term, acquired, pid, killed
    last = 0
    deadline = time.monotonic() + 90
    for _ in range(30):
        info = next_holder(last)
        p = procs.pop(info.holder_pid)
        term, acquired_at, pid = _parse_acquired(wait_line(p, "acquired"))
        killed_at = time.monotonic()
        p.kill()
        p.wait()
        spawn()
        assert p.stdout is not None
        assert "acquired" not in p.stdout.read()
        assert (term, pid) == (info.term, p.pid)
        held.append((term, acquired_at, pid, killed_at))
        last = term
    # The survivors: at most one of them holds a term, the newest.
    final = next_holder(last)
    survivors = [_parse_acquired(wait_line(procs[final.holder_pid], "acquired"))]
    # The others first (SIGKILL: they cannot take over any more), then the holder.
    for p in sorted(procs.values(), key=lambda p: p.pid == final.holder_pid):
        p.kill()
        p.wait()
        assert p.stdout is not None
        survivors += [_parse_acquired(ln) for ln in p.stdout.read().splitlines()
                      if ln.startswith("acquired")]
    assert [s[0] for s in survivors] == [final.term]
    terms = [h[0] for h in held] + [final.term]
    assert terms == sorted(terms) and len(set(terms)) == len(terms)
    for prev, nxt in zip(held, held[1:] + [(final.term, survivors[0][1], 0, 0.0)], strict=True):
        assert nxt[1] > prev[3], "a new holder started before the old one was killed"
    # The history agrees: one row per term, each with one holder; all released by now.
    coord.reap(store)
    rows = engine_sql.rows(store, "SELECT term, holder_id, released_at FROM lease_terms "
                      "WHERE name = 'chaos/L' ORDER BY term")
    assert [r["term"] for r in rows] == terms
    assert all(r["released_at"] is not None for r in rows)
    assert [p for p in check(store, strict=True) if p.check != "instances"] == []
    store.close()


# A holder with something the death rule releases: an ephemeral key.
KEYED_HOLDER = """
import os, sys, time, coord
from coord import kv
from coord.leases import acquire
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, app="keyed")
kv.set(store, "keyed/" + inst.id, 1, owner=inst)
acquire(inst, sys.argv[1])
print("acquired", inst.id, flush=True)
while True:
    time.sleep(1)
"""


def test_takeover_buries_the_dead_holder_after_returning(
        db_path: Path, children: list[subprocess.Popen[Any]]) -> None:
    """acquire() returns once the lease is taken from a SIGKILLed holder; the death rule is
    applied to that holder by the new holder itself (no reaper runs here), right after the
    return on both engines: its ephemeral key goes, its row leaves the living, and only one
    holder is on record."""
    store = coord.Store(db_path)
    me = _register(store)
    p = spawn_python(KEYED_HOLDER, "bury/L", db=db_path)
    children.append(p)
    dead_id = wait_line(p, "acquired").split()[1]
    waiting = threading.Thread(target=lambda: got.append(acquire(me, "bury/L", timeout=60)))
    got: list[Any] = []
    waiting.start()
    p.kill()
    p.wait()
    waiting.join(60)
    assert got and got[0].held and get_lease(store, "bury/L").holder == me.id
    wait_until(lambda: engine_sql.value(store, "SELECT count(*) FROM kv WHERE key = ?",
                                        (f"keyed/{dead_id}",)) == 0)
    wait_until(lambda: not engine_sql.rows(
        store, "SELECT 1 FROM instances WHERE id = ? AND status = 'alive'", (dead_id,)))
    got[0].release()
    me.close()
    store.close()


# A holder of two leases and an ephemeral key.
TWO_LEASE_HOLDER = """
import os, sys, time, coord
from coord import kv
from coord.leases import acquire
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, app="keyed")
kv.set(store, "keyed/" + inst.id, 1, owner=inst)
a, b = acquire(inst, sys.argv[1]), acquire(inst, sys.argv[2])
print("acquired", inst.id, inst.incarnation, a.term, flush=True)
while True:
    time.sleep(1)
"""


def test_a_takeover_leaves_the_burial_to_a_reaper_when_the_new_holder_never_buries(
        db_path: Path, children: list[subprocess.Popen[Any]]) -> None:
    """The takeover rule only proves the holder dead and takes the lease in a higher term:
    the rest of the death rule is not part of it. When the new holder never applies it (it
    died first: here nobody calls it), the dead holder's other lease reads free, its key
    stays until a reaper buries it, and the reaper's burial leaves the new term alone. A
    candidate handing in its look at that dead holder after the takeover takes nothing."""
    store = coord.Store(db_path)
    me, other = _register(store), _register(store)
    p = spawn_python(TWO_LEASE_HOLDER, "bury2/L", "bury2/M", db=db_path)
    children.append(p)
    _, dead_id, dead_inc, old_term = wait_line(p, "acquired").split()
    dead_row = store.backend.instances.get((dead_id, int(dead_inc)))
    assert dead_row is not None
    p.kill()
    p.wait()
    taken = store.backend.leases.take((me.id, me.incarnation), "bury2/L", 30.0)
    assert isinstance(taken, LeaseTaken)
    assert taken.term > int(old_term) and taken.previous_holder == dead_id
    assert taken.dead == (dead_id, int(dead_inc), "died")
    # Not buried by the takeover: still on record as alive, its key kept, lease M recorded.
    key = f"keyed/{dead_id}"
    assert engine_sql.value(store, "SELECT count(*) FROM kv WHERE key = ?", (key,)) == 1
    assert engine_sql.rows(store, "SELECT 1 FROM instances WHERE id = ? AND status = 'alive'",
                           (dead_id,))
    assert store.backend.leases.get("bury2/M").holder == (dead_id, int(dead_inc))
    assert get_lease(store, "bury2/M").holder is None  # readers see it free already
    # A look taken before the takeover proves the death again, but the term moved on.
    again = store.backend.leases.take((other.id, other.incarnation), "bury2/L", 30.0,
                                      (int(old_term), dict(dead_row)))
    assert again == me.id
    reap(store, trees=False)
    assert engine_sql.value(store, "SELECT count(*) FROM kv WHERE key = ?", (key,)) == 0
    assert not engine_sql.rows(
        store, "SELECT 1 FROM instances WHERE id = ? AND status = 'alive'", (dead_id,))
    assert store.backend.leases.get("bury2/M").holder is None
    held = store.backend.leases.get("bury2/L")
    assert held.holder == (me.id, me.incarnation) and held.term == taken.term
    me.close()
    other.close()
    store.close()


def test_sigstopped_holder_loses_after_ttl_not_before(
    db_path: Path, children: list[subprocess.Popen[Any]]
) -> None:
    env = {"COORD_LEASE_TTL": "1.5", "COORD_RENEW_DEADLINE": "1.0", "COORD_HEARTBEAT": "0.3",
           "COORD_INSTANCE_TTL": "60"}
    store = coord.Store(db_path)
    holder = spawn_python(DRIVEN_HOLDER, "stop/L", db=db_path, env=env, stdin=subprocess.PIPE)
    children.append(holder)
    old_term = int(wait_line(holder, "acquired").split()[1])
    cand = spawn_python(CANDIDATE, "stop/L", db=db_path, env=env)
    children.append(cand)
    wait_line(cand, "ready")
    time.sleep(0.2)  # the candidate is waiting
    stop_outside_a_write(store, holder)  # stopped mid-write, it would block every writer
    try:
        # Its expiry on this process's CLOCK_MONOTONIC (the engine's clock may be another's):
        # read before the lease, so the true expiry is no earlier.
        now = time.monotonic()
        expires = now + (get_lease(store, "stop/L").expires_in or 0)
        # Before its TTL, nobody takes it: the holder is alive, only paused.
        while time.monotonic() < expires - 0.2:
            assert get_lease(store, "stop/L").term == old_term
            time.sleep(0.05)
        new_term, acquired_at, _ = _parse_acquired(wait_line(cand, "acquired", timeout=30))
        assert new_term > old_term
        assert acquired_at >= expires
        assert engine_sql.value(store, "SELECT reason FROM lease_terms WHERE name = 'stop/L' "
                                "AND term = ?", (old_term,)) == "expired"
    finally:
        holder.send_signal(signal.SIGCONT)
    assert holder.stdin is not None
    holder.stdin.write("after\n")
    holder.stdin.flush()
    reply = wait_line(holder, "lost").split()
    assert reply[1:3] == [str(old_term), "True"]
    assert engine_sql.value(store, "SELECT value FROM meta WHERE key = 'test/w'") is None
    store.close()


def test_reaper_is_elected_among_live_instances(
    db_path: Path, children: list[subprocess.Popen[Any]]
) -> None:
    code = """
import os, time, coord
from coord.leases import serve_reaper
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, app="r")
serve_reaper(inst, every=0.2)
print("ready", inst.id, flush=True)
while True:
    time.sleep(1)
"""
    env = {"COORD_HEARTBEAT": "0.1", "COORD_INSTANCE_TTL": "5", "COORD_LEASE_TTL": "1.5"}
    store = coord.Store(db_path)
    ps = [spawn_python(code, db=db_path, env=env) for _ in range(3)]
    children.extend(ps)
    for p in ps:
        wait_line(p)
    first = wait_until(lambda: get_lease(store, REAPER_LEASE).alive and get_lease(store, REAPER_LEASE))
    victim = next(p for p in ps if p.pid == first.holder_pid)
    victim.kill()
    victim.wait()
    second = wait_until(lambda: (i := get_lease(store, REAPER_LEASE)).alive
                        and (i.term or 0) > (first.term or 0) and i)
    assert second.holder != first.holder
    # A dead instance is buried by the elected reaper (no cron, no manual reap).
    other = next(p for p in ps if p.poll() is None and p.pid != second.holder_pid)
    other.kill()
    other.wait()
    wait_until(lambda: engine_sql.value(store, "SELECT count(*) FROM instances") == 1, timeout=20)
    store.close()


def test_reaper_duty_in_process(fast_store: coord.Store) -> None:
    a = _register(fast_store, "a")
    serve_reaper(a, every=0.1)
    serve_reaper(a, every=0.1)  # once only
    assert len([h for h in a.hooks if type(h).__name__ == "_ReaperDuty"]) == 1
    wait_until(lambda: get_lease(fast_store, REAPER_LEASE).holder == "a", timeout=10)
    assert os.getpid() == get_lease(fast_store, REAPER_LEASE).holder_pid


def test_checker_sees_broken_lease_rules(store: coord.Store) -> None:
    a = _register(store, "a")
    lease = acquire(a, "chk", renew=False)
    assert check(store) == []
    engine_sql.execute(store, "UPDATE lease_terms SET released_at = 1 WHERE name = 'chk'")
    assert any("history row is not open" in p.detail for p in check(store))
    engine_sql.execute(store, "UPDATE lease_terms SET released_at = NULL WHERE name = 'chk'")
    engine_sql.execute(
        store, "INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at) "
        "VALUES ('other', ?, 'x', 1, 0)", (lease.term,))
    details = [p.detail for p in check(store)]
    assert any("handed out 2 times" in d for d in details)
    assert any("'other'" in d and "open but not held" in d for d in details)
    engine_sql.execute(store, "DELETE FROM lease_terms WHERE name = 'other'")
    engine_sql.execute(store, "UPDATE leases SET expires_mono = 0 WHERE name = 'chk'")
    assert check(store) == []  # past its TTL is pending, not broken
    assert any("past its TTL" in p.detail for p in check(store, strict=True))
    lease.release()


def test_a_closed_instance_cannot_acquire(store: coord.Store) -> None:
    from coord.errors import NotRegistered

    a = _register(store, "a")
    a.close()
    with pytest.raises(NotRegistered):
        try_acquire(a, "closed")
    with pytest.raises(NotRegistered):
        acquire(a, "closed", timeout=5)


def test_a_stuck_instance_stops_renewing_and_steps_down(fast_store: coord.Store) -> None:
    a = coord.register(fast_store, "w", app="t", watchdog=0.2, handle_signals=False)
    lease = acquire(a, "stuck")  # the app never calls a.beat(): stuck after 0.2 s
    wait_until(lambda: get_lease(fast_store, "stuck").holder is None, timeout=10)
    assert not lease.held and lease.lost_reason == "renew deadline passed"


def _block_writes(store: coord.Store, name: str) -> Callable[[], None]:
    """Make every renewal of lease ``name`` wait (as for a server that stopped answering):
    SQLite's write lock, or the lease's row locked on PostgreSQL. Returns the unblocking."""
    if store.engine == "postgresql":
        c = store.backend.db.connect()  # type: ignore[attr-defined]
        c.execute("BEGIN")
        c.execute("SELECT * FROM leases WHERE name = %s FOR UPDATE", (name,))

        def unblock_pg() -> None:
            c.execute("ROLLBACK")
            c.close()

        return unblock_pg
    raw = store.raw_connection()
    raw.execute("BEGIN IMMEDIATE")

    def unblock() -> None:
        raw.execute("ROLLBACK")
        raw.close()

    return unblock


def test_a_renewal_stuck_in_the_driver_does_not_delay_the_step_down(
        fast_store: coord.Store) -> None:
    a = _register(fast_store, "a")
    seen: list[float] = []
    lease = acquire(a, "stuck/renew", on_lost=lambda ls: seen.append(time.monotonic()))
    t0 = time.monotonic()
    unblock = _block_writes(fast_store, "stuck/renew")
    try:
        # The renewing thread waits on the lock (for SQLite's busy timeout, 5 s; on
        # PostgreSQL until unblocked); the deadline still holds (a margin for a busy machine).
        assert lease.lost.wait(timeout=lease.deadline_span + 4.0)
        wait_until(lambda: seen, timeout=2)  # the callbacks run just after the event is set
        assert seen[0] - t0 <= lease.deadline_span + 2.0
        assert lease.lost_reason == "renew deadline passed" and not lease.held
    finally:
        unblock()
    # Once the store answers again, the term is freed as a step-down.
    wait_until(lambda: get_lease(fast_store, "stuck/renew").holder is None, timeout=20)
    wait_until(lambda: engine_sql.value(
        fast_store, "SELECT reason FROM lease_terms WHERE name = 'stuck/renew'") is not None,
        timeout=20)
    assert engine_sql.value(fast_store, "SELECT reason FROM lease_terms "
                            "WHERE name = 'stuck/renew'") in ("stepped down", "expired")


def test_racing_first_takes_of_a_new_lease_have_one_winner(db_path: Path,
                                                           store: coord.Store) -> None:
    # Takers of a lease nobody ever held, all at once, each its own store and instance:
    # one term, one holder, one history row.
    n = 6
    start = threading.Barrier(n)
    won: list[int] = []
    lost: list[str] = []
    errors: list[BaseException] = []

    def take(i: int) -> None:
        s = coord.Store(db_path)
        inst = None
        try:
            inst = coord.register(s, f"racer-{i}", app="t", heartbeat=False,
                                  handle_signals=False)
            start.wait(10)
            lease = try_acquire(inst, "race/new", renew=False)
            if lease is None:
                lost.append(inst.id)
            else:
                won.append(lease.term)
            start.wait(10)  # nobody leaves (freeing what it holds) before all have tried
        except BaseException as e:  # reported below: a thread's failure must fail the test
            errors.append(e)
        finally:
            if inst is not None:
                inst.close()
            s.close()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(won) == 1 and len(lost) == n - 1, (won, lost)
    rows = engine_sql.rows(store, "SELECT term FROM lease_terms WHERE name = 'race/new'")
    assert [r["term"] for r in rows] == won


def test_a_step_down_that_must_end_work_first_frees_the_term_at_release(
        fast_store: coord.Store) -> None:
    # coord elect's way: the term stays the holder's in the store (no other holder before
    # its TTL) until what the lease guarded has ended and release() frees it.
    a = _register(fast_store, "a")
    lease = acquire(a, "deferred", renew=False)
    lease.free_at_step_down = False
    wait_until(lambda: not lease.held, timeout=5)
    with pytest.raises(LeaseLost):
        lease.check()
    assert lease.lost_reason == "renew deadline passed"
    rec = fast_store.backend.leases.get("deferred")
    assert rec is not None and rec.holder == (a.id, a.incarnation) and rec.term == lease.term
    lease.release()
    assert get_lease(fast_store, "deferred").holder is None
    assert engine_sql.value(fast_store, "SELECT reason FROM lease_terms "
                            "WHERE name = 'deferred'") == "stepped down"


def test_a_lease_steps_down_when_its_instance_stops_heartbeating(
        fast_store: coord.Store) -> None:
    # Others may bury an instance as hung a TTL after its last heartbeat, whatever its
    # leases' expiry: its leases step down by the instance's renew deadline too, even while
    # their own renewals still get through.
    a = _register(fast_store, "a")
    lease = acquire(a, "hb/first")
    assert a._thread is not None
    a._stop.set()  # the heartbeat stops (as when its beats no longer get through)
    a._thread.join(timeout=5)
    t0 = time.monotonic()
    wait_until(lambda: not lease.held, timeout=5)
    span = fast_store.config.renew_deadline_for(a.ttl)
    assert time.monotonic() - t0 <= span + 0.5
    # `held` is False from the deadline on; the keeper thread records why just after.
    assert lease.lost.wait(timeout=5)
    assert lease.lost_reason == "renew deadline passed"
    wait_until(lambda: get_lease(fast_store, "hb/first").holder is None, timeout=5)
