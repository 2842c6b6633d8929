"""Liveness across hosts on PostgreSQL, on a real server with real processes:

- each instance heartbeats on a connection of its own that holds a session advisory lock
  keyed by its registration, with server-side timeouts chosen from its TTL (on that
  connection only);
- its session ended by the server (``pg_terminate_backend``) is not its death: it stays
  alive, and its next heartbeat opens another session, takes the lock again and records it;
- another host's instance whose lock nobody holds is alive until its heartbeat expires by
  the server's clock, and only then buried ('hung');
- a boot rebase buries this machine's rows of a boot that is over and leaves other
  machines' rows, and their processes, alone; processes and trees of another boot are never
  probed, marked exited or signalled here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import engine_sql as sql
import pytest
from conftest import wait_line, wait_until
from contract_engines import fresh_schema
from pg_fixtures import import_psycopg

import coord
from coord.backend.postgresql.connection import SERVER_TIMEOUTS
from coord.backend.postgresql.liveness import machine_id
from coord.clock import boot_id
from coord.config import Config

psycopg = import_psycopg()

WORKER = """
import os, sys, time, coord
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="test", ttl=float(sys.argv[2]))
print("ready", inst.id, inst.incarnation, flush=True)
time.sleep(120)
"""


@pytest.fixture
def url(pg_url: str) -> Iterator[str]:
    with fresh_schema(pg_url) as u:
        yield u


@pytest.fixture
def pg_store(url: str) -> Iterator[coord.Store]:
    s = coord.Store(url, config=Config(heartbeat=0.2))
    yield s
    coord.instances.close_all()
    s.close()


def advisory_holders(store: coord.Store) -> list[dict[str, Any]]:
    """Backends holding a one-key advisory lock (coord's registration locks)."""
    return sql.rows(store, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                           "AND objsubid = 1 AND pid <> pg_backend_pid()")


def fake_row(store: coord.Store, id: str, *, machine: str, boot: str, ttl: float = 2.0) -> None:
    """An instance row as another host would have registered it (nobody here holds its
    lock: there is no lock file, no session)."""
    sql.execute(store,
                "INSERT INTO instances (id, incarnation, app, status, pid, start_token, boot_id, "
                'pidns, uid, "user", host, machine_id, lock_path, ttl, started_at, heartbeat_at, '
                "heartbeat_mono) VALUES (?, nextval('incarnation_seq'), 'far', 'alive', 1, 1, ?, "
                "'pid:[1]', 0, 'u', 'far-host', ?, '/nonexistent/far.lock', ?, coord_now(), "
                "coord_now(), coord_now())", (id, boot, machine, ttl))


def bury_the_dead(store: coord.Store) -> list[tuple[str, str]]:
    """The reaper's first step (``coord.reap`` without the rest): judge every live row and
    bury the dead; (id, verdict) of those buried."""
    death, liveness = store.backend.death, store.backend.liveness
    look = liveness.look()
    out = []
    for row in death.alive():
        alive, verdict = liveness.judge(row, look)
        if not alive:
            out += [(i, verdict) for i, _ in death.bury([row], verdict)]
    return out


def _insert_process(store: coord.Store, instance: str, boot: str) -> int:
    return int(sql.txn(store, lambda t: t(
        "INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, name, "
        "started_at, tree) SELECT id, incarnation, 1, 1, ?, 'far-proc', coord_now(), 1 "
        "FROM instances WHERE id = ? RETURNING id", (boot, instance))[0]["id"]))


def test_the_liveness_connection_holds_the_registration_lock(pg_store: coord.Store) -> None:
    with coord.register(pg_store, "me", app="x", ttl=3.0) as inst:
        proof = pg_store.backend.liveness.by_member(  # type: ignore[attr-defined]
            (inst.id, inst.incarnation))
        assert proof is not None and proof.holds()
        mine = proof.backend_pid()
        # (Other tests' sessions on this server may still be closing: only ours counts.)
        assert mine in [r["pid"] for r in advisory_holders(pg_store)]
        assert mine != sql.value(pg_store, "SELECT pg_backend_pid()")
        # Timeouts from the TTL on that connection alone: keepalives a third of it apart,
        # unacknowledged data given up after it, an idle session ended after twice it.
        got = proof.settings()
        assert got["idle_session_timeout"] == "6s"
        assert got["tcp_user_timeout"] in ("3s", "3000ms", "0")  # 0: a unix socket has none
        assert sql.value(pg_store, "SHOW idle_session_timeout") == "0"
        assert inst.heartbeat()
    # Deregistering ended its session, and the lock with it.
    wait_until(lambda: mine not in [r["pid"] for r in advisory_holders(pg_store)], timeout=5)


def test_a_terminated_session_is_not_death(pg_store: coord.Store, url: str,
                                           procs: list[subprocess.Popen[str]]) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("COORD_")},
           "COORD_DB": url, "COORD_HEARTBEAT": "0.2"}
    w = subprocess.Popen([sys.executable, "-c", WORKER, "far", "3"], env=env,
                         stdout=subprocess.PIPE, text=True)
    procs.append(w)
    wait_line(w, "ready", timeout=60)
    def liveness_backend() -> int | None:
        # The worker's liveness session names its registration.
        return sql.value(pg_store, "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l "
                                   "ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted "
                                   "WHERE a.application_name LIKE 'coord live far#%'")

    first = wait_until(liveness_backend, timeout=10)
    assert sql.value(pg_store, "SELECT pg_terminate_backend(?)", (first,)) is True
    # Its lock is free now, with the holder alive: never a verdict.
    deadline = time.monotonic() + 4.0  # past its TTL: it kept heartbeating all along
    while time.monotonic() < deadline:
        info = coord.get_instance(pg_store, "far")
        assert (info.alive, info.status) == (True, "alive")
        time.sleep(0.1)
    again = wait_until(liveness_backend, timeout=10)
    assert again != first
    kinds = [(r["kind"], json.loads(r["detail"])) for r in sql.rows(
        pg_store, "SELECT kind, detail FROM events WHERE instance_id = 'far' ORDER BY id")]
    retaken = [d for k, d in kinds if k == "liveness lock retaken"]
    assert retaken and retaken[0]["got"] is True
    assert not bury_the_dead(pg_store)


