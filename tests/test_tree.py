"""Process trees from the library's side: pid reuse is never signalled, readers apply proof
of death without waiting for the death rule, the elected reaper's pidfd watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import engine_sql as sql
import pytest
from conftest import INSTANCE_WORKER, spawn_python, wait_line, wait_until

import coord
from coord import processes as P
from coord import tree
from coord.identity import ProcIdentity, identify
from coord.leases import acquire, get_lease, list_leases, serve_reaper

pytestmark = pytest.mark.contract

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_a_reused_pid_is_never_signalled(store: coord.Store, children: list[Any]) -> None:
    """A dead wrapper's tree rows and its lease's recorded group name pids that now belong
    to another process (another start token): nothing ends it — not the reap, not the
    orphan killer, not the next holder of the lease."""
    bystander = subprocess.Popen(SLEEPER, start_new_session=True)  # leads its own group
    children.append(bystander)
    ident = identify(bystander.pid)
    assert ident is not None
    inst = coord.register(store, "gone", app="t", heartbeat=False, handle_signals=False)
    owner = (inst.id, inst.incarnation)
    lease = acquire(inst, "reuse/l")
    # What the dead wrapper recorded: an earlier process that had this pid (and its group).
    old = tree.Proc(ident.pid, 1, ident.pid, ident.start_token - 7, "S")
    earlier = ProcIdentity(ident.boot_id, ident.pid, old.token)
    tree.record(store, owner, [(old, ["old"])], [], tree=True, user="u", cwd="/")
    coord.leases.record_group(store, "reuse/l", lease.term, ident.pid, ident.start_token - 7,
                              holder=owner)
    inst.close()  # dead now; the lease is released, the row keeps the group
    assert get_lease(store, "reuse/l").pgid == ident.pid
    assert [t.owner for t in tree.dead_trees(store)] == [owner]
    assert P.orphans(store) == []
    assert P.kill_orphans(store, grace=0.1) == []
    assert coord.reap(store).trees_ended == 1
    assert tree.end_tree([earlier], [earlier], 0.1) == tree.GONE
    nxt = coord.register(store, "next", app="t", heartbeat=False, handle_signals=False)
    taken = acquire(nxt, "reuse/l", timeout=0)
    assert bystander.poll() is None  # never signalled
    assert get_lease(store, "reuse/l").pgid is None  # the recorded group was proven empty
    taken.release()
    nxt.close()


HOLDER = """
import os, sys, time, coord
from coord.leases import acquire
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, "holder", app="t")
lease = acquire(inst, "read/l")
print("ready", lease.term, flush=True)
while True:
    time.sleep(0.5)
