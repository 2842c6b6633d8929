"""``coord demo``: a short, self-contained show of what coord does, on a real database.

Each capability adds a section. Worker instances are real processes (``python -c``) that
register through the library; everything the demo starts, it ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from .db import Store
from .instances import list_instances
from .reaper import reap

Say = Callable[[str], None]
DEMO_LEASE = "demo/leader"

# A worker: registers as an instance of the demo app and waits to be told to stop.
WORKER = textwrap.dedent(
    """
    import os, signal, sys, time, coord
    store = coord.Store(os.environ["COORD_DB"])
    inst = coord.register(store, sys.argv[1], app="demo")
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)


class Demo:
    """The running show: its store, the processes it started, and how it talks."""

    def __init__(self, store: Store, say: Say) -> None:
        self.store = store
        self.say = say
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, script: str, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, COORD_DB=self.store.address)
        env.pop("COORD_INSTANCE_ID", None)
        p = subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                             stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def wait_ready(self, p: subprocess.Popen[str]) -> str:
        assert p.stdout is not None
        return p.stdout.readline().strip()

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        reap(self.store)


def _names(items: Iterable[object]) -> str:
    """Items for a line of text: ``a, b, c`` (or ``none``), never a Python repr."""
    return ", ".join(str(i) for i in items) or "none"


class _Term(NamedTuple):
    """A term of a lease, to fence a write with (``coord.kv.Fence``)."""

    name: str
    term: int


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def forget_lease(store: Store, name: str) -> None:
    """Delete a free lease's row and its history, so the demo leaves no lease behind. Terms
    come from a counter that never goes back, so a later holder still gets a higher one."""
    store.backend.leases.forget(name)


def section_instances(d: Demo) -> None:
    d.say("== instances: three copies of one tool register ==")
    tag = os.urandom(2).hex()
    ids = [f"demo-{tag}-{n}" for n in ("a", "b", "c")]
    workers = [d.spawn(WORKER, i) for i in ids]
    for w in workers:
        d.wait_ready(w)
    for info in list_instances(d.store, app="demo"):
        if info.id in ids:
            d.say(f"  {info.id:<18} pid {info.pid:<7} incarnation {info.incarnation}  {info.status}")
    victim = workers[1]
    d.say(f"-- kill -9 {ids[1]} (pid {victim.pid})")
    t0 = time.monotonic()
    victim.kill()
    victim.wait()
    status = {i.id: i.status for i in list_instances(d.store, include_dead=True, app="demo")}
    d.say(f"  seen {status.get(ids[1])} after {1000 * (time.monotonic() - t0):.1f} ms (no TTL wait)")
    report = reap(d.store)
    d.say(f"  reaped: {_names(x['id'] for x in report.dead)}")
    alive = [i.id for i in list_instances(d.store, app="demo") if i.id in ids]
    d.say(f"  still alive: {_names(alive)}")


# A worker that starts one child through coord (its own session: it outlives the worker).
SPAWNING_WORKER = textwrap.dedent(
    """
    import os, sys, time, coord
    from coord.processes import spawn
    store = coord.Store(os.environ["COORD_DB"])
    inst = coord.register(store, sys.argv[1], app="demo")
    child = spawn(inst, [sys.executable, "-c", "import time; time.sleep(600)", sys.argv[2]])
    print("ready", child.id, flush=True)
    while True:
        time.sleep(1)
    """
)


def section_processes(d: Demo) -> None:
    from .errors import PermissionDenied
    from .processes import kill_orphans, list_processes, orphans, stop_as

    d.say("== processes: every child is tagged with its instance ==")
    tag = os.urandom(2).hex()
    web, jobs = f"demo-{tag}-web", f"demo-{tag}-jobs"
    workers = {i: d.spawn(SPAWNING_WORKER, i, role) for i, role in ((web, "serve"), (jobs, "work"))}
    child = {i: int(d.wait_ready(w).split()[1]) for i, w in workers.items()}
    for p in list_processes(d.store, all_=True):
        if p.instance_id in child:
            rss = f"{(p.rss or 0) / 1048576:.1f}M"
            d.say(f"  {p.instance_id:<20} process {p.id:<3} pid {p.pid:<7} {p.status:<9} {rss:>7}  "
                  f"{' '.join(p.cmdline[2:])}")
    d.say(f"-- {web} sees only its own: process {_names(p.id for p in list_processes(d.store, web))}")
    try:
        stop_as(d.store, child[jobs], instance_id=web, grace=1)
    except PermissionDenied as e:
        d.say(f"-- {web} tries to stop {jobs}'s process: {e}")
    d.say(f"-- kill -9 {jobs}; its child keeps running")
    workers[jobs].kill()
    workers[jobs].wait()
    report = reap(d.store)
    d.say(f"  reaped {_names(x['id'] for x in report.dead)}: kept as a tombstone while its child "
          "runs")
    for o in orphans(d.store, live=False):
        d.say(f"  orphan: process {o.id} pid {o.pid} of dead instance {o.instance_id}")
    for ended in kill_orphans(d.store, grace=2):
        d.say(f"  ended orphan {ended['id']} (pid {ended['pid']}): {ended['how']}")
    report = reap(d.store)
    d.say(f"  next reap: tombstones removed: {report.tombstones_removed}")
    how = stop_as(d.store, child[web], instance_id=web, grace=2)
    d.say(f"-- {web} stops its own process {child[web]}: {how}")


