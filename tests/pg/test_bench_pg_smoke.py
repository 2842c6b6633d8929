"""``scripts/bench_pg.py --tiny`` runs against the test server: every section answers with a
figure, the table is printed, and its schema is gone afterwards. Nothing here looks at a
figure's size (a benchmark is not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pg_fixtures import PgServer, run_keeping_pid

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench_pg.py"

WORKS = {
    "transactions": {"one-row INSERT (1 client)", "one-row INSERT (4 clients)"},
    "skip_locked": {"claim+ack (1 consumer)", "claim+ack (4 consumers)"},
    "advisory_handover": {"SIGKILL holder -> waiter holds (advisory lock)",
                          "SIGKILL holder -> waiter holds (advisory lock + lease term bump)"},
    "notify": {"NOTIFY round trip (2 processes)",
               "request→reply, coord's three writes (2 processes)"},
    "import": {"python -c pass", 'python -c "import psycopg"'},
}


@pytest.mark.timeout(180)
def test_every_section_answers(pg_cluster: PgServer, tmp_path: Path) -> None:
    import psycopg

    out = tmp_path / "run.jsonl"
    p = run_keeping_pid([sys.executable, str(BENCH), "--tiny", "--db", pg_cluster.url,
                         "--json-out", str(out)], timeout=170)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    sections = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["section"] for s in sections] == list(WORKS)
    for s in sections:
        assert {r["work"] for r in s["rows"]} == WORKS[s["section"]]
        for r in s["rows"]:
            assert r["error"] is None, r
            figure = r["ops_per_s"] if r["metric"] == "ops/s" else r["p50_us"]
            assert figure is not None and figure > 0, r
        assert s["run"]["size"] == "tiny" and s["run"]["server_version"]
    for name in WORKS:
        assert f"== {name} ==" in p.stdout
    assert "FAILED" not in p.stdout
    with psycopg.connect(pg_cluster.url) as conn:
        left = conn.execute("select nspname from pg_namespace where nspname ~ %s",
                            (rf"^coord_bench_(c_)?{p.pid}_",)).fetchall()
    assert left == []


@pytest.mark.timeout(180)
def test_table_for_people(pg_cluster: PgServer) -> None:
    p = subprocess.run([sys.executable, str(BENCH), "--tiny", "--db", pg_cluster.url,
                        "--only", "notify"], capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "== notify ==" in p.stdout and "P50 ms" in p.stdout and "FAILED" not in p.stdout


@pytest.mark.timeout(180)
def test_partition_section_cuts_a_link(pg_cluster: PgServer, tmp_path: Path) -> None:
    """--netns adds the partition section (a server inside the harness's namespaces)."""
    sys.path.insert(0, str(ROOT / "tests" / "multihost"))
    from netns import HarnessUnavailable, Net
    from pg_fixtures import missing

    try:
        Net(hosts=1).__enter__().close()
    except HarnessUnavailable as e:
        missing(str(e))
    out = tmp_path / "run.jsonl"
    p = subprocess.run([sys.executable, str(BENCH), "--tiny", "--db", pg_cluster.url, "--netns",
                        "--only", "partition", "--json-out", str(out)],
                       capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (section,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert section["section"] == "partition" and len(section["rows"]) == 3
    for r in section["rows"]:
        assert r["error"] is None and r["p50_us"] > 0, r
    refused = subprocess.run([sys.executable, str(BENCH), "--only", "partition"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "needs --netns" in refused.stderr
