"""`coord queue …`: put, claim, ack, fail, extend, release, cancel, ls, stats, requeue, adopt,
purge, import, create — output, JSON keys, exit statuses, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import coord_env, wait_line

import coord
from coord import queues

pytestmark = pytest.mark.contract

Cli = Callable[..., subprocess.CompletedProcess[str]]
FIXTURE = Path(__file__).parent.parent / "fixtures" / "murmuration-queue-state.json"
JOB_KEYS = {"id", "queue", "state", "priority", "attempts", "max_attempts", "payload",
            "dedupe_key", "instance_id", "created_at", "available_in", "expires_in",
            "last_error", "result", "finished_at"}


@pytest.fixture
def inst(store: coord.Store) -> coord.Instance:
    """A live instance in this process, for in-process CLI runs that claim as it."""
    return coord.register(store, "w", app="test")


def ok(r: Any) -> str:
    assert r.exit_code == 0, (r.exit_code, r.output)
    return str(r.stdout)


def one_line_error(r: Any, code: int, *words: str) -> None:
    assert r.exit_code == code, (r.exit_code, r.output)
    err = r.stderr
    assert err.startswith("coord: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_put_ls_stats(invoke: Any, store: coord.Store) -> None:
    assert ok(invoke("queue", "put", "jobs", '{"n": 1}')).strip() == "1"
    assert ok(invoke("queue", "put", "jobs", "-", "--priority", "5", input='{"n": 2}')).strip() == "2"
    out = json.loads(ok(invoke("queue", "put", "jobs", '"x"', "--delay", "60", "--dedupe", "k",
                               "--max-attempts", "2", "--json")))
    assert out == {"id": 3, "queue": "jobs"}
    assert ok(invoke("queue", "put", "jobs", '"y"', "--dedupe", "k")).strip() == "3"
    rows = json.loads(ok(invoke("queue", "ls", "--json")))
    assert [r["id"] for r in rows] == [2, 1, 3]  # claim order
    assert [r["state"] for r in rows] == ["ready", "ready", "delayed"]
    assert JOB_KEYS <= set(rows[0]) and "token" not in rows[0]
    assert rows[2]["max_attempts"] == 2 and rows[2]["dedupe_key"] == "k"
    assert [r["id"] for r in json.loads(ok(invoke("queue", "ls", "jobs", "--state", "delayed",
                                                  "--json")))] == [3]
    text = ok(invoke("queue", "ls"))
    assert "QUEUE" in text and '{"n":2}' in text
    st = json.loads(ok(invoke("queue", "stats", "--json")))
    assert st == [{"id": "jobs", "instance_id": None, "alive": None, "max_depth": None,
                   "ready": 2, "delayed": 1, "claimed": 0, "dead": 0, "done": 0,
                   "cancelled": 0, "oldest_age": st[0]["oldest_age"]}]
    assert "READY" in ok(invoke("queue", "stats"))


def test_bad_input_is_one_line(invoke: Any) -> None:
    one_line_error(invoke("queue", "put", "jobs", "{nope"), 2, "payload")
    one_line_error(invoke("queue", "put", "", "1"), 2, "queue name")
    one_line_error(invoke("queue", "ls", "--state", "weird"), 2, "unknown state")
    one_line_error(invoke("queue", "stats", "nope"), 1, "no such queue")
    one_line_error(invoke("queue", "cancel", "99"), 1, "no such job")
    one_line_error(invoke("queue", "requeue"), 2, "JOB_ID")


def test_claim_needs_an_instance(invoke: Any) -> None:
    invoke("queue", "put", "jobs", "1")
    one_line_error(invoke("queue", "claim", "jobs"), 1, "COORD_INSTANCE_ID")
    one_line_error(invoke("queue", "claim", "jobs", env={"COORD_INSTANCE_ID": "ghost"}), 1,
                   "ghost")


def test_claim_ack_and_a_stale_token(invoke: Any, inst: coord.Instance, store: coord.Store) -> None:
    env = {"COORD_INSTANCE_ID": "w"}
    one_line_error(invoke("queue", "claim", "jobs", "--wait", "0.1", env=env), 3, "nothing")
    invoke("queue", "put", "jobs", '{"task": "a"}')
    job = json.loads(ok(invoke("queue", "claim", "jobs", "--lease", "30", "--json", env=env)))
    assert JOB_KEYS <= set(job) and job["state"] == "claimed" and job["instance_id"] == "w"
    assert job["token"] and job["attempts"] == 1 and job["payload"] == {"task": "a"}
    ok(invoke("queue", "extend", job["token"], "--lease", "90"))
    ok(invoke("queue", "ack", job["token"], "--result", '{"rows": 2}'))
    one_line_error(invoke("queue", "ack", job["token"]), 1, "no longer held")
    done = json.loads(ok(invoke("queue", "ls", "--state", "done", "--json")))
    assert done[0]["result"] == {"rows": 2} and done[0]["state"] == "done"
    # human output carries the token on its first line
    invoke("queue", "put", "jobs", "2")
    text = ok(invoke("queue", "claim", "jobs", env=env))
    token = text.splitlines()[0].split()[1]
    ok(invoke("queue", "release", token))
    one_line_error(invoke("queue", "release", token), 1, "no longer held")


def test_fail_dead_letter_requeue_cancel_purge(invoke: Any, inst: coord.Instance) -> None:
    env = {"COORD_INSTANCE_ID": "w"}
    invoke("queue", "put", "jobs", "1", "--max-attempts", "2")
    for expect in ("ready", "dead"):
        job = json.loads(ok(invoke("queue", "claim", "jobs", "--json", env=env)))
        assert ok(invoke("queue", "fail", job["token"], "--error", "exit 1",
                         "--retry-in", "0")).strip() == expect
    dead = json.loads(ok(invoke("queue", "ls", "--state", "dead", "--json")))
    assert dead[0]["last_error"] == "exit 1" and dead[0]["attempts"] == 2
    assert ok(invoke("queue", "requeue", "--dead", "jobs")).strip() == "1"
    ok(invoke("queue", "cancel", "1"))
    ok(invoke("queue", "requeue", "1"))
    one_line_error(invoke("queue", "requeue", "1"), 2, "only a dead or cancelled job")
    job = json.loads(ok(invoke("queue", "claim", "jobs", "--json", env=env)))
    one_line_error(invoke("queue", "cancel", "1"), 2, "claimed")
    ok(invoke("queue", "ack", job["token"]))
    assert ok(invoke("queue", "purge", "jobs")).strip() == "1"
    ok(invoke("queue", "put", "jobs", "1"))
    assert ok(invoke("queue", "purge", "jobs", "--all")).strip() == "1"
    assert json.loads(ok(invoke("queue", "stats", "--json"))) == []


def test_private_queue_and_adopt(invoke: Any, inst: coord.Instance, store: coord.Store) -> None:
    # Owners must be registered instances (a typo is refused): these two leave tombstones.
    gone = coord.register(store, "gone", app="t", heartbeat=False)
    gone2 = coord.register(store, "gone2", app="t", heartbeat=False)
    ok(invoke("queue", "create", "mine", "--owner", "gone", "--max-depth", "5"))
    invoke("queue", "put", "mine", '"x"')
    ok(invoke("queue", "create", "mine2", "--owner", "gone2"))
    invoke("queue", "put", "mine2", '"y"')
    gone.close()
    gone2.close()
    one_line_error(invoke("queue", "claim", "mine", env={"COORD_INSTANCE_ID": "w"}), 1,
                   "private to instance 'gone'")
    text = ok(invoke("queue", "adopt", "gone", env={"COORD_INSTANCE_ID": "w"}))
    assert "mine now owned by w" in text
    job = json.loads(ok(invoke("queue", "claim", "mine", "--json", env={"COORD_INSTANCE_ID": "w"})))
    assert job["payload"] == "x"
    one_line_error(invoke("queue", "adopt", "w", "--to", "z"), 1, "alive")
    got = json.loads(ok(invoke("queue", "adopt", "gone2", "--to-queue", "shared", "--json")))
    assert got["jobs"] == 1 and got["queues"] == ["mine2"] and got["to_queue"] == "shared"
    st = {s["id"]: s for s in json.loads(ok(invoke("queue", "stats", "--json")))}
    assert st["mine"]["instance_id"] == "w" and st["mine"]["alive"] is True
    assert st["mine"]["max_depth"] == 5 and st["shared"]["ready"] == 1


def test_import(invoke: Any, tmp_path: Path) -> None:
    out = ok(invoke("queue", "import", str(FIXTURE)))
    assert "imported 3 jobs into legacy" in out and "not imported (completed)" in out
    again = json.loads(ok(invoke("queue", "import", str(FIXTURE), "--json")))
    assert again["imported"] == [] and len(again["existing"]) == 3
    cut = tmp_path / "cut.json"
    cut.write_text(FIXTURE.read_text()[:500])
    one_line_error(invoke("queue", "import", str(cut), "--queue", "other"), 1,
                   "not valid JSON", "nothing was imported")
    rows = json.loads(ok(invoke("queue", "ls", "--json")))
    assert [r["queue"] for r in rows] == ["legacy"] * 3
    assert [r["priority"] for r in rows] == [8, 5, 5]


def test_claim_a_batch(invoke: Any, inst: coord.Instance, store: coord.Store) -> None:
    """`--count N` claims up to N jobs in claim order, each with its own token."""
    env = {"COORD_INSTANCE_ID": "w"}
    for n in range(3):
        invoke("queue", "put", "jobs", json.dumps({"n": n}), "--priority", str(n % 2))
    jobs = json.loads(ok(invoke("queue", "claim", "jobs", "--count", "2", "--json", env=env)))
    assert [j["payload"]["n"] for j in jobs] == [1, 0]  # priority first, then FIFO
    assert all(JOB_KEYS <= set(j) and j["state"] == "claimed" for j in jobs)
    assert len({j["token"] for j in jobs}) == 2
    ok(invoke("queue", "ack", jobs[0]["token"]))
    one_line_error(invoke("queue", "ack", jobs[0]["token"]), 1, "no longer held")
    text = ok(invoke("queue", "claim", "jobs", "-n", "5", env=env))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["TOKEN", "JOB"] and len(lines) == 2  # the one job left
    ok(invoke("queue", "release", lines[1].split()[0]))
    assert invoke("queue", "claim", "jobs", "--count", "0", env=env).exit_code == 2  # usage
    assert len(json.loads(ok(invoke("queue", "claim", "jobs", "-n", "9", "--json", env=env)))) == 1
    one_line_error(invoke("queue", "claim", "jobs", "-n", "3", "--wait", "0.1", env=env), 3,
                   "nothing")


def test_a_shell_worker_under_coord_run(cli: Cli, db_path: Path) -> None:
    """The real thing: `coord run` gives a shell script an instance; it claims, works, acks."""
    s = coord.Store(db_path)
    queues.put(s, "work", {"n": 1})
    queues.put(s, "work", {"n": 2}, priority=3)
    prefix = shutil.which("coord") or f"{sys.executable} -m coord"
    script = (
        f'C="{prefix}"; '
        "while true; do J=$($C queue claim work --wait 0.2); rc=$?; "
        '  [ $rc -eq 0 ] || break; '
        "  T=$(printf '%s\\n' \"$J\" | sed -n 's/^token *//p'); "
        '  $C queue ack "$T" --result "{\\"by\\": \\"$COORD_INSTANCE_ID\\"}" || exit 9; '
        'done; echo "drained $rc"'
    )
    r = cli("run", "--app", "shellworker", "--", "sh", "-c", script, timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "drained 3" in r.stdout  # the loop ended on exit 3: nothing arrived
    rows = queues.list_jobs(s, "work", state="done")
    assert [row.payload["n"] for row in rows] == [2, 1]
    assert all(row.result["by"].startswith("shellworker-") for row in rows)
    s.close()


def test_claim_from_a_real_process_without_instance(cli: Cli) -> None:
    cli("queue", "put", "work", "1")
    r = cli("queue", "claim", "work")
    assert r.returncode == 1 and r.stderr.startswith("coord: ") and "COORD_INSTANCE_ID" in r.stderr
    assert r.stderr.count("\n") == 1


def test_claim_wait_wakes_on_put(cli: Cli, db_path: Path, procs: list[Any]) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time, coord; s = coord.Store(os.environ['COORD_DB']);"
         "i = coord.register(s, 'waiter', app='t'); print('ready', flush=True); time.sleep(60)"],
        env=coord_env(db_path), stdout=subprocess.PIPE, text=True)
    procs.append(worker)
    wait_line(worker)
    env = coord_env(db_path)  # the waiter runs elsewhere: named with --as
    claimer = subprocess.Popen([sys.executable, "-m", "coord", "queue", "claim", "late",
                                "--wait", "60", "--json", "--as", "waiter"], env=env,
                               stdout=subprocess.PIPE, text=True)
    procs.append(claimer)
    s = coord.Store(db_path)
    try:
        queues.put(s, "late", {"hello": "there"})
    finally:
        s.close()
    out, _ = claimer.communicate(timeout=60)
    assert claimer.returncode == 0
    assert json.loads(out)["payload"] == {"hello": "there"}
