"""The bounded load run (scripts/load.py): instances heartbeating beside a busy shared queue,
messages, a reader held open and a cron-style reaper; no Busy reaches a caller, no
heartbeat misses its TTL, and the WAL is emptied once the load stops."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load.py"


@pytest.mark.timeout(240)
def test_bounded_load_run(tmp_path: Path) -> None:
    full = bool(os.environ.get("COORD_SLOW"))
    args = ["--instances", "50", "--duration", "60"] if full else ["--instances", "15", "--duration", "6"]
    out = subprocess.run([sys.executable, str(SCRIPT), *args, "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=220)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    m = re.fullmatch(r"instances=(\d+) ops=(\d+) busy=(\d+) missed=(\d+) wal_max=(\d+) "
                     r"wal_end=(\d+) violations=(\d+)", last)
    assert m, f"unexpected last line {last!r}\n{out.stderr[-3000:]}"
    _, ops, busy, missed, _, _, violations = map(int, m.groups())
    assert (busy, missed, violations) == (0, 0, 0), out.stderr[-3000:]
    assert ops > 100 and out.returncode == 0
