"""A lease holder's faults across hosts, with real namespaces, each host a machine of its
own (its own machine and boot id), over TCP:

- **cut**: the link of the holder's host is cut. The holder (``coord elect``, whose CMD and
  CMD's child ignore SIGTERM, so the kill grace and KILL are really exercised) steps down on
  its own renew deadline: its CMD tree has ended before the candidate on another host takes
  the lease (both CLOCK_MONOTONIC of this machine: the CMD's pids vanish before the
  candidate *starts* the take that succeeds); the new term is higher; the old term's fenced
  write is refused; no session of the cut host holds a lock on the server longer than TTL +
  2 s from the cut; after the heal the old host's wrapper exits 75 and contends again
  normally (it gets the lease, in a higher term, once the new holder releases it).
- **sigkill**: the holder's liveness backend is SIGKILLed on the server (every session ends,
  the holder lives) and **terminate**: every backend of the holder's host ends by
  ``pg_terminate_backend``. No other instance holds the lease before the holder's step-down
  completed (if it stepped down at all: it reconnects and renews in time).

CI runs one trial of each; the slow marker with COORD_SLOW=1 runs 20."""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time

import pytest
from hostprocs import (
    CANDIDATE,
    GRACE,
    NAME,
    RENEW_DEADLINE,
    TTL,
    Admin,
    Proc,
    alive,
    env,
    kill_left,
    locks_of,
    read_pids,
    run_trials,
    start_holder,
)
from netns import Host, Net, mono
from pg_fixtures import import_psycopg

psycopg = import_psycopg()

SLOW = bool(os.environ.get("COORD_SLOW"))


def fault(net: Net, admin: Admin, host: Host, how: str) -> None:
    if how == "cut":
        net.cut(host)
    elif how == "sigkill":
        pids = [int(r[0]) for r in admin.sql(
            "SELECT pid FROM pg_stat_activity WHERE client_addr = %s "
            "AND application_name LIKE 'coord live %%'", (host.addr,))]
        assert pids, "no liveness session of the holder"
        os.kill(pids[0], signal.SIGKILL)
    else:
        ended = admin.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE client_addr = %s", (host.addr,))
        assert ended and all(r[0] for r in ended), ended


_TRIALS = iter(range(10**6))
INTERVAL = TTL / 3


def trial(net: Net, how: str) -> dict[str, float]:
    a, b = net.hosts
    schema = f"lease{next(_TRIALS)}"
    admin = Admin(net, schema)
    ra, rb = tempfile.mkdtemp(prefix="coordt-a-"), tempfile.mkdtemp(prefix="coordt-b-")
    url_a, url_b = (net.url(h) + f"?schema={schema}" for h in (a, b))
    holder = start_holder(net, a, url_a, ra, "1")
    pids = read_pids(os.path.join(ra, "cmd-1.pids"), 60)
    cand = Proc.python(net, b, CANDIDATE, url_b, NAME, environ=env(rb))
    again: Proc | None = None
    try:
        cand.wait_for("ready", 60)
        holder_id, old_term = admin.term()
        assert holder_id is not None and holder_id != "cand"
        time.sleep(random.uniform(INTERVAL, 2 * INTERVAL))  # any phase of the renewals
        fault(net, admin, a, how)
        t_fault = mono()
        gone: float | None = None
        last_lock = t_fault
        # Watch the old CMD's pids and the candidate; a cut lasts past TTL + 2 s.
        end = t_fault + (TTL + 4 if how == "cut" else TTL + 6)
        while mono() < end or (how == "cut" and not cand.found("took")):
            if gone is None and not any(alive(p) for p in pids):
                gone = mono()
            if how == "cut" and locks_of(admin.sql, a.addr):
                last_lock = mono()
            cand.pump(0.01)
            assert mono() < t_fault + 60, "no takeover within 60 s of the cut"
        took = cand.found("took")
        out = {"kept": 0.0 if took else 1.0}
        if took:
            # The ordering: the old CMD tree ended before the winning take even started.
            assert gone is not None, "another holder while the old CMD ran"
            assert gone < took[0]["t0"], (gone - t_fault, took[0]["t0"] - t_fault)
            assert took[0]["term"] > old_term
            assert admin.fenced_refused(old_term)
            out["stepped_down_after_fault"] = gone - t_fault
            out["taken_after_fault"] = took[0]["t0"] - t_fault
            out["margin"] = took[0]["t0"] - gone
        else:
            assert how != "cut"
            # Kept: it reconnected and renewed, its CMD runs, its term is current.
            assert gone is None and admin.term() == (holder_id, old_term)
        if how == "cut":
            assert gone is not None
            assert gone - t_fault <= RENEW_DEADLINE + GRACE + 2, gone - t_fault
            assert last_lock - t_fault <= TTL + 2, f"a lock held {last_lock - t_fault:.1f} s"
            out["last_lock_after_cut"] = last_lock - t_fault
            net.heal(a)
            t_heal = mono()
            assert holder.p.wait(timeout=60) == 75
            out["wrapper_exit_after_heal"] = mono() - t_heal
            # It contends again normally: the lease is its once the candidate releases it.
            again = start_holder(net, a, url_a, ra, "2")
            time.sleep(1)
            assert admin.term()[0] == "cand"
            cand.send("release")
            cand.wait_for("released", 30)
            read_pids(os.path.join(ra, "cmd-2.pids"), 60)
            who, term = admin.term()
            assert who not in (None, "cand") and term > took[0]["term"]
        return out
    finally:
        net.heal(a)
        for p in (holder, cand, *([again] if again else [])):
            p.end()
        kill_left(pids)
        admin.close()




VARIANTS = ["cut", "sigkill", "terminate"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", VARIANTS)
def test_the_holder_steps_down_before_anyone_takes_over(net: Net, how: str) -> None:
    run_trials(trial, net, 1, how)


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="set COORD_SLOW=1 for the long run")
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("how", VARIANTS)
def test_the_step_down_order_holds_in_20_trials(net: Net, how: str) -> None:
    run_trials(trial, net, 20, how)
