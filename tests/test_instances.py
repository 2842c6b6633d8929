"""Instances: register, liveness by proof of death and heartbeat, takeover, deregistration.

Workers are real processes that register through the library; deaths are real SIGKILLs and
hangs are real SIGSTOPs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import engine_sql as sql
import pytest
from conftest import move_server_clock, stop_outside_a_write, wait_line, wait_until
from engine_sql import expiry_now

import coord
from coord.check import check
from coord.clock import Clock
from coord.identity import HELD, lock_state, proc_stat
from coord.instances import get_instance, list_instances, register

pytestmark = pytest.mark.contract

# A worker instance. argv: id ('' = generated). Env: APP, TTL (register's ttl), FORK=1 (fork
# a child that outlives it; prints "child PID"). Prints "ready ID INCARNATION", then "lost"
# if its registration is ever lost (declared dead, taken over).
WORKER = """
import os, sys, time, coord
store = coord.Store(os.environ["COORD_DB"])
ttl = float(os.environ["TTL"]) if os.environ.get("TTL") else None
inst = coord.register(store, sys.argv[1] or None, app=os.environ.get("APP", "test"), ttl=ttl)
if os.environ.get("FORK"):
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    print("child", pid, flush=True)
print("ready", inst.id, inst.incarnation, flush=True)
inst.lost.wait()
print("lost", flush=True)
time.sleep(60)
"""


def start(db: Path, id: str = "", **env: str) -> subprocess.Popen[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    e.update(COORD_DB=str(db), **env)
    return subprocess.Popen([sys.executable, "-c", WORKER, id], env=e, stdout=subprocess.PIPE,
                            text=True)


def ready(p: subprocess.Popen[str]) -> tuple[str, int]:
    _, id, inc = wait_line(p, "ready", timeout=60).split()
    return id, int(inc)


def kill_hard(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.wait()


def verdicts(store: coord.Store) -> dict[str, tuple[bool, str]]:
    return {i.id: (i.alive, i.status) for i in list_instances(store, include_dead=True)}


def alive_ids(store: coord.Store) -> set[str]:
    return {i.id for i in list_instances(store)}


def events_of(store: coord.Store, id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(r["kind"], json.loads(r["detail"])) for r in
            sql.rows(store, "SELECT kind, detail FROM events WHERE instance_id = ? ORDER BY id",
                     (id,))]


def judge(store: coord.Store, row: dict[str, Any], now: float | None = None) -> tuple[bool, str]:
    """The engine's verdict on ``row``, its heartbeat judged at ``now`` (the expiry clock's
    reading; default: now)."""
    liveness = store.backend.liveness
    look = liveness.look()
    if now is not None:
        look.now = now  # type: ignore[attr-defined]
    return liveness.judge(row, look)


# -- register ------------------------------------------------------------------------------


def test_id_from_argument_environment_or_generated(store: coord.Store,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with register(store, "given-1", app="x") as a:
        assert a.id == "given-1"
    monkeypatch.setenv("COORD_INSTANCE_ID", "from-env")
    with register(store, app="x") as b:
        assert b.id == "from-env"
    monkeypatch.delenv("COORD_INSTANCE_ID")
    with register(store, app="my tool") as c:
        assert re.fullmatch(r"my-tool-[0-9a-f]{6}", c.id)
    with pytest.raises(coord.InvalidArgument):
        register(store, "bad id!", app="x")
    with pytest.raises(coord.InvalidArgument):
        register(store, "ok", app="x", ttl=0)
    assert not sql.rows(store, "SELECT * FROM instances")


def test_registration_records_identity_and_labels(store: coord.Store) -> None:
    with register(store, "me", app="tool", labels={"port": 8080, "role": "web"}) as inst:
        info = get_instance(store, "me")
        assert (info.app, info.pid, info.alive, info.status) == ("tool", os.getpid(), True, "alive")
        assert info.labels == {"port": 8080, "role": "web"}
        assert info.incarnation == inst.incarnation
        assert info.boot_id == coord.clock.boot_id()
        assert info.pidns == os.readlink("/proc/self/ns/pid")
        assert info.start_token == coord.identity.start_token(os.getpid())
        assert info.cwd == os.getcwd() and info.cmdline
        assert lock_state(info.lock_path)[0] == HELD or info.pid == os.getpid()
        assert info.to_json()["id"] == "me"


def test_every_registration_bumps_the_incarnation(store: coord.Store) -> None:
    seen = []
    for _ in range(3):
        with register(store, "again", app="x") as inst:
            seen.append(inst.incarnation)
    with register(store, "other", app="x") as inst:
        seen.append(inst.incarnation)
    assert seen == sorted(seen) and len(set(seen)) == 4


def test_a_live_holder_s_id_is_refused(store: coord.Store, db_path: Path,
                                       procs: list[subprocess.Popen[str]]) -> None:
    w = start(db_path, "taken")
    procs.append(w)
    ready(w)
    with pytest.raises(coord.InstanceIdInUse) as e:
        register(store, "taken", app="x")
    assert e.value.pid == w.pid and "taken" in str(e.value)
    with register(store, "mine", app="x"), pytest.raises(coord.InstanceIdInUse):
        register(store, "mine", app="x")  # also within one process
    assert get_instance(store, "taken").alive


def test_two_processes_racing_for_one_id_one_wins(db_path: Path,
                                                  procs: list[subprocess.Popen[str]],
                                                  store: coord.Store) -> None:
    ws = [start(db_path, "race") for _ in range(3)]
    procs.extend(ws)
    winners = []
    for w in ws:
        assert w.stdout is not None
        line = w.stdout.readline()
        if line.startswith("ready"):
            winners.append(w)
        else:
            assert w.wait(timeout=60) != 0  # InstanceIdInUse
    assert len(winners) == 1
    assert get_instance(store, "race").pid == winners[0].pid


# -- liveness ------------------------------------------------------------------------------


def test_ten_register_at_once_three_killed_are_dead_at_once(
    store: coord.Store, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    ws = [start(db_path, f"w{i}") for i in range(10)]
    procs.extend(ws)
    incs = dict(ready(w) for w in ws)
    assert alive_ids(store) == set(incs)
    victims = ws[:3]
    for v in victims:
        kill_hard(v)
    # No TTL wait: the kernel dropped their locks the instant they died.
    v = verdicts(store)
    assert {i for i, (alive, _) in v.items() if not alive} == {"w0", "w1", "w2"}
    assert {v[i][1] for i in ("w0", "w1", "w2")} == {"died"}
    assert alive_ids(store) == {f"w{i}" for i in range(3, 10)}

    out = subprocess.run([sys.executable, "-m", "coord", "reap"], capture_output=True, text=True,
                         env={**os.environ, "COORD_DB": str(db_path)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(re.findall(r"reaped (w\d)", out.stdout)) == ["w0", "w1", "w2"]
    rows = {r["id"]: r for r in sql.rows(store, "SELECT id, incarnation, status FROM instances")}
    assert set(rows) == {f"w{i}" for i in range(3, 10)}  # the dead are gone ...
    for i in range(3, 10):  # ... the others untouched
        assert rows[f"w{i}"]["incarnation"] == incs[f"w{i}"]
        assert rows[f"w{i}"]["status"] == "alive"
    assert alive_ids(store) == set(rows)
    assert check(store, strict=True) == []


def test_a_zombie_is_dead(store: coord.Store, db_path: Path,
                          procs: list[subprocess.Popen[str]]) -> None:
    w = start(db_path, "zombie")
    procs.append(w)
    ready(w)
    os.kill(w.pid, signal.SIGKILL)  # not waited for: a zombie until reaped
    wait_until(lambda: (proc_stat(w.pid) or (0, "Z"))[1] == "Z", timeout=10)
    assert verdicts(store)["zombie"] == (False, "died")


def test_a_stopped_instance_is_hung_only_after_its_ttl(
    store: coord.Store, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    ttl = 1.5
    w = start(db_path, "sleepy", TTL=str(ttl), COORD_HEARTBEAT="0.2")
    procs.append(w)
    ready(w)
    stop_outside_a_write(store, w)
    row = sql.row(store, "SELECT * FROM instances WHERE id = 'sleepy'")
    assert row is not None
    hb = row["heartbeat_mono"]
    # The process exists and holds its lock: only the heartbeat's age can condemn it.
    assert lock_state(row["lock_path"])[0] == HELD
    assert judge(store, row, hb + ttl - 0.01) == (True, "alive")
    assert judge(store, row, hb + ttl + 0.01) == (False, "hung")
    # In real time: it is seen hung, and never before its TTL has passed.
    while True:
        now = expiry_now(store)
        alive, status = get_instance(store, "sleepy").alive, get_instance(store, "sleepy").status
        if not alive:
            assert status == "hung"
            assert now - hb > ttl - 0.01
            break
        assert expiry_now(store) - hb <= ttl + 5, "not seen hung long after its TTL"
        time.sleep(0.02)
    # Resumed before anyone reaped it: it heartbeats again and is alive.
    os.kill(w.pid, signal.SIGCONT)
    wait_until(lambda: get_instance(store, "sleepy").alive, timeout=20)


def test_pid_reuse_is_death(store: coord.Store, db_path: Path,
                            procs: list[subprocess.Popen[str]]) -> None:
    w = start(db_path, "real")
    procs.append(w)
    ready(w)
    row = sql.row(store, "SELECT * FROM instances WHERE id = 'real'")
    assert row is not None
    # Same pid, alive, even holding the lock -- but another start token: another process.
    assert judge(store, dict(row, id="reused", start_token=row["start_token"] - 1)) == (False, "died")
    # Right pid and token, but its lock file is there and nobody holds it: proof of death.
    free = store.side_dir("locks") / "nobody.lock"
    free.touch()
    assert judge(store, dict(row, id="unlocked", lock_path=str(free))) == (False, "died")
    # Its lock file removed by someone: no proof of anything; pid and heartbeat say alive.
    assert judge(store, dict(row, id="cleaned", lock_path=str(free) + ".gone")) == (True, "alive")
    # Another boot: dead, whatever the pid says.
    assert judge(store, dict(row, boot_id="another-boot")) == (False, "reboot")

    # Such a row in the table is reaped; the real instance is untouched.
    fake = dict(row, id="reused", start_token=row["start_token"] - 1, lock_path=str(free))
    cols = ", ".join(f'"{c}"' for c in fake)
    sql.execute(store, f"INSERT INTO instances ({cols}) VALUES ({', '.join('?' * len(fake))})",
                tuple(fake.values()))
    report = coord.reap(store)
    assert [d["id"] for d in report.dead] == ["reused"]
    assert alive_ids(store) == {"real"}


def test_a_forked_child_does_not_keep_a_dead_instance_alive(
    store: coord.Store, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    w = start(db_path, "forker", FORK="1")
    procs.append(w)
    child = int(wait_line(w, "child", timeout=60).split()[1])
    try:
        ready(w)
        assert verdicts(store)["forker"] == (True, "alive")
        kill_hard(w)
        assert proc_stat(child) is not None  # the child lives on ...
        assert verdicts(store)["forker"] == (False, "died")  # ... and proves nothing
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_wall_clock_jump_changes_no_verdict(db_path: Path,
                                              procs: list[subprocess.Popen[str]]) -> None:
    offset = [0.0]
    s = coord.Store(db_path, clock=Clock(wall=lambda: time.time() + offset[0]))
    try:
        ws = [start(db_path, f"j{i}") for i in range(3)]
        procs.extend(ws)
        for w in ws:
            ready(w)
        mine = register(s, "local", app="x")
        kill_hard(ws[0])
        before = verdicts(s)
        assert before == {"j0": (False, "died"), "j1": (True, "alive"), "j2": (True, "alive"),
                          "local": (True, "alive")}
        for jump in (86400.0, -86400.0, 7 * 86400.0, -7 * 86400.0):
            offset[0] = jump
            assert mine.heartbeat()  # a heartbeat stamped with the jumped wall clock
            assert verdicts(s) == before
        report = coord.reap(s)  # with the clock a week behind
        assert [d["id"] for d in report.dead] == ["j0"]
        assert alive_ids(s) == {"j1", "j2", "local"}
        mine.close()
    finally:
        coord.instances.close_all()
        s.close()


def test_expiry_follows_the_engine_s_clock(db_path: Path,
                                           procs: list[subprocess.Popen[str]]) -> None:
    """SQLite: this boot's monotonic clock (the store's); PostgreSQL: the server's."""
    shift = [0.0]
    real = coord.clock.SYSTEM.mono
    s = coord.Store(db_path, clock=Clock(mono=lambda: real() + shift[0]))

    def move(to: float) -> None:
        if s.engine == "postgresql":
            move_server_clock(s, to - shift[0])
        shift[0] = to

    try:
        w = start(db_path, "m1")
        procs.append(w)
        ready(w)
        assert verdicts(s)["m1"] == (True, "alive")
        move(16.0)  # the default TTL is 15 s (heartbeats 5 s apart)
        assert verdicts(s)["m1"] == (False, "hung")
        move(0.0)
        assert verdicts(s)["m1"] == (True, "alive")
    finally:
        s.close()


