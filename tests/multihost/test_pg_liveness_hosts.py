"""An instance on a host whose link to the server is cut (the multi-host harness): the server
ends its liveness session within about its TTL (the settings coord chose from the TTL), which
frees its lock — and that is no verdict: it is alive until its heartbeat expires by the
server's clock, then 'hung', never 'died'. Once the link heals, its heartbeat opens another
session, takes its lock again and records it, and it is alive again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import engine_sql as sql
from conftest import wait_line
from netns import Net, mono
from pg_fixtures import import_psycopg

import coord

import_psycopg()

TTL = 3.0
WORKER = """
import os, sys, time, coord
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, "far", app="test", ttl=float(sys.argv[1]))
print("ready", inst.incarnation, flush=True)
time.sleep(300)
"""


HOSTS = 1  # the ``net`` fixture's (tests/pg_fixtures.py)


def liveness_backend(store: coord.Store) -> int | None:
    return sql.value(store, "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l "
                            "ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted "
                            "AND l.objsubid = 1 WHERE a.application_name LIKE 'coord live far#%'")


def test_a_cut_host_keeps_its_instance_until_its_heartbeat_expires(net: Net) -> None:
    host = net.hosts[0]
    schema = f"t_{uuid.uuid4().hex[:16]}"
    here = coord.Store(f"{net.admin_url}{'&' if '?' in net.admin_url else '?'}schema={schema}")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("COORD_")},
           "COORD_DB": net.url(host, schema=schema), "COORD_HEARTBEAT": "0.3"}
    w = net.run(host, [sys.executable, "-c", WORKER, str(TTL)], env=env,
                stdout=subprocess.PIPE, text=True)
    try:
        inc = int(wait_line(w, "ready", timeout=60).split()[1])
        first = liveness_backend(here)
        assert first is not None
        net.cut(host)
        cut_at = mono()
        seen: set[str] = set()
        while liveness_backend(here) == first:  # the server ends the cut session ...
            seen.add(coord.get_instance(here, "far").status)
            assert mono() - cut_at < 4 * TTL, "the server kept the cut session"
            time.sleep(0.1)
        freed_after = mono() - cut_at
        print(f"cut session ended by the server after {freed_after:.1f} s (TTL {TTL} s)")
        # ... which proves nothing: alive until its heartbeat is older than its TTL, then hung.
        deadline = mono() + 2 * TTL
        while "hung" not in seen and mono() < deadline:
            seen.add(coord.get_instance(here, "far").status)
            time.sleep(0.1)
        assert seen <= {"alive", "hung"} and "hung" in seen, seen
        assert freed_after < 4 * TTL
        net.heal(host)
        deadline = mono() + 60
        while not coord.get_instance(here, "far").alive:
            assert mono() < deadline, "its heartbeat did not come back"
            time.sleep(0.1)
        again = liveness_backend(here)
        assert again is not None and again != first
        retaken = [json.loads(r["detail"]) for r in sql.rows(
            here, "SELECT detail FROM events WHERE kind = 'liveness lock retaken'")]
        assert retaken and retaken[-1]["incarnation"] == inc and retaken[-1]["got"] is True
    finally:
        net.heal(host)
        w.kill()
        w.wait(timeout=10)
        if w.stdout is not None:
            w.stdout.close()
        here.close()
