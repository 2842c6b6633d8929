"""Queue invariants under concurrent writers, on every engine: max depth, dedupe, adoption,
no job claimed twice, no ack by a stale claim, no claim committed for a buried instance.

SQLite serialises writers; PostgreSQL (READ COMMITTED) does not, so each of these is one
statement or a row lock there, and these tests are its proof. The writers are threads,
each with its own connection, released together by a barrier, so their transactions
overlap on the server.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from conftest import invariants, reg

import coord
from coord import queues
from coord.errors import ClaimLost, NotFound, NotRegistered, QueueFull
from coord.reaper import bury_dead

pytestmark = pytest.mark.contract

THREADS = 6


def together(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads started at once; their results (or exceptions)."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - the caller judges every outcome
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return out


def test_max_depth_holds_under_concurrent_puts(store: coord.Store) -> None:
    queues.create_queue(store, "bounded", max_depth=10)
    for _ in range(3):
        got = together(THREADS, lambda i: [queues.put_many(store, "bounded", [i, i])
                                           for _ in range(3)])
        st = queues.stats(store, "bounded")[0]
        assert st.ready == 10  # filled to the brim, never past it
        added = sum(len(r) for r in got if isinstance(r, list))
        assert all(isinstance(r, (list, QueueFull)) for r in got), got
        assert added <= 20 and st.ready == 10
        queues.purge(store, "bounded", everything=True)
        queues.create_queue(store, "bounded", max_depth=10)


def test_a_bounded_queue_counts_claimed_jobs_under_concurrent_puts(store: coord.Store) -> None:
    w = reg(store, "w")
    queues.create_queue(store, "bounded", max_depth=5)
    queues.put_many(store, "bounded", [1, 2, 3])
    assert len(queues.claim_many(store, "bounded", 3, w)) == 3
    got = together(THREADS, lambda i: queues.put_many(store, "bounded", [i]))
    assert sum(isinstance(r, list) for r in got) == 2
    assert all(isinstance(r, (list, QueueFull)) for r in got), got
    st = queues.stats(store, "bounded")[0]
    assert (st.ready, st.claimed) == (2, 3)


def test_dedupe_holds_under_concurrent_puts(store: coord.Store) -> None:
    keys = [f"k{n}" for n in range(20)]

    def put(i: int) -> list[int]:
        # Each thread puts the keys in its own order, singly and in batches.
        order = keys[i:] + keys[:i]
        ids = [queues.put(store, "dd", {"by": i}, dedupe_key=k) for k in order[:10]]
        ids += queues.put_many(store, "dd", [queues.NewJob({"by": i}, dedupe_key=k)
                                             for k in order[10:]])
        return [ids[order.index(k)] for k in keys]

    got = together(THREADS, put)
    assert all(isinstance(r, list) for r in got), got
    assert all(r == got[0] for r in got)  # every caller got the one job of each key
    jobs = queues.list_jobs(store, "dd", state="all")
    assert sorted(j.id for j in jobs) == sorted(got[0]) and len(jobs) == len(keys)


def test_no_job_is_claimed_twice(store: coord.Store) -> None:
    workers = [reg(store, f"w{i}") for i in range(THREADS)]
    ids = queues.put_many(store, "work", list(range(300)))

    def drain(i: int) -> list[tuple[int, str]]:
        mine = []
        while True:
            got = queues.claim_many(store, "work", 1 + i % 3, workers[i])
            if not got:
                return mine
            mine += [(j.id, str(j.token)) for j in got]

    got = together(THREADS, drain)
    claims = [c for r in got for c in r]
    assert sorted(j for j, _ in claims) == sorted(ids)  # each job exactly once
    assert len({t for _, t in claims}) == len(claims)
    held = {j.id: j.instance_id for j in queues.list_jobs(store, "work", state="claimed")}
    for i, r in enumerate(got):
        assert all(held[j] == f"w{i}" for j, _ in r)


def test_no_ack_by_a_stale_claim(cstore: coord.Store, clock: Any) -> None:
    """Claims past their lease race a release and a new claimer: every job ends done once,
    acked only by a claim that was current."""
    old, new = reg(cstore, "old"), reg(cstore, "new")
    ids = queues.put_many(cstore, "work", list(range(60)))
    stale = queues.claim_many(cstore, "work", 60, old, lease=5)
    clock.now += 10  # every lease has run out
    acked: Counter[int] = Counter()

    def stale_acks(i: int) -> int:
        n = 0
        for job in stale[i::2]:
            try:
                queues.ack(cstore, job)
                n += 1
            except ClaimLost:
                pass
        return n

    def new_claims(i: int) -> list[int]:
        done = []
        while True:
            got = queues.claim_many(cstore, "work", 2, new, lease=300)
            if not got:
                return done
            for job in got:
                queues.ack(cstore, job)
                done.append(job.id)

    got = together(4, lambda i: stale_acks(i) if i < 2 else new_claims(i))
    assert all(not isinstance(r, Exception) for r in got), got
    assert got[0] == got[1] == 0  # a claim past its lease acks nothing
    acked.update(j for r in got[2:] for j in r)
    assert sorted(acked) == sorted(ids) and max(acked.values()) == 1
    assert all(j.instance_id == "new" for j in queues.list_jobs(cstore, "work", state="done"))
    assert invariants(cstore, strict=True) == []


def test_a_buried_instance_never_keeps_a_claim(store: coord.Store) -> None:
    """Claims by one instance race its burial: whatever it claimed before goes back, and
    nothing it claims commits after."""
    for round in range(4):
        race_a_burial(store, reg(store, f"victim-{round}"))


def race_a_burial(store: coord.Store, victim: coord.Instance) -> None:
    queues.put_many(store, "work", list(range(40)))
    buried = threading.Event()
    after: list[Any] = []

    def claimer() -> int:
        n = 0
        while True:
            late = buried.is_set()
            try:
                n += len(queues.claim_many(store, "work", 2, victim))
            except NotRegistered:
                return n
            if late:  # began after the burial had committed, and did not fail
                after.append(n)
                return n

    def burier() -> None:
        row = store.backend.instances.by_id(victim.id)
        assert bury_dead(store, [row], "died") == [(victim.id, victim.incarnation)]
        buried.set()

    got = together(THREADS, lambda i: burier() if i == 0 else claimer())
    assert all(not isinstance(r, Exception) for r in got), got
    assert after == []  # no claim committed once the burial had
    assert not [j for j in queues.list_jobs(store, "work", state="claimed")
                if j.instance_id == victim.id]
    with pytest.raises(NotRegistered):
        queues.claim(store, "work", victim)
    queues.purge(store, "work", everything=True)
    victim.close()


def test_concurrent_adoptions_take_each_queue_once(store: coord.Store) -> None:
    """Many adopt a dead owner's queues at once: given to new owners, exactly one gets
    them; moved into a queue, each job moves once (an adoption after that finds nothing
    left to move: the emptied queues stay the dead owner's)."""
    for round in range(6):
        race_adoptions(store, f"owner-{round}", f"shared-{round}", into_queue=bool(round % 2))


def race_adoptions(store: coord.Store, owner_id: str, shared: str, *, into_queue: bool) -> None:
    owner = reg(store, owner_id)
    names = [f"{owner_id}-p1", f"{owner_id}-p2"]
    for name in names:
        queues.create_queue(store, name, owner=owner_id)
        queues.put_many(store, name, [queues.NewJob(n, dedupe_key=f"{name}-{n}")
                                      for n in range(20)])
    queues.put(store, shared, "there first", dedupe_key=f"{names[0]}-0")
    owner.close()  # gone: its queues wait for someone to adopt them

    def adopt(i: int) -> queues.Adoption:
        if into_queue:
            return queues.adopt(store, owner_id, to_queue=shared)
        return queues.adopt(store, owner_id, to=f"heir-{i}")

    got = together(THREADS, adopt)
    wins = [r for r in got if isinstance(r, queues.Adoption)]
    assert all(isinstance(r, (queues.Adoption, NotFound)) for r in got), got
    assert all(w.queues == names for w in wins) and wins
    stats = {s.id: s for s in queues.stats(store)}
    if into_queue:
        assert sum(w.jobs for w in wins) == 39  # the first key was already in the shared one
        assert all(w.left == 1 for w in wins)
        assert stats[shared].ready == 40 and stats[names[0]].ready == 1
        assert stats[names[1]].ready == 0
    else:
        assert len(wins) == 1, got
        assert stats[names[0]].instance_id == stats[names[1]].instance_id == wins[0].to
        assert stats[shared].ready == 1
    assert invariants(store) == []  # (the owner's tombstone may await the reaper)


def test_an_adoption_into_a_queue_races_puts_of_the_same_keys(store: coord.Store) -> None:
    """Jobs moved into a queue while others put the same dedupe keys there: no error, and
    each key is in that queue once (the job that stays behind keeps its own queue)."""
    for round in range(4):
        owner_id, shared = f"owner-{round}", f"shared-{round}"
        owner = reg(store, owner_id)
        queues.create_queue(store, f"{owner_id}-p", owner=owner_id)
        keys = [f"k{n}" for n in range(30)]
        queues.put_many(store, f"{owner_id}-p", [queues.NewJob(k, dedupe_key=k) for k in keys])
        owner.close()

        def act(i: int, owner_id: str = owner_id, shared: str = shared,
                keys: list[str] = keys) -> Any:
            if i == 0:
                return queues.adopt(store, owner_id, to_queue=shared)
            mine = keys[i::THREADS - 1]
            return queues.put_many(store, shared, [queues.NewJob(i, dedupe_key=k)
                                                   for k in mine])

        got = together(THREADS, act)
        assert not [r for r in got if isinstance(r, Exception)], got
        moved = got[0]
        there = queues.list_jobs(store, shared, state="all")
        assert sorted(j.dedupe_key or "" for j in there) == sorted(keys)  # each once
        behind = queues.list_jobs(store, f"{owner_id}-p", state="all")
        assert moved.jobs + len(behind) == len(keys) and moved.left == len(behind)
        assert not {j.dedupe_key for j in behind} - set(keys)


def test_puts_race_the_deletion_of_their_queue(store: coord.Store) -> None:
    """A queue deleted whole while others put into it: each put either lands in the old
    queue (and goes with it) or makes the queue anew; none fails."""
    for _ in range(5):
        queues.put(store, "brief", "first")

        def act(i: int) -> Any:
            if i == 0:
                return queues.purge(store, "brief", everything=True)
            return [queues.put_many(store, "brief", [i, i]) for _ in range(3)]

        got = together(THREADS, act)
        assert not [r for r in got if isinstance(r, Exception)], got
        kept = {j.id for j in queues.list_jobs(store, "brief", state="all")}
        put = {x for r in got[1:] for ids in r for x in ids}
        assert kept <= put  # whatever is there now was put by a put that succeeded
        with contextlib.suppress(NotFound):  # the race's purge may have come last
            queues.purge(store, "brief", everything=True)
