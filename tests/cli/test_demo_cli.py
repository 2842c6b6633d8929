"""`coord demo` end to end: readable lines (no Python reprs), and the database as it found
it apart from the event log (and the counters, which never go back), on both engines; every
process it started has ended."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = pytest.mark.contract

# What the demo may change: the event log (with its AUTOINCREMENT sequence) and the counters
# that never go back (incarnations, terms, kv revisions; sequences on PostgreSQL).
MAY_CHANGE = {"events", "sqlite_sequence", "counters"}
TABLES = {
    "sqlite": "SELECT name FROM sqlite_schema WHERE type = 'table'",
    "postgresql": "SELECT table_name AS name FROM information_schema.tables "
                  "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
}
PY_REPR = re.compile(r"\[('|\d)|\{'|'\]|\(\d+, ")


def snapshot(db: Path | str) -> dict[str, list[object]]:
    engine = "postgresql" if str(db).startswith("postgresql") else "sqlite"
    r = run_cli(db, "sql", "--json", TABLES[engine])
    assert r.returncode == 0, r.stderr
    tables = [t["name"] for t in json.loads(r.stdout) if t["name"] not in MAY_CHANGE]
    out = {}
    for t in tables:
        rows = run_cli(db, "sql", "--json", f"SELECT * FROM {t}")
        assert rows.returncode == 0, rows.stderr
        out[t] = sorted(json.loads(rows.stdout), key=lambda r: json.dumps(r, sort_keys=True))
    return out


@pytest.mark.timeout(300)
def test_demo_reads_well_and_leaves_nothing_behind(db_path: Path | str) -> None:
    before = snapshot(db_path)
    r = run_cli(db_path, "demo", timeout=280)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("demo done")
    reprs = [line for line in lines if PY_REPR.search(line)]
    assert not reprs, reprs
    assert any(re.search(r'request to \S+: \{"from": "demo-', line) for line in lines)
    after = snapshot(db_path)
    assert after == before  # no lease, key, job, message, process or instance left
    running = []
    for pid in {int(p) for p in re.findall(r"\bpid (\d+)", r.stdout)}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        running.append(pid)
    assert not running, f"the demo left these running: {running}"
