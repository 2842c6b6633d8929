"""A plain shell can act: send, broadcast, request and gather register a short-lived operator
instance (cli-<user>-<6 hex>) for their own life; "be this instance" commands need one; a
COORD_INSTANCE_ID copied from elsewhere is refused unless the command runs under it or names
it with --as."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import coord_env, spawn_python, wait_line

import coord
from coord import messages

Cli = Callable[..., subprocess.CompletedProcess[str]]
OPERATOR = re.compile(r"^cli-[a-z0-9_.-]+-[0-9a-f]{6}$")

# A live instance in another process that answers every request with {"got": payload}.
SERVER = """
import os, sys, coord
from coord import messages
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="srv")
print("ready", flush=True)
while True:
    m = messages.receive(inst, 1.0)
    if m is not None and m.kind == "request":
        m.reply({"got": m.payload, "from": m.sender})
"""


def _server(db: Path, procs: list[Any], id: str) -> subprocess.Popen[str]:
    p = spawn_python(SERVER, id, db=db)
    procs.append(p)
    wait_line(p)
    return p


def test_send_from_a_plain_shell_names_an_operator_sender(cli: Cli, store: coord.Store) -> None:
    a = coord.register(store, "a-1", app="t")
    r = cli("send", "a-1", "{}", "--json")
    assert r.returncode == 0, r.stderr
    msg = messages.receive(a, 5)
    assert msg is not None and msg.payload == {}
    assert OPERATOR.match(msg.sender), msg.sender
    # The operator instance lived only for the command: it has left and kept nothing.
    assert msg.sender not in {i.id for i in coord.list_instances(store, include_dead=True)}
    kinds = [(e["kind"], e["instance_id"]) for e in coord.events.list_events(store)]
    assert ("joined", msg.sender) in kinds and ("left", msg.sender) in kinds


def test_request_and_gather_from_a_plain_shell(cli: Cli, db_path: Path, store: coord.Store,
                                               procs: list[Any]) -> None:
    _server(db_path, procs, "s-1")
    _server(db_path, procs, "s-2")
    r = cli("request", "s-1", '{"q": 1}', "--timeout", "30")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["got"] == {"q": 1} and OPERATOR.match(answer["from"])
    r = cli("gather", '"roll call"', "--app", "srv", "--timeout", "30", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert sorted(m["sender"] for m in got["replies"]) == ["s-1", "s-2"]
    r = cli("broadcast", '"hello"', "--app", "srv", "--json")
    assert r.returncode == 0 and sorted(m["recipient"] for m in json.loads(r.stdout)) == [
        "s-1", "s-2"]
    # The operator has no app of its own: broadcast and gather must name one.
    for args in (["broadcast", "1"], ["gather", "1"]):
        r = cli(*args)
        assert r.returncode == 2 and "name the app to reach with --app APP" in r.stderr


def test_acting_as_an_instance_elsewhere_needs_as(cli: Cli, db_path: Path, store: coord.Store,
                                                  procs: list[Any]) -> None:
    """A COORD_INSTANCE_ID copied into another shell must not consume a running instance's
    messages: refused unless the command runs under it, or with --as."""
    p = spawn_python("import os, time, coord\n"
                     "s = coord.Store(os.environ['COORD_DB'])\n"
                     "coord.register(s, 'a-1', app='t')\n"
                     "print('ready', flush=True)\ntime.sleep(120)\n", db=db_path)
    procs.append(p)
    wait_line(p)
    assert cli("send", "a-1", '"for a-1"').returncode == 0
    copied = coord_env(db_path, COORD_INSTANCE_ID="a-1")
    r = cli("recv", env=copied)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "does not run under; to act as it anyway, pass --as a-1" in r.stderr
    assert cli("send", "a-1", "1", env=copied).returncode == 1  # nor send as it
    r = cli("recv", "--as", "a-1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["payload"] == "for a-1"  # still there: nothing was consumed


def test_a_command_under_coord_run_acts_as_its_instance(cli: Cli, store: coord.Store) -> None:
    """The instance is an ancestor (pid and start token): a grandchild through sh acts as it."""
    r = cli("run", "--app", "w", "--instance-id", "w-1", "--", "sh", "-c",
            '"$0" -m coord send w-1 \'"to myself"\' >/dev/null && "$0" -m coord recv --json',
            sys.executable)
    assert r.returncode == 0, r.stderr
    msg = json.loads(r.stdout)
    assert (msg["sender"], msg["payload"]) == ("w-1", "to myself")


def test_the_operator_instance_is_closed_when_interrupted(cli: Cli, db_path: Path,
                                                          store: coord.Store,
                                                          procs: list[Any]) -> None:
    """SIGTERM during a request: the operator instance leaves (no tombstone, no lease)."""
    mute = coord.register(store, "mute", app="t")
    p = subprocess.Popen([sys.executable, "-m", "coord", "request", "mute", "1", "--timeout", "60"],
                         env=coord_env(db_path), stderr=subprocess.PIPE, text=True)
    procs.append(p)
    got = threading.Event()
    sender: list[str] = []

    def watch() -> None:
        m = messages.receive(mute, 30)
        if m is not None:
            sender.append(m.sender)
            got.set()

    t = threading.Thread(target=watch)
    t.start()
    t.join(40)
    assert got.is_set()
    p.terminate()
    p.wait(30)
    assert OPERATOR.match(sender[0])
    assert sender[0] not in {i.id for i in coord.list_instances(store, include_dead=True)}
    assert ("left", sender[0]) in [(e["kind"], e["instance_id"])
                                   for e in coord.events.list_events(store)]
