"""The server crashes (``pg_ctl stop -m immediate``) and restarts while several processes
register, heartbeat and deregister instances:

- nothing committed is lost: every registration a caller saw succeed is there (unless it
  then deregistered it), every deregistration it saw succeed is gone;
- nothing half-written remains: every instance row has its 'joined' event (one transaction);
- callers get one-line ``StorageError``s naming the store, never another error, and carry on
  by themselves — a registered instance's heartbeat thread renews it again after the restart;
- an outage shorter than the TTL buries no instance: past the crash + TTL every long-lived
  instance is still alive, its id still refused to a newcomer;
- incarnations and terms keep rising after the restart.

The server is a private cluster of this module (it is crashed), never COORD_TEST_PG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from contract_engines import with_schema
from pg_fixtures import import_psycopg, private_cluster
from pgcluster import Cluster

import coord
from coord.errors import InstanceIdInUse

psycopg = import_psycopg()

SLOW = bool(os.environ.get("COORD_SLOW"))
WORKERS = 3
#: The long-lived instances' TTL: well above an outage here (crash, 0.5 s down, start).
TTL = 6.0

# A worker: registers a long-lived instance (heartbeat thread on), then registers,
# heartbeats and deregisters short-lived ones until told "stop"; prints one JSON line per
# outcome (what committed, or the error), then its keeper's state, then waits for "exit".
WORKER = r"""
import json, sys, threading, time
import coord
from coord.errors import CoordError

url, n, ttl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
KEEP = 20

def say(**kw):
    kw["t"] = time.clock_gettime(time.CLOCK_MONOTONIC)
    print(json.dumps(kw), flush=True)

store = coord.Store(url)
keeper = coord.register(store, f"keeper-{n}", app="crash", ttl=ttl, handle_signals=False)
say(op="keeper", id=keeper.id, inc=keeper.incarnation, shown=store.address_shown)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
i = kept = 0
while not stop.is_set():
    i += 1
    id = f"w{n}-{i}"
    try:
        inst = coord.register(store, id, app="crash", ttl=ttl, heartbeat=False,
                              handle_signals=False)
    except CoordError as e:
        say(op="register", id=id, error=type(e).__name__, message=str(e))
        time.sleep(0.02)
        continue
    member = (id, inst.incarnation)
    say(op="register", id=id, inc=inst.incarnation)
    try:
        say(op="heartbeat", id=id, inc=inst.incarnation, ok=inst.heartbeat())
    except CoordError as e:
        say(op="heartbeat", id=id, inc=inst.incarnation, error=type(e).__name__,
            message=str(e))
    # Three in four leave again (and free their local files); of the others, the first
    # KEEP stay: each holds a server session (its liveness lock) until the worker exits, and
    # a fast machine would otherwise fill the server's connection slots.
    if i % 4 or kept >= KEEP:
        try:
            ok = store.backend.instances.deregister(member)
            say(op="deregister", id=id, inc=inst.incarnation, ok=ok)
        except CoordError as e:
            say(op="deregister", id=id, inc=inst.incarnation, error=type(e).__name__,
                message=str(e))
        inst.close()  # its local files (its deregistration is already settled above)
    else:
        kept += 1
    time.sleep(0.01)
