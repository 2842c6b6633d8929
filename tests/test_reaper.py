"""The reaper: the death rule for everyone, idempotent, bounded, safe beside live instances
and beside a second reaper; the event log and its bounds."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import engine_sql as sql
import pytest
from conftest import move_server_clock, run_cli, wait_line

import coord
from coord.check import check
from coord.clock import Clock, boot_id
from coord.config import Config
from coord.identity import pid_namespace
from coord.instances import list_instances, register

pytestmark = pytest.mark.contract

WORKER = """
import os, sys, time, coord
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="test")
print("ready", inst.id, inst.incarnation, flush=True)
inst.lost.wait()
print("lost", flush=True)
time.sleep(60)
"""

# Waits for the go-file, reaps once, prints the report as JSON.
REAPER = """
import json, os, sys, time, coord
store = coord.Store(os.environ["COORD_DB"])
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
print(json.dumps(coord.reap(store).to_json()), flush=True)
"""


def env_for(db: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    e.update(COORD_DB=str(db), **extra)
    return e


def start(db: Path, procs: list[subprocess.Popen[str]], script: str, *args: str,
          **env: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", script, *args], env=env_for(db, **env),
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    return p


def exists(path: str) -> bool:
    """A file, or an abstract socket (``@name``: used where the file's path would be too long
    for a socket address), which lives in the kernel's table, not on disk."""
    if path.startswith("@"):
        with open("/proc/net/unix") as f:
            return any(line.split()[-1] == path for line in f if len(line.split()) > 7)
    return os.path.exists(path)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def insert_dead(store: coord.Store, n: int, prefix: str = "dead") -> list[str]:
    """``n`` registered rows whose process is gone (a waited-for pid, a wrong start token)."""
    pid = dead_pid()
    ids = [f"{prefix}-{i}" for i in range(n)]
    locks = store.side_dir("locks")

    def txn(c: sql.Txn) -> None:
        mono, wall = c.now, c.wall
        for id in ids:
            c(
                "INSERT INTO instances (id, incarnation, app, pid, start_token, boot_id, pidns, "
                'uid, "user", host, lock_path, ttl, started_at, heartbeat_at, heartbeat_mono) '
                "VALUES (?, ?, 'test', ?, 1, ?, ?, ?, 'u', 'h', ?, 15, ?, ?, ?)",
                (id, c.counter("incarnation"), pid, boot_id(), pid_namespace(),
                 os.geteuid(), str(locks / f"{id}.lock"), wall, wall, mono))
            if c.pg:  # the host it was registered on: this one
                c("UPDATE instances SET machine_id = ? WHERE id = ?", (machine(), id))

    sql.txn(store, txn)
    return ids


def machine() -> str:
    from coord.backend.postgresql.liveness import machine_id

    return machine_id()


def died_events(store: coord.Store) -> list[str]:
    return [r["instance_id"] for r in sql.rows(
        store, "SELECT instance_id FROM events WHERE kind = 'died'")]


def snapshot(store: coord.Store) -> tuple[object, ...]:
    return tuple(sql.rows(store, f"SELECT * FROM {t} ORDER BY 1")  # noqa: S608 - fixed names
                 for t in ("instances", "events", "leases", "jobs", "kv", "messages"))


def test_reap_buries_the_dead_and_is_idempotent(store: coord.Store, db_path: Path,
                                                procs: list[subprocess.Popen[str]]) -> None:
    ws = [start(db_path, procs, WORKER, f"r{i}") for i in range(3)]
    for w in ws:
        wait_line(w, timeout=60)
    locks = {i.id: (i.lock_path, i.nudge_path) for i in list_instances(store)}
    ws[0].kill()
    ws[0].wait()
    first = run_cli(db_path, "reap")
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"reaped r0 \(incarnation \d+, died\)\n", first.stdout), first.stdout
    # Its lock file and socket went with it; the living keep theirs.
    assert not any(exists(p) for p in locks["r0"] if p)
    assert all(exists(p) for p in locks["r1"] if p)
    # A second run has nothing to do, and says nothing.
    second = run_cli(db_path, "reap")
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    report = json.loads(run_cli(db_path, "reap", "--json").stdout)
    assert report["dead"] == [] and report["dry_run"] is False
    assert not coord.reap(store).did_something
    assert died_events(store) == ["r0"]
    assert {i.id for i in list_instances(store)} == {"r1", "r2"}


def test_dry_run_changes_nothing(store: coord.Store, db_path: Path) -> None:
    insert_dead(store, 4)
    before = snapshot(store)
    report = coord.reap(store, dry_run=True)
    assert report.dry_run and sorted(d["id"] for d in report.dead) == [f"dead-{i}" for i in range(4)]
    out = run_cli(db_path, "reap", "--dry-run")
    assert out.returncode == 0 and out.stdout.count("would reap") == 4
    assert snapshot(store) == before
    assert len(coord.reap(store).dead) == 4