# -- takeover ------------------------------------------------------------------------------


def _hold_things(store: coord.Store, id: str, inc: int) -> None:
    """Give (id, inc) a lease, a claimed job, an ephemeral key and a private queue with
    ready jobs, written directly with SQL."""

    def txn(c: sql.Txn) -> None:
        mono, wall = c.now, c.wall
        term = c.counter("term")
        c("INSERT INTO leases (name, holder_id, holder_incarnation, term, ttl, acquired_at, "
                  "renewed_at, expires_mono) VALUES (?, ?, ?, ?, 15, ?, ?, ?)",
                  (f"{id}/lease", id, inc, term, wall, wall, mono + 15))
        c("INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at) "
                  "VALUES (?, ?, ?, ?, ?)", (f"{id}/lease", term, id, inc, wall))
        c("INSERT INTO queues (name, owner_id, created_at) VALUES (?, NULL, ?), (?, ?, ?)",
                  (f"{id}/shared", wall, f"{id}/private", id, wall))
        c("INSERT INTO jobs (queue, state, payload, attempts, available_mono, created_at, "
                  "claimed_by, claimed_incarnation, claim_token, claim_expires_mono, claimed_at) "
                  "VALUES (?, 'claimed', '1', 1, ?, ?, ?, ?, ?, ?, ?)",
                  (f"{id}/shared", mono, wall, id, inc, f"tok-{id}", mono + 60, wall))
        for n in range(3):
            c("INSERT INTO jobs (queue, payload, available_mono, created_at) "
                      "VALUES (?, ?, ?, ?)", (f"{id}/private", str(n), mono, wall))
        c("INSERT INTO kv (key, value, version, owner_id, owner_incarnation, created_at, "
                  "updated_at) VALUES (?, '\"here\"', ?, ?, ?, ?, ?)",
                  (f"{id}/addr", c.counter("revision"), id, inc, wall, wall))

    sql.txn(store, txn)


