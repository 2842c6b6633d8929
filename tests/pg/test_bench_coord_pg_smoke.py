"""``scripts/bench.py --tiny --db postgresql://…`` against the test server: every PostgreSQL
section answers for coord and for the server's raw limit, the targets are checked, and both
schemas are gone afterwards. Nothing here looks at a figure's size (a benchmark is not a timed
test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pg_fixtures import PgServer, run_keeping_pid

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench.py"

SECTIONS = ["pg transactions", "pg queue", "pg messages", "pg failover", "pg cli"]


@pytest.mark.timeout(400)
def test_every_postgresql_section_answers_beside_its_limit(pg_cluster: PgServer,
                                                           tmp_path: Path) -> None:
    import psycopg

    out = tmp_path / "run.jsonl"
    p = run_keeping_pid([sys.executable, str(BENCH), "--tiny", "--db", pg_cluster.url,
                         "--json-out", str(out)], timeout=380)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sections = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["section"] for s in sections] == SECTIONS
    for s in sections:
        for w in s["works"]:
            assert w["coord"] is not None and w["coord"]["error"] is None, w
            assert w["coord"]["figure"] > 0, w
            limits = [r for r in w["references"] if r["limit"]]
            assert len(limits) == 1 and limits[0]["figure"] > 0, w
            assert limits[0]["coord_ratio"] > 0, w
        assert s["run"]["server_version"] and s["run"]["size"] == "tiny"
    checked = {t["target"] for s in sections for t in s["targets"] if t["met"] is not None}
    assert len(checked) == 4, checked
    for name in SECTIONS:
        assert f"== {name} ==" in p.stdout  # and the table for people
    assert "FAILED" not in p.stdout
    with psycopg.connect(pg_cluster.url) as conn:
        left = conn.execute("select nspname from pg_namespace where nspname ~ %s",
                            (rf"^coord_bench_(c_)?{p.pid}_",)).fetchall()
    assert left == []
