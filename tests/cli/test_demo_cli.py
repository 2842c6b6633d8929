"""`coord demo` end to end: readable lines (no Python reprs), and the database as it found
it apart from the event log (and the counters, which never go back)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli

# What the demo may change: the event log (with its AUTOINCREMENT sequence) and the counters
# that never go back (incarnations, terms, kv revisions).
MAY_CHANGE = {"events", "sqlite_sequence", "counters"}
PY_REPR = re.compile(r"\[('|\d)|\{'|'\]|\(\d+, ")


def snapshot(db: Path) -> dict[str, list[object]]:
    r = run_cli(db, "sql", "--json", "SELECT name FROM sqlite_schema WHERE type = 'table'")
    assert r.returncode == 0, r.stderr
    tables = [t["name"] for t in json.loads(r.stdout) if t["name"] not in MAY_CHANGE]
    out = {}
    for t in tables:
        rows = run_cli(db, "sql", "--json", f"SELECT * FROM {t}")
        assert rows.returncode == 0, rows.stderr
        out[t] = sorted(json.loads(rows.stdout), key=lambda r: json.dumps(r, sort_keys=True))
    return out


@pytest.mark.timeout(300)
def test_demo_reads_well_and_leaves_nothing_behind(db_path: Path) -> None:
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
