"""The lease rules against a model (hypothesis stateful), with an injected clock.

Three in-process instances contend for two leases while the clock jumps around. After every
step: the database agrees with the model, at most one Lease object per name believes it is
held, terms only grow (globally, across names), a fenced write with any term but the current,
unexpired one fails and changes nothing, and the invariant checker is clean.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import engine_sql
import pytest
from contract_engines import with_schema
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
from coord.check import check
from coord.clock import Clock
from coord.config import Config
from coord.errors import LeaseLost
from coord.leases import Lease, fenced_write, try_acquire

TTL = 10.0
DEADLINE = 6.0  # renew deadline: a holder steps down before anyone may take over by TTL
NAMES = ("svc/a", "svc/b")
IDS = ("m-0", "m-1", "m-2")
#: A fenced upsert of meta, both engines' SQL (placeholders: ``?`` or ``%s``).
UPSERT = ("INSERT INTO meta (key, value) VALUES ({}, {}) "
          "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

pytestmark = pytest.mark.contract

# On PostgreSQL every expiry is the server's coord_now(): the model's schema replaces it with
# a clock that stands still unless the model moves it (its offset is then the time itself).
FROZEN_SERVER_CLOCK = """
CREATE OR REPLACE FUNCTION coord_now() RETURNS double precision
    LANGUAGE sql VOLATILE SET search_path FROM CURRENT
    AS $$ SELECT offset_s FROM clock_offset $$