def test_another_host_s_free_lock_is_not_death_only_its_heartbeat_expiry(
        pg_store: coord.Store) -> None:
    fake_row(pg_store, "far", machine="another-machine", boot="another-boot", ttl=2.0)
    info = coord.get_instance(pg_store, "far")
    assert (info.alive, info.status) == (True, "alive")
    assert info.heartbeat_age is not None and 0 <= info.heartbeat_age < 2.0
    assert not bury_the_dead(pg_store)
    # Real time, not a moved server clock: a moved clock is a step, which holds verdicts
    # back for one TTL (coord.backend.postgresql.clock).
    time.sleep(2.5)
    assert coord.get_instance(pg_store, "far").status == "hung"
    assert bury_the_dead(pg_store) == [("far", "hung")]


def test_a_rebase_buries_only_this_machine_s_old_boot(url: str) -> None:
    s = coord.Store(url)
    try:
        fake_row(s, "mine-old", machine=machine_id(), boot="an-old-boot", ttl=1e6)
        fake_row(s, "far", machine="another-machine", boot="its-boot", ttl=1e6)
        old_proc = _insert_process(s, "mine-old", "an-old-boot")
        far_proc = _insert_process(s, "far", "its-boot")
        # Judged from here: this machine's other boot is over; the other machine's row is not
        # ours to judge and its heartbeat is current.
        assert coord.get_instance(s, "mine-old").status == "reboot"
        assert coord.get_instance(s, "far").status == "alive"
        # Another boot's processes are never probed here, nor listed as trees to end.
        assert s.backend.death.running_processes() == []
        assert s.backend.trees.members() == []
    finally:
        s.close()
    again = coord.Store(url)  # opening rebases this machine's old boot
    try:
        ids = {r["id"]: r["status"] for r in sql.rows(again, "SELECT id, status FROM instances")}
        assert ids == {"far": "alive"}
        procs = {r["id"]: r["status"] for r in sql.rows(again, "SELECT id, status FROM processes")}
        assert procs == {far_proc: "running"}  # the old boot's row went with its instance
        assert old_proc not in procs
        reboot = sql.rows(again, "SELECT detail FROM events WHERE kind = 'reboot'")
        assert [json.loads(r["detail"])["boot_id"] for r in reboot] == [boot_id()]
        # The reaper's process step: the far process is not ours to probe or mark.
        assert again.backend.death.running_processes() == []
        assert sql.value(again, "SELECT status FROM processes WHERE id = ?", (far_proc,)) \
            == "running"
    finally:
        again.close()