# A worker that publishes its port as an ephemeral key and answers requests ("mute": never).
MESSAGE_WORKER = textwrap.dedent(
    """
    import os, sys, time, coord
    from coord import kv, messages
    store = coord.Store(os.environ["COORD_DB"])
    inst = coord.register(store, sys.argv[1], app="demo-msg")
    n = int(sys.argv[2])
    kv.set(store, f"demo-msg/{inst.id}/port", 8000 + n, owner=inst)
    print("ready", flush=True)
    while sys.argv[3] == "mute":
        time.sleep(1)
    while True:
        m = messages.receive(inst, timeout=None)
        if m.kind == "request":
            m.reply({"from": inst.id, "load": 10 * n, "asked": m.payload})
    """
)


def section_messages(d: Demo) -> None:
    import threading

    from . import kv, messages
    from .errors import RecipientDead
    from .instances import register

    d.say("== messages: request/reply, gather, shared context ==")
    tag = os.urandom(2).hex()
    ids = [f"demo-{tag}-w{n}" for n in range(3)]
    workers = [d.spawn(MESSAGE_WORKER, i, str(n), "mute" if n == 2 else "answer")
               for n, i in enumerate(ids)]
    for w in workers:
        d.wait_ready(w)
    me = register(d.store, f"demo-{tag}-boss", app="demo-msg", handle_signals=False)
    try:
        answer = messages.request(me, ids[0], {"q": "status"}, timeout=10)
        d.say(f"  request to {ids[0]}: {_json(answer.payload)}")
        times = []
        for i in range(100):
            t0 = time.monotonic()
            messages.request(me, ids[1], i, timeout=10)
            times.append(time.monotonic() - t0)
        d.say(f"  100 more round trips to {ids[1]}: median "
              f"{1000 * sorted(times)[50]:.2f} ms")
        d.say(f"-- gather over the other {len(ids)} instances of demo-msg "
              f"({ids[2]} never answers; timeout 1 s)")
        got = messages.gather(me, {"q": "load?"}, timeout=1.0)
        for m in got.replies:
            d.say(f"  {m.sender}: load {m.payload['load']}")
        d.say(f"  no answer from: {_names(got.missing)}")
        d.say("-- port discovery: each worker published an ephemeral key")
        mine = [e for e in kv.list_keys(d.store, "demo-msg/") if tag in e.key]
        for e in mine:
            d.say(f"  {e.key} = {_json(e.value)}  (owner {e.owner_id}, version {e.version})")
        d.say(f"-- kill -9 {ids[0]}")
        workers[0].kill()
        workers[0].wait()
        left = [e.key for e in kv.list_keys(d.store, "demo-msg/") if tag in e.key]
        d.say(f"  its key is gone at once; keys left: {_names(left)}")
        d.say(f"-- ask {ids[2]} (it never answers; timeout 30 s) and kill -9 it meanwhile")
        threading.Timer(0.3, workers[2].kill).start()
        t0 = time.monotonic()
        try:
            messages.request(me, ids[2], {"q": "still there?"}, timeout=30)
        except RecipientDead as e:
            d.say(f"  the request fails {time.monotonic() - t0:.2f} s in, not at the timeout: {e}")
    finally:
        me.close()


# A candidate: registers, waits to lead the lease named in argv[2], says when it does (CLOCK_MONOTONIC).
CANDIDATE = textwrap.dedent(
    """
    import os, sys, time, coord
    store = coord.Store(os.environ["COORD_DB"])
    inst = coord.register(store, sys.argv[1], app="demo-elect")
    print("ready", flush=True)
    lease = coord.acquire(inst, sys.argv[2])
    print("leader", lease.term, time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)
    while True:
        time.sleep(1)
    """
)


