"""`coord events`: filters, JSON, following — on every engine (a contract module)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import coord_env

import coord
from coord.instances import register

pytestmark = pytest.mark.contract

Cli = Callable[..., subprocess.CompletedProcess[str]]
COORD = [sys.executable, "-m", "coord"]


def test_events_json_and_follow(cli: Cli, store: coord.Store, db_path: Path) -> None:
    with register(store, "ev-1", app="test"):
        pass
    listed = json.loads(cli("events", "--json").stdout)
    assert [e["kind"] for e in listed if e["instance_id"] == "ev-1"] == ["joined", "left"]
    assert {"id", "at", "kind", "instance_id", "subject", "detail"} <= set(listed[0])
    assert "joined" in cli("events").stdout

    follow = subprocess.Popen([sys.executable, "-m", "coord", "events", "--follow", "--json"],
                              env=coord_env(db_path), stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        seen: list[dict[str, Any]] = []
        # The backlog first (one JSON object per line) ...
        while not any(e["instance_id"] == "ev-1" and e["kind"] == "left" for e in seen):
            seen.append(json.loads(follow.stdout.readline()))
        # ... then what happens next, as it happens.
        with register(store, "ev-2", app="test"):
            pass
        while not any(e["instance_id"] == "ev-2" and e["kind"] == "left" for e in seen):
            seen.append(json.loads(follow.stdout.readline()))
        assert [e["id"] for e in seen] == sorted({e["id"] for e in seen})  # none twice
    finally:
        follow.terminate()
        follow.wait(timeout=30)
        if follow.stdout is not None:
            follow.stdout.close()


def test_events_filters(cli: Cli, store: coord.Store) -> None:
    a = coord.register(store, "ev-a", app="t", heartbeat=False)
    coord.register(store, "ev-b", app="t", heartbeat=False)
    a.close()
    kinds = [(e["kind"], e["instance_id"]) for e in json.loads(
        cli("events", "--json", "--kind", "joined", "--kind", "left").stdout)]
    assert kinds == [("joined", "ev-a"), ("joined", "ev-b"), ("left", "ev-a")]
    mine = json.loads(cli("events", "--json", "--instance", "ev-a").stdout)
    assert {e["instance_id"] for e in mine} == {"ev-a"} and len(mine) == 2
    assert json.loads(cli("events", "--json", "--since", str(time.time() + 60)).stdout) == []
    assert len(json.loads(cli("events", "--json", "--since", "1h").stdout)) >= 3
    r = cli("events", "--since", "yesterday-ish")
    assert r.returncode == 2 and "--since" in r.stderr


def test_events_follow_with_a_filter(db_path: Path, store: coord.Store, procs: list[Any]) -> None:
    p = subprocess.Popen([*COORD, "events", "-f", "--kind", "left", "--json"],
                         env=coord_env(db_path), stdout=subprocess.PIPE, text=True)
    procs.append(p)
    # Before or after the follower starts, they come out: -f prints the recent ones first.
    for id in ("f-1", "f-2"):
        coord.register(store, id, app="t", heartbeat=False).close()
    assert p.stdout is not None
    got = [json.loads(p.stdout.readline()) for _ in range(2)]
    assert [(e["kind"], e["instance_id"]) for e in got] == [("left", "f-1"), ("left", "f-2")]