def test_takeover_of_a_dead_id(store: coord.Store, db_path: Path,
                               procs: list[subprocess.Popen[str]]) -> None:
    w = start(db_path, "svc")
    procs.append(w)
    _, old = ready(w)
    _hold_things(store, "svc", old)
    with pytest.raises(coord.InstanceIdInUse):
        register(store, "svc", app="test")
    kill_hard(w)

    with register(store, "svc", app="test") as inst:
        assert inst.incarnation > old
        lease = sql.row(store, "SELECT * FROM leases WHERE name = 'svc/lease'")
        assert lease is not None and lease["holder_id"] is None  # released, not inherited
        term = sql.row(store, "SELECT * FROM lease_terms WHERE name = 'svc/lease'")
        assert term is not None and term["released_at"] is not None
        assert term["reason"] == "taken over"
        job = sql.row(store, "SELECT * FROM jobs WHERE queue = 'svc/shared'")
        assert job is not None and (job["state"], job["claimed_by"]) == ("ready", None)
        assert sql.value(store, "SELECT count(*) FROM kv WHERE key = 'svc/addr'") == 0
        # Private work is kept and is the new incarnation's to resume.
        assert sql.value(store, "SELECT count(*) FROM jobs WHERE queue = 'svc/private' "
                           "AND state = 'ready'") == 3
        assert sql.value(store, "SELECT owner_id FROM queues WHERE name = 'svc/private'") == "svc"
        kinds = [k for k, _ in events_of(store, "svc")]
        assert kinds == ["joined", "died", "lease released", "took over", "joined"]
        died = dict(events_of(store, "svc"))["died"]
        assert died == {"incarnation": old, "reason": "died"}
        assert check(store, strict=True) == []


