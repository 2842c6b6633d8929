"""`coord send/broadcast/recv/request/reply/gather` and `coord kv ...`: output, exit statuses,
refusals. In-process (CliRunner) for speed, real subprocesses for the end-to-end cases and
for raw bytes on stdin."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer.main
from conftest import coord_env, run_cli, wait_until
from coord.cli.main import app
from engine_sql import value as sql_value

import coord
from coord import kv, messages

Invoke = Callable[..., Any]
MESSAGE_COMMANDS = ["send", "broadcast", "recv", "request", "reply", "gather"]
KV_COMMANDS = ["get", "set", "del", "ls", "cas", "watch"]
pytestmark = pytest.mark.contract
MESSAGE_KEYS = {"id", "kind", "sender", "recipient", "topic", "payload", "correlation_id",
                "reply_to", "created_at", "expires_at"}


def as_(id: str) -> dict[str, str]:
    return {"COORD_INSTANCE_ID": id}


def count(store: coord.Store, table: str = "messages") -> int:
    return int(sql_value(store, f"SELECT count(*) FROM {table}"))


def popen_cli(db: Path, *args: str, instance: str | None = None) -> subprocess.Popen[str]:
    env = coord_env(db, **({"COORD_INSTANCE_ID": instance} if instance else {}))
    return subprocess.Popen([sys.executable, "-m", "coord", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# -- help and refusals --------------------------------------------------------------------


def test_every_command_and_option_has_help(invoke: Invoke) -> None:
    group: Any = typer.main.get_command(app)
    kv_group = group.commands["kv"]
    assert kv_group.help
    commands = [(n, group.commands[n]) for n in MESSAGE_COMMANDS]
    commands += [(f"kv {n}", kv_group.commands[n]) for n in KV_COMMANDS]
    for name, cmd in commands:
        assert cmd.help and cmd.help.strip(), name
        for param in cmd.params:
            if param.name != "help":
                assert getattr(param, "help", None), f"{name} {param.name} has no help"
    for args in (*([c] for c in MESSAGE_COMMANDS), *(["kv", c] for c in KV_COMMANDS)):
        r = invoke(*args, "--help")
        assert r.exit_code == 0 and "Usage" in r.output, (args, r.output)


@pytest.mark.parametrize("args", [["recv"], ["reply", str(uuid.uuid4()), "1"],
                                  ["kv", "set", "k", "1", "--ephemeral"], ["queue", "claim", "q"]])
def test_being_an_instance_needs_one_and_says_how(invoke: Invoke, args: list[str]) -> None:
    """Commands that mean "be this instance" keep requiring one (the plain-shell operator
    instance is only for send, broadcast, request, gather and stop --instance)."""
    r = invoke(*args)
    assert r.exit_code == 1
    what = "an ephemeral key" if "--ephemeral" in args else "coord " + " ".join(args[:2 if args[0] == "queue" else 1])
    assert r.stderr.strip() == (
        f"coord: no instance: {what} acts as an instance: run it under one (`coord run --app "
        "APP -- CMD` sets COORD_INSTANCE_ID for CMD), or name a live instance with --as ID")


def test_a_dead_or_unknown_instance_is_refused(invoke: Invoke, store: coord.Store) -> None:
    r = invoke("send", "b", "1", env=as_("nobody-here"))
    assert r.exit_code == 1 and "'nobody-here' is not a live registered instance" in r.stderr


# -- send, broadcast, recv ----------------------------------------------------------------


def test_send_and_recv(invoke: Invoke, store: coord.Store) -> None:
    coord.register(store, "a", app="t")
    coord.register(store, "b", app="t")
    r = invoke("send", "b", '{"x": [1, "é"]}', "--topic", "t/x", env=as_("a"))
    assert r.exit_code == 0, r.output
    mid = r.stdout.strip()
    assert uuid.UUID(mid)
    r = invoke("recv", "--json", env=as_("b"))
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert set(m) >= MESSAGE_KEYS
    assert (m["id"], m["sender"], m["recipient"], m["topic"], m["payload"]) == \
        (mid, "a", "b", "t/x", {"x": [1, "é"]})
    r = invoke("recv", env=as_("b"))
    assert r.exit_code == 3 and r.stderr.startswith("coord: recv: nothing within 0s")
    invoke("send", "b", '"[bold]not markup[/bold]"', env=as_("a"))
    r = invoke("recv", env=as_("b"))
    assert r.exit_code == 0 and '"[bold]not markup[/bold]"' in r.stdout
    assert count(store) == 1  # delivered, acknowledged by the next recv
    assert invoke("recv", env=as_("b")).exit_code == 3
    assert count(store) == 0


def test_send_to_unknown_fails(invoke: Invoke, store: coord.Store) -> None:
    coord.register(store, "a", app="t")
    r = invoke("send", "ghost", "1", env=as_("a"))
    assert r.exit_code == 1 and r.stderr.strip() == "coord: no such instance: 'ghost'"
    assert count(store) == 0


def test_recv_waits_and_filters_by_topic(invoke: Invoke, store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    coord.register(store, "b", app="t")
    messages.send(a, "b", 1, topic="x")
    r = invoke("recv", "--topic", "y", "--wait", "0.2", env=as_("b"))
    assert r.exit_code == 3
    timer = threading.Timer(0.3, lambda: messages.send(a, "b", 2, topic="y"))
    timer.start()
    r = invoke("recv", "--topic", "y", "--wait", "30", "--json", env=as_("b"))
    timer.join()
    assert r.exit_code == 0 and json.loads(r.stdout)["payload"] == 2


def test_broadcast(invoke: Invoke, store: coord.Store) -> None:
    for i in ("a", "b", "c"):
        coord.register(store, i, app="crew")
    coord.register(store, "z", app="other")
    r = invoke("broadcast", '{"cfg": 1}', "--json", env=as_("a"))
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert sorted(x["recipient"] for x in rows) == ["b", "c"] and all(x["id"] for x in rows)
    r = invoke("broadcast", "2", "--app", "other", env=as_("a"))
    assert r.exit_code == 0 and "z" in r.stdout


# -- request, reply, gather (end to end) --------------------------------------------------


def test_request_and_reply_through_the_cli(cli: Any, db_path: Path, store: coord.Store,
                                           procs: list[Any]) -> None:
    coord.register(store, "client", app="t")
    coord.register(store, "server", app="t")
    asker = popen_cli(db_path, "request", "server", '{"q": "time?"}', "--timeout", "60",
                      "--json", instance="client")
    procs.append(asker)
    r = cli("recv", "--wait", "60", "--json", env=coord_env(db_path, **as_("server")))
    assert r.returncode == 0, r.stderr
    req = json.loads(r.stdout)
    assert req["kind"] == "request" and req["reply_to"] == "client"
    assert req["correlation_id"] == req["id"] and req["payload"] == {"q": "time?"}
    r = cli("reply", req["id"], '{"a": "noon"}', env=coord_env(db_path, **as_("server")))
    assert r.returncode == 0, r.stderr
    out, err = asker.communicate(timeout=60)
    assert asker.returncode == 0, err
    answer = json.loads(out)
    assert answer["payload"] == {"a": "noon"} and answer["correlation_id"] == req["id"]
    assert answer["sender"] == "server" and answer["kind"] == "reply"
    r = cli("reply", req["id"], '"again"', env=coord_env(db_path, **as_("server")))
    assert r.returncode == 1 and "no such pending request" in r.stderr


def test_request_timeout_and_dead_recipient(invoke: Invoke, store: coord.Store) -> None:
    coord.register(store, "client", app="t")
    coord.register(store, "mute", app="t")
    r = invoke("request", "mute", "1", "--timeout", "0.3", env=as_("client"))
    assert r.exit_code == 3 and "request to mute: nothing within 0.3s" in r.stderr
    gone = coord.register(store, "gone", app="t")
    gone.close()
    r = invoke("request", "gone", "1", env=as_("client"))
    assert r.exit_code == 1 and "no such instance: 'gone'" in r.stderr
    r = invoke("request", "mute", "1", "--timeout", "0", env=as_("client"))
    assert r.exit_code == 2 and "timeout must be a positive number" in r.stderr


def test_request_prints_the_reply_payload(invoke: Invoke, store: coord.Store) -> None:
    coord.register(store, "client", app="t")
    server = coord.register(store, "server", app="t")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            m = messages.receive(server, 0.1)
            if m is not None:
                m.reply({"got": m.payload})

    t = threading.Thread(target=serve)
    t.start()
    try:
        r = invoke("request", "server", "[1, 2]", "--timeout", "30", env=as_("client"))
    finally:
        stop.set()
        t.join(10)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"got": [1, 2]}


def test_gather_names_who_did_not_answer(cli: Any, db_path: Path, store: coord.Store) -> None:
    coord.register(store, "boss", app="g")
    w1 = coord.register(store, "w1", app="g")
    coord.register(store, "w2", app="g")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            m = messages.receive(w1, 0.1)
            if m is not None:
                m.reply("here")

    t = threading.Thread(target=serve)
    t.start()
    try:
        r = cli("gather", '"roll call"', "--timeout", "3", "--json",
                env=coord_env(db_path, **as_("boss")))
        human = cli("gather", '"roll call"', "--timeout", "3",
                    env=coord_env(db_path, **as_("boss")))
    finally:
        stop.set()
        t.join(10)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [m["sender"] for m in got["replies"]] == ["w1"]
    assert got["replies"][0]["payload"] == "here"
    assert got["silent"] == ["w2"] and got["dead"] == []
    assert human.returncode == 0 and "no answer: w2" in human.stdout and "w1" in human.stdout
    # Nobody answers: exit 3.
    r = cli("gather", "1", "--timeout", "0.3", env=coord_env(db_path, **as_("boss")))
    assert r.returncode == 3 and "no answer: w1" in r.stdout


# -- payloads -----------------------------------------------------------------------------

BAD_STDIN = {
    "oversized": b'"' + b"x" * (1 << 20) + b'"',
    "not json": b"hello there",
    "NaN": b"[NaN]",
    "Infinity": b'{"a": Infinity}',
    "deeply nested": b"[" * 100 + b"]" * 100,
    "hostile nesting": b"[" * 100_000 + b"]" * 100_000,
    "invalid UTF-8": b'"\xff\xfe"',
    "NUL bytes": b'"a\x00b"',
}


@pytest.mark.parametrize("name", list(BAD_STDIN))
def test_bad_payloads_on_stdin_are_refused_and_nothing_stored(name: str, invoke: Invoke,
                                                              store: coord.Store) -> None:
    coord.register(store, "a", app="t")
    coord.register(store, "b", app="t")
    for args in (["send", "b", "-"], ["request", "b", "-"], ["kv", "set", "k", "-"]):
        r = invoke(*args, input=BAD_STDIN[name], env=as_("a"))
        assert r.exit_code == 2, (name, args, r.output)  # an invalid argument
        assert r.stderr.startswith("coord: bad payload: ") and r.stderr.count("\n") == 1
    assert count(store) == 0 and count(store, "kv") == 0


@pytest.mark.parametrize("name", ["invalid UTF-8", "NUL bytes", "oversized"])
def test_raw_bytes_through_a_real_stdin(name: str, db_path: Path, store: coord.Store) -> None:
    coord.register(store, "a", app="t")
    coord.register(store, "b", app="t")
    r = subprocess.run([sys.executable, "-m", "coord", "send", "b", "-"],
                       env=coord_env(db_path, **as_("a")), input=BAD_STDIN[name],
                       capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.startswith("coord: bad payload: ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert count(store) == 0


def test_payload_arguments_are_checked_too(invoke: Invoke, store: coord.Store) -> None:
    coord.register(store, "a", app="t")
    coord.register(store, "b", app="t")
    for text, why in (("NaN", "NaN is not JSON"), ("{'a': 1}", "not JSON"),
                      ("[" * 70 + "]" * 70, "nested deeper")):
        r = invoke("send", "b", text, env=as_("a"))
        assert r.exit_code == 2 and why in r.stderr, (text, r.stderr)
    assert count(store) == 0
    r = invoke("send", "b", "-", input='{"from": "stdin"}', env=as_("a"))
    assert r.exit_code == 0, r.output
    assert messages.receive(messages.mailbox(store, "b"), 0).payload == {"from": "stdin"}  # type: ignore[union-attr]


def test_the_payload_limit_follows_the_configuration(db_path: Path, store: coord.Store) -> None:
    coord.register(store, "a", app="t")
    coord.register(store, "b", app="t")
    env = coord_env(db_path, COORD_INSTANCE_ID="a", COORD_PAYLOAD_LIMIT="100")
    r = run_cli(db_path, "send", "b", json.dumps("x" * 200), env=env)
    assert r.returncode == 2 and "exceeds the limit of 100 bytes" in r.stderr
    assert count(store) == 0


# -- kv -----------------------------------------------------------------------------------


def test_kv_commands(invoke: Invoke, store: coord.Store) -> None:
    r = invoke("kv", "set", "app/port", "8080")
    assert r.exit_code == 0, r.output
    v1 = int(r.stdout)
    r = invoke("kv", "get", "app/port")
    assert r.exit_code == 0 and r.stdout.strip() == "8080"
    r = invoke("kv", "get", "app/port", "--json")
    e = json.loads(r.stdout)
    assert (e["key"], e["value"], e["version"], e["instance_id"], e["ephemeral"]) == \
        ("app/port", 8080, v1, None, False)
    r = invoke("kv", "cas", "app/port", str(v1), '{"port": 9090}')
    assert r.exit_code == 0, r.output
    v2 = int(r.stdout)
    r = invoke("kv", "cas", "app/port", str(v1), "1")
    assert r.exit_code == 1
    assert r.stderr.strip() == f"coord: key 'app/port': expected version {v1}, found {v2}"
    r = invoke("kv", "cas", "app/new", "0", "true")
    assert r.exit_code == 0
    invoke("kv", "set", "other", '"[red]x[/red]"')
    r = invoke("kv", "ls", "app/", "--json")
    assert [x["key"] for x in json.loads(r.stdout)] == ["app/new", "app/port"]
    r = invoke("kv", "ls")
    assert r.exit_code == 0 and "app/port" in r.stdout and '"[red]x[/red]"' in r.stdout
    r = invoke("kv", "del", "app/new", "--version", "1")
    assert r.exit_code == 1 and "expected version 1" in r.stderr
    assert invoke("kv", "del", "app/new").exit_code == 0
    r = invoke("kv", "del", "app/new")
    assert r.exit_code == 1 and r.stderr.strip() == "coord: no such key: 'app/new'"
    r = invoke("kv", "get", "app/new")
    assert r.exit_code == 1 and "no such key" in r.stderr


def test_kv_ephemeral_needs_and_binds_an_instance(invoke: Invoke, store: coord.Store) -> None:
    inst = coord.register(store, "svc", app="t")
    r = invoke("kv", "set", "svc/port", "7000", "--ephemeral", env=as_("svc"))
    assert r.exit_code == 0, r.output
    e = kv.get(store, "svc/port")
    assert e is not None and (e.owner_id, e.owner_incarnation) == ("svc", inst.incarnation)
    inst.close()
    r = invoke("kv", "get", "svc/port")
    assert r.exit_code == 1
    r = invoke("kv", "cas", "svc/port", "0", "1", "--ephemeral", env=as_("svc"))
    assert r.exit_code == 1 and "not a live registered instance" in r.stderr


def test_kv_watch(db_path: Path, store: coord.Store, procs: list[Any]) -> None:
    r = run_cli(db_path, "kv", "watch", "w/", "--prefix", "--timeout", "0.2")
    assert r.returncode == 3 and "nothing within 0.2s" in r.stderr
    kv.set(store, "w/before", 0)  # existing state is not a change
    p = popen_cli(db_path, "kv", "watch", "w/", "--prefix", "--json", "--timeout", "60")
    procs.append(p)
    assert p.stdout is not None
    # The watcher reads its starting state when it starts: write until it reports a change.
    n = iter(range(1, 1_000_000))
    wait_until(lambda: kv.set(store, "w/a", next(n)) and _readable(p), timeout=30)
    first = json.loads(p.stdout.readline())
    assert first["key"] == "w/a" and first["event"] == "set" and first["value"] >= 1
    assert set(first) >= {"key", "value", "version", "instance_id", "ephemeral"}
    kv.delete(store, "w/a")
    events = [json.loads(p.stdout.readline())]
    while events[-1]["event"] != "deleted":  # sets still on their way come first
        events.append(json.loads(p.stdout.readline()))
    assert events[-1] == {"id": "w/a", "key": "w/a", "event": "deleted"}
    assert all(e["key"] == "w/a" for e in events)
    p.terminate()
    p.wait(timeout=30)
    r = run_cli(db_path, "kv", "watch", "w/before", "--count", "1", "--timeout", "0.3")
    assert r.returncode == 3


def _readable(p: subprocess.Popen[str]) -> bool:
    import select

    assert p.stdout is not None
    return bool(select.select([p.stdout], [], [], 0.1)[0])


def test_a_program_under_coord_run_receives_through_the_cli(db_path: Path, store: coord.Store,
                                                            procs: list[Any]) -> None:
    me = coord.register(store, "sender", app="t")
    p = popen_cli(db_path, "run", "--app", "t", "--instance-id", "shell-1", "--",
                  sys.executable, "-m", "coord", "recv", "--wait", "60", "--json")
    procs.append(p)
    wait_until(lambda: any(i.id == "shell-1" for i in coord.list_instances(store)), timeout=30)
    mid = messages.send(me, "shell-1", {"hello": "program"})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    got = json.loads(out)
    assert (got["id"], got["recipient"], got["payload"]) == (mid, "shell-1", {"hello": "program"})
