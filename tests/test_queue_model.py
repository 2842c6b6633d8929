"""The queue rules against a model (hypothesis stateful), with an injected clock.

Three in-process instances put, claim (one job or a batch, perhaps acking their last jobs in
the claim's transaction), ack (one or a batch), fail,
extend, release, cancel and requeue on one shared queue while the clock moves, leases expire, instances are "killed" (they stop beating
and the clock passes their TTL, so they are seen hung) and restarted under the same id, and
workers ack with stale tokens. After every step every job's state, attempts and holder match
the model, and the invariant checker is clean. On PostgreSQL the schema's coord_now() is
the model's clock (frozen between steps, as the injected clock is on SQLite).

The model's rules: a claim takes the due ready job with the highest priority, then the
lowest id, counting an attempt; before it picks, claims past their lease and claims of dead
holders go back (dead-lettered when out of attempts). A token works while its claim is
current and not past its lease; using one that is past its lease releases the claim.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import invariants
from contract_engines import fresh_schema
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import coord
from coord import queues
from coord.clock import Clock
from coord.config import Config
from coord.errors import ClaimLost, InvalidArgument

TTL = 10.0
IDS = ("m-0", "m-1", "m-2")
Q = "model"


@dataclass
class MJob:
    id: int
    priority: int
    max_attempts: int
    state: str = "ready"  # ready, claimed, done, dead, cancelled
    attempts: int = 0
    available: float = 0.0
    holder: int | None = None
    token: str | None = None
    expires: float = 0.0


class QueueMachine(RuleBasedStateMachine):
    #: Where the stores live: None for an SQLite file per example, else the URL of one
    #: PostgreSQL schema emptied for each example (set by the test below).
    url: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="coord-qmodel-"))
        self.now = 1000.0
        clock = Clock(mono=lambda: self.now, wall=lambda: 1.7e9 + self.now)
        self.store = coord.Store(self.url or self.dir / "coord.db", clock=clock,
                                 config=Config(instance_ttl=TTL, claim_lease=30.0))
        if self.store.engine == "postgresql":
            empty_and_freeze(self.store, self.now)
        self.insts = [self._register(i) for i in IDS]
        self.old: list[coord.Instance] = []
        self.killed: set[int] = set()
        self.jobs: dict[int, MJob] = {}
        self.tokens: list[str] = []

    def _register(self, id: str) -> coord.Instance:
        return coord.register(self.store, id, app="model", ttl=TTL, heartbeat=False,
                              handle_signals=False)

    def teardown(self) -> None:
        for inst in self.insts + self.old:
            inst.close()
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the model ------------------------------------------------------------------------

    def _back(self, j: MJob) -> None:
        """A claim goes back with its attempt counted."""
        j.holder = j.token = None
        if j.attempts >= j.max_attempts:
            j.state = "dead"
        else:
            j.state, j.available = "ready", self.now

    def _release_pending(self) -> None:
        for j in self.jobs.values():
            if j.state == "claimed" and (j.expires < self.now or j.holder in self.killed):
                self._back(j)

    def _current(self, token: str) -> MJob | None:
        for j in self.jobs.values():
            if j.state == "claimed" and j.token == token:
                return j
        return None

    def _use(self, token: str) -> MJob | None:
        """The job a token still holds; a token past its lease releases its claim."""
        j = self._current(token)
        if j is not None and j.expires < self.now:
            self._back(j)
            return None
        return j

    def _advance(self, dt: float) -> None:
        self.now += dt
        if self.store.engine == "postgresql":
            set_server_clock(self.store, self.now)
        for i, inst in enumerate(self.insts):
            if i not in self.killed:
                assert inst.heartbeat()

    # -- rules ----------------------------------------------------------------------------

    @rule(priority=st.integers(0, 2), delay=st.sampled_from([0.0, 0.0, 3.0]),
          max_attempts=st.integers(1, 3))
    def put(self, priority: int, delay: float, max_attempts: int) -> None:
        jid = queues.put(self.store, Q, {"p": priority}, priority=priority, delay=delay,
                         max_attempts=max_attempts)
        assert jid not in self.jobs
        self.jobs[jid] = MJob(jid, priority, max_attempts, available=self.now + delay)

    @precondition(lambda self: len(self.killed) < len(IDS))
    @rule(data=st.data(), lease=st.sampled_from([5.0, 30.0, 30.0]))
    def claim(self, data: st.DataObject, lease: float, n: int = 1,
              acks: list[str] | None = None) -> None:
        i = data.draw(st.sampled_from([i for i in range(len(IDS)) if i not in self.killed]))
        self._release_pending()
        lost = []
        for t in acks or []:  # acked first, in the claim's transaction
            j = self._use(t)
            if j is None:
                lost.append(t)
            else:
                j.state, j.token = "done", None
        due = [j for j in self.jobs.values() if j.state == "ready" and j.available <= self.now]
        want = [] if lost else sorted(due, key=lambda j: (-j.priority, j.id))[:n]
        try:
            if n == 1 and len(acks or []) <= 1:
                one = queues.claim(self.store, Q, self.insts[i], lease=lease,
                                   ack=acks[0] if acks else None, result={"n": 1})
                got = [] if one is None else [one]
            else:
                got = queues.claim_many(self.store, Q, n, self.insts[i], lease=lease,
                                        ack=acks or ())
        except ClaimLost as e:
            assert lost and list(e.tokens) == lost, (e.tokens, lost)
            return
        assert not lost
        assert [g.id for g in got] == [w.id for w in want], (got, want)
        for g, w in zip(got, want, strict=True):
            assert g.token is not None and g.token not in self.tokens
            w.state, w.holder, w.token = "claimed", i, g.token
            w.attempts += 1
            w.expires = self.now + lease
            assert g.attempts == w.attempts
            self.tokens.append(g.token)

    @precondition(lambda self: self.tokens and len(self.killed) < len(IDS))
    @rule(data=st.data(), lease=st.sampled_from([5.0, 30.0]), n=st.integers(1, 3))
    def ack_in_next_claim(self, data: st.DataObject, lease: float, n: int) -> None:
        """A worker loop's step: the acks of its last jobs (perhaps stale or repeated) made
        in its next claim's transaction. The held ones are acked whatever happens; when any
        was lost, ClaimLost names exactly those, in order, and nothing is claimed."""
        pick = st.sampled_from(self.tokens[-3:] + self.tokens[:1])
        self.claim(data, lease, n, data.draw(st.lists(pick, min_size=1, max_size=3)))

    @precondition(lambda self: len(self.killed) < len(IDS))
    @rule(data=st.data(), lease=st.sampled_from([5.0, 30.0]), n=st.integers(2, 4))
    def claim_batch(self, data: st.DataObject, lease: float, n: int) -> None:
        """A worker takes up to n jobs in one claim_many."""
        self.claim(data, lease, n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def settle_batch(self, data: st.DataObject) -> None:
        """A worker acks several claims at once, some of them perhaps stale or repeated:
        the held ones are acked, and ClaimLost names exactly the others, in order."""
        pick = st.sampled_from(self.tokens[-4:] + self.tokens[:1])
        tokens = data.draw(st.lists(pick, min_size=1, max_size=4))
        lost = []
        for t in tokens:
            j = self._use(t)
            if j is None:
                lost.append(t)
            else:
                j.state, j.token = "done", None
        try:
            queues.ack_many(self.store, tokens, [{"n": k} for k in range(len(tokens))])
        except ClaimLost as e:
            assert list(e.tokens) == lost
        else:
            assert lost == []

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), op=st.sampled_from(["ack", "ack", "fail", "extend", "release"]),
          seconds=st.sampled_from([0.0, 2.0, 5.0, 30.0]))
    def settle(self, data: st.DataObject, op: str, seconds: float) -> None:
        """A worker acks, fails, extends or releases with a token: its own current one
        (usually the newest) or a stale one."""
        token = data.draw(st.sampled_from(self.tokens[-3:] + self.tokens[:1]))
        j = self._use(token)
        try:
            if op == "ack":
                queues.ack(self.store, token, result={"ok": True})
            elif op == "fail":
                state = queues.fail(self.store, token, "boom", retry_in=seconds)
            elif op == "extend":
                queues.extend(self.store, token, seconds or 1.0)
            else:
                queues.release(self.store, token)
        except ClaimLost:
            assert j is None
            return
        assert j is not None
        if op == "ack":
            j.state, j.token = "done", None
        elif op == "fail":
            j.holder = j.token = None
            if j.attempts >= j.max_attempts:
                j.state = "dead"
            else:
                j.state, j.available = "ready", self.now + seconds
            assert state == j.state
        elif op == "extend":
            j.expires = self.now + (seconds or 1.0)
        else:
            j.state, j.holder, j.token, j.available = "ready", None, None, self.now
            j.attempts = max(0, j.attempts - 1)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), op=st.sampled_from(["cancel", "requeue"]))
    def admin(self, data: st.DataObject, op: str) -> None:
        """Someone cancels or requeues a job by id, whatever its state."""
        j = self.jobs[data.draw(st.sampled_from(sorted(self.jobs)))]
        if op == "cancel":
            try:
                queues.cancel(self.store, j.id)
            except InvalidArgument:
                assert j.state not in ("ready", "dead")
            else:
                assert j.state in ("ready", "dead")
                j.state = "cancelled"
            return
        try:
            queues.requeue(self.store, j.id)
        except InvalidArgument:
            assert j.state not in ("dead", "cancelled")
        else:
            assert j.state in ("dead", "cancelled")
            j.state, j.attempts, j.available = "ready", 0, self.now

    @rule(dt=st.sampled_from([1.0, 3.0, 6.0]), reap=st.sampled_from([False, False, True]))
    def tick(self, dt: float, reap: bool) -> None:
        """Time passes: delayed jobs fall due, leases run out; now and then the reaper runs
        (it releases what claimers would release)."""
        self._advance(dt)
        if reap:
            coord.reap(self.store, checkpoint=False)
            self._release_pending()

    @precondition(lambda self: len(self.killed) < len(IDS))
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        """A live instance (one holding a claim when there is one) stops beating; past its
        TTL it is dead (hung) to everyone else, though its claims' leases may run longer."""
        live = [i for i in range(len(IDS)) if i not in self.killed]
        holders = sorted({j.holder for j in self.jobs.values()
                          if j.state == "claimed" and j.holder in live})
        i = data.draw(st.sampled_from(holders or live))
        self.killed.add(i)
        self._advance(TTL + 1)
        if len(self.killed) < len(IDS) and data.draw(st.booleans()):
            self.claim(data, 30.0)  # someone claims next: the dead one's claims go back first

    @precondition(lambda self: self.killed)
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        """A killed instance comes back under the same id: its old claims are released."""
        i = data.draw(st.sampled_from(sorted(self.killed)))
        self.old.append(self.insts[i])
        self.insts[i] = self._register(IDS[i])
        self.killed.discard(i)
        for j in self.jobs.values():
            if j.state == "claimed" and j.holder == i:
                self._back(j)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        got = {j.id: j for j in queues.list_jobs(self.store, Q, state="all")}
        assert set(got) == set(self.jobs)
        for jid, m in self.jobs.items():
            g = got[jid]
            shown = "delayed" if m.state == "ready" and m.available > self.now else m.state
            assert (g.state, g.attempts) == (shown, m.attempts), (jid, g, m)
            if m.state == "claimed":
                assert m.holder is not None
                assert g.instance_id == IDS[m.holder]
                assert g.expires_in == m.expires - self.now

    @invariant()
    def checker_is_clean(self) -> None:
        assert invariants(self.store) == []


