"""Queues: order, delay, dedupe, batches, depth, ack/fail/extend/release/cancel, dead letters,
leases, isolation, adoption, and the death rule for claims.

Workers that die are real processes killed with SIGKILL; a hung worker is a real SIGSTOP.
Expiry is tested with an injected clock, never by sleeping through a lease.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ManualClock,
    invariants,
    reg,
    spawn_python,
    stop_outside_a_write,
    wait_line,
    wait_until,
)

import coord
from coord import queues
from coord.errors import (
    ClaimLost,
    InvalidArgument,
    NotFound,
    NotRegistered,
    PayloadError,
    PermissionDenied,
    QueueFull,
)

pytestmark = pytest.mark.contract


def reap(store: coord.Store) -> coord.reaper.ReapReport:
    return coord.reap(store)


def queue_problems(store: coord.Store) -> list[str]:
    """The queue checks of ``coord.check`` (strict: pending ones too), which are exactly
    ``queues.problems``: on every engine, whatever else its checker covers yet."""
    return [detail for detail, _ in queues.problems(store)]


# A worker in its own process. argv: id, queue, lease. Claims one job (waiting up to 20 s),
# prints "claimed ID TOKEN", then for every line on stdin tries to ack and prints "acked"
# or "lost".
CLAIMER = """
import os, sys, coord
from coord import queues
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="test")
job = queues.claim(store, sys.argv[2], inst, lease=float(sys.argv[3]), timeout=20)
print("claimed", job.id, job.token, flush=True)
for line in sys.stdin:
    try:
        queues.ack(store, job.token)
        print("acked", flush=True)
    except coord.ClaimLost:
        print("lost", flush=True)
