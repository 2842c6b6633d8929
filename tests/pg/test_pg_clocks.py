"""Clocks on PostgreSQL: only the server's clock (``coord_now()``) decides a verdict.

- Clients whose clocks are an hour ahead or behind (a ``coord.clock.Clock`` with shifted
  readings, injected into ``coord.Store``: the system clock is never set) change no verdict:
  instances registered by them are alive while they heartbeat and 'hung' once their last
  heartbeat is older than the TTL on the server's clock — never before — for observers with
  any of those clocks alike; nothing they write carries their clock; no step is seen.
- A step of the server's clock forward by an hour (faked with the schema's ``clock_offset``)
  is noticed by the first process that reads the clock twice around it: it records the step,
  and an instance whose last heartbeat is older than the step gets one TTL from the step to
  heartbeat again — it is not declared hung, nor its id taken over, before that. A heartbeating
  instance stays alive throughout. Before any process has noticed, a reader's first look sees
  what the step does: every heartbeat an hour old.
- The same step, noticed by the processes that hold and wait themselves, moves nothing from a
  live holder (``coord_expiry``: one TTL from the step): a renewing lease holder keeps its
  lease and no candidate gets it until the holder is SIGKILLed; a worker extending its claim
  keeps the job; a message is delivered within its lifetime, and one never received goes
  within a lifetime of the step.
- A step back is not acted on: an unrenewed lease expires as much later as the step was
  long, by real time — never early, not for ever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ManualClock, move_server_clock, reap_children, stop_outside_a_write, wait_until
from contract_engines import fresh_schema
from pg_fixtures import import_psycopg, make_version_1

import coord
from coord.clock import Clock
from coord.errors import InstanceIdInUse
from coord.instances import get_instance

psycopg = import_psycopg()

HOUR = 3600.0
TTL = 2.0


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def shifted(offset: float) -> Clock:
    return Clock(mono=lambda: mono() + offset, wall=lambda: time.time() + offset)


# An instance whose process's clocks are shifted by argv[3] seconds; heartbeats every TTL/3.
HOLDER = r"""
import sys, time
import coord
from coord.clock import Clock
url, id, offset, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
def mono():
    return time.clock_gettime(time.CLOCK_MONOTONIC) + offset