def empty_and_freeze(store: coord.Store, now: float) -> None:
    """Empty a PostgreSQL schema's tables and make its coord_now() read ``now`` until moved
    (``set_server_clock``): the schema's own clock function, replaced for this test."""
    def txn(c: object) -> None:
        c.execute("TRUNCATE instances, processes, leases, lease_terms, queues, jobs, "  # type: ignore[attr-defined]
                  "messages, kv, events")
        c.execute("CREATE OR REPLACE FUNCTION coord_now() RETURNS double precision "  # type: ignore[attr-defined]
                  "LANGUAGE sql VOLATILE SET search_path FROM CURRENT "
                  "AS $$ SELECT offset_s FROM clock_offset $$")
        c.execute("UPDATE clock_offset SET offset_s = %s", (now,))  # type: ignore[attr-defined]

    store.backend.db.write(txn)  # type: ignore[attr-defined]


def set_server_clock(store: coord.Store, now: float) -> None:
    store.backend.db.write(lambda c: c.execute(  # type: ignore[attr-defined]
        "UPDATE clock_offset SET offset_s = %s", (now,)))


pytestmark = pytest.mark.contract

def model_settings(engine: str) -> settings:
    # A PostgreSQL step costs several round trips: fewer examples keep the run bounded.
    return settings(
        max_examples=60 if engine == "sqlite" else 25,
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.fixture
def model_url(engine: str, request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None on SQLite (a file per example); a PostgreSQL schema reused by every example."""
    if engine != "postgresql":
        yield None
        return
    with fresh_schema(request.getfixturevalue("pg_url")) as url:
        yield url


def test_queue_model(model_url: str | None, engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(QueueMachine, "url", model_url)
    run_state_machine_as_test(QueueMachine, settings=model_settings(engine))
