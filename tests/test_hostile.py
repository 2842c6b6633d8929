"""Hostile and broken input: a corrupt page, planted symlinks beside the database, and SQL
injection attempts in every name and filter. Each gets a clear one-line error (or is taken
literally), the right exit status, and nothing already stored is lost."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import coord
from coord import kv, queues

Cli = Callable[..., subprocess.CompletedProcess[str]]

NASTY = [
    "x'; DROP TABLE jobs; --",
    'q" OR "1"="1',
    "a; DELETE FROM instances",
    "n' OR '1'='1",
    "%' OR 1=1 --",
    "Robert'); DROP TABLE kv;--",
]


def _tables(store: coord.Store) -> set[str]:
    return {r["name"] for r in store.rows("SELECT name FROM sqlite_schema WHERE type = 'table'")}


def _one_line_error(out: Any) -> None:
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


class _Out:
    def __init__(self, r: Any) -> None:
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("name", NASTY)
def test_injection_in_names_is_taken_literally(store: coord.Store, invoke: Callable[..., Any],
                                               name: str) -> None:
    def cli(*args: str) -> Any:
        return _Out(invoke(*args))

    before = _tables(store)
    put = cli("queue", "put", name, '{"n": 1}', "--json")
    assert put.returncode == 0, put.stderr
    ls = cli("queue", "ls", name, "--json")
    assert ls.returncode == 0, ls.stderr
    jobs = json.loads(ls.stdout)
    assert [j["queue"] for j in jobs] == [name]
    assert cli("kv", "set", name, '"v"').returncode == 0
    got = cli("kv", "get", name)
    assert got.returncode == 0 and json.loads(got.stdout) == "v"
    assert cli("kv", "ls", name, "--json").returncode == 0
    for args in (["instances", "--app", name, "--json"], ["leader", name, "--json"],
                 ["instance", name], ["queue", "stats", "--json"]):
        out = cli(*args)
        assert out.returncode in (0, 1), (args, out.stderr)
        if out.returncode:
            _one_line_error(out)
    assert _tables(store) == before
    assert queues.stats(store, name)[0].ready == 1
    assert kv.get(store, name) is not None


@pytest.mark.parametrize("name", NASTY[:3])
def test_injection_in_instance_ids_is_refused_clearly(store: coord.Store, cli: Cli, name: str) -> None:
    out = cli("run", "--app", "t", "--instance-id", name, "--", "true")
    assert out.returncode == 2
    _one_line_error(out)
    assert "invalid instance id" in out.stderr
    assert store.value("SELECT count(*) FROM instances") == 0


def test_sql_refuses_every_write_form(store: coord.Store, cli: Cli) -> None:
    kv.set(store, "keep", 1)
    for q in ("DELETE FROM kv", "UPDATE kv SET value = 2", "WITH x AS (SELECT 1) DELETE FROM kv",
              "ATTACH DATABASE '/tmp/x.db' AS x", "PRAGMA user_version = 7",
              "PRAGMA journal_mode = delete", "SELECT load_extension('/tmp/x.so')",
              "CREATE TABLE t (x)", "DROP VIEW live_instances", "VACUUM",
              "SELECT 1; DELETE FROM kv", "BEGIN; DELETE FROM kv; COMMIT"):
        out = cli("sql", q)
        assert out.returncode != 0, q
        _one_line_error(out)
    assert kv.get(store, "keep") is not None
    assert store.value("PRAGMA user_version") != 7


def _corrupt_a_page(db: Path) -> None:
    size = db.stat().st_size
    page = int.from_bytes(db.read_bytes()[16:18], "big")
    assert size >= 3 * page
    with open(db, "r+b") as f:
        f.seek(2 * page + 8)  # inside page 3: a b-tree page of some table
        f.write(b"\xff" * 64)


def test_corrupt_page_is_reported_not_hidden(db_path: Path, cli: Cli) -> None:
    s = coord.Store(db_path)
    for i in range(200):
        kv.set(s, f"k{i}", "x" * 100)
    s.conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    _corrupt_a_page(db_path)
    doc = cli("doctor", "--json")
    assert doc.returncode == 1
    if doc.stdout.strip():
        report = json.loads(doc.stdout)
        assert not report["ok"]
        assert any(p["check"] == "integrity" for p in report["problems"])
    else:
        _one_line_error(doc)
    for args in (["kv", "ls"], ["instances"], ["sql", "select count(*) from kv"]):
        out = cli(*args)
        if out.returncode:
            _one_line_error(out)


def test_symlink_planted_for_the_lock_directory_is_refused(db_path: Path, tmp_path: Path) -> None:
    s = coord.Store(db_path)
    s.close()
    side = Path(f"{db_path}.d")
    target = tmp_path / "attacker"
    target.mkdir()
    side.mkdir(mode=0o700, exist_ok=True)
    if (side / "locks").exists():
        os.rmdir(side / "locks")
    (side / "locks").symlink_to(target)
    s = coord.Store(db_path)
    with pytest.raises(coord.UnsafePath, match="symlink"):
        coord.register(s, "x", heartbeat=False, handle_signals=False)
    assert list(target.iterdir()) == []
    s.close()


def test_symlink_planted_at_the_side_directory_is_refused(db_path: Path, tmp_path: Path) -> None:
    coord.Store(db_path).close()
    side = Path(f"{db_path}.d")
    if side.exists():
        for sub in side.iterdir():
            os.rmdir(sub)
        os.rmdir(side)
    target = tmp_path / "elsewhere"
    target.mkdir()
    side.symlink_to(target)
    with pytest.raises(coord.UnsafePath, match="symlink planted"):
        coord.Store(db_path)
    assert list(target.iterdir()) == []


def test_symlink_at_the_database_path_cli(db_path: Path, tmp_path: Path, cli: Cli) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    db_path.symlink_to(victim)
    out = cli("instances")
    assert out.returncode == 1
    _one_line_error(out)
    assert "symlink" in out.stderr
    assert victim.read_bytes() == b"precious"


def test_fifo_at_the_database_path_cli(db_path: Path, cli: Cli) -> None:
    os.mkfifo(db_path, 0o600)
    out = cli("instances", timeout=20)
    assert out.returncode == 1
    _one_line_error(out)
    assert str(db_path) in out.stderr
