"""SIGTERM to a coord process on PostgreSQL while its main thread is inside a transaction:
the handler cuts that transaction's connection (the server rolls it back) and deregisters on
a new one, so the instance leaves cleanly and its lease is free, as on SQLite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from contract_engines import fresh_schema

import coord
from coord.leases import get_lease

HOLDER = textwrap.dedent("""
    import sys, coord
    from coord import leases
    store = coord.Store(sys.argv[1])
    inst = coord.register(store, "sigterm-holder", app="t")
    lease = leases.acquire(inst, "t/lease", timeout=10)
    print("ready", flush=True)
    while True:
        lease.write("SELECT pg_sleep(0.5)")  # the main thread is almost always in a transaction
""")


@pytest.mark.timeout(120)
def test_sigterm_inside_a_transaction_still_deregisters(pg_url: str) -> None:
    with fresh_schema(pg_url) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
        p = subprocess.Popen([sys.executable, "-c", HOLDER, url], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            time.sleep(0.3)  # inside a pg_sleep, in the fenced transaction
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == -signal.SIGTERM, err
        assert "deregistration failed" not in err, err
        store = coord.Store(url)
        try:
            assert [i.id for i in coord.list_instances(store)] == []
            assert get_lease(store, "t/lease").holder is None
        finally:
            store.close()