"""


def start_claimer(db: Path, id: str, queue: str, lease: float) -> subprocess.Popen[str]:
    return spawn_python(CLAIMER, id, queue, str(lease), db=db, stdin=subprocess.PIPE)


# -- order, delay, dedupe, batches, depth -------------------------------------------------


def test_order_is_priority_then_fifo(cstore: coord.Store) -> None:
    a = reg(cstore, "a")
    ids = [queues.put(cstore, "q", {"n": n}, priority=p) for n, p in
           enumerate([0, 5, 0, 9, 5, -1, 9])]
    got = [queues.claim(cstore, "q", a) for _ in ids]
    assert [j.id for j in got if j] == [ids[3], ids[6], ids[1], ids[4], ids[0], ids[2], ids[5]]
    assert queues.claim(cstore, "q", a) is None
    # ls shows the same order
    assert [j.id for j in queues.list_jobs(cstore, "q", state="claimed")] == [j.id for j in got if j]


def test_delayed_jobs_keep_their_place(cstore: coord.Store, clock: ManualClock) -> None:
    a = reg(cstore, "a")
    first = queues.put(cstore, "q", "first", delay=10)
    second = queues.put(cstore, "q", "second")
    assert [j.state for j in queues.list_jobs(cstore, "q")] == ["delayed", "ready"]
    st = queues.stats(cstore, "q")[0]
    assert (st.ready, st.delayed) == (1, 1)
    job = queues.claim(cstore, "q", a)
    assert job is not None and job.id == second
    assert queues.claim(cstore, "q", a) is None
    clock.now += 10
    job = queues.claim(cstore, "q", a)
    assert job is not None and job.id == first and job.payload == "first"


def test_dedupe_key_holds_until_purged(cstore: coord.Store) -> None:
    a = reg(cstore, "a")
    j1 = queues.put(cstore, "q", {"v": 1}, dedupe_key="k")
    assert queues.put(cstore, "q", {"v": 2}, dedupe_key="k") == j1
    assert queues.put(cstore, "other", {"v": 3}, dedupe_key="k") != j1  # per queue
    job = queues.claim(cstore, "q", a)
    assert job is not None
    queues.ack(cstore, job)
    assert queues.put(cstore, "q", {"v": 4}, dedupe_key="k") == j1  # done, still there
    assert queues.get_job(cstore, j1).payload == {"v": 1}
    assert queues.purge(cstore, "q") == 1
    j2 = queues.put(cstore, "q", {"v": 5}, dedupe_key="k")
    assert j2 != j1 and queues.get_job(cstore, j2).payload == {"v": 5}


def test_batch_put_is_all_or_nothing(cstore: coord.Store) -> None:
    ids = queues.put_many(cstore, "q", [{"n": 1}, queues.NewJob({"n": 2}, priority=3,
                                                                 dedupe_key="d")])
    assert len(ids) == 2
    with pytest.raises(PayloadError):
        queues.put_many(cstore, "q", [{"n": 3}, float("nan")])
    with pytest.raises(InvalidArgument):
        queues.put_many(cstore, "q", [{"n": 3}, queues.NewJob({"n": 4}, max_attempts=0)])
    assert len(queues.list_jobs(cstore, "q", state="all")) == 2
    # a repeat inside a batch returns the existing id
    again = queues.put_many(cstore, "q", [queues.NewJob({"x": 1}, dedupe_key="d"), {"n": 5}])
    assert again[0] == ids[1]
    assert len(queues.list_jobs(cstore, "q", state="all")) == 3


def test_max_depth(cstore: coord.Store) -> None:
    a = reg(cstore, "a")
    queues.create_queue(cstore, "small", max_depth=2)
    queues.put(cstore, "small", 1, dedupe_key="one")
    queues.put(cstore, "small", 2)
    with pytest.raises(QueueFull) as e:
        queues.put(cstore, "small", 3)
    assert e.value.depth == 2 and "full" in str(e.value)
    # a dedupe repeat is not a new job: allowed when full
    assert queues.put(cstore, "small", 1, dedupe_key="one") == 1
    # a batch that would overflow adds nothing
    job = queues.claim(cstore, "small", a)
    assert job is not None
    queues.ack(cstore, job)
    with pytest.raises(QueueFull):
        queues.put_many(cstore, "small", [3, 4])
    assert queues.stats(cstore, "small")[0].ready == 1
    queues.put(cstore, "small", 3)


def test_put_sees_a_new_max_depth_and_a_recreated_queue(cstore: coord.Store) -> None:
    queues.put(cstore, "q", 1)
    queues.put(cstore, "q", 2)  # this process now knows "q" has no max depth
    queues.create_queue(cstore, "q", max_depth=2)
    with pytest.raises(QueueFull):
        queues.put(cstore, "q", 3)
    queues.purge(cstore, "q", everything=True)
    queues.put(cstore, "q", 4)  # created again, shared
    queues.put(cstore, "q", 5)
    queues.purge(cstore, "q", everything=True)
    queues.put(cstore, "q", 6)  # gone while known unbounded: the foreign key tells
    assert [j.payload for j in queues.list_jobs(cstore, "q")] == [6]


def test_payload_is_validated(cstore: coord.Store) -> None:
    with pytest.raises(PayloadError):
        queues.put(cstore, "q", {1, 2})
    with pytest.raises(InvalidArgument):
        queues.put(cstore, "", 1)
    with pytest.raises(InvalidArgument):
        queues.put(cstore, "q", 1, delay=-1)


# -- ack, fail, extend, release, cancel ---------------------------------------------------


def test_ack_keeps_result_and_refuses_a_second_ack(cstore: coord.Store) -> None:
    a = reg(cstore, "a")
    queues.put(cstore, "q", {"task": 1})
    job = queues.claim(cstore, "q", a)
    assert job is not None and job.token and job.state == "claimed" and job.attempts == 1
    queues.ack(cstore, job, result={"rows": 3})
    done = queues.get_job(cstore, job.id)
    assert done.state == "done" and done.result == {"rows": 3} and done.instance_id == "a"
    with pytest.raises(ClaimLost):
        queues.ack(cstore, job)
    for op in (lambda: queues.fail(cstore, job, "x"), lambda: queues.extend(cstore, job),
               lambda: queues.release(cstore, job)):
        with pytest.raises(ClaimLost):
            op()
    with pytest.raises(ClaimLost):
        queues.ack(cstore, "no-such-token")
    queues.put(cstore, "q", 1)
    j2 = queues.claim(cstore, "q", a)
    assert j2 is not None
    with pytest.raises(PayloadError):
        queues.ack(cstore, j2, result="x" * (queues.RESULT_LIMIT + 1))
    queues.ack(cstore, j2)


def test_fail_backs_off_then_dead_letters(cstore: coord.Store, clock: ManualClock) -> None:
    a = reg(cstore, "a")
    jid = queues.put(cstore, "q", "flaky", max_attempts=3)
    delays = []
    for attempt in (1, 2):
        job = queues.claim(cstore, "q", a)
        assert job is not None and job.attempts == attempt
        assert queues.fail(cstore, job, f"boom {attempt}") == "ready"
        j = queues.get_job(cstore, jid)
        assert j.state == "delayed" and j.last_error == f"boom {attempt}"
        base = queues.BACKOFF_BASE * 2 ** (attempt - 1)
        assert 0.5 * base <= j.available_in <= base
        delays.append(j.available_in)
        assert queues.claim(cstore, "q", a) is None
        clock.now += j.available_in
    job = queues.claim(cstore, "q", a)
    assert job is not None and job.attempts == 3
    assert queues.fail(cstore, job, "boom 3") == "dead"
    dead = queues.get_job(cstore, jid)
    assert dead.state == "dead" and dead.last_error == "boom 3" and dead.finished_at
    assert [j.id for j in queues.list_jobs(cstore, "q", state="dead")] == [jid]
    kinds = [e["kind"] for e in coord.events.list_events(cstore)]
    assert "job dead-lettered" in kinds
    # requeue gives it fresh attempts
    queues.requeue(cstore, jid)
    again = queues.claim(cstore, "q", a)
    assert again is not None and again.id == jid and again.attempts == 1
    queues.fail(cstore, again, "now", retry_in=0)
    assert queues.get_job(cstore, jid).state == "ready"
    assert queue_problems(cstore) == []


def test_requeue_all_dead_of_a_queue(cstore: coord.Store) -> None:
    a = reg(cstore, "a")
    for n in range(3):
        queues.put(cstore, "q", n, max_attempts=1)
    for _ in range(3):
        job = queues.claim(cstore, "q", a)
        assert job is not None
        assert queues.fail(cstore, job, "no") == "dead"
    assert queues.requeue_dead(cstore, "q") == 3
    assert queues.stats(cstore, "q")[0].ready == 3
    with pytest.raises(InvalidArgument):
        queues.requeue(cstore, 1)  # ready, not dead
    with pytest.raises(NotFound):
        queues.requeue(cstore, 999)


def test_expired_lease_loses_the_claim(cstore: coord.Store, clock: ManualClock) -> None:
    a, b = reg(cstore, "a"), reg(cstore, "b")
    jid = queues.put(cstore, "q", "slow")
    job = queues.claim(cstore, "q", a, lease=10)
    assert job is not None and job.expires_in == 10
    clock.now += 5
    assert queues.extend(cstore, job, 10) == 10
    clock.now += 9  # still within the extended lease
    assert queues.claim(cstore, "q", b) is None
    clock.now += 2  # now past it
    assert queue_problems(cstore) == [f"job {jid} is claimed past its lease, awaiting release"]
    with pytest.raises(ClaimLost):
        queues.ack(cstore, job)  # the hung worker resumes: refused, and the job goes back
    j = queues.get_job(cstore, jid)
    assert j.state == "ready" and j.attempts == 1 and j.last_error == "claim lease expired"
    job2 = queues.claim(cstore, "q", b)
    assert job2 is not None and job2.attempts == 2
    with pytest.raises(ClaimLost):
        queues.ack(cstore, job)
    queues.ack(cstore, job2)


def test_expired_claims_are_released_by_the_next_claimer(cstore: coord.Store,
                                                         clock: ManualClock) -> None:
    a, b = reg(cstore, "a"), reg(cstore, "b")
    jid = queues.put(cstore, "q", "x", max_attempts=2)
    assert queues.claim(cstore, "q", a, lease=5) is not None
    clock.now += 6
    job = queues.claim(cstore, "q", b, lease=5)
    assert job is not None and job.id == jid and job.attempts == 2
    clock.now += 6
    # last attempt expired: the reaper dead-letters it
    assert reap(cstore).claims_released == 1
    assert queues.get_job(cstore, jid).state == "dead"


def test_release_gives_the_attempt_back(cstore: coord.Store) -> None:
    a, b = reg(cstore, "a"), reg(cstore, "b")
    jid = queues.put(cstore, "q", "x", max_attempts=1)
    job = queues.claim(cstore, "q", a)
    assert job is not None
    queues.release(cstore, job)
    j = queues.get_job(cstore, jid)
    assert j.state == "ready" and j.attempts == 0
    job = queues.claim(cstore, "q", b)
    assert job is not None and job.attempts == 1
    with pytest.raises(ClaimLost):
        queues.release(cstore, "1-0000")


def test_cancel(cstore: coord.Store) -> None:
    a = reg(cstore, "a")
    j1 = queues.put(cstore, "q", 1)
    j2 = queues.put(cstore, "q", 2, delay=50)
    queues.cancel(cstore, j2)
    job = queues.claim(cstore, "q", a)
    assert job is not None and job.id == j1
    with pytest.raises(InvalidArgument, match="claimed"):
        queues.cancel(cstore, j1)
    queues.ack(cstore, job)
    with pytest.raises(InvalidArgument, match="done"):
        queues.cancel(cstore, j1)
    with pytest.raises(NotFound):
        queues.cancel(cstore, 12345)
    assert queues.get_job(cstore, j2).state == "cancelled"
    queues.requeue(cstore, j2)
    assert queues.get_job(cstore, j2).state == "ready"


def test_stats_and_listing(cstore: coord.Store, clock: ManualClock) -> None:
    a = reg(cstore, "a")
    # The ids each put returned: a put retried after a lost race (PostgreSQL) uses up one.
    old = queues.put(cstore, "q", "old")
    clock.now += 7
    later = queues.put(cstore, "q", "later", delay=100)
    first = queues.put(cstore, "q", "claim me", priority=10)
    cancel = queues.put(cstore, "q", "cancel me")
    job = queues.claim(cstore, "q", a)
    assert job is not None and job.payload == "claim me" and job.id == first
    queues.cancel(cstore, cancel)
    st = queues.stats(cstore, "q")[0]
    assert (st.ready, st.delayed, st.claimed, st.dead, st.done, st.cancelled) == (1, 1, 1, 0, 0, 1)
    # On PostgreSQL the server's clock also runs while the test does.
    assert st.oldest_age == pytest.approx(7, abs=0.5)
    assert st.instance_id is None and st.alive is None
    assert st.to_json()["id"] == "q"
    states = {s: [j.id for j in queues.list_jobs(cstore, "q", state=s)]
              for s in ("ready", "delayed", "claimed", "cancelled", "all", None)}
    assert states == {"ready": [old], "delayed": [later], "claimed": [first],
                      "cancelled": [cancel], "all": [first, old, later, cancel],
                      None: [first, old, later]}
    with pytest.raises(InvalidArgument):
        queues.list_jobs(cstore, state="bogus")
    with pytest.raises(NotFound):
        queues.stats(cstore, "nope")
    d = job.to_json()
    assert {"id", "queue", "state", "priority", "attempts", "payload", "token"} <= d.keys()
    assert "token" not in queues.get_job(cstore, job.id).to_json()
    json.dumps(d)


# -- claimers: liveness, isolation --------------------------------------------------------


def test_claimer_must_be_a_live_instance(cstore: coord.Store) -> None:
    queues.put(cstore, "q", 1)
    with pytest.raises(NotRegistered):
        queues.claim(cstore, "q", None)  # no COORD_INSTANCE_ID
    with pytest.raises(NotRegistered):
        queues.claim(cstore, "q", "nobody")
    a = reg(cstore, "a")
    job = queues.claim(cstore, "q", "a")  # by id
    assert job is not None and job.instance_id == "a"
    a.close()
    with pytest.raises(NotRegistered):
        queues.claim(cstore, "q", a)


def test_private_queue_isolation(cstore: coord.Store) -> None:
    a, b = reg(cstore, "a"), reg(cstore, "b")
    qa = coord.Queue(cstore, "a-inbox", a, private=True)
    qb = coord.Queue(cstore, "a-inbox", b)
    qb.put({"from": "b"})  # anyone may put
    with pytest.raises(PermissionDenied, match="private"):
        qb.claim()
    with pytest.raises(PermissionDenied):
        qb.claim(timeout=0.05)
    job = qa.claim()
    assert job is not None and job.payload == {"from": "b"}
    qa.ack(job)
    assert qa.stats().instance_id == "a" and qa.stats().alive is True
    with pytest.raises(InvalidArgument, match="private to"):
        queues.create_queue(cstore, "a-inbox")
    assert queue_problems(cstore) == []


# -- the death rule, real processes --------------------------------------------------------


def test_a_dead_workers_claim_goes_back_at_once(store: coord.Store, db_path: Path,
                                                children: list[Any]) -> None:
    jid = queues.put(store, "work", {"n": 1})
    w = start_claimer(db_path, "w1", "work", 3600)
    children.append(w)
    _, got, token = wait_line(w, "claimed").split()
    assert int(got) == jid
    me = coord.register(store, "me", app="test")
    assert queues.claim(store, "work", me) is None
    w.kill()
    w.wait()
    # No reap, no lease wait (an hour): the next claim applies the death rule itself.
    job = wait_until(lambda: queues.claim(store, "work", me), timeout=10)
    assert job.id == jid and job.attempts == 2
    assert queues.get_job(store, jid).last_error == "worker w1 died"
    with pytest.raises(ClaimLost):
        queues.ack(store, token)
    queues.ack(store, job)
    reap(store)
    assert invariants(store, strict=True) == []


def test_a_waiting_claimer_wakes_when_the_holder_dies(store: coord.Store, db_path: Path,
                                                      children: list[Any]) -> None:
    jid = queues.put(store, "work", {"n": 1})
    w = start_claimer(db_path, "w1", "work", 3600)
    children.append(w)
    wait_line(w, "claimed")
    me = coord.register(store, "me", app="test")
    killer = spawn_python("import os, sys, time, signal; time.sleep(0.3); "
                          "os.kill(int(sys.argv[1]), signal.SIGKILL)", str(w.pid), db=db_path)
    children.append(killer)
    job = queues.claim(store, "work", me, timeout=30)  # the lease is an hour
    assert job is not None and job.id == jid and job.attempts == 2


def test_a_waiting_claimer_wakes_on_put(store: coord.Store, db_path: Path,
                                        children: list[Any]) -> None:
    me = coord.register(store, "me", app="test")
    putter = spawn_python(
        "import os, time, coord; from coord import queues; s = coord.Store(os.environ['COORD_DB']);"
        "time.sleep(0.3); print('put', queues.put(s, 'work', {'hello': 1}), flush=True)",
        db=db_path)
    children.append(putter)
    job = queues.claim(store, "work", me, timeout=30)
    assert job is not None and job.payload == {"hello": 1}
    assert queues.claim(store, "work", me, timeout=0.05) is None


def test_a_hung_worker_cannot_ack_a_redelivered_job(store: coord.Store, db_path: Path,
                                                    children: list[Any]) -> None:
    jid = queues.put(store, "work", {"n": 1})
    w = start_claimer(db_path, "slow", "work", 0.5)
    children.append(w)
    wait_line(w, "claimed")
    stop_outside_a_write(store, w)
    try:
        me = coord.register(store, "me", app="test")
        job = queues.claim(store, "work", me, timeout=30)  # after its lease runs out
        assert job is not None and job.id == jid and job.attempts == 2
        queues.ack(store, job)
    finally:
        w.send_signal(signal.SIGCONT)
    assert w.stdin is not None
    w.stdin.write("ack\n")
    w.stdin.flush()
    assert wait_line(w, "") in ("lost",)
    j = queues.get_job(store, jid)
    assert j.state == "done" and j.instance_id == "me"


def test_adopt_a_dead_instances_private_queue(store: coord.Store, db_path: Path,
                                              children: list[Any]) -> None:
    owner = spawn_python(
        "import os, time, coord; from coord import queues; s = coord.Store(os.environ['COORD_DB']);"
        "i = coord.register(s, 'owner', app='test');"
        "q = coord.Queue(s, 'owner-q', i, private=True); [q.put(n) for n in range(3)];"
        "j = q.claim(); print('ready', j.id, flush=True); time.sleep(60)",
        db=db_path)
    children.append(owner)
    claimed = int(wait_line(owner).split()[1])
    me = coord.register(store, "me", app="test")
    with pytest.raises(PermissionDenied, match="alive"):
        queues.adopt(store, "owner", to="me")
    owner.kill()
    owner.wait()
    reap(store)
    st = queues.stats(store, "owner-q")[0]
    assert st.instance_id == "owner" and st.alive is False and st.ready == 3  # kept, job back
    assert coord.get_instance(store, "owner").tombstone
    with pytest.raises(PermissionDenied):
        queues.claim(store, "owner-q", me)
    got = queues.adopt(store, "owner", to="me")
    assert got.queues == ["owner-q"] and got.to == "me"
    first = queues.claim(store, "owner-q", me)
    assert first is not None and first.id == claimed and first.attempts == 2
    reap(store)
    with pytest.raises(NotFound):
        coord.get_instance(store, "owner")  # nothing keeps its tombstone now
    with pytest.raises(NotFound):
        queues.adopt(store, "owner", to="me")


def test_adopt_into_another_queue(store: coord.Store, db_path: Path) -> None:
    queues.create_queue(store, "ghost-q", owner="ghost")  # an owner that never registered
    queues.put(store, "ghost-q", "a", dedupe_key="a")
    queues.put(store, "ghost-q", "b", dedupe_key="b")
    queues.put(store, "shared", "a2", dedupe_key="a")
    got = queues.adopt(store, "ghost", to_queue="shared")
    assert (got.jobs, got.left) == (1, 1)
    assert sorted(j.payload for j in queues.list_jobs(store, "shared")) == ["a2", "b"]
    with pytest.raises(InvalidArgument):
        queues.adopt(store, "ghost", to="x", to_queue="y")


def test_claims_and_checker_after_a_mixed_session(cstore: coord.Store, clock: ManualClock) -> None:
    a, b = reg(cstore, "a"), reg(cstore, "b")
    for n in range(20):
        queues.put(cstore, "q", n, priority=n % 3, max_attempts=2)
    held = []
    for n in range(20):
        job = queues.claim(cstore, "q", a if n % 2 else b, lease=5)
        assert job is not None
        if n % 4 == 0:
            queues.ack(cstore, job)
        elif n % 4 == 1:
            queues.fail(cstore, job, "e", retry_in=0)
        elif n % 4 == 2:
            queues.release(cstore, job)
        else:
            held.append(job)
    clock.now += 6
    reap(cstore)
    assert queue_problems(cstore) == []
    assert invariants(cstore, strict=True) == []


def test_claim_without_timeout_waits_until_a_job_comes(store: coord.Store, db_path: Path,
                                                       children: list[Any]) -> None:
    me = coord.register(store, "me", app="test")
    children.append(spawn_python(
        "import os, time, coord; from coord import queues; s = coord.Store(os.environ['COORD_DB']);"
        "time.sleep(0.2); queues.put(s, 'work', 'late')", db=db_path))
    job = queues.claim(store, "work", me, timeout=None)
    assert job is not None and job.payload == "late"


def test_waiting_claim_returns_none_in_time(store: coord.Store) -> None:
    me = coord.register(store, "me", app="test")
    t = time.monotonic()
    assert queues.claim(store, "empty", me, timeout=0.2) is None
    assert time.monotonic() - t >= 0.2