def section_election(d: Demo) -> None:
    from .errors import LeaseLost
    from .kv import set as kv_set
    from .leases import get_lease

    d.say("== leader election: three candidates, one leader, failover on kill -9 ==")
    tag = os.urandom(2).hex()
    ids = [f"demo-{tag}-{n}" for n in ("a", "b", "c")]
    procs = {i: d.spawn(CANDIDATE, i, DEMO_LEASE) for i in ids}
    for p in procs.values():
        d.wait_ready(p)

    def next_leader(after: int) -> tuple[str, int, float]:
        info = d.store.backend.wakeup.wait_for(
            lambda: (i := get_lease(d.store, DEMO_LEASE)).alive and (i.term or 0) > after
            and i or None, 30)
        assert info is not None and info.holder is not None and info.term is not None
        line = d.wait_ready(procs[info.holder]).split()
        return info.holder, info.term, float(line[2])

    leader, term, _ = next_leader(0)
    d.say(f"  leader: {leader}, term {term} (the others wait; `coord leader {DEMO_LEASE}`)")
    for _ in range(2):
        victim = procs.pop(leader)
        d.say(f"-- kill -9 {leader} (pid {victim.pid})")
        t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
        victim.kill()
        victim.wait()
        old = term
        leader, term, t1 = next_leader(term)
        d.say(f"  new leader {leader}, term {term}, took over {1000 * (t1 - t0):.1f} ms after "
              "the kill (proof of death, no TTL wait)")
    try:
        kv_set(d.store, "demo/fenced", "stale", fence=_Term(DEMO_LEASE, old))
    except LeaseLost as e:
        d.say(f"  a write fenced with the old term {old} is refused: {e}")


# A queue worker: claims from a shared queue, works 20 ms per job, acks. "hang": it claims
# one job and sits on it (and is then killed holding it).
QUEUE_WORKER = textwrap.dedent(
    """
    import os, sys, time, coord
    from coord import queues
    store = coord.Store(os.environ["COORD_DB"])
    inst = coord.register(store, sys.argv[1], app="demo-queue")
    print("ready", flush=True)
    while True:
        job = queues.claim(store, sys.argv[2], inst, timeout=3600)
        if job is None:
            continue
        if sys.argv[3] == "hang":
            print("holding", job.id, flush=True)
            time.sleep(3600)
        time.sleep(0.02)
        queues.ack(store, job, result={"by": inst.id})
    """
)


def section_queues(d: Demo) -> None:
    from collections import Counter

    from . import queues
    wait_for = d.store.backend.wakeup.wait_for

    d.say("== queues: shared work spread over instances; a killed worker's job finishes "
          "elsewhere ==")
    tag = os.urandom(2).hex()
    q = f"demo-{tag}-jobs"
    hang_id = f"demo-{tag}-stuck"
    hang = d.spawn(QUEUE_WORKER, hang_id, q, "hang")
    d.wait_ready(hang)
    first = queues.put(d.store, q, {"n": 0}, priority=9)
    d.wait_ready(hang)  # "holding <id>"
    d.say(f"  {hang_id} claimed job {first} (priority 9) and sits on it; its lease is "
          f"{d.store.config.claim_lease:.0f} s")
    ids = [f"demo-{tag}-w{n}" for n in range(3)]
    workers = [d.spawn(QUEUE_WORKER, i, q, "work") for i in ids]
    for w in workers:
        d.wait_ready(w)
    queues.put_many(d.store, q, [{"n": n} for n in range(1, 31)])
    d.say(f"-- put 30 more jobs into {q}; {len(ids)} workers claim them, and kill -9 {hang_id}")
    t0 = time.monotonic()
    hang.kill()
    hang.wait()
    wait_for(lambda: queues.get_job(d.store, first).state == "done" or None, 30)
    t1 = time.monotonic()
    job = queues.get_job(d.store, first)
    d.say(f"  job {first} went back at once and was done by {job.instance_id} (attempt "
          f"{job.attempts}) {1000 * (t1 - t0):.0f} ms after the kill, not after the lease")
    wait_for(lambda: queues.stats(d.store, q)[0].done == 31 or None, 30)
    by = Counter(j.instance_id for j in queues.list_jobs(d.store, q, state="done"))
    for i in ids:
        d.say(f"  {i} did {by.get(i, 0)} jobs")
    st = queues.stats(d.store, q)[0]
    d.say(f"  stats: ready {st.ready}, claimed {st.claimed}, done {st.done}, dead {st.dead} "
          f"(`coord queue stats`)")
    queues.purge(d.store, q, everything=True)


SECTIONS: list[Callable[[Demo], None]] = [section_instances, section_processes, section_messages,
                                          section_election, section_queues]


def run_demo(store: Store, say: Say = print) -> None:
    """Run every section; always end what was started."""
    d = Demo(store, say)
    say(f"database: {store.address_shown}")
    try:
        for section in SECTIONS:
            section(d)
            d.cleanup()
            d.procs.clear()
    finally:
        d.cleanup()
        forget_lease(store, DEMO_LEASE)
    say("demo done: nothing left running, nothing left behind but the event log")
