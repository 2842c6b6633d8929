"""The queue's hot path: claim_many and ack_many, claims found by their job id, payloads
decoded when read, the plans of the hot statements, and schema 004 applied to existing
databases (right after 002, and after a 003 that only replaces views) with their jobs kept."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ManualClock, invariants, reg, set_job_payload

import coord
import coord.backend.sqlite.migrations
from coord import queue_put, queues
from coord.backend.sqlite import queues as sqlite_queues
from coord.backend.sqlite.migrations import latest_version, migrations
from coord.check import check
from coord.errors import (
    ClaimLost,
    InvalidArgument,
    NotRegistered,
    PayloadError,
    PermissionDenied,
    QueueFull,
)
from coord.reaper import bury_dead

pytestmark = pytest.mark.contract

# -- claim_many and ack_many --------------------------------------------------------------


def test_claim_many_takes_due_jobs_in_claim_order(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    ids = [queues.put(cstore, "q", {"i": i}, priority=p) for i, p in enumerate([0, 2, 1, 2, 0])]
    queues.put(cstore, "q", {"later": 1}, priority=9, delay=60)  # not due: skipped
    got = queues.claim_many(cstore, "q", 3, w)
    assert [j.id for j in got] == [ids[1], ids[3], ids[2]]
    assert len({j.token for j in got}) == 3 and all(j.attempts == 1 for j in got)
    assert all(j.state == "claimed" and j.instance_id == "w-1" for j in got)
    rest = queues.claim_many(cstore, "q", 10, w)
    assert [j.id for j in rest] == [ids[0], ids[4]]
    assert queues.claim_many(cstore, "q", 10, w) == []


@pytest.mark.parametrize("n", [0, -1, True, 1.5])
def test_claim_many_refuses_a_count_that_is_not_one_or_more(cstore: coord.Store, n: Any) -> None:
    w = reg(cstore, "w-1")
    queues.put(cstore, "q", 1)
    with pytest.raises(InvalidArgument):
        queues.claim_many(cstore, "q", n, w)
    assert queues.stats(cstore, "q")[0].claimed == 0


def test_claim_many_for_a_buried_claimer_takes_nothing(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    queues.put_many(cstore, "q", [1, 2, 3])
    bury_dead(cstore, [cstore.backend.instances.by_id("w-1")], "died")
    with pytest.raises(NotRegistered):
        queues.claim_many(cstore, "q", 3, w)
    assert queues.stats(cstore, "q")[0].claimed == 0


def test_ack_many_acks_the_held_claims_and_names_the_lost_ones(
    cstore: coord.Store, clock: ManualClock
) -> None:
    a, b = reg(cstore, "w-a"), reg(cstore, "w-b")
    queues.put_many(cstore, "q", [{"n": i} for i in range(4)])
    j1, j2, j3 = queues.claim_many(cstore, "q", 3, a, lease=30)
    j4 = queues.claim(cstore, "q", a, lease=5)
    assert j4 is not None
    queues.release(cstore, j2)
    again = queues.claim(cstore, "q", b)  # j2's job, redelivered to b
    assert again is not None and again.id == j2.id
    clock.now += 10  # j4's lease has run out
    with pytest.raises(ClaimLost) as e:
        queues.ack_many(cstore, [j1, j2, j3, j4], [{"r": 1}, {"r": 2}, {"r": 3}, {"r": 4}])
    assert e.value.tokens == (j2.token, j4.token) and e.value.token == j2.token
    assert "2 claims are no longer held" in str(e.value)
    done = {j.id: j for j in queues.list_jobs(cstore, "q", state="done")}
    assert set(done) == {j1.id, j3.id}
    assert done[j1.id].result == {"r": 1} and done[j3.id].result == {"r": 3}
    held = queues.get_job(cstore, j2.id)
    assert (held.state, held.instance_id) == ("claimed", "w-b")  # b's claim untouched
    back = queues.get_job(cstore, j4.id)
    assert (back.state, back.attempts) == ("ready", 1)  # expired: released, attempt counted
    queues.ack(cstore, again)
    assert invariants(cstore) == []


def test_ack_many_pairs_results_with_claims(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    queues.put_many(cstore, "q", [1, 2])
    jobs = queues.claim_many(cstore, "q", 2, w)
    with pytest.raises(InvalidArgument, match="2 claims but 1 results"):
        queues.ack_many(cstore, jobs, [{"only": "one"}])
    assert queues.stats(cstore, "q")[0].claimed == 2  # nothing acked
    queues.ack_many(cstore, jobs)
    assert queues.stats(cstore, "q")[0].done == 2
    queues.ack_many(cstore, [])  # nothing to do


def test_a_queue_handle_claims_and_acks_batches(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    q = queues.Queue(cstore, "handle", w)
    q.put_many(["a", "b", "c"])
    jobs = q.claim_many(2)
    assert [j.payload for j in jobs] == ["a", "b"]
    q.ack_many(jobs, ["A", "B"])
    assert [j.result for j in q.jobs("done")] == ["A", "B"]


# -- the ack folded into the next claim ---------------------------------------------------


def test_a_claim_acks_the_last_job_first(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    q = queues.Queue(cstore, "q", w)
    ids = q.put_many(["a", "b", "c"])
    job = q.claim()
    assert job is not None
    done = [job.id]
    while (job := q.claim(ack=job, result={"did": job.payload})) is not None:
        done.append(job.id)
    assert done == ids
    # the last claim found nothing due and still acked the last job
    assert [(j.id, j.result) for j in q.jobs("done")] == [
        (ids[0], {"did": "a"}), (ids[1], {"did": "b"}), (ids[2], {"did": "c"})]
    assert q.stats().claimed == 0


def test_a_stale_ack_in_a_claim_claims_nothing(cstore: coord.Store, clock: ManualClock) -> None:
    a, b = reg(cstore, "w-a"), reg(cstore, "w-b")
    queues.put_many(cstore, "q", [1, 2])
    old = queues.claim(cstore, "q", a, lease=5)
    assert old is not None
    clock.now += 10  # its lease has run out
    with pytest.raises(ClaimLost) as e:
        queues.claim(cstore, "q", a, ack=old)
    assert e.value.tokens == (old.token,)
    back = queues.get_job(cstore, old.id)
    assert (back.state, back.attempts) == ("ready", 1)  # released, the attempt counted
    assert queues.stats(cstore, "q")[0].claimed == 0  # and nothing was claimed
    again = queues.claim(cstore, "q", b)
    assert again is not None and again.id == old.id


def test_claim_many_acks_the_held_claims_of_a_batch_and_names_the_lost(
    cstore: coord.Store,
) -> None:
    a, b = reg(cstore, "w-a"), reg(cstore, "w-b")
    queues.put_many(cstore, "q", range(5))
    j1, j2 = queues.claim_many(cstore, "q", 2, a)
    queues.release(cstore, j2)
    taken = queues.claim(cstore, "q", b)
    assert taken is not None and taken.id == j2.id
    with pytest.raises(ClaimLost) as e:
        queues.claim_many(cstore, "q", 2, a, ack=[j1, j2], results=[{"r": 1}, {"r": 2}])
    assert e.value.tokens == (j2.token,)
    assert [(j.id, j.result) for j in queues.list_jobs(cstore, "q", state="done")] == [
        (j1.id, {"r": 1})]
    assert queues.get_job(cstore, j2.id).instance_id == "w-b"  # b's claim untouched
    assert queues.stats(cstore, "q")[0].claimed == 1
    assert len(queues.claim_many(cstore, "q", 9, a)) == 3  # the batch claims as before


def test_an_ack_in_a_refused_claim_still_commits(cstore: coord.Store) -> None:
    a = reg(cstore, "w-a")
    queues.create_queue(cstore, "b-only", owner="w-b")
    queues.put(cstore, "b-only", "x")
    queues.put(cstore, "q", 1)
    job = queues.claim(cstore, "q", a)
    assert job is not None
    with pytest.raises(PermissionDenied):
        queues.claim(cstore, "b-only", a, ack=job)
    assert queues.get_job(cstore, job.id).state == "done"
    assert queues.stats(cstore, "b-only")[0].claimed == 0


def test_a_buried_claimer_acking_in_its_claim_claims_nothing(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    queues.put_many(cstore, "q", [1, 2, 3])
    job = queues.claim(cstore, "q", w)
    assert job is not None
    bury_dead(cstore, [cstore.backend.instances.by_id("w-1")], "died")
    with pytest.raises(ClaimLost):  # the burial gave its job back
        queues.claim(cstore, "q", w, ack=job)
    assert queues.get_job(cstore, job.id).state == "ready"
    with pytest.raises(NotRegistered):
        queues.claim(cstore, "q", w)
    assert queues.stats(cstore, "q")[0].claimed == 0


def test_a_producer_that_never_pauses_sees_a_max_depth_set_meanwhile(
    cstore: coord.Store, db_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_put, "QUEUE_CONFIG_SECONDS", 0.5)
    other = coord.Store(db_path)  # another process's view of the same store: its own cache
    queues.create_queue(other, "grow")
    queues.put(cstore, "grow", 0)  # looked: unbounded, so the next puts do not look
    queues.create_queue(other, "grow", max_depth=3)
    end = time.monotonic() + 10.0
    with pytest.raises(QueueFull):  # once its QUEUE_CONFIG_SECONDS have passed
        while time.monotonic() < end:  # puts without a pause
            queues.put(cstore, "grow", 1)
    other.close()


# -- tokens name their job ----------------------------------------------------------------


def test_a_token_is_checked_whole_not_just_its_job_id(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    queues.put_many(cstore, "q", [1, 2])
    mine = queues.claim(cstore, "q", w)
    other = queues.claim(cstore, "q", w)
    assert mine is not None and other is not None and mine.token is not None
    assert mine.token.startswith(f"{mine.id}-")
    forged = f"{other.id}-{random.getrandbits(64):016x}"  # the right id, a guessed secret
    for bad in (forged, "no-such-claim", f"{other.id}", "-1-x", "٣-x"):
        for op in (lambda t: queues.ack(cstore, t), lambda t: queues.extend(cstore, t),
                   lambda t: queues.release(cstore, t), lambda t: queues.fail(cstore, t)):
            with pytest.raises(ClaimLost):
                op(bad)
    assert queues.get_job(cstore, other.id).state == "claimed"
    queues.ack(cstore, other)
    queues.ack(cstore, mine)


# -- payloads are decoded when read -------------------------------------------------------


def test_a_bad_stored_payload_reaches_the_worker_holding_the_claim(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    job_id = queues.put(cstore, "q", {"fine": True})
    set_job_payload(cstore, job_id, "[[[")
    job = queues.claim(cstore, "q", w)  # claiming does not decode
    assert job is not None and job.token is not None
    with pytest.raises(PayloadError):
        _ = job.payload
    assert queues.fail(cstore, job, "unreadable payload", retry_in=0) == "ready"


def test_payload_is_decoded_once_and_shown_in_json(cstore: coord.Store) -> None:
    w = reg(cstore, "w-1")
    queues.put(cstore, "q", {"a": [1, 2]})
    job = queues.claim(cstore, "q", w)
    assert job is not None
    assert job.payload is job.payload == {"a": [1, 2]}
    d = job.to_json()
    assert d["payload"] == {"a": [1, 2]} and d["token"] == job.token
    assert "payload_text" not in d and "_limits" not in d


# -- the plans of the hot statements ------------------------------------------------------


def _plan(store: coord.Store, sql: str, params: tuple[Any, ...]) -> str:
    return " | ".join(str(r[3]) for r in store.conn().execute("EXPLAIN QUERY PLAN " + sql,
                                                               params))


@pytest.mark.sqlite_only("reads SQLite's query plans of the SQLite engine's statements")
def test_hot_statements_use_the_active_index_or_the_row_id(store: coord.Store) -> None:
    pick = _plan(store, sqlite_queues._PICK, ("w", 1, "q", 0.0))
    assert "COVERING INDEX jobs_active (state=? AND queue=?)" in pick
    assert "TEMP B-TREE" not in pick  # claim order is index order: no sort
    assert "jobs_active (state=? AND queue=?)" in _plan(store, sqlite_queues._MORE, ("q", 0.0, 1, 3))
    assert "INTEGER PRIMARY KEY" in _plan(store, sqlite_queues._CLAIM, ("t", "w", 1, 0.0, 0.0, 1))
    assert "INTEGER PRIMARY KEY" in _plan(store, sqlite_queues._ACK, (None, 0.0, 0.0, 1, "t", 0.0))
    # The death rule's claim lookups and the claimer's scans read the 'claimed' range.
    assert "jobs_active (state=?)" in _plan(
        store, "SELECT id FROM jobs WHERE state = 'claimed' AND claimed_by = ? "
               "AND claimed_incarnation = ?", ("w", 1))
    assert "jobs_active (state=? AND queue=?)" in _plan(
        store, "SELECT DISTINCT claimed_by FROM jobs WHERE queue = ? AND state = 'claimed'",
        ("q",))
    indexes = {r["name"] for r in store.rows(
        "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'jobs' "
        "AND sql IS NOT NULL")}
    assert indexes == {"jobs_active", "jobs_dedupe"}



def test_postgresql_hot_statements_use_the_ready_index_or_the_row_id(pg_url: str) -> None:
    """The PostgreSQL twin: the claim walks jobs_ready in claim order (no sort before the
    LIMIT) and updates by primary key; an ack finds its row by an index."""
    from contract_engines import fresh_schema

    from coord.backend.postgresql import queues as pg_queues

    with fresh_schema(pg_url) as url, coord.Store(url) as store:
        for q in ("a", "b"):
            queues.put_many(store, q, list(range(2000)))
        db = store.backend.db  # type: ignore[attr-defined]
        db.conn().execute("ANALYZE jobs")

        def plan(sql: str, params: Any) -> str:
            return "\n".join(r["QUERY PLAN"] for r in db.rows("EXPLAIN " + sql, params))

        claim = plan(pg_queues._CLAIM, {"id": "w", "inc": 1, "queue": "a", "lease": 1.0,
                                        "n": 3})
        picked = claim[claim.index("CTE picked"):claim.index("CTE got")]
        assert "Index Scan using jobs_ready on jobs" in picked
        assert "Sort" not in picked and "Seq Scan" not in claim
        assert "Index Scan using jobs_pkey on jobs j" in claim[claim.index("CTE got"):]
        ack = plan(pg_queues._ACK, (None, 1, "1-x"))
        assert "Index Scan using" in ack and "Seq Scan" not in ack


# -- schema 004 on existing databases -----------------------------------------------------

#: A 003 as the operator's views may bring it: it only replaces views (one reads jobs).
VIEWS_ONLY_003 = (3, "003_views.sql", """
-- views only
DROP VIEW IF EXISTS queue_depths;
-- Per-queue counts by state.
CREATE VIEW queue_depths AS
SELECT q.name AS queue, count(j.id) FILTER (WHERE j.state = 'ready') AS ready,
       count(j.id) FILTER (WHERE j.state = 'claimed') AS claimed,
       count(j.id) FILTER (WHERE j.state = 'done') AS done