say(op="summary", keeper_lost=keeper.lost.is_set())
sys.stdin.readline()
"""


class Worker:
    """One load process and the lines it printed (read by a thread)."""

    def __init__(self, url: str, n: int, log: Path) -> None:
        self.err = open(log, "w")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(n), str(TTL)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.lines: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def committed(self) -> int:
        return sum(1 for x in self.lines if "error" not in x and x["op"] != "keeper")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        for s in (self.proc.stdin, self.proc.stdout):
            if s is not None:
                s.close()
        self.err.close()


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def wait_for(what: str, cond: Any, timeout: float = 60) -> None:
    deadline = mono() + timeout
    while not cond():
        if mono() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def more_load(workers: list[Worker], what: str, ops: int = 20) -> None:
    """Wait until every worker has committed ``ops`` more operations."""
    marks = [w.committed() + ops for w in workers]
    wait_for(what, lambda: all(w.committed() >= m for w, m in zip(workers, marks, strict=True)))


def admin(cluster: Cluster, schema: str) -> Any:
    deadline = mono() + 60
    while True:
        try:
            return psycopg.connect(cluster.url(), autocommit=True, connect_timeout=5,
                                   options=f"-c search_path={schema}")
        except psycopg.OperationalError:
            if mono() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with private_cluster("coord-pgcrash-") as c:
        yield c


def run_trial(cluster: Cluster, schema: str, crashes: int, tmp_path: Path) -> dict[str, Any]:
    url = with_schema(cluster.url(), schema)
    coord.Store(url).close()  # the schema, before the workers race to create it
    with admin(cluster, schema) as a:
        term_before = a.execute("SELECT nextval('term_seq')").fetchone()[0]
    workers = [Worker(url, n, tmp_path / f"worker{n}.log") for n in range(WORKERS)]
    cycles: list[dict[str, float]] = []
    try:
        wait_for("the keepers", lambda: all(
            any(x["op"] == "keeper" for x in w.lines) for w in workers))
        for _ in range(crashes):
            more_load(workers, "load before the crash")
            crashed = mono()
            cluster.crash()
            time.sleep(0.5)
            cluster.run_server()
            up = mono()
            with admin(cluster, schema) as a:
                server_up = a.execute("SELECT coord_now()").fetchone()[0]
            cycles.append({"crashed": crashed, "up": up, "server_up": server_up})
            more_load(workers, "load after the restart")
        # Past the last crash + TTL: an instance whose heartbeat had stopped would be hung.
        with admin(cluster, schema) as a:
            wait_for("crash + TTL on the server clock", lambda: (
                a.execute("SELECT coord_now()").fetchone()[0]
                > cycles[-1]["server_up"] + TTL + 1), timeout=TTL + 30)
        for w in workers:
            w.send("stop")
        wait_for("the summaries", lambda: all(
            any(x["op"] == "summary" for x in w.lines) for w in workers))
        check(cluster, schema, url, workers, cycles, term_before)
        for w in workers:
            w.send("exit")
            w.proc.wait(timeout=30)
    finally:
        for w in workers:
            w.finish()
    return {"cycles": cycles, "workers": workers}


def check(cluster: Cluster, schema: str, url: str, workers: list[Worker], cycles: list[dict[str, float]],
          term_before: int) -> None:
    lines = [x for w in workers for x in w.lines]
    shown = next(x["shown"] for x in lines if x["op"] == "keeper")
    errors = [x for x in lines if "error" in x]
    assert errors, "no caller saw the crash: the test did not test it"
    for x in errors:
        assert x["error"] == "StorageError", x
        assert "\n" not in x["message"] and x["message"].startswith(f"{shown}: "), x
    assert not any(x["keeper_lost"] for x in lines if x["op"] == "summary")
    with admin(cluster, schema) as a:
        rows = {r[0]: r for r in a.execute(
            "SELECT id, incarnation, status, heartbeat_mono FROM instances").fetchall()}
        joined = {(r[0], r[1]) for r in a.execute(
            "SELECT instance_id, (detail::json->>'incarnation')::bigint FROM events "
            "WHERE kind = 'joined'").fetchall()}
        term_after = a.execute("SELECT nextval('term_seq')").fetchone()[0]
    # Nothing half-written: each row came with its event, in one transaction.
    for id, inc, _status, _hb in rows.values():
        assert (id, inc) in joined, f"{id}/{inc} has no 'joined' event"
    # Nothing committed lost: the last outcome each caller saw for an id holds.
    last: dict[str, dict[str, Any]] = {}
    for x in lines:
        if x["op"] in ("register", "deregister") and "error" not in x:
            last[x["id"]] = x
        elif x["op"] == "deregister":  # failed: it may or may not have committed
            last[x["id"]] = {**x, "unknown": True}
    for id, x in last.items():
        if x.get("unknown"):
            continue
        if x["op"] == "register":
            assert id in rows and rows[id][1] == x["inc"] and rows[id][2] == "alive", (x, rows.get(id))
        else:
            assert x["ok"] and id not in rows, (x, rows.get(id))
    # No instance buried by an outage shorter than its TTL; each heartbeat thread renewed
    # its instance after the last restart.
    for w in range(WORKERS):
        id = f"keeper-{w}"
        assert rows[id][2] == "alive", rows[id]
        assert rows[id][3] > cycles[-1]["server_up"], "no heartbeat since the restart"
    s = coord.Store(url)
    try:
        live = {i.id for i in coord.instances.list_instances(s)}
        assert {f"keeper-{w}" for w in range(WORKERS)} <= live
        with pytest.raises(InstanceIdInUse):
            coord.register(s, "keeper-0", app="crash", heartbeat=False, handle_signals=False)
    finally:
        s.close()
    # Sequences keep rising: every incarnation handed out after a restart is above every one
    # committed before it; so is the next term.
    for c in cycles:
        before = [x["inc"] for x in lines if x["op"] == "register" and "inc" in x
                  and x["t"] < c["crashed"]]
        after = [x["inc"] for x in lines if x["op"] == "register" and "inc" in x
                 and x["t"] > c["up"]]
        assert before and after and min(after) > max(before)
    assert term_after > term_before


def error_kinds(result: dict[str, Any]) -> dict[str, int]:
    """How many errors the callers saw, by the reason's first words."""
    out: dict[str, int] = {}
    for w in result["workers"]:
        for x in w.lines:
            if "error" in x:
                key = x["message"].split(": ", 1)[-1][:60]
                out[key] = out.get(key, 0) + 1
    return out


def reconnect_seconds(result: dict[str, Any]) -> list[float]:
    """Per worker and crash: from the server accepting connections again to the worker's
    first committed operation."""
    out = []
    for c in result["cycles"]:
        for w in result["workers"]:
            t = [x["t"] for x in w.lines if "error" not in x and x["t"] > c["up"]]
            out.append(min(t) - c["up"])
    return out


def test_a_server_crash_during_registrations_loses_nothing_and_buries_nobody(
        cluster: Cluster, tmp_path: Path) -> None:
    t = mono()
    result = run_trial(cluster, "crash_ci", crashes=2, tmp_path=tmp_path)
    took = reconnect_seconds(result)
    print(f"2 crashes, {WORKERS} workers: {mono() - t:.1f} s; reconnected "
          f"{min(took):.2f}-{max(took):.2f} s after the server was up; errors {error_kinds(result)}")


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="set COORD_SLOW=1 for the long run")
@pytest.mark.timeout(900)
def test_many_server_crashes_lose_nothing_and_bury_nobody(
        cluster: Cluster, tmp_path: Path) -> None:
    t = mono()
    result = run_trial(cluster, "crash_slow", crashes=10, tmp_path=tmp_path)
    took = reconnect_seconds(result)
    print(f"10 crashes, {WORKERS} workers: {mono() - t:.1f} s; reconnected "
          f"{min(took):.2f}-{max(took):.2f} s after the server was up; errors {error_kinds(result)}")
