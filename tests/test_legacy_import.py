"""Import of a legacy queue-state.json (fixtures/murmuration-queue-state.json).

Pending and processing entries become ready jobs in the legacy order (priority, then
queuedAt); a processing entry's interrupted attempt counts; finished entries are reported,
not imported; a second import adds nothing, even after the jobs ran; a malformed or
truncated file is refused and nothing is imported.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import coord
from coord import queues
from coord.check import check
from coord.errors import MalformedFile, QueueFull, UnsafePath
from coord.legacy import import_queue_state
from coord.lockless import lockless_users

FIXTURE = Path(__file__).parent / "fixtures" / "murmuration-queue-state.json"

PENDING = "6f1c2a8e-1d4b-4c61-9d2e-3b0f7a9c1e01"  # priority 8
PENDING_RETRIED = "0b7d5e44-92a3-4f0e-8c1b-5a6d7e8f9a02"  # priority 5, retryCount 1
PROCESSING = "a3e9f210-4c5d-4b8a-9e7f-6d5c4b3a2f03"  # priority 5, queued 1 ms later


def doc() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


def write(tmp_path: Path, data: Any, name: str = "state.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def all_jobs(store: coord.Store) -> list[queues.Job]:
    return queues.list_jobs(store, state="all")


def test_fixture_becomes_the_ready_jobs_in_order(store: coord.Store) -> None:
    report = import_queue_state(store, FIXTURE, queue="legacy")
    assert [i["id"] for i in report.imported] == [PENDING, PENDING_RETRIED, PROCESSING]
    assert report.existing == []
    assert report.not_imported == {
        "completed": ["c4d8b7a6-5e4f-4a3b-8c2d-1e0f9a8b7c04"],
        "failed": ["d9e8f7a6-b5c4-4d3e-9f2a-1b0c9d8e7f05"],
        "cancelled": ["e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a06"],
    }
    jobs = queues.list_jobs(store, "legacy", state="all")
    assert [j.state for j in jobs] == ["ready"] * 3
    by_key = {j.dedupe_key: j for j in jobs}
    assert set(by_key) == {PENDING, PENDING_RETRIED, PROCESSING}
    entries = {e["id"]: e for e in doc()["entries"]}
    for key, job in by_key.items():
        e = entries[key]
        assert job.payload == {**e["process"], "id": key}
        assert job.priority == e["priority"]
        assert job.max_attempts == e["maxRetries"] + 1
        queued = datetime.fromisoformat(e["queuedAt"].replace("Z", "+00:00")).timestamp()
        assert job.created_at == pytest.approx(queued)
    assert by_key[PENDING].attempts == 0
    assert by_key[PENDING_RETRIED].attempts == 1 and by_key[PENDING_RETRIED].last_error == "exit code 1"
    assert by_key[PROCESSING].attempts == 1  # the interrupted attempt counts
    # claimed in the legacy order: priority 8, then the two 5s by queuedAt
    me = coord.register(store, "me", app="test")
    order = []
    while (job := queues.claim(store, "legacy", me)) is not None:
        order.append(job.dedupe_key)
    assert order == [PENDING, PENDING_RETRIED, PROCESSING]
    assert check(store, strict=True, integrity=False) == []


def test_a_second_import_adds_nothing_even_after_the_jobs_ran(store: coord.Store) -> None:
    first = import_queue_state(store, FIXTURE)
    assert first.queue == "legacy" and len(first.imported) == 3
    again = import_queue_state(store, FIXTURE)
    assert again.imported == [] and len(again.existing) == 3
    me = coord.register(store, "me", app="test")
    while (job := queues.claim(store, "legacy", me)) is not None:
        queues.ack(store, job)
    third = import_queue_state(store, FIXTURE)
    assert third.imported == []
    assert sorted(x["job_id"] for x in third.existing) == sorted(x["job_id"] for x in first.imported)
    assert [j.state for j in all_jobs(store)] == ["done"] * 3
    assert queues.claim(store, "legacy", me) is None


def test_a_truncated_file_is_refused_and_nothing_is_imported(store: coord.Store,
                                                             tmp_path: Path) -> None:
    text = FIXTURE.read_text()
    body = len(text.rstrip())
    for cut in sorted({1, 10, body // 4, body // 2, body * 3 // 4, body - 2, body - 1}):
        p = write(tmp_path, text[:cut], f"cut{cut}.json")
        with pytest.raises(MalformedFile) as e:
            import_queue_state(store, p)
        assert "not valid JSON" in str(e.value) and "nothing was imported" in str(e.value)
        assert str(p) in str(e.value)
    assert all_jobs(store) == []
    assert store.value("SELECT count(*) FROM queues") == 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.__setitem__("entries", {}), "entries"),
        (lambda d: d.__setitem__("version", "2.0.0"), "unsupported version"),
        (lambda d: d["entries"][4].pop("id"), "has no id"),
        (lambda d: d["entries"][1].__setitem__("id", d["entries"][0]["id"]), "repeats an id"),
        (lambda d: d["entries"][2].__setitem__("status", "running"), "unknown status"),
        (lambda d: d["entries"][2].__setitem__("queuedAt", "yesterday"), "ISO-8601"),
        (lambda d: d["entries"][1].__setitem__("priority", "high"), "priority"),
        (lambda d: d["entries"][0].__setitem__("retryCount", -1), "retryCount"),
        (lambda d: d["entries"][0].__setitem__("process", "npm run dev"), "process object"),
        (lambda d: d["entries"].append(7), "not an object"),
    ],
)
def test_malformed_files_are_refused(store: coord.Store, tmp_path: Path, mutate: Any,
                                     message: str) -> None:
    data = copy.deepcopy(doc())
    mutate(data)
    with pytest.raises(MalformedFile, match=message):
        import_queue_state(store, write(tmp_path, data))
    assert all_jobs(store) == []


def test_not_a_queue_state_at_all(store: coord.Store, tmp_path: Path) -> None:
    for content in ("[]", '"x"', "{}", "NaN", "\xff"):
        p = tmp_path / "x.json"
        p.write_bytes(content.encode("latin-1"))
        with pytest.raises(MalformedFile):
            import_queue_state(store, p)
    with pytest.raises(MalformedFile, match="cannot read"):
        import_queue_state(store, tmp_path / "missing.json")
    assert all_jobs(store) == []


def test_a_processing_entry_on_its_last_attempt_is_dead_lettered(store: coord.Store,
                                                                tmp_path: Path) -> None:
    data = doc()
    for e in data["entries"]:
        if e["id"] == PROCESSING:
            e["retryCount"] = e["maxRetries"]
    report = import_queue_state(store, write(tmp_path, data))
    states = {i["id"]: i["state"] for i in report.imported}
    assert states[PROCESSING] == "dead"
    dead = queues.list_jobs(store, "legacy", state="dead")
    assert [j.dedupe_key for j in dead] == [PROCESSING]
    assert dead[0].last_error and dead[0].finished_at is not None
    assert check(store, strict=True, integrity=False) == []


def test_import_into_a_full_queue_imports_nothing(store: coord.Store) -> None:
    queues.create_queue(store, "small", max_depth=2)
    with pytest.raises(QueueFull):
        import_queue_state(store, FIXTURE, queue="small")
    assert all_jobs(store) == []


def test_entries_without_counts_take_the_defaults(store: coord.Store, tmp_path: Path) -> None:
    data = {"entries": [{"id": "x1", "process": {"script_name": "make"}, "status": "pending",
                         "priority": 1, "queuedAt": "2025-07-30T18:40:55"}]}
    report = import_queue_state(store, write(tmp_path, data), queue="q")
    job = queues.get_job(store, report.imported[0]["job_id"])
    assert (job.attempts, job.max_attempts) == (0, 4)
    assert job.payload == {"script_name": "make", "id": "x1"}


def test_the_databases_own_files_are_refused_before_they_are_opened(
    store: coord.Store, tmp_path: Path
) -> None:
    """coord.db, -wal, -shm and a hard link to the database: refused without opening them —
    opening and closing one would drop this process's SQLite locks (it would then show up
    as a lockless user, and its next commits could be lost)."""
    inst = coord.register(store, "importer", app="legacy")
    link = tmp_path / "state.json"
    os.link(store.path, link)
    for path in (store.path, f"{store.path}-wal", f"{store.path}-shm", link):
        with pytest.raises(UnsafePath, match="own file"):
            import_queue_state(store, path)
    assert os.getpid() not in [u.pid for u in lockless_users(store.path)]
    assert store.value("SELECT count(*) FROM jobs") == 0
    inst.close()
    r = subprocess.run([sys.executable, "-m", "coord", "--db", str(store.path), "queue", "import",
                        f"{store.path}-wal"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "own file" in r.stderr