FROM queues q LEFT JOIN jobs j ON j.queue = q.name GROUP BY q.name;
""")


def _old_database(path: Path, ladder: tuple[tuple[int, str, str], ...],
                  monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A database built by an older ladder, holding jobs in every state (ready, claimed by
    an instance that stays alive, done with a result, dead, cancelled); returns what a
    later open must find again."""
    with monkeypatch.context() as m:
        m.setattr(coord.backend.sqlite.migrations, "_migrations", lambda: ladder)
        store = coord.Store(path)
        assert store.value("PRAGMA user_version") == ladder[-1][0]
        assert store.value("SELECT count(*) FROM sqlite_schema WHERE name = 'jobs_ready'") == 1
        w, keeper = reg(store, "old-worker"), reg(store, "keeper")
        ids = queues.put_many(store, "old", [
            queues.NewJob({"n": i}, priority=i % 3, dedupe_key=f"k{i}") for i in range(8)])
        done = queues.claim(store, "old", w)
        assert done is not None
        queues.ack(store, done, {"ok": 1})
        dead = queues.claim(store, "old", w)
        assert dead is not None
        store.write(lambda c: c.execute("UPDATE jobs SET max_attempts = 1 WHERE id = ?",
                                        (dead.id,)))
        assert queues.fail(store, dead, "boom") == "dead"
        queues.cancel(store, ids[-1])
        held = queues.claim(store, "old", keeper)
        assert held is not None
        w.close()
    return {"rows": store.rows("SELECT * FROM jobs ORDER BY id"), "held": held, "done": done,
            "keeper": keeper, "store": store}