"""


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self, pg_url: str | None = None) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="coord-model-"))
        self.now = 1000.0
        clock = Clock(mono=lambda: self.now, wall=lambda: 1.7e9 + self.now)
        cfg = Config(instance_ttl=1e9, heartbeat=1.0, lease_ttl=TTL, renew_deadline=DEADLINE)
        self.schema = f"t_{uuid.uuid4().hex[:16]}" if pg_url else None
        where = with_schema(pg_url, self.schema) if pg_url and self.schema else self.dir / "coord.db"
        self.store = coord.Store(where, clock=clock, config=cfg)
        if self.schema:
            self._set_server_clock(FROZEN_SERVER_CLOCK)
        self.insts = [self._register(i) for i in IDS]
        # model: name -> (holder index, term, expires) or None
        self.model: dict[str, tuple[int, int, float] | None] = dict.fromkeys(NAMES)
        self.last_term: dict[str, int] = {}
        self.lost_terms: dict[str, set[int]] = {n: set() for n in NAMES}
        self.top_term = 0
        # live Lease objects: (index, name) -> (Lease, local renew deadline)
        self.leases: dict[tuple[int, str], tuple[Lease, float]] = {}
        self.stale: list[Lease] = []  # objects whose instance was restarted
        self.writes = 0

    def _register(self, id: str) -> coord.Instance:
        return coord.register(self.store, id, app="model", heartbeat=False, handle_signals=False)

    def _set_server_clock(self, *first: str) -> None:
        """Make the server's clock read the model's (after the statements ``first``), in
        one transaction that reads no clock: a reading between the model's move and the
        server's would see the server catch up, and a step forward is held back."""
        if not self.schema:
            return

        def txn(c: Any) -> None:
            for sql in first:
                c.execute(sql)
            c.execute("UPDATE clock_offset SET offset_s = %s", (self.now,))

        self.store.backend.db.write(txn)  # type: ignore[attr-defined]

    def teardown(self) -> None:
        for inst in self.insts:
            inst.close()
        if self.schema:
            engine_sql.execute(self.store, f'DROP SCHEMA "{self.schema}" CASCADE')
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _free(self, name: str) -> None:
        cur = self.model[name]
        if cur is not None:
            self.lost_terms[name].add(cur[1])
        self.model[name] = None

    # -- rules ----------------------------------------------------------------------------

    @rule(i=st.integers(0, 2), name=st.sampled_from(NAMES))
    def acquire(self, i: int, name: str) -> None:
        cur = self.model[name]
        takeable = cur is None or cur[2] < self.now
        lease = try_acquire(self.insts[i], name, renew=False)
        assert (lease is not None) == takeable, (cur, self.now)
        if lease is None:
            return
        assert lease.term > self.top_term  # strictly increasing, never reused
        self.top_term = lease.term
        self._free(name)
        old = self.leases.pop((i, name), None)
        if old is not None:
            self.stale.append(old[0])
        self.model[name] = (i, lease.term, self.now + TTL)
        self.last_term[name] = lease.term
        self.leases[(i, name)] = (lease, self.now + DEADLINE)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.leases)))
        lease, deadline = self.leases[key]
        i, name = key
        cur = self.model[name]
        ours = cur is not None and cur[0] == i and cur[1] == lease.term
        held_locally = not lease.lost.is_set() and self.now < deadline
        expect = held_locally and ours and cur is not None and cur[2] >= self.now
        assert lease.renew() == expect
        if expect:
            self.model[name] = (i, lease.term, self.now + TTL)
            self.leases[key] = (lease, self.now + DEADLINE)
        elif ours:
            self._free(name)  # stepped down, or found expired: freed either way
        if not expect:
            assert lease.lost.is_set()

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.leases)))
        lease, _ = self.leases.pop(key)
        i, name = key
        cur = self.model[name]
        was_lost = lease.lost.is_set()
        lease.release()
        if not was_lost and cur is not None and cur[0] == i and cur[1] == lease.term:
            self._free(name)
        self.stale.append(lease)

    @rule(dt=st.sampled_from([0.0, 0.5, 2.0, 3.9, 5.99, 6.0, 9.99, 10.0, 10.01, 25.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._set_server_clock()

    @rule(i=st.integers(0, 2))
    def restart(self, i: int) -> None:
        """A clean exit and a new incarnation under the same id: what it held is released."""
        self.insts[i].close()
        for key in [k for k in self.leases if k[0] == i]:
            self.stale.append(self.leases.pop(key)[0])
        for name in NAMES:
            cur = self.model[name]
            if cur is not None and cur[0] == i:
                self._free(name)
        self.insts[i] = self._register(IDS[i])

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def stale_write(self, data: st.DataObject) -> None:
        """A Lease object that was released, taken over or outlived its instance never writes."""
        lease = data.draw(st.sampled_from(self.stale))
        cur = self.model[lease.name]
        if cur is not None and cur[1] == lease.term:
            return  # a released object whose term is current cannot exist; guard anyway
        with pytest.raises(LeaseLost):
            lease.write(UPSERT.format("'model/stale'", "'x'"))
        assert engine_sql.value(self.store, "SELECT value FROM meta WHERE key = 'model/stale'") is None

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def database_agrees(self) -> None:
        for name in NAMES:
            found = engine_sql.rows(self.store, "SELECT * FROM leases WHERE name = ?", (name,))
            row = found[0] if found else None
            cur = self.model[name]
            if cur is None:
                assert row is None or row["holder_id"] is None
                continue
            assert row is not None
            assert (row["holder_id"], row["term"]) == (IDS[cur[0]], cur[1])
            assert row["holder_incarnation"] == self.insts[cur[0]].incarnation
            assert row["expires_mono"] == pytest.approx(cur[2])

    @invariant()
    def only_the_current_term_writes(self) -> None:
        """Fenced writes with every term ever issued: only the current, unexpired one passes,
        and a refused write changes nothing."""
        for name, last in self.last_term.items():
            cur = self.model[name]
            for term in sorted(self.lost_terms[name] | {last}):
                current = cur is not None and cur[1] == term and cur[2] >= self.now
                self.writes += 1
                value = f"w{self.writes}"
                try:
                    fenced_write(self.store, name, term,
                                 UPSERT.format("'model/w'", "%s" if self.schema else "?"),
                                 (value,))
                    ok = True
                except LeaseLost as e:
                    assert (e.name, e.term) == (name, term)
                    ok = False
                assert ok == current, (name, term, cur, self.now)
                stored = engine_sql.value(self.store, "SELECT value FROM meta WHERE key = 'model/w'")
                assert (stored == value) == ok

    @invariant()
    def one_holder_at_a_time(self) -> None:
        for name in NAMES:
            believers = [lease for (_, n), (lease, _) in self.leases.items()
                         if n == name and lease.held]
            believers += [lease for lease in self.stale if lease.name == name and lease.held]
            assert len(believers) <= 1, believers
            if believers:
                cur = self.model[name]
                assert cur is not None and believers[0].term == cur[1]

    @invariant()
    def history_is_consistent(self) -> None:
        # In the order the rows were written (PostgreSQL keeps no such order: by the time
        # each term was taken, which the model's clock only moves forward).
        order = "acquired_at, term" if self.schema else "rowid"
        terms = [r["term"] for r in engine_sql.rows(
            self.store, f"SELECT term FROM lease_terms ORDER BY {order}")]
        assert terms == sorted(terms) and len(set(terms)) == len(terms)
        problems = [p for p in check(self.store, integrity=False) if p.check != "instances"]
        assert not problems, problems


def model_settings(engine: str) -> settings:
    # A PostgreSQL step costs several round trips: fewer examples keep the run bounded.
    return settings(
        max_examples=40 if engine == "sqlite" else 20, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def test_lease_rules_against_the_model(engine: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if engine == "postgresql" else None
    run_state_machine_as_test(lambda: LeaseMachine(url), settings=model_settings(engine))
