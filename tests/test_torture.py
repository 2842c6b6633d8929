"""The bounded torture run (scripts/torture.py): real processes SIGKILLed and SIGSTOPped at
random while they use leases, queues, messages and kv; zero violations allowed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "torture.py"


@pytest.mark.timeout(240)
def test_bounded_torture_run_has_no_violations(tmp_path: Path) -> None:
    duration = "60" if os.environ.get("COORD_SLOW") else "12"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", duration, "--workers", "4", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=220,
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    m = re.fullmatch(r"kills=(\d+) ops=(\d+) violations=(\d+)", last)
    assert m, f"unexpected last line {last!r}\n{out.stderr[-3000:]}"
    kills, ops, violations = map(int, m.groups())
    assert violations == 0, out.stderr[-5000:]
    assert out.returncode == 0
    assert kills >= 5 and ops > 100, last