@pytest.mark.sqlite_only("the SQLite schema ladder (user_version 2 to 4)")
@pytest.mark.parametrize("before", ["002", "003 views only"])
def test_004_keeps_every_job_of_an_existing_database(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, before: str
) -> None:
    real = tuple(m for m in migrations() if m[0] <= 2)
    ladder = real if before == "002" else (*real, VIEWS_ONLY_003)
    old = _old_database(db_path, ladder, monkeypatch)
    old_store: coord.Store = old["store"]
    keeper: coord.Instance = old["keeper"]
    # Another process opens it with this code: the migration runs once.
    with coord.Store(db_path) as s:
        assert s.value("PRAGMA user_version") == latest_version()
        assert s.rows("SELECT * FROM jobs ORDER BY id") == old["rows"]  # every job intact
        names = {r["name"] for r in s.rows("SELECT name FROM sqlite_schema WHERE type = 'index'"
                                           " AND tbl_name = 'jobs' AND sql IS NOT NULL")}
        assert names == {"jobs_active", "jobs_dedupe"}
        assert s.rows("SELECT queue, ready, claimed, done FROM queue_depths") == [
            {"queue": "old", "ready": 4, "claimed": 1, "done": 1}]
        # The held claim's token still acks; the done job's dedupe key still holds.
        assert queues.put(s, "old", "again", dedupe_key=old["done"].dedupe_key) == \
            old["done"].id
        queues.ack(s, old["held"].token)
        w = reg(s, "new-worker")
        got = queues.claim_many(s, "old", 10, w)
        want = sorted((r for r in old["rows"] if r["state"] == "ready"),
                      key=lambda r: (-r["priority"], r["id"]))
        assert [j.id for j in got] == [r["id"] for r in want]
        queues.ack_many(s, got)
        assert check(s, integrity=False) == []
        w.close()
    keeper.close()
    old_store.close()