def test_tombstone_is_kept_while_its_private_queue_has_work(
    store: coord.Store, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    w = start(db_path, "tomb")
    procs.append(w)
    _, old = ready(w)
    _hold_things(store, "tomb", old)
    kill_hard(w)
    report = coord.reap(store)
    assert [d["id"] for d in report.dead] == ["tomb"]
    info = get_instance(store, "tomb")
    assert (info.tombstone, info.alive, info.status) == (True, False, "died")
    assert not coord.reap(store).did_something  # kept, and nothing else to do
    assert get_instance(store, "tomb").tombstone
    # A restart with the same id takes over the tombstone and resumes the queue.
    with register(store, "tomb", app="test") as inst:
        assert inst.incarnation > old
        assert "took over" in [k for k, _ in events_of(store, "tomb")]
        assert sql.value(store, "SELECT count(*) FROM jobs WHERE queue = 'tomb/private' "
                           "AND state = 'ready'") == 3
    # It left with work queued: a tombstone again, until the queue is empty.
    assert get_instance(store, "tomb").tombstone
    sql.txn(store, lambda t: t("UPDATE jobs SET state = 'done', finished_at = ?, "
                               "finished_mono = ? WHERE queue = 'tomb/private'",
                               (t.wall, t.now)))
    report = coord.reap(store)
    assert report.tombstones_removed == 1
    with pytest.raises(coord.NotFound):
        get_instance(store, "tomb")
    assert [k for k, _ in events_of(store, "tomb")][-1] == "reaped"


# -- heartbeat, watchdog, deregistration -------------------------------------------------


def test_heartbeat_runs_at_least_three_times_per_ttl(store: coord.Store) -> None:
    assert store.config.heartbeat == 5.0
    with register(store, "hb", app="x", ttl=0.6) as inst:
        assert inst.heartbeat_interval == pytest.approx(0.2)
        first = sql.value(store, "SELECT heartbeat_mono FROM instances WHERE id = 'hb'")
        wait_until(lambda: sql.value(store, "SELECT heartbeat_mono FROM instances WHERE id = 'hb'") > first)
        time.sleep(1.0)
        assert get_instance(store, "hb").alive


def test_watchdog_stops_the_heartbeat_of_a_stuck_app(fast_store: coord.Store) -> None:
    with register(fast_store, "dog", app="x", watchdog=0.3) as inst:
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            inst.beat()
            time.sleep(0.05)
        assert get_instance(fast_store, "dog").alive
        # Stuck: no beat() any more, so no heartbeat, so hung after the TTL.
        wait_until(lambda: get_instance(fast_store, "dog").status == "hung", timeout=20)
        inst.beat()
        wait_until(lambda: get_instance(fast_store, "dog").alive, timeout=20)


def test_a_lost_registration_is_reported(fast_store: coord.Store) -> None:
    inst = register(fast_store, "loser", app="x")
    sql.execute(fast_store, "UPDATE instances SET status = 'dead' WHERE id = 'loser'")
    assert inst.lost.wait(timeout=20)
    assert inst.heartbeat() is False
    inst.close()


def test_log_lines_carry_the_instance_id(store: coord.Store,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with register(store, "talker", app="x") as inst, caplog.at_level(logging.INFO, "coord"):
        inst.log.info("hello %s", "world")
    rec = [r for r in caplog.records if "hello world" in r.getMessage()][0]
    assert "talker" in rec.getMessage()
    assert rec.instance_id == "talker"  # type: ignore[attr-defined]


def test_context_exit_deregisters(store: coord.Store) -> None:
    with register(store, "ctx", app="x") as inst:
        lock = inst.lock_path
        assert alive_ids(store) == {"ctx"}
    assert sql.rows(store, "SELECT * FROM instances") == []
    assert not os.path.exists(lock)
    assert [k for k, _ in events_of(store, "ctx")] == ["joined", "left"]
    inst.close()  # idempotent


EXITS = """
import os, signal, sys, time, coord
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="x")
mode = sys.argv[2]
if mode == "fork":
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # runs atexit in the child, which must not deregister the parent's instance
    os.waitpid(pid, 0)
    print("ready", flush=True)
    time.sleep(60)
elif mode == "atexit":
    print("ready", flush=True)
    sys.exit(0)
else:
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("how", ["sigterm", "atexit"])
def test_sigterm_and_exit_deregister(store: coord.Store, db_path: Path, how: str,
                                     procs: list[subprocess.Popen[str]]) -> None:
    e = {**{k: v for k, v in os.environ.items() if not k.startswith("COORD_")},
         "COORD_DB": str(db_path)}
    w = subprocess.Popen([sys.executable, "-c", EXITS, "bye", how], env=e,
                         stdout=subprocess.PIPE, text=True)
    procs.append(w)
    wait_line(w, timeout=60)
    if how == "sigterm":
        w.terminate()
        assert w.wait(timeout=30) == -signal.SIGTERM  # the default action still happens
    else:
        assert w.wait(timeout=30) == 0
    assert sql.rows(store, "SELECT * FROM instances") == []
    assert [k for k, _ in events_of(store, "bye")] == ["joined", "left"]


def test_only_the_registering_pid_deregisters(store: coord.Store, db_path: Path,
                                              procs: list[subprocess.Popen[str]]) -> None:
    e = {**{k: v for k, v in os.environ.items() if not k.startswith("COORD_")},
         "COORD_DB": str(db_path)}
    w = subprocess.Popen([sys.executable, "-c", EXITS, "parent", "fork"], env=e,
                         stdout=subprocess.PIPE, text=True)
    procs.append(w)
    wait_line(w, timeout=60)
    assert get_instance(store, "parent").alive
    assert [k for k, _ in events_of(store, "parent")] == ["joined"]


def test_lost_worker_learns_it_after_being_reaped(
    store: coord.Store, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    w = start(db_path, "napper", TTL="1", COORD_HEARTBEAT="0.2")
    procs.append(w)
    ready(w)
    stop_outside_a_write(store, w)
    wait_until(lambda: get_instance(store, "napper").status == "hung", timeout=30)
    report = coord.reap(store)
    assert report.dead == [{"id": "napper", "incarnation": report.dead[0]["incarnation"],
                            "reason": "hung"}]
    os.kill(w.pid, signal.SIGCONT)
    wait_line(w, "lost", timeout=30)  # its next heartbeat found its registration gone


def test_list_filters_by_app(store: coord.Store) -> None:
    with register(store, "a1", app="alpha"), register(store, "b1", app="beta"):
        assert [i.id for i in list_instances(store, app="alpha")] == ["a1"]
        assert {i.id for i in list_instances(store)} == {"a1", "b1"}


def test_check_reports_registry_invariants(store: coord.Store, db_path: Path,
                                           procs: list[subprocess.Popen[str]]) -> None:
    w = start(db_path, "chk")
    procs.append(w)
    ready(w)
    kill_hard(w)
    pending = [p.detail for p in check(store, strict=True) if p.check == "instances"]
    assert pending == ["chk is died, awaiting the reaper"]
    assert check(store) == []  # pending only: not a broken invariant
    coord.reap(store)
    # A tombstone that keeps nothing is pending; one without an end is broken.
    sql.execute(store,
        "INSERT INTO instances (id, incarnation, app, status, pid, start_token, boot_id, pidns, "
        'uid, "user", host, lock_path, ttl, started_at, heartbeat_at, heartbeat_mono) VALUES '
        "('bare', 10000, 'x', 'dead', 1, 1, 'b', 'n', 0, 'u', 'h', '/x', 15, 1, 1, 1)")
    details = {p.detail: p.pending for p in check(store, strict=True) if p.check == "instances"}
    assert details == {"tombstone bare has no end time or reason": False,
                       "tombstone bare keeps nothing, awaiting the reaper": True}
    coord.reap(store)
    assert check(store, strict=True) == []


def test_a_stuck_instance_runs_no_hooks(fast_store: coord.Store) -> None:
    calls: list[float] = []
    with register(fast_store, "hooked", app="x", watchdog=0.3) as inst:
        inst.hooks.append(lambda i: calls.append(time.monotonic()))
        while len(calls) < 2:
            inst.beat()
            time.sleep(0.05)
        wait_until(lambda: inst.stuck, timeout=20)
        n = len(calls)
        time.sleep(1.0)  # five heartbeat intervals, stuck all along
        assert len(calls) <= n + 1  # at most one already under way when it got stuck
        deadline = time.monotonic() + 20
        while len(calls) <= n + 1:  # making progress again: hooks run again
            assert time.monotonic() < deadline
            inst.beat()
            time.sleep(0.05)


@pytest.mark.sqlite_only("the nudge socket's name follows the database file's path")
def test_abstract_socket_names_are_never_unlinked_as_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, procs: list[subprocess.Popen[str]]
) -> None:
    """A database deep in the tree gets abstract-namespace nudge sockets (``@coord-…``):
    closing an instance, and reaping a killed one, must not unlink a file of that name in
    the current directory."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    db = deep / "coord.db"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    store = coord.Store(db)
    inst = register(store, "deep", app="x")
    victim = subprocess.Popen([sys.executable, "-c", WORKER, "victim"], cwd=cwd,
                              env={**{k: v for k, v in os.environ.items()
                                      if not k.startswith("COORD_")}, "COORD_DB": str(db)},
                              stdout=subprocess.PIPE, text=True)
    procs.append(victim)
    ready(victim)
    names = [r["nudge_path"] for r in store.rows("SELECT nudge_path FROM instances")]
    assert len(names) == 2 and all(n.startswith("@coord-") for n in names)
    for n in names:  # someone's files that happen to carry those names
        (cwd / n).write_text("keep me")
    inst.close()
    victim.kill()
    victim.wait()
    coord.reap(store)
    assert store.rows("SELECT id FROM instances") == []
    assert sorted(p.name for p in cwd.iterdir()) == sorted(names)
    store.close()
