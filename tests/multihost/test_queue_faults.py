"""Queue workers across hosts under faults: 3 hosts (each a machine of its own) × 2
workers on one shared queue, while links are cut and hosts frozen (SIGSTOP of every process
on them) at random, each for a bounded time. Afterwards every job put is done or dead
(none lost); a done job was acked exactly once, by its latest claim (its result carries the
acking claim's token, and no worker saw a successful ack with any other token: no ack by a
stale claim).

Each worker prints every claim and every ack that returned (CLOCK_MONOTONIC): the audit
compares these with the jobs on the server. CI runs 25 s of faults; COORD_SLOW=1 runs 4
minutes."""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Any

import pytest
from hostprocs import Admin, Proc, env
from netns import Host, Net, mono

from coord import queues

SLOW = bool(os.environ.get("COORD_SLOW"))
QUEUE = "work"
CLAIM_LEASE = 5.0

# A worker: claims (lease 5 s), works 0.1 s, acks with its token as the result; a worker
# whose registration was lost registers again (a new id); stops when nothing is left.
WORKER = r"""
import json, sys, time
import coord
from coord import queues
from coord.errors import ClaimLost, CoordError, NotRegistered

def say(**kw):
    kw["t"] = time.clock_gettime(time.CLOCK_MONOTONIC)
    print(json.dumps(kw), flush=True)

url, wid = sys.argv[1], sys.argv[2]
store = coord.Store(url)
n = 0
inst = None
while True:
    try:
        if inst is None or inst.lost.is_set():
            n += 1
            inst = coord.register(store, f"{wid}-{n}", app="worker", handle_signals=False)
            say(op="registered", id=inst.id)
        job = queues.claim(store, "work", inst, lease=%(lease)s, timeout=1)
        if job is None:
            say(op="idle")
            continue
        say(op="claimed", job=job.id, token=job.token, attempt=job.attempts)
        time.sleep(0.1)
        queues.ack(store, job, result={"token": job.token, "worker": wid})
        say(op="acked", job=job.id, token=job.token)
    except ClaimLost as e:
        say(op="lost", error=str(e))
    except NotRegistered:
        inst = None
    except CoordError as e:
        say(op="error", error=str(e))
        time.sleep(0.1)
""".replace("%(lease)s", str(CLAIM_LEASE))


HOSTS = 3  # the ``net`` fixture's (tests/pg_fixtures.py)


def chaos(net: Net, workers: list[Proc], seconds: float, rng: random.Random) -> list[str]:
    """Cut links and freeze hosts at random for ``seconds``; at most two hosts faulted at a
    time, each fault 2-10 s. Returns what was done."""
    faulted: dict[int, tuple[str, float]] = {}
    done: list[str] = []
    end = mono() + seconds
    next_fault = mono() + rng.uniform(0.5, 2)
    while mono() < end or faulted:
        now = mono()
        for i, (kind, until) in list(faulted.items()):
            if now >= until:
                (net.heal if kind == "cut" else net.thaw)(net.hosts[i])
                del faulted[i]
        if now < end and now >= next_fault and len(faulted) < 2:
            i = rng.choice([h.index for h in net.hosts if h.index not in faulted])
            kind = rng.choice(["cut", "freeze"])
            span = rng.uniform(2, 10)
            (net.cut if kind == "cut" else net.freeze)(net.hosts[i])
            faulted[i] = (kind, now + span)
            done.append(f"{kind} h{i} {span:.1f}s")
            next_fault = now + rng.uniform(1, 4)
        for w in workers:
            w.pump(0)
        time.sleep(0.05)
    return done


def audit(admin: Admin, ids: list[int], workers: list[Proc]) -> dict[str, int]:
    jobs = {j: queues.get_job(admin.store, j) for j in ids}
    states = {j: job.state for j, job in jobs.items()}
    assert set(states.values()) <= {"done", "dead"}, \
        {s: sum(1 for x in states.values() if x == s) for s in set(states.values())}
    claims: dict[int, list[tuple[float, str]]] = {}
    acked: dict[int, list[str]] = {}
    for w in workers:
        for x in w.lines:
            if x.get("op") == "claimed":
                # Ordered by the server's count of attempts, not by when the worker said it:
                # a claim's reply a cut delayed may be told after a later claim's.
                claims.setdefault(x["job"], []).append((x["attempt"], x["token"]))
            elif x.get("op") == "acked":
                acked.setdefault(x["job"], []).append(x["token"])
    for j, job in jobs.items():
        if job.state == "dead":
            assert j not in acked, (j, acked[j])
            continue
        token = job.result["token"]
        # Acked once, by the latest claim, and no other ack came back as a success.
        # (None seen is possible: an ack whose reply a cut lost reports an error.)
        assert acked.get(j, []) in ([], [token]), (j, token, acked[j])
        logged = sorted(claims.get(j, []))
        assert logged and logged[-1][1] == token, (j, token, logged)
    return {"jobs": len(ids), "done": sum(s == "done" for s in states.values()),
            "dead": sum(s == "dead" for s in states.values()),
            "claims": sum(len(v) for v in claims.values()),
            "lost_claims": sum(1 for w in workers for x in w.lines if x.get("op") == "lost")}


def trial(net: Net, seconds: float, jobs: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    schema = f"queue{seed}"
    admin = Admin(net, schema)
    ids = [queues.put(admin.store, QUEUE, {"n": i}) for i in range(jobs)]
    workers: list[Proc] = []
    hosts: list[Host] = list(net.hosts)
    try:
        for h in hosts:
            runtime = tempfile.mkdtemp(prefix=f"coordt-q{h.index}-")
            for k in range(2):
                url = net.url(h) + f"?schema={schema}"
                workers.append(Proc.python(net, h, WORKER, url, f"w{h.index}{k}",
                                           environ=env(runtime)))
        for w in workers:
            w.wait_for("registered", 60)
        t0 = mono()
        faults = chaos(net, workers, seconds, rng)
        # Healed and thawed: the rest drains within a bounded time.
        deadline = mono() + 180
        while admin.sql("SELECT count(*) FROM jobs WHERE queue = %s AND state NOT IN "
                        "('done', 'dead')", (QUEUE,))[0][0]:
            assert mono() < deadline, "jobs left after 180 s without faults"
            for w in workers:
                w.pump(0.01)
        for w in workers:
            w.pump(0.2)
        out: dict[str, Any] = audit(admin, ids, workers)
        out["seconds"] = round(mono() - t0, 1)
        out["faults"] = len(faults)
        print(f"seed {seed}: {out}; faults: {', '.join(faults)}")
        return out
    finally:
        for h in hosts:
            net.heal(h)
            net.thaw(h)
        for w in workers:
            w.end()
        admin.close()


@pytest.mark.timeout(600)
def test_workers_across_hosts_ack_every_job_once_under_faults(net: Net) -> None:
    out = trial(net, 25, 150, random.randrange(10**6))
    assert out["faults"] >= 3


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="set COORD_SLOW=1 for the long run")
@pytest.mark.timeout(1800)
def test_workers_across_hosts_for_minutes(net: Net) -> None:
    out = trial(net, 240, 1500, random.randrange(10**6))
    assert out["faults"] >= 30
