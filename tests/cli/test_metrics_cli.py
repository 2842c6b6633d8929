"""`coord metrics`: the Prometheus text export reflects instances, queues and leases."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

import pytest

import coord
from coord import leases, queues

pytestmark = pytest.mark.contract

Cli = Callable[..., subprocess.CompletedProcess[str]]

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+$')


def test_metrics_text_format_and_figures(store: coord.Store, cli: Cli) -> None:
    inst = coord.register(store, "m1", app="web", heartbeat=False, handle_signals=False)
    queues.put(store, "web/jobs", {"n": 1})
    queues.put(store, "web/jobs", {"n": 2})
    lease = leases.acquire(inst, 'web/"leader"', timeout=0)
    out = cli("metrics")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for line in lines:
        assert line.startswith("# ") or SAMPLE.match(line), line
    assert 'coord_instances{app="web",state="alive"} 1' in lines
    assert 'coord_queue_jobs_ready{queue="web/jobs"} 2' in lines
    assert any(line.startswith('coord_lease_held{lease="web/\\"leader\\"",holder="m1"} 1') for line in lines)
    lease.release()
    inst.close()


def test_terms_are_exact_integers_and_json_has_the_same_figures(store: coord.Store,
                                                                 cli: Cli) -> None:
    """A term is a fencing token seeded from the wall clock in ms (~1.8e12): every digit
    counts, in the text and in --json."""
    import json

    inst = coord.register(store, "m2", app="web", heartbeat=False, handle_signals=False)
    lease = leases.acquire(inst, "web/lead", timeout=0)
    assert lease.term > 10**12
    text = cli("metrics").stdout.splitlines()
    assert f'coord_lease_term{{lease="web/lead"}} {lease.term}' in text
    assert not [line for line in text if "e+" in line and not line.startswith("#")]
    out = cli("metrics", "--json")
    assert out.returncode == 0, out.stderr
    families = {f["name"]: f for f in json.loads(out.stdout)}
    assert families["coord_lease_term"]["type"] == "gauge"
    assert families["coord_lease_term"]["samples"] == [
        {"labels": {"lease": "web/lead"}, "value": lease.term}]
    # The engine's own figures: SQLite's write-ahead log, PostgreSQL's server and sessions.
    own = "coord_wal_bytes" if store.engine == "sqlite" else "coord_schema_version"
    assert {"coord_instances", "coord_queue_jobs_ready", own} <= set(families)
    lease.release()
    inst.close()