store = coord.Store(url, clock=Clock(mono=mono, wall=lambda: time.time() + offset))
inst = coord.register(store, id, app="clocks", ttl=ttl, handle_signals=False)
print("ready", inst.incarnation, flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def url(pg_url: str) -> Iterator[str]:
    with fresh_schema(pg_url) as u:
        coord.Store(u).close()
        yield u


def start_holder(url: str, id: str, offset: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, url, id, str(offset), str(TTL)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("ready"), line
    return p


def verdict(store: coord.Store, id: str) -> tuple[float, str, float]:
    """(server clock before, status, server clock after) of one look at ``id``."""
    before = store.backend.clock.now()
    status = get_instance(store, id).status
    return before, status, store.backend.clock.now()


def heartbeat_of(store: coord.Store, id: str) -> float:
    row = store.backend.instances.by_id(id)
    assert row is not None
    return float(row["heartbeat_mono"])


def events(store: coord.Store, kind: str) -> list[dict[str, Any]]:
    return store.backend.db.rows(  # type: ignore[attr-defined, no-any-return]
        "SELECT * FROM events WHERE kind = %s", (kind,))


def test_client_clocks_an_hour_off_change_no_verdict(url: str) -> None:
    holders = {"ahead": start_holder(url, "ahead", HOUR),
               "behind": start_holder(url, "behind", -HOUR)}
    observers = [coord.Store(url, clock=shifted(off)) for off in (-HOUR, 0.0, HOUR)]
    try:
        # While they heartbeat: alive to every observer, over several TTLs.
        end = mono() + 2.5 * TTL
        while mono() < end:
            for o in observers:
                for id in holders:
                    assert verdict(o, id)[1] == "alive", (id, o.clock.mono())
            time.sleep(0.05)
        # What they wrote is the server's time, not theirs.
        server_wall = float(observers[1].backend.db.value(  # type: ignore[attr-defined]
            "SELECT extract(epoch FROM clock_timestamp())"))
        for id in holders:
            row = observers[1].backend.instances.by_id(id)
            assert row is not None
            assert abs(row["heartbeat_at"] - server_wall) < TTL + 1, row
            assert abs(row["started_at"] - server_wall) < 60, row
        # Their heartbeats stop (SIGSTOP between two beats: a beat is one short statement).
        for p in holders.values():
            os.kill(p.pid, signal.SIGSTOP)
        time.sleep(0.2)
        last = {id: heartbeat_of(observers[1], id) for id in holders}
        first_hung: dict[tuple[int, str], float] = {}
        deadline = mono() + TTL + 10
        while len(first_hung) < len(observers) * len(holders) and mono() < deadline:
            for n, o in enumerate(observers):
                for id in holders:
                    before, status, after = verdict(o, id)
                    if status == "hung":
                        # never before the TTL ran out on the server's clock
                        assert after - last[id] > TTL, (n, id, after - last[id])
                        first_hung.setdefault((n, id), before)
                    else:
                        assert status == "alive" and before - last[id] <= TTL + 0.001, \
                            (n, id, status, before - last[id])
            time.sleep(0.02)
        assert len(first_hung) == len(observers) * len(holders), first_hung
        late = {k: t - last[k[1]] - TTL for k, t in first_hung.items()}
        assert max(late.values()) < 0.5, late  # and promptly after, for every observer
        assert not events(observers[1], "clock stepped")
    finally:
        for p in holders.values():
            os.kill(p.pid, signal.SIGCONT)
        reap_children(list(holders.values()))
        for o in observers:
            o.close()


def test_a_server_clock_step_holds_expiry_back_for_one_ttl(url: str) -> None:
    watcher = coord.Store(url)  # a long-lived reader: its clock readings bracket the step
    other = coord.Store(url)
    try:
        idle = coord.register(watcher, "idle", app="clocks", ttl=TTL, heartbeat=False,
                              handle_signals=False)
        assert verdict(watcher, "idle")[1] == "alive"
        move_server_clock(watcher, HOUR)
        # Noticed at the watcher's next reading: the idle instance's heartbeat, an hour old
        # now, counts from the step.
        _, status, now = verdict(watcher, "idle")
        assert status == "alive"
        stepped = events(watcher, "clock stepped")
        assert len(stepped) == 1 and '"at_least_s": 3' in stepped[0]["detail"], stepped
        held = watcher.backend.clock.held_since  # type: ignore[attr-defined]
        assert held is not None and held <= now
        # A reader with no reading of its own before the step learns it from the server.
        assert verdict(other, "idle")[1] == "alive"
        with pytest.raises(InstanceIdInUse):
            coord.register(other, "idle", app="clocks", heartbeat=False, handle_signals=False)
        # One TTL after the step (on the server's clock) it is hung, and its id free.
        wait_until(lambda: verdict(other, "idle")[1] == "hung", timeout=TTL + 5)
        assert other.backend.clock.now() - held > TTL
        taken = coord.register(other, "idle", app="clocks", heartbeat=False,
                               handle_signals=False)
        assert taken.incarnation > idle.incarnation
        assert not idle.heartbeat()
    finally:
        coord.instances.close_all()
        watcher.close()
        other.close()


def test_a_heartbeating_instance_stays_alive_through_a_server_clock_step(url: str) -> None:
    holder = start_holder(url, "beating", 0.0)
    watcher = coord.Store(url)
    try:
        assert verdict(watcher, "beating")[1] == "alive"
        move_server_clock(watcher, HOUR)
        end = mono() + 3 * TTL
        while mono() < end:
            assert verdict(watcher, "beating")[1] == "alive"
            time.sleep(0.05)
        assert heartbeat_of(watcher, "beating") > watcher.backend.clock.held_since  # type: ignore[attr-defined, operator]
    finally:
        reap_children([holder])
        watcher.close()


def test_before_anyone_notices_a_server_clock_step_every_heartbeat_looks_old(
        url: str) -> None:
    """What the docs say a step does to a reader with no reading of its own before it, when
    no process has read the clock twice around the step yet."""
    owner = coord.Store(url)
    try:
        coord.register(owner, "early", app="clocks", ttl=TTL, heartbeat=False,
                       handle_signals=False)
        move_server_clock(owner, HOUR)
        fresh = coord.Store(url)
        try:
            assert verdict(fresh, "early")[1] == "hung"
        finally:
            fresh.close()
        # The owner's store read the clock before the step: its next look notices it.
        assert verdict(owner, "early")[1] == "alive"
    finally:
        coord.instances.close_all()
        owner.close()


def test_a_manual_clock_that_moves_the_server_clock_with_it_is_no_step(url: str) -> None:
    """The contract suite's manual clock (``cstore``) moves ``coord_now()`` along with the
    store's own clock, and stands still while real time passes: neither is a step."""
    clock = ManualClock()
    s = coord.Store(url, clock=Clock(mono=clock.mono, wall=clock.wall))
    clock.moved.append(lambda step: move_server_clock(s, step))
    try:
        inst = coord.register(s, "manual", app="clocks", ttl=10.0, heartbeat=False,
                              handle_signals=False)
        s.backend.clock.now()
        clock.now += 4.0
        time.sleep(1.5)
        assert verdict(s, "manual")[1] == "alive"
        clock.now += 5.0  # 10.5 s and more since its heartbeat, on the server's clock
        assert verdict(s, "manual")[1] == "hung"
        assert not events(s, "clock stepped")
        assert s.backend.clock.held_since is None  # type: ignore[attr-defined]
        inst.close()
    finally:
        coord.instances.close_all()
        s.close()


# -- a step forward moves no lease, claim or message while its holder lives -----------------

LEASE = "clocks/leader"
# A candidate for LEASE, in a process of its own: prints "waiting" when it finds it held,
# "holds <term>" once it has it, "lost <reason>" if it loses it; renews it until killed.
CANDIDATE = r"""
import sys
import coord
from coord.config import Config
from coord.leases import acquire
url, id, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = coord.Store(url, config=Config(lease_ttl=ttl, instance_ttl=ttl, heartbeat=ttl / 3))
inst = coord.register(store, id, app="clocks", handle_signals=False)
lease = acquire(inst, sys.argv[4], on_wait=lambda info: print("waiting", flush=True),
                on_lost=lambda l: print("lost", l.lost_reason, flush=True))
print("holds", lease.term, flush=True)
sys.stdin.readline()
"""

# A worker in a process of its own: with argv[4] "extend" it claims one job of the queue and
# extends its claim every third of its lease ("claimed <id>", "extended", "lost"); else it
# waits for a job and prints "got <id>".
WORKER = r"""
import sys, time
import coord
from coord import queues
from coord.errors import ClaimLost
url, id, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = coord.Store(url, config=coord.config.Config(heartbeat=0.5))
inst = coord.register(store, id, app="clocks", handle_signals=False)
print("ready", flush=True)
job = queues.claim(store, "clocks/q", inst, lease=lease, timeout=None)
if sys.argv[4] != "extend":
    print("got", job.id, flush=True)
    sys.stdin.readline()
    sys.exit()
print("claimed", job.id, flush=True)
while True:
    time.sleep(lease / 3)
    try:
        queues.extend(store, job, lease)
    except ClaimLost:
        print("lost", flush=True)
        break
    print("extended", flush=True)
sys.stdin.readline()
"""

# The reaper, as a long-lived process runs it: reap every 0.2 s.
REAPER = r"""
import sys, time
import coord
from coord.reaper import reap
store = coord.Store(sys.argv[1])
print("ready", flush=True)
while True:
    reap(store, checkpoint=False, trees=False)
    time.sleep(0.2)
"""


class Child:
    """A child process whose output lines are collected as they come, with the time
    (``mono()``) each came."""

    def __init__(self, script: str, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", script, *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append((mono(), line.strip()))

    def said(self, head: str) -> list[tuple[float, str]]:
        return [(t, s) for t, s in self.lines if s.split()[0] == head]

    def wait_for(self, head: str, timeout: float = 20.0) -> tuple[float, str]:
        return wait_until(lambda: (self.said(head) or [None])[0], timeout=timeout)  # type: ignore[no-any-return]


def test_a_server_clock_step_moves_no_lease_from_a_live_holder(url: str) -> None:
    """The holder renews normally; the server's clock steps an hour forward; a candidate of
    another process does not get the lease while the holder lives (for twice its TTL), the
    holder keeps renewing it in the same term; once the holder is SIGKILLed the candidate
    takes over within the TTL."""
    watcher = coord.Store(url)
    holder = Child(CANDIDATE, url, "first", str(TTL), LEASE)
    children = [holder]
    try:
        _, line = holder.wait_for("holds")
        term = int(line.split()[1])
        candidate = Child(CANDIDATE, url, "second", str(TTL), LEASE)
        children.append(candidate)
        candidate.wait_for("waiting")
        time.sleep(TTL / 2)
        move_server_clock(watcher, HOUR)
        stepped = watcher.backend.clock.now()
        end = mono() + 2 * TTL
        while mono() < end:
            assert not candidate.said("holds"), candidate.lines
            assert not holder.said("lost"), holder.lines
            time.sleep(0.05)
        rec = watcher.backend.leases.get(LEASE)
        assert rec is not None and rec.term == term and rec.holder is not None
        assert rec.holder[0] == "first"
        assert rec.renewed_at is not None and rec.renewed_at > stepped  # renewed since
        assert events(watcher, "clock stepped")
        killed = mono()
        os.kill(holder.p.pid, signal.SIGKILL)
        at, line = candidate.wait_for("holds", timeout=TTL + 5)
        assert at - killed < TTL + 1, at - killed
        assert int(line.split()[1]) > term
    finally:
        reap_children([c.p for c in children])
        coord.instances.close_all()
        watcher.close()


def test_a_server_clock_step_releases_no_claim_of_a_live_worker(url: str) -> None:
    """A worker holds a claim and extends it; the server's clock steps an hour forward;
    another worker waiting on the queue does not get the job while the first lives (for
    twice the claim's lease), and the first one's extensions go on; once it is SIGKILLed the
    other gets the job."""
    lease = TTL
    s = coord.Store(url)
    children: list[Child] = []
    try:
        job = coord.queues.put(s, "clocks/q", {"n": 1})
        first = Child(WORKER, url, "w1", str(lease), "extend")
        children.append(first)
        first.wait_for("claimed")
        other = Child(WORKER, url, "w2", str(lease), "wait")
        children.append(other)
        other.wait_for("ready")
        time.sleep(lease / 2)
        move_server_clock(s, HOUR)
        end = mono() + 2 * lease
        while mono() < end:
            assert not other.said("got"), other.lines
            assert not first.said("lost"), first.lines
            time.sleep(0.05)
        after_step = len(first.said("extended"))
        wait_until(lambda: len(first.said("extended")) > after_step, timeout=lease)
        assert coord.queues.get_job(s, job).state == "claimed"
        killed = mono()
        os.kill(first.p.pid, signal.SIGKILL)
        at, line = other.wait_for("got", timeout=lease + 10)
        assert int(line.split()[1]) == job
        assert at - killed < lease + 1, at - killed
    finally:
        reap_children([c.p for c in children])
        coord.instances.close_all()
        s.close()


def test_a_server_clock_step_expires_no_message_early(url: str) -> None:
    """Messages with a lifetime of 3 TTLs; the server's clock steps an hour forward while a
    reaper runs: the message is still delivered within its lifetime, and one never
    received is removed within a lifetime of the step."""
    life = 3 * TTL
    s = coord.Store(url)
    reaper = Child(REAPER, url)
    try:
        sender = coord.register(s, "sender", app="clocks", handle_signals=False)
        inbox = coord.register(s, "inbox", app="clocks", handle_signals=False)
        reaper.wait_for("ready")
        sent = mono()
        coord.messages.send(sender, "inbox", {"n": 1}, ttl=life)
        coord.messages.send(sender, "inbox", {"n": 2}, topic="never", ttl=life)
        time.sleep(1.0)  # the reaper reads the clock before the step
        move_server_clock(s, HOUR)
        time.sleep(1.0)  # and after it, several times
        got = coord.messages.receive(inbox, timeout=0, topic="")
        assert mono() - sent < life
        assert got is not None and got.payload == {"n": 1}
        stepped = events(s, "clock stepped")
        assert stepped
        # Not held for ever: gone within a lifetime of the step (and the reaper's round).
        wait_until(lambda: not s.backend.db.rows(  # type: ignore[attr-defined]
            "SELECT 1 FROM messages WHERE topic = 'never'"), timeout=life + 5)
        assert mono() - sent > life
    finally:
        reap_children([reaper.p])
        coord.instances.close_all()
        s.close()


def test_a_server_clock_step_back_delays_a_takeover_by_the_step(url: str) -> None:
    """A step back is not held nor undone: a lease that is not renewed (its holder
    SIGSTOPped) expires as late as the step was long, by the server's clock — late, never
    early, and not for ever: the candidate takes it over then."""
    back = 3 * TTL
    watcher = coord.Store(url)
    holder = Child(CANDIDATE, url, "first", str(TTL), LEASE)
    children = [holder]
    try:
        holder.wait_for("holds")
        candidate = Child(CANDIDATE, url, "second", str(TTL), LEASE)
        children.append(candidate)
        candidate.wait_for("waiting")
        stop_outside_a_write(watcher, holder.p)
        rec = watcher.backend.leases.get(LEASE)
        due = mono() + (rec.expires_in or 0.0) if rec is not None else 0.0
        move_server_clock(watcher, -back)
        at, _ = candidate.wait_for("holds", timeout=TTL + back + 10)
        assert due + back - 0.1 <= at <= due + back + 2, (at - due, back)
        assert not events(watcher, "clock stepped")
    finally:
        reap_children([c.p for c in children])
        coord.instances.close_all()
        watcher.close()


def test_a_version_1_schema_is_brought_to_the_hold(pg_url: str) -> None:
    """A deployment made at schema version 1 gets ``coord_expiry`` when a coord of version 2
    (or later) opens it; the rule: a stamp, or one ttl after the step was seen when that is later (a
    claim made before the migration has no lease recorded: never held back)."""
    from coord.backend.postgresql.opening import latest_version

    with fresh_schema(pg_url) as u:
        make_version_1(pg_url, u)
        s = coord.Store(u)
        try:
            assert s.backend.meta.version() == latest_version() >= 2
            db = s.backend.db  # type: ignore[attr-defined]

            def expiry(stamp: float | None, ttl: float | None) -> float | None:
                return db.value("SELECT coord_expiry(%s, %s)", (stamp, ttl))  # type: ignore[no-any-return]

            s.backend.clock.epoch()  # the epoch row, with no step seen
            assert (expiry(10.0, 3.0), expiry(10.0, None), expiry(None, 3.0)) == (10.0, 10.0, None)
            db.write(lambda c: c.execute("UPDATE server_epoch SET held_since = 100"))
            assert (expiry(10.0, 3.0), expiry(200.0, 3.0), expiry(10.0, None)) == (103.0, 200.0, 10.0)
        finally:
            s.close()