def test_two_reapers_at_once_bury_each_death_once(db_path: Path, tmp_path: Path,
                                                  procs: list[subprocess.Popen[str]]) -> None:
    s = coord.Store(db_path)
    try:
        ids = insert_dead(s, 600)
        go = tmp_path / "go"
        reapers = [start(db_path, procs, REAPER, str(go), COORD_REAP_BATCH="10")
                   for _ in range(2)]
        for r in reapers:
            wait_line(r, timeout=60)
        go.touch()
        reports = []
        for r in reapers:
            assert r.stdout is not None
            reports.append(json.loads(r.stdout.readline()))
            assert r.wait(timeout=60) == 0
        buried = [d["id"] for rep in reports for d in rep["dead"]]
        assert sorted(buried) == sorted(ids)  # between them, each exactly once
        died = Counter(died_events(s))
        assert set(died) == set(ids) and set(died.values()) == {1}
        assert Counter(r["instance_id"] for r in sql.rows(
            s, "SELECT instance_id FROM events WHERE kind = 'reaped'")) == Counter(ids)
        assert sql.rows(s, "SELECT * FROM instances") == []
        assert check(s, strict=True) == []
    finally:
        s.close()


def test_burial_goes_in_bounded_batches(db_path: Path) -> None:
    ticks = itertools.count(1_000_000)
    # Each call of the wall clock is a new second, so one transaction's events share one.
    s = coord.Store(db_path, clock=Clock(wall=lambda: float(next(ticks))),
                    config=Config(reap_batch=7))
    try:
        insert_dead(s, 30)
        report = coord.reap(s)
        assert len(report.dead) == 30
        # The transaction of each event: SQLite's one wall-clock reading (a new second per
        # reading here), PostgreSQL's xmin.
        txn_of = "xmin::text" if s.engine == "postgresql" else "at"
        per_txn = Counter(r["t"] for r in sql.rows(
            s, f"SELECT {txn_of} AS t FROM events WHERE kind = 'died'"))  # noqa: S608
        assert max(per_txn.values()) <= 7
        assert len(per_txn) >= 5
    finally:
        s.close()


def test_reaper_beside_live_instances(store: coord.Store, db_path: Path,
                                      procs: list[subprocess.Popen[str]]) -> None:
    ws = [start(db_path, procs, WORKER, f"live{i}", COORD_HEARTBEAT="0.1") for i in range(4)]
    incs = {}
    for w in ws:
        _, id, inc = wait_line(w, timeout=60).split()
        incs[id] = int(inc)
    with register(store, "here", app="test"):
        for round in range(5):
            insert_dead(store, 50, prefix=f"d{round}")
            report = coord.reap(store)
            assert len(report.dead) == 50
            assert {d["id"].split("-")[0] for d in report.dead} == {f"d{round}"}
        live = {i.id: i.incarnation for i in list_instances(store)}
        assert live == {**incs, "here": live["here"]}
    for w in ws:
        assert w.poll() is None  # none of them was told it was lost
    assert check(store, strict=True) == []


def test_an_instance_of_another_boot_is_reaped(store: coord.Store) -> None:
    insert_dead(store, 1, prefix="old")
    sql.execute(store, "UPDATE instances SET boot_id = 'another-boot'")
    report = coord.reap(store)
    assert report.dead == [{"id": "old-0", "incarnation": report.dead[0]["incarnation"],
                            "reason": "reboot"}]


def test_events_are_trimmed_by_rows(db_path: Path) -> None:
    s = coord.Store(db_path, config=Config(events_max_rows=5))
    try:
        for i in range(10):
            with register(s, f"e{i}", app="test"):
                pass
        newest = sql.value(s, "SELECT max(id) FROM events")
        report = coord.reap(s)
        assert report.events_trimmed >= 15
        assert sql.value(s, "SELECT count(*) FROM events") == 5
        assert sql.value(s, "SELECT max(id) FROM events") == newest  # the newest are kept
    finally:
        s.close()


def test_events_are_trimmed_by_age(db_path: Path) -> None:
    offset = [0.0]
    s = coord.Store(db_path, clock=Clock(wall=lambda: time.time() + offset[0]),
                    config=Config(events_max_age=60.0))
    try:
        with register(s, "old", app="test"):
            pass
        offset[0] = 120.0  # events are stamped with the wall clock: the server's on PostgreSQL
        if s.engine == "postgresql":
            move_server_clock(s, 120.0)
        with register(s, "new", app="test"):
            pass
        coord.reap(s)
        left = {(r["kind"], r["instance_id"])
                for r in sql.rows(s, "SELECT kind, instance_id FROM events")}
        if s.engine == "postgresql":
            # Moving the server's clock under a real-clock store is a step it detects and
            # records (after the step: a new event, kept).
            assert ("clock stepped", None) in left
            left.discard(("clock stepped", None))
        assert left == {("joined", "new"), ("left", "new")}
    finally:
        s.close()


def test_event_kinds_of_a_life(store: coord.Store, db_path: Path,
                               procs: list[subprocess.Popen[str]]) -> None:
    w = start(db_path, procs, WORKER, "life")
    wait_line(w, timeout=60)
    w.kill()
    w.wait()
    w2 = start(db_path, procs, WORKER, "life")  # takes over the dead id
    wait_line(w2, timeout=60)
    w2.kill()
    w2.wait()
    coord.reap(store)
    with register(store, "short", app="test"):
        pass
    kinds = [r["kind"] for r in sql.rows(
        store, "SELECT kind FROM events WHERE instance_id IN ('life', 'short') ORDER BY id")]
    assert kinds == ["joined", "died", "took over", "joined", "died", "reaped", "joined", "left"]
    out = run_cli(db_path, "events", "--json")
    listed = json.loads(out.stdout)
    assert {"joined", "died", "took over", "reaped", "left"} <= {e["kind"] for e in listed}
