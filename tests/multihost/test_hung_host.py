"""A hung holder across hosts (SIGSTOP), with real namespaces, each host a machine of its own:

- **host**: every process of the holder's host is stopped (``net.freeze``: the wrapper, its
  CMD, all). The lease moves to the candidate on another host a TTL after the holder's last
  sign of life on the server's clock (its last heartbeat or renewal), within 10 %, never
  before; after the thaw the holder learns by itself that it lost (its wrapper ends CMD at
  once — KILL without the grace, its deadline long past — and exits 75) and its term's
  fenced write is refused.
- **wrapper**: only the wrapper is stopped and its CMD runs on, with no other coord process
  on that host. The candidate on another host takes the lease after the TTL *while the old
  CMD still runs*: from another machine nothing can end it, so exclusion for effects that
  are not fenced is not promised there — the old term's fenced write is refused, which is
  the guarantee. After the thaw the wrapper ends its CMD and exits 75.
- **host-mate**: as **wrapper**, but the other contender is a ``coord elect`` on the same
  host: it takes the lease after the TTL and ends the stopped holder's CMD tree (TERM
  ignored, KILL after the grace) before its own CMD starts.

CI runs one trial of each; COORD_SLOW=1 runs ten."""

from __future__ import annotations

import os
import signal
import tempfile
import time

import pytest
from hostprocs import (
    CANDIDATE,
    GRACE,
    NAME,
    TTL,
    Admin,
    Proc,
    alive,
    env,
    kill_left,
    read_pids,
    run_trials,
    start_holder,
)
from netns import Net, mono

SLOW = bool(os.environ.get("COORD_SLOW"))




_TRIALS = iter(range(10**6))


def signs_of_life(admin: Admin, holder_id: str, term: int) -> tuple[float, float] | None:
    """(last heartbeat, last renewal) of the holder on the server's clock, while it holds."""
    rows = admin.sql(
        "SELECT i.heartbeat_mono, l.expires_mono - l.ttl FROM leases l JOIN instances i "
        "ON i.id = l.holder_id AND i.incarnation = l.holder_incarnation "
        "WHERE l.name = %s AND l.term = %s AND i.id = %s", (NAME, term, holder_id))
    return (float(rows[0][0]), float(rows[0][1])) if rows else None


def trial(net: Net, how: str) -> dict[str, float]:
    a, b = net.hosts
    schema = f"hung{next(_TRIALS)}"
    admin = Admin(net, schema)
    ra, rb = tempfile.mkdtemp(prefix="coordt-a-"), tempfile.mkdtemp(prefix="coordt-b-")
    url_a, url_b = (net.url(h) + f"?schema={schema}" for h in (a, b))
    holder = start_holder(net, a, url_a, ra, "1")
    pids = read_pids(os.path.join(ra, "cmd-1.pids"), 60)
    other: Proc
    if how == "host-mate":
        other = start_holder(net, a, url_a, ra, "2")
    else:
        other = Proc.python(net, b, CANDIDATE, url_b, NAME, environ=env(rb))
        other.wait_for("ready", 60)
    stopped: list[int] = []
    try:
        holder_id, old_term = admin.term()
        assert holder_id is not None
        time.sleep(TTL / 3)
        if how == "host":
            stopped = net.freeze(a)
        else:
            os.kill(holder.p.pid, signal.SIGSTOP)
            stopped = [holder.p.pid]
        t_stop = mono()
        life = signs_of_life(admin, holder_id, old_term)
        while True:
            who, term = admin.term()
            if who != holder_id:
                break
            now = signs_of_life(admin, holder_id, old_term)
            life = now or life
            assert mono() < t_stop + 60, "no takeover within 60 s"
            time.sleep(0.02)
        assert life is not None
        t_taken = mono()
        took_at = float(admin.sql("SELECT acquired_at FROM lease_terms WHERE name = %s "
                                  "AND term = %s", (NAME, term))[0][0])
        assert term > old_term
        first, last = min(life), max(life)
        out = {"moved_after_last_sign": took_at - last, "moved_after_first_sign": took_at - first}
        assert took_at - first >= TTL, out  # never before a TTL without a sign of life
        assert took_at - last <= TTL * 1.1, out
        assert admin.fenced_refused(old_term)
        if how == "wrapper":
            # What is not promised: the old CMD runs on beside the new holder.
            assert all(alive(p) for p in pids)
        if how == "host-mate":
            new_pids = read_pids(os.path.join(ra, "cmd-2.pids"), 30)
            t_new = mono()
            assert not any(alive(p) for p in pids), "the new CMD runs beside the old one"
            out["new_cmd_after_take"] = t_new - t_taken
            assert new_pids
        # Thawed, the holder learns it lost: its CMD tree ends, the wrapper exits 75.
        if how == "host":
            net.thaw(a)
        else:
            os.kill(holder.p.pid, signal.SIGCONT)
        t_thaw = mono()
        stopped = []
        while any(alive(p) for p in pids):
            assert mono() < t_thaw + 30, "the old CMD outlived the thaw by 30 s"
            time.sleep(0.01)
        out["cmd_gone_after_thaw"] = mono() - t_thaw
        if how != "host-mate":
            # Its deadline long past, the wrapper does not wait out the kill grace: every
            # moment CMD runs on is a moment beside the new holder.
            assert out["cmd_gone_after_thaw"] < GRACE, out
        assert holder.p.wait(timeout=60) == 75
        out["wrapper_exit_after_thaw"] = mono() - t_thaw
        assert not any(alive(p) for p in pids)
        assert admin.term()[1] == term  # the new holder keeps it
        return out
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        holder.end()
        other.end()
        kill_left(pids)
        admin.close()




