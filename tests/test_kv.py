"""coord.kv: shared context with versions, compare-and-set, ephemeral keys and watches.

Owners of ephemeral keys are real processes, killed with a real SIGKILL.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import engine_sql
import pytest
from conftest import spawn_python, wait_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coord
from coord import kv
from coord.check import check
from coord.config import Config
from coord.errors import InvalidArgument, NotRegistered, PayloadError, VersionConflict

# A server that takes a free port, publishes it as an ephemeral key and serves until killed.
PORT_SERVER = """
import os, socket, sys, time, coord
from coord import kv
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app="web")
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
port = srv.getsockname()[1]
kv.cas(store, "web/port", {"host": "127.0.0.1", "port": port}, version=0, owner=inst)
print("ready", port, flush=True)
while True:
    conn, _ = srv.accept()
    conn.sendall(inst.id.encode())
    conn.close()
"""


pytestmark = pytest.mark.contract


def healthy(store: coord.Store) -> None:
    problems = check(store, strict=True)
    assert problems == [], problems


def test_get_set_delete_and_list(store: coord.Store) -> None:
    assert kv.get(store, "app/a") is None
    v1 = kv.set(store, "app/a", {"x": 1})
    e = kv.get(store, "app/a")
    assert e is not None and e.value == {"x": 1} and e.version == v1 and not e.ephemeral
    v2 = kv.set(store, "app/a", [1, 2])
    assert v2 > v1
    e2 = kv.get(store, "app/a")
    assert e2 is not None and e2.value == [1, 2] and e2.created_at == e.created_at
    kv.set(store, "app/b", None)
    kv.set(store, "apple", "not under app/")
    kv.set(store, "app%_", "wildcards are plain characters")
    assert [x.key for x in kv.list_keys(store, "app/")] == ["app/a", "app/b"]
    assert [x.key for x in kv.list_keys(store, "app%")] == ["app%_"]
    assert [x.key for x in kv.list_keys(store)] == ["app%_", "app/a", "app/b", "apple"]
    assert kv.delete(store, "app/a") is True
    assert kv.delete(store, "app/a") is False
    assert kv.get(store, "app/a") is None
    assert kv.get(store, "app/b") is not None and kv.get(store, "app/b").value is None  # type: ignore[union-attr]
    assert set(e.to_json()) >= {"key", "value", "version", "instance_id", "ephemeral"}
    healthy(store)


def test_versions_never_repeat_even_after_delete(store: coord.Store) -> None:
    seen = [kv.set(store, "k", 1)]
    kv.delete(store, "k")
    seen.append(kv.set(store, "k", 1))
    seen.append(kv.set(store, "other", 1))
    seen.append(kv.cas(store, "k", 2, version=seen[1]))
    assert seen == sorted(seen) and len(set(seen)) == 4


def test_compare_and_set(store: coord.Store) -> None:
    v1 = kv.cas(store, "cfg", {"n": 1}, version=0)  # create only
    with pytest.raises(VersionConflict) as e:
        kv.cas(store, "cfg", {"n": 99}, version=0)
    assert (e.value.expected, e.value.found) == (0, v1)
    v2 = kv.cas(store, "cfg", {"n": 2}, version=v1)
    with pytest.raises(VersionConflict, match=f"expected version {v1}, found {v2}"):
        kv.cas(store, "cfg", {"n": 3}, version=v1)  # stale
    assert kv.get(store, "cfg").value == {"n": 2}  # type: ignore[union-attr]
    with pytest.raises(VersionConflict):
        kv.delete(store, "cfg", version=v1)
    assert kv.delete(store, "cfg", version=v2) is True
    with pytest.raises(VersionConflict) as e:
        kv.cas(store, "cfg", 1, version=v2)  # gone
    assert e.value.found is None
    with pytest.raises(InvalidArgument):
        kv.cas(store, "cfg", 1, version=-1)


def test_concurrent_increments_lose_nothing(db_path: Path, store: coord.Store) -> None:
    kv.set(store, "counter", 0)

    def bump(n: int) -> None:
        s = coord.Store(db_path)
        try:
            for _ in range(n):
                while True:
                    e = kv.get(s, "counter")
                    assert e is not None
                    try:
                        kv.cas(s, "counter", e.value + 1, version=e.version)
                        break
                    except VersionConflict:
                        continue
        finally:
            s.close()

    threads = [threading.Thread(target=bump, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert kv.get(store, "counter").value == 200  # type: ignore[union-attr]


def test_ephemeral_key_goes_with_its_owner(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    kv.set(store, "t/a/port", 8080, owner=a)
    e = kv.get(store, "t/a/port")
    assert e is not None and e.ephemeral and (e.owner_id, e.owner_incarnation) == ("a", a.incarnation)
    assert e.to_json()["instance_id"] == "a"
    a.close()
    assert kv.get(store, "t/a/port") is None
    assert engine_sql.value(store, "SELECT count(*) FROM kv") == 0
    with pytest.raises(NotRegistered):
        kv.set(store, "t/a/port", 1, owner=a)  # a closed instance owns nothing
    assert engine_sql.value(store, "SELECT count(*) FROM kv") == 0


def test_port_discovery_and_sigkill_of_the_owner(store: coord.Store, db_path: Path,
                                                 children: list[Any]) -> None:
    import socket

    p = spawn_python(PORT_SERVER, "web-1", db=db_path)
    children.append(p)
    port = int(wait_line(p).split()[1])
    # A client discovers the server through the shared context, and talks to it.
    entry = kv.get(store, "web/port")
    assert entry is not None and entry.value == {"host": "127.0.0.1", "port": port}
    assert entry.owner_id == "web-1"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.recv(100) == b"web-1"
    # A second server cannot take the name while the first lives.
    with pytest.raises(VersionConflict):
        kv.cas(store, "web/port", {"port": 1}, version=0)
    watched: list[Any] = []
    started = threading.Event()

    def watch() -> None:
        it = kv.watch(store, "web/", prefix=True, timeout=60)
        started.set()
        watched.extend(next(it) for _ in range(1))

    t = threading.Thread(target=watch)
    t.start()
    started.wait(10)
    p.kill()
    p.wait()
    # The process is gone, so its lock is too: the key is gone for every reader now.
    assert kv.get(store, "web/port") is None
    assert kv.list_keys(store, "web/") == []
    t.join(30)
    assert [(c.key, c.deleted) for c in watched] == [("web/port", True)]
    # The death rule was applied by the read: nothing is left for the reaper.
    assert engine_sql.value(store, "SELECT count(*) FROM kv") == 0
    assert kv.cas(store, "web/port", {"port": 2}, version=0) > entry.version
    healthy(store)


def test_a_watcher_wakes_at_the_owners_death_without_reading(store: coord.Store, db_path: Path,
                                                              children: list[Any]) -> None:
    p = spawn_python(PORT_SERVER, "web-2", db=db_path)
    children.append(p)
    wait_line(p)
    it = kv.watch(store, "web/port", timeout=60)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(next(it)))
    t.start()
    p.kill()
    t.join(30)
    assert not t.is_alive()
    assert result[0].key == "web/port" and result[0].deleted
    assert result[0].to_json() == {"key": "web/port", "event": "deleted"}


def test_cas_takes_over_a_dead_owners_key(store: coord.Store, db_path: Path,
                                          children: list[Any]) -> None:
    p = spawn_python(PORT_SERVER, "web-3", db=db_path)
    children.append(p)
    wait_line(p)
    old = engine_sql.value(store, "SELECT version FROM kv WHERE key = 'web/port'")
    p.kill()
    p.wait()
    # No read, no reap in between: the compare-and-set itself applies the death rule.
    me = coord.register(store, "web-4", app="web")
    v = kv.cas(store, "web/port", {"port": 3}, version=0, owner=me)
    assert v > old
    e = kv.get(store, "web/port")
    assert e is not None and e.owner_id == "web-4"
    assert engine_sql.value(store, "SELECT count(*) FROM instances WHERE id = 'web-3'") == 0


def test_watch_reports_sets_and_deletes(store: coord.Store, db_path: Path) -> None:
    it = kv.watch(store, "w/", prefix=True, timeout=30)
    other = coord.Store(db_path)  # another connection, as another process would write
    try:
        v = kv.set(other, "w/a", 1)
        c = next(it)
        assert (c.key, c.deleted, c.entry and c.entry.version) == ("w/a", False, v)
        kv.set(other, "elsewhere", 1)
        kv.set(other, "w/b", 2)
        c = next(it)
        assert (c.key, c.entry and c.entry.value) == ("w/b", 2)
        kv.set(other, "w/a", 3)
        kv.delete(other, "w/b")
        got = [next(it), next(it)]
        assert [(c.key, c.deleted) for c in got] == [("w/a", False), ("w/b", True)]
        assert got[1].to_json() == {"key": "w/b", "event": "deleted"}
    finally:
        other.close()


def test_watch_ends_after_an_idle_timeout(store: coord.Store) -> None:
    assert list(kv.watch(store, "nothing", timeout=0.2)) == []


@pytest.mark.parametrize("key", ["", "x" * 1001, "a\x00b"])
def test_bad_keys_are_refused(store: coord.Store, key: str) -> None:
    with pytest.raises(InvalidArgument):
        kv.set(store, key, 1)
    with pytest.raises(InvalidArgument):
        kv.get(store, key)


@pytest.mark.parametrize("bad", [float("nan"), {"a": float("inf")}, [[[[[1]]]]], "x" * 2000,
                                 object()])
def test_bad_values_are_refused_and_nothing_is_stored(db_path: Path, bad: Any) -> None:
    s = coord.Store(db_path, config=Config(payload_limit=1000, payload_max_depth=3))
    try:
        with pytest.raises(PayloadError, match="bad payload"):
            kv.set(s, "k", bad)
        with pytest.raises(PayloadError):
            kv.cas(s, "k", bad, version=0)
        assert engine_sql.value(s, "SELECT count(*) FROM kv") == 0
    finally:
        s.close()


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4),
    max_leaves=20,
)


@given(key=TEXT.filter(lambda k: k and "\x00" not in k), value=VALUES)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_json_value_round_trips(store: coord.Store, key: str, value: Any) -> None:
    # One database for every example is fine: each example sets its own key and reads it.
    v = kv.set(store, key, value)
    e = kv.get(store, key)
    assert e is not None and e.value == value and e.version == v
    assert key in [x.key for x in kv.list_keys(store, key)]


def test_the_checker_sees_broken_kv_rows(store: coord.Store) -> None:
    healthy(store)
    engine_sql.txn(store, lambda t: [t(
        "INSERT INTO kv (key, value, version, created_at, updated_at) VALUES (?, ?, ?, 0, 0)", r)
        for r in [("a", "1", 5), ("b", "2", 5), ("c", "{nope", 6)]])
    # SQLite's counter must stay ahead of every version (PostgreSQL's is a sequence).
    engine_sql.execute(store, "UPDATE counters SET value = 10 WHERE name = 'revision'")
    details = [p.detail for p in check(store)]
    assert "keys a, b share version 5" in details
    assert "key 'c': value is not valid JSON" in details


def test_create_only_cas_has_exactly_one_winner(db_path: Path, store: coord.Store) -> None:
    # Writers racing to create one key (version 0): one wins, every other sees its version.
    won: list[int] = []
    lost: list[int | None] = []
    start = threading.Barrier(6)

    def race() -> None:
        s = coord.Store(db_path)
        try:
            start.wait(10)
            try:
                won.append(kv.cas(s, "race/k", 1, version=0))
            except VersionConflict as e:
                lost.append(e.found)
        finally:
            s.close()

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and lost == [won[0]] * 5
