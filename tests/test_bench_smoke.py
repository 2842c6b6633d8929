"""The benchmark runs: ``scripts/bench.py --tiny`` prints its table, writes one JSON object
per section, and every section and every reference in it answers. Nothing here looks at a
figure's size: the machine is shared, and a benchmark is not a timed test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"

SECTIONS = ["transactions", "queue", "messages", "failover", "registry", "cli"]

#: Every implementation each section must have measured (coord's own rows and references).
EXPECTED = {
    "transactions": {"coord Store.write", "raw apsw"},
    "queue": {"coord", "minimal queue", "coord's schema, raw", "persist-queue", "litequeue",
              "huey (no ack)", "file-per-job dir", "persist-queue (4 threads)"},
    "messages": {"coord", "pipe", "file-per-message dir"},
    "failover": {"coord", "kernel lock (F_SETLKW)", "kernel lock (F_SETLKW), coord-sized processes",
                 "filelock", "TTL lease row"},
    "registry": {"coord", "file-per-PID"},
    "cli": {"coord instances --json", "coord queue put", 'coord sql "select 1"', "python -c pass",
            'python -c "import typer"'},
}

QUEUE_WORKS = {"put (1 producer)", "claim+ack (1 consumer)", "claim+ack, batches of 10 (1 consumer)",
               "1 producer + 4 consumers", "latency at 200 jobs/s"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "run.jsonl"
    p = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--dir", str(tmp), "--json-out", str(out)],
        capture_output=True, text=True, timeout=170, cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert not [x for x in tmp.iterdir() if x.name.startswith("coord-bench-")], \
        "the benchmark left its working directory behind"
    return p.stdout, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.timeout(200)
def test_every_section_and_reference_answers(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, sections = run
    assert [s["section"] for s in sections] == SECTIONS
    for s in sections:
        seen = {r["impl"] for r in s["rows"]}
        assert seen == EXPECTED[s["section"]], s["section"]
        failed = {(r["work"], r["impl"]): r["error"] for r in s["rows"] if r["error"]}
        assert not failed, f"{s['section']}: {failed}"
        for w in s["works"]:
            assert w["coord"] is not None and w["coord"]["figure"] is not None, w
            assert w["references"], f"{s['section']}/{w['work']} has no reference"
            for ref in w["references"]:
                assert ref["figure"] is not None, (s["section"], w["work"], ref)
                assert ref["coord_ratio"] is not None, (s["section"], w["work"], ref)
    queue = next(s for s in sections if s["section"] == "queue")
    assert {w["work"] for w in queue["works"]} == QUEUE_WORKS
    registry = next(s for s in sections if s["section"] == "registry")
    assert {w["work"] for w in registry["works"]} >= {"list alive (N=10)", "reap, all dead (N=10)"}


@pytest.mark.timeout(200)
def test_json_names_the_run_and_the_targets(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, sections = run
    for s in sections:
        facts = s["run"]
        assert facts["size"] == "tiny"
        for key in ("python", "sqlite", "apsw", "cpus", "kernel", "filesystem", "load_avg"):
            assert facts[key] not in (None, ""), key
        for t in s["targets"]:
            assert t["met"] in (True, False, None) and t["target"]
    checked = {t["target"] for s in sections for t in s["targets"]}
    assert "request→reply p50 ≤ 0.4 ms" in checked
    assert "claim+ack ≥ 0.5 × the minimal queue" in checked
    assert "failover p50 ≤ 2 × the kernel's handover" in checked
    queue = next(s for s in sections if s["section"] == "queue")
    limits = {w["work"]: [r["impl"] for r in w["references"] if r["limit"]] for w in queue["works"]}
    assert all(v == ["minimal queue"] for v in limits.values()), limits
    failover = next(s for s in sections if s["section"] == "failover")
    takeover = next(w for w in failover["works"] if w["work"] == "SIGKILL holder → next holder")
    # The kernel's handover between processes as big as coord's is the limit: the same exit.
    assert [r["impl"] for r in takeover["references"] if r["limit"]] == [
        "kernel lock (F_SETLKW), coord-sized processes"]


@pytest.mark.timeout(200)
def test_table_for_people(run: tuple[str, list[dict[str, Any]]]) -> None:
    table, _ = run
    for name in SECTIONS:
        assert f"== {name} ==" in table
    assert "COORD ÷ THIS" in table and "FAILED" not in table


@pytest.mark.timeout(200)
def test_size_runs_put_and_claim_at_each_depth(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--only", "queue", "--size", "30,60", "--json",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=170, cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (queue,) = [json.loads(line) for line in p.stdout.splitlines()]
    works = {w["work"]: w for w in queue["works"]}
    for n in (30, 60):
        for work in (f"put (1 producer, {n} jobs)", f"claim+ack (1 consumer, {n} jobs)"):
            rows = {r["impl"]: r for r in queue["rows"] if r["work"] == work}
            assert set(rows) == EXPECTED["queue"] - {"persist-queue (4 threads)"}, work
            assert rows["coord"]["n"] == n, rows["coord"]
            assert works[work]["coord"]["figure"] is not None
    targets = {t["target"] for t in queue["targets"]}
    assert {"claim+ack ahead of litequeue (30 jobs)",
            "claim+ack ahead of litequeue (60 jobs)"} <= targets


def test_size_refuses_what_is_not_a_count(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(BENCH), "--size", "lots", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "--size" in p.stderr
