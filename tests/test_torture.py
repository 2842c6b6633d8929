"""The bounded torture run (scripts/torture.py): real processes SIGKILLed and SIGSTOPped at
random while they use leases, queues, messages and kv; and the bounded fork torture
(scripts/fork_torture.py). Zero violations allowed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from contract_engines import fresh_schema

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "torture.py"


def _bounded_torture(tmp_path: Path, *args: str, duration: str = "12") -> None:
    duration = "60" if os.environ.get("COORD_SLOW") else duration
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", duration, "--workers", "4", "--dir", str(tmp_path),
         *args],
        capture_output=True, text=True, timeout=220,
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    m = re.fullmatch(r"kills=(\d+) ops=(\d+) violations=(\d+)", last)
    assert m, f"unexpected last line {last!r}\n{out.stderr[-3000:]}"
    kills, ops, violations = map(int, m.groups())
    assert violations == 0, out.stderr[-5000:]
    assert out.returncode == 0
    assert kills >= 5 and ops > 100, last


@pytest.mark.timeout(240)
def test_bounded_torture_run_has_no_violations(tmp_path: Path) -> None:
    _bounded_torture(tmp_path)


@pytest.mark.timeout(240)
def test_bounded_torture_run_on_postgresql_has_no_violations(tmp_path: Path, pg_url: str) -> None:
    """The same chaos on a PostgreSQL schema of its own. A worker there starts slower (the
    driver's import, the schema check), so the run is bounded by its kills, not its seconds."""
    with fresh_schema(pg_url) as url:
        _bounded_torture(tmp_path, "--db", url, "--kills", "6", duration="90")


FORK_SCRIPT = SCRIPT.with_name("fork_torture.py")


@pytest.mark.timeout(240)
def test_bounded_fork_torture_loses_nothing_and_refuses_every_child(tmp_path: Path) -> None:
    """scripts/fork_torture.py: threaded coord writers start fork children while they write
    and are SIGKILLed; every acknowledged write is found by a fresh process after a third one
    opened and closed the database, and every child's coord call was refused."""
    duration = "60" if os.environ.get("COORD_SLOW") else "8"
    out = subprocess.run(
        [sys.executable, str(FORK_SCRIPT), "--duration", duration, "--writers", "3",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=220,
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    m = re.fullmatch(r"forks=(\d+) refused=(\d+) acked=(\d+) kills=(\d+) violations=(\d+)", last)
    assert m, f"unexpected last line {last!r}\n{out.stderr[-3000:]}"
    forks, refused, acked, kills, violations = map(int, m.groups())
    assert violations == 0, out.stderr[-5000:]
    assert out.returncode == 0
    assert forks >= 20 and refused >= 4 * forks and acked > 100 and kills >= 2, last