"""


def test_readers_show_a_dead_holders_lease_free_without_burying(store: coord.Store, db_path: Any,
                                                                procs: list[Any]) -> None:
    p = spawn_python(HOLDER, db=db_path)
    procs.append(p)
    term = int(wait_line(p).split()[1])
    assert get_lease(store, "read/l").holder == "holder"
    p.kill()
    p.wait()
    info = get_lease(store, "read/l")
    assert (info.holder, info.alive, info.expires_in, info.term) == (None, None, None, term)
    assert list_leases(store, held_only=True) == []
    assert [i.holder for i in list_leases(store)] == [None]
    # A reader writes nothing: the row still names the dead holder until the rule is applied.
    assert sql.value(store, "SELECT holder_id FROM leases WHERE name = 'read/l'") == "holder"
    coord.reap(store)
    assert sql.value(store, "SELECT holder_id FROM leases WHERE name = 'read/l'") is None


def test_the_elected_reaper_acts_on_a_death_by_its_pidfd_watch(fast_store: coord.Store,
                                                                db_path: Any,
                                                                procs: list[Any]) -> None:
    """The reaper's periodic reap is an hour away: what buries a SIGKILLed instance at once
    is its watch of every instance of the host."""
    me = coord.register(fast_store, "reaper", app="t", handle_signals=False)
    serve_reaper(me, every=3600)
    wait_until(lambda: get_lease(fast_store, "coord/reaper").holder == "reaper", timeout=10)
    victims = [spawn_python(INSTANCE_WORKER, f"v{i}", db=db_path) for i in range(3)]
    procs.extend(victims)
    for v in victims:
        wait_line(v)
    victims[1].send_signal(signal.SIGKILL)
    victims[1].wait()
    wait_until(lambda: sql.row(fast_store, "SELECT 1 FROM instances WHERE id = 'v1'") is None,
               timeout=5)
    alive = {r["id"] for r in sql.rows(fast_store, "SELECT id FROM instances WHERE status = 'alive'")}
    assert alive == {"reaper", "v0", "v2"}
    died = [json.loads(r["detail"])["reason"] for r in sql.rows(
        fast_store, "SELECT detail FROM events WHERE kind = 'died' AND instance_id = 'v1'")]
    assert died == ["died"]
    me.close()


def test_an_unrecorded_escapee_is_found_by_its_term(store: coord.Store,
                                                   children: list[Any]) -> None:
    """A descendant that daemonized just before its wrapper was SIGKILLed has no row; it
    still carries its term (COORD_LEASE_TERM, never reused), which the death rule finds.
    A process with another term is left alone."""
    inst = coord.register(store, "gone", app="t", heartbeat=False, handle_signals=False)
    lease = acquire(inst, "esc/l")
    env = dict(os.environ, COORD_LEASE_TERM=str(lease.term))
    escapee = subprocess.Popen(SLEEPER, env=env, start_new_session=True)
    other = subprocess.Popen(SLEEPER, env=dict(env, COORD_LEASE_TERM=str(lease.term + 1)),
                             start_new_session=True)
    children += [escapee, other]
    wait_until(lambda: b"COORD_LEASE_TERM" in Path(f"/proc/{escapee.pid}/environ").read_bytes())
    # The wrapper had recorded its CMD (ended since: its pid now names another process).
    first = tree.Proc(1, 0, 1, 0, "S")
    tree.record(store, (inst.id, inst.incarnation), [(first, ["cmd"])], [], tree=True,
                user="u", cwd="/")
    inst.close()
    found = P.orphans(store, live=False)
    assert [(o.id, o.pid) for o in found] == [(0, escapee.pid)]
    assert coord.reap(store).trees_ended == 1
    assert escapee.wait(10) == -signal.SIGTERM
    assert other.poll() is None


def test_the_death_watch_holds_more_pidfds_than_select_could(fast_store: coord.Store,
                                                             children: list[Any]) -> None:
    """1 100 registered instances (rows naming one real process, heartbeats fresh): the
    elected reaper's watch holds a pidfd for each in one epoll set — beyond select's 1 024 —
    and buries all of them when that process dies."""
    from coord.clock import boot_id
    from coord.identity import pid_namespace

    me = coord.register(fast_store, "reaper", app="t", handle_signals=False)
    serve_reaper(me, every=3600)
    wait_until(lambda: get_lease(fast_store, "coord/reaper").holder == "reaper", timeout=10)
    sleeper = subprocess.Popen(SLEEPER)
    children.append(sleeper)
    ident = identify(sleeper.pid)
    assert ident is not None

    def insert(t: sql.Txn) -> None:
        rows = [(f"many-{i}", 100000 + i, sleeper.pid, ident.start_token, boot_id(),
                 pid_namespace(), "/nonexistent/many.lock", t.wall, t.wall, t.now)
                for i in range(1100)]
        t("INSERT INTO instances (id, incarnation, app, status, pid, start_token, boot_id, "
          'pidns, uid, "user", host, lock_path, ttl, started_at, heartbeat_at, heartbeat_mono) '
          "SELECT * FROM (VALUES " + ", ".join(
              ["(?, ?, 'x', 'alive', ?, ?, ?, ?, 0, 'u', 'h', ?, 3600, ?, ?, ?)"] * len(rows))
          + ") AS v", tuple(v for r in rows for v in r))

    sql.txn(fast_store, insert)

    def pidfds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
            except OSError:
                pass
        return n

    wait_until(lambda: pidfds() >= 1100, timeout=20)
    sleeper.kill()
    sleeper.wait()
    wait_until(lambda: sql.value(fast_store, "SELECT count(*) FROM instances WHERE id LIKE "
                                             "'many-%' AND status = 'alive'") == 0, timeout=20)
    assert pidfds() < 100  # it let go of the dead ones
    me.close()