def test_another_host_s_process_is_not_stopped_from_here(pg_store: coord.Store) -> None:
    fake_row(pg_store, "far", machine="another-machine", boot="its-boot", ttl=1e6)
    far_proc = _insert_process(pg_store, "far", "its-boot")
    with pytest.raises(coord.PermissionDenied, match="another host"):
        coord.processes.stop_as(pg_store, far_proc, instance_id="far", grace=0.1)
    assert sql.value(pg_store, "SELECT status FROM processes WHERE id = ?", (far_proc,)) \
        == "running"
    # Not an orphan here either (orphans also looks for dead wrappers' trees: the lease
    # engine's recorded groups).
    assert [p for p in coord.processes.list_processes(pg_store, all_=True, live=False)
            if p.orphan] == []


def test_a_lock_found_free_is_taken_again_and_recorded(pg_store: coord.Store) -> None:
    with coord.register(pg_store, "me", app="x", ttl=3.0, heartbeat=False) as inst:
        proof = pg_store.backend.liveness.by_member(  # type: ignore[attr-defined]
            (inst.id, inst.incarnation))
        pid = proof.backend_pid()
        proof._conn.execute("SELECT pg_advisory_unlock_all()")  # as a server restart would
        assert not proof.holds()
        assert get_instance_alive(pg_store, "me")
        assert inst.heartbeat()
        assert proof.holds() and proof.backend_pid() == pid  # the same session took it
        details = [json.loads(r["detail"]) for r in sql.rows(
            pg_store, "SELECT detail FROM events WHERE kind = 'liveness lock retaken'")]
        assert details == [{"incarnation": inst.incarnation, "why": "lock free", "got": True}]


def get_instance_alive(store: coord.Store, id: str) -> bool:
    return coord.get_instance(store, id).alive


def test_another_host_s_instance_is_never_watched_by_pid(pg_store: coord.Store) -> None:
    fake_row(pg_store, "far", machine="another-machine", boot="its-boot", ttl=1e6)
    row = pg_store.backend.instances.by_id("far")
    assert row is not None
    sql.execute(pg_store, "UPDATE instances SET pid = ?, pidns = ? WHERE id = 'far'",
                (os.getpid(), os.readlink("/proc/self/ns/pid")))
    row = pg_store.backend.instances.by_id("far")
    assert row is not None
    liveness = pg_store.backend.liveness
    assert liveness.watchable_pid(row) is None
    for watched in (row, coord.get_instance(pg_store, "far")):
        w = liveness.watch(watched)
        try:
            assert w.pids() == [] and not w.exited() and not w.pinned_alive()
        finally:
            w.close()


def test_over_tcp_both_ends_of_the_liveness_session_follow_the_ttl(pg_cluster: Any) -> None:
    import socket

    with fresh_schema(pg_cluster.tcp_url) as tcp:
        s = coord.Store(tcp)
        try:
            with coord.register(s, "me", app="x", ttl=3.0, heartbeat=False) as inst:
                proof = s.backend.liveness.by_member(  # type: ignore[attr-defined]
                    (inst.id, inst.incarnation))
                server = proof.settings()
                assert (server["tcp_keepalives_idle"], server["tcp_keepalives_count"],
                        server["tcp_user_timeout"]) == ("1", "3", "3000")
                sock = socket.socket(fileno=os.dup(proof._conn.fileno()))
                try:  # the client's own side: a cut link fails a heartbeat within the TTL
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000
                finally:
                    sock.close()
                # The store's other connections keep coord's default link timeouts.
                assert sql.value(s, "SHOW tcp_user_timeout") == SERVER_TIMEOUTS["tcp_user_timeout"]
        finally:
            s.close()
