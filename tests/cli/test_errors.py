"""One error contract: the README's exit statuses in every command, one line on stderr (one
JSON object with --json), usage errors for invalid arguments — never an internal error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import coord_env
from coord.cli._common import INT64_MAX, INT64_MIN

import coord

Cli = Callable[..., subprocess.CompletedProcess[str]]
COORD = [sys.executable, "-m", "coord"]


def one_line(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("coord: "), r.stderr
    return lines[0]


NOT_FOUND = [
    ["leader", "nosuch"], ["ps", "--instance", "nosuch"], ["queue", "ls", "nosuch"],
    ["queue", "stats", "nosuch"], ["kv", "get", "nosuch"], ["instance", "nosuch"],
    ["queue", "show", "999"], ["queue", "cancel", "999"], ["kv", "del", "nosuch"],
    ["logs", "999"], ["queue", "requeue", "--dead", "nosuch"], ["queue", "purge", "nosuch"],
    ["send", "nosuch", "1"],
]


@pytest.mark.parametrize("args", NOT_FOUND, ids=[" ".join(a) for a in NOT_FOUND])
def test_not_found_is_1_everywhere(cli: Cli, store: coord.Store, args: list[str]) -> None:
    assert "no such" in one_line(cli(*args), 1)


@pytest.mark.parametrize("args", [["leader", "nosuch"], ["kv", "get", "nosuch"],
                                  ["queue", "ls", "nosuch"]])
def test_json_errors_are_one_object_on_stderr(cli: Cli, store: coord.Store,
                                              args: list[str]) -> None:
    r = cli(*args, "--json")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    err = json.loads(r.stderr)
    assert err == {"error": err["error"], "kind": "NotFound", "exit": 1}
    assert "nosuch" in err["error"]


def test_json_usage_and_payload_errors(cli: Cli, store: coord.Store) -> None:
    r = cli("queue", "put", "q", "{bad", "--json")
    assert r.returncode == 2 and json.loads(r.stderr)["kind"] == "PayloadError"
    assert json.loads(r.stderr)["exit"] == 2
    r = cli("queue", "ls", "--state", "nosuch", "--json")
    assert (r.returncode, json.loads(r.stderr)["kind"]) == (2, "InvalidArgument")
    r = cli("leases", "--bogus", "--json")
    assert r.returncode == 2 and json.loads(r.stderr) == {
        "error": json.loads(r.stderr)["error"], "kind": "UsageError", "exit": 2}
    # Without --json, the same error is the one `coord:` line.
    assert "No such option" in one_line(cli("leases", "--bogus"), 2)


@pytest.mark.parametrize("args", [["queue", "put", "q", "{bad"], ["kv", "set", "k", "bare"],
                                  ["queue", "put", "q", "NaN"]])
def test_a_bad_json_payload_is_a_usage_error(cli: Cli, store: coord.Store,
                                             args: list[str]) -> None:
    assert "not JSON" in one_line(cli(*args), 2) or "NaN" in cli(*args).stderr
    assert coord.queues.stats(store) == [] and coord.kv.list_keys(store) == []


HUGE = "99999999999999999999"
HUGE_INTS = [
    ["queue", "put", "-p", HUGE, "q", "1"], ["queue", "put", "--max-attempts", HUGE, "q", "1"],
    ["queue", "create", "--max-depth", HUGE, "q"], ["queue", "ls", "-n", HUGE],
    ["queue", "cancel", HUGE], ["queue", "show", HUGE], ["queue", "requeue", HUGE],
    ["kv", "cas", "k", HUGE, "1"], ["kv", "del", "--version", HUGE, "k"],
    ["kv", "watch", "-n", HUGE, "k"], ["stop", HUGE], ["top", "-n", HUGE],
    ["events", "-n", HUGE], ["events", "-n", "-5"], ["events", "-n", "0"], ["logs", HUGE],
]


@pytest.mark.parametrize("args", HUGE_INTS, ids=[" ".join(a) for a in HUGE_INTS])
def test_out_of_range_integers_are_usage_errors(invoke: Callable[..., Any], store: coord.Store,
                                                args: list[str]) -> None:
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert "not in the range" in r.output and "OverflowError" not in r.output


def test_every_integer_parameter_is_bounded_by_sqlite() -> None:
    """So a new integer option cannot bring back `internal error: OverflowError`."""
    from coord.cli.main import app

    def walk(cmd: Any, path: str = "coord") -> Any:
        for p in getattr(cmd, "params", []):
            yield path, p
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    # typer vendors its click layer: types are recognised by name, not by import path.
    ints = [(path, p) for path, p in walk(typer.main.get_command(app))
            if type(p.type).__name__ in ("IntParamType", "IntRange")]
    assert len(ints) >= 10
    for path, p in ints:
        assert type(p.type).__name__ == "IntRange", f"{path} {p.name} is unbounded"
        lo = INT64_MIN if p.type.min is None else p.type.min
        hi = INT64_MAX if p.type.max is None else p.type.max
        assert p.type.max is not None and INT64_MIN <= lo and hi <= INT64_MAX, (path, p.name)


def _claim_under_run(db: Path, *claim: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
    return subprocess.run([*COORD, "run", "--app", "w", "--", *COORD, "queue", "claim", *claim],
                          env=coord_env(db), timeout=60, **kw)


def test_claim_on_a_queue_that_does_not_exist_yet(db_path: Path, store: coord.Store) -> None:
    r = _claim_under_run(db_path, "nosuchq", "--wait", "0", capture_output=True, text=True)
    line = one_line(r, 3)
    assert "nothing within 0s" in line and "does not exist yet" in line
    # On a terminal, a waiting claim says it is waiting for the queue's first put.
    master, slave = os.openpty()
    try:
        r = _claim_under_run(db_path, "nosuchq", "--wait", "0.3", stderr=slave,
                             stdout=subprocess.PIPE)
        os.close(slave)
        err = os.read(master, 65536).decode()
    finally:
        os.close(master)
    assert r.returncode == 3
    assert "does not exist yet; waiting up to 0.3s for its first put" in err


def test_claim_waits_on_a_missing_queue_until_its_first_put(db_path: Path,
                                                            store: coord.Store,
                                                            procs: list[Any]) -> None:
    p = subprocess.Popen([*COORD, "run", "--app", "w", "--", *COORD, "queue", "claim", "later",
                          "--wait", "30", "--json"], env=coord_env(db_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    from conftest import wait_until

    wait_until(lambda: coord.list_instances(store), timeout=20)
    coord.queues.put(store, "later", {"n": 1})
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert json.loads(out)["payload"] == {"n": 1}
    assert err == ""  # not a terminal: nothing said about waiting


def test_a_private_queue_for_an_unknown_owner_is_refused(cli: Cli, store: coord.Store) -> None:
    assert "no such instance" in one_line(cli("queue", "create", "--private", "--owner",
                                              "nosuch", "q"), 1)
    assert coord.queues.stats(store) == []


@pytest.mark.parametrize("db", ["&schema=x", "?schema=x"])
def test_a_url_tail_with_nothing_before_it_is_refused(db: str, tmp_path: Path) -> None:
    # `--db "$URL&schema=x"` with $URL empty: one line, and no file of that name made.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    for args, extra in (((f"--db={db}", "instances"), {}), (("instances",), {"COORD_DB": db})):
        r = subprocess.run([sys.executable, "-m", "coord", *args], cwd=tmp_path,
                           env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith(f"coord: database {db!r} is the end of a PostgreSQL URL")
        assert r.stderr.count("\n") == 1
        assert list(tmp_path.iterdir()) == []
