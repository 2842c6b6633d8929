"""Every view gives the same answer through `coord sql`, Debian's `sqlite3` binary and
Python's stdlib `sqlite3` module, each in its own process: the views use only functions
SQLite 3.37 has (the first release with STRICT tables)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, spawn_python, wait_line

import coord
from coord.backend.sqlite.migrations import migrations

# A live instance in another process that holds a lease (its heartbeat keeps it fresh).
HOLDER = """
import os, time, coord
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, "viewer-1", app="viewer")
lease = coord.try_acquire(inst, "viewer/lead")
print("ready", lease.term, flush=True)
while True:
    time.sleep(0.5)
"""

STDLIB = """
import json, sqlite3, sys
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
cur = conn.execute(sys.argv[2])
cols = [d[0] for d in cur.description]
print(json.dumps([dict(zip(cols, r)) for r in cur.fetchall()]))
"""

# Columns that read the clock: they must be numbers everywhere, close to each other.
CLOCK_COLUMNS = {"heartbeat_age_s"}
# Functions and modifiers newer than SQLite 3.37, which would make a view fail (or return
# NULL, silently) under an older sqlite3: unixepoch() 3.38, format() 3.38, unhex() 3.41,
# 'subsec' 3.42, timediff() 3.43, octet_length() 3.43, concat() and string_agg() 3.44.
# (The 'unixepoch' modifier of datetime() is old; the unixepoch() function is not.)
NEWER_THAN_3_37 = [r"\bunixepoch\s*\(", r"\bformat\s*\(", r"\bunhex\s*\(", r"subsec",
                   r"\btimediff\s*\(", r"\boctet_length\s*\(", r"\bconcat(_ws)?\s*\(",
                   r"\bstring_agg\s*\(", r"->"]


def sqlite3_binary() -> str:
    found = shutil.which("sqlite3")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have the sqlite3 binary (.ci/run installs it)")
        pytest.skip("the sqlite3 command-line program is not installed (apt-get install sqlite3)")
    return found


def views(db: Path) -> list[str]:
    r = run_cli(db, "sql", "--json", "SELECT name FROM sqlite_schema WHERE type = 'view' ORDER BY name")
    assert r.returncode == 0, r.stderr
    return [row["name"] for row in json.loads(r.stdout)]


def _split(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows without their clock columns (sorted, as text), and the clock columns apart."""
    fixed = sorted(json.dumps({k: v for k, v in r.items() if k not in CLOCK_COLUMNS},
                              sort_keys=True) for r in rows)
    clocks = [{k: v for k, v in r.items() if k in CLOCK_COLUMNS} for r in rows]
    return fixed, clocks


@pytest.fixture
def busy_db(db_path: Path, store: coord.Store, procs: list[Any]) -> Path:
    """A database with a live instance holding a lease, queues with jobs in several
    states, a key and events."""
    p = spawn_python(HOLDER, db=db_path)
    procs.append(p)
    wait_line(p)
    for n in range(3):
        coord.queues.put(store, "viewer/jobs", {"n": n}, priority=n)
    coord.queues.put(store, "other", "x")
    worker = coord.register(store, "viewer-2", app="viewer", heartbeat=False)
    job = coord.queues.claim(store, "viewer/jobs", worker)
    assert job is not None
    coord.queues.ack(store, job)
    coord.kv.set(store, "viewer/port", 8080)
    return db_path


def test_every_view_agrees_across_sqlite_engines(busy_db: Path) -> None:
    binary = sqlite3_binary()
    names = views(busy_db)
    assert {"live_instances", "leaders", "queue_depths", "orphan_processes",
            "recent_events"} <= set(names)
    for view in names:
        sql = f"SELECT * FROM {view}"
        ours = run_cli(busy_db, "sql", "--json", sql)
        assert ours.returncode == 0, ours.stderr
        cli_rows = json.loads(ours.stdout)
        deb = subprocess.run([binary, "-readonly", "-json", str(busy_db), sql],
                             capture_output=True, text=True, timeout=60)
        assert deb.returncode == 0 and deb.stderr == "", (view, deb.stderr)
        deb_rows = json.loads(deb.stdout) if deb.stdout.strip() else []
        std = subprocess.run([sys.executable, "-c", STDLIB, str(busy_db), sql],
                             capture_output=True, text=True, timeout=60)
        assert std.returncode == 0, (view, std.stderr)
        std_rows = json.loads(std.stdout)
        fixed, clocks = _split(cli_rows)
        for other in (deb_rows, std_rows):
            other_fixed, other_clocks = _split(other)
            assert other_fixed == fixed, view
            for ours_c, theirs_c in zip(clocks, other_clocks, strict=True):
                for col, value in ours_c.items():
                    assert isinstance(theirs_c[col], (int, float)), (view, col, theirs_c)
                    assert abs(theirs_c[col] - value) < 30, (view, col)
    # The views are not empty where the data is there: the bug was a silent 0 rows.
    live = json.loads(run_cli(busy_db, "sql", "--json", "SELECT * FROM live_instances").stdout)
    assert "viewer-1" in {r["id"] for r in live}
    count = subprocess.run([binary, "-readonly", str(busy_db),
                            "SELECT count(*) FROM live_instances"],
                           capture_output=True, text=True, timeout=60)
    assert int(count.stdout) >= 1


def test_views_use_only_what_sqlite_3_37_has() -> None:
    """The latest definition of every view avoids functions newer than 3.37."""
    latest: dict[str, str] = {}
    for _, _, text in migrations():
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        for m in re.finditer(r"CREATE VIEW (\w+) AS(.*?);", code, re.S):
            latest[m.group(1)] = m.group(2)
    assert latest
    for name, body in latest.items():
        for pattern in NEWER_THAN_3_37:
            assert not re.search(pattern, body, re.I), f"view {name} uses {pattern}"


def test_sql_prints_the_result_of_every_statement(db_path: Path, store: coord.Store) -> None:
    r = run_cli(db_path, "sql", "SELECT 1 AS a; SELECT 2 AS b, 3 AS c")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n\n") == ["a\n1", "b  c\n2  3\n"]
    r = run_cli(db_path, "sql", "--json", "SELECT 1 AS a; SELECT 2 AS b")
    assert [json.loads(line) for line in r.stdout.splitlines()] == [[{"a": 1}], [{"b": 2}]]
    r = run_cli(db_path, "sql", "--csv", "SELECT 1 AS a; SELECT 2 AS b")
    assert r.stdout.replace("\r", "") == "a\n1\n\nb\n2\n"