VARIANTS = ["host", "wrapper", "host-mate"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", VARIANTS)
def test_a_hung_holder_loses_after_its_ttl_and_learns_it(net: Net, how: str) -> None:
    run_trials(trial, net, 1, how)


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="set COORD_SLOW=1 for the long run")
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("how", VARIANTS)
def test_hung_holders_again_and_again(net: Net, how: str) -> None:
    run_trials(trial, net, 10, how)


# A worker that claims one job for a long claim lease and holds it; on a line on stdin it
# tries to ack, and prints what happened.
CLAIMER = r"""
import json, sys, time
import coord
from coord import queues
from coord.errors import ClaimLost, CoordError

def say(**kw):
    kw["t"] = time.clock_gettime(time.CLOCK_MONOTONIC)
    print(json.dumps(kw), flush=True)

url, wid = sys.argv[1], sys.argv[2]
store = coord.Store(url)
inst = coord.register(store, wid, app="worker", handle_signals=False)
say(op="ready", inc=inst.incarnation)
job = None
while job is None:
    job = queues.claim(store, "work", inst, lease=60, timeout=1)
say(op="claimed", job=job.id, token=job.token)
sys.stdin.readline()
for _ in range(20):
    try:
        queues.ack(store, job, result={"by": wid})
        say(op="acked")
        break
    except ClaimLost:
        say(op="lost")
        break
    except CoordError as e:
        say(op="error", error=str(e))
        time.sleep(0.5)
"""


@pytest.mark.timeout(300)
def test_a_hung_hosts_claim_moves_after_its_ttl_and_its_ack_is_refused(net: Net) -> None:
    from coord import queues

    a, b = net.hosts
    schema = f"hungq{next(_TRIALS)}"
    admin = Admin(net, schema)
    job = queues.put(admin.store, "work", {"n": 1})
    ra, rb = tempfile.mkdtemp(prefix="coordt-a-"), tempfile.mkdtemp(prefix="coordt-b-")
    first = Proc.python(net, a, CLAIMER, net.url(a) + f"?schema={schema}", "wa",
                        environ=env(ra))
    second: Proc | None = None
    stopped: list[int] = []
    try:
        assert first.wait_for("claimed", 60)["job"] == job
        second = Proc.python(net, b, CLAIMER, net.url(b) + f"?schema={schema}", "wb",
                             environ=env(rb))
        second.wait_for("ready", 60)
        time.sleep(TTL / 3)
        stopped = net.freeze(a)
        t_stop = mono()
        beat = None
        while not second.found("claimed"):
            rows = admin.sql("SELECT heartbeat_mono FROM instances WHERE id = 'wa' "
                             "AND status = 'alive'")
            beat = float(rows[0][0]) if rows else beat
            second.pump(0.02)
            assert mono() < t_stop + 60, "the claim did not move within 60 s"
        assert beat is not None
        moved = float(admin.sql("SELECT claimed_at FROM jobs WHERE id = %s", (job,))[0][0])
        # Its claim lease (60 s) is far off: the claim moved with the hung instance's TTL.
        assert TTL <= moved - beat <= TTL * 1.1, moved - beat
        net.thaw(a)
        stopped = []
        first.send("ack")
        assert first.wait_for("lost", 60)
        second.send("ack")
        second.wait_for("acked", 30)
        got = queues.get_job(admin.store, job)
        assert got.state == "done" and got.result == {"by": "wb"}
        print(f"claim moved {moved - beat:.2f} s after the hung host's last heartbeat")
    finally:
        if stopped:
            net.thaw(a)
        first.end()
        if second is not None:
            second.end()
        admin.close()
