"""The schema ladder: files that are not coord databases are refused and left untouched,
a schema newer than the code is refused, migrations run once and all-or-nothing."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest
from conftest import reap_children

import coord
import coord.backend.sqlite.migrations
import coord.check
from coord.backend.sqlite.connection import APPLICATION_ID
from coord.backend.sqlite.migrations import latest_version, migrations
from coord.db import Store
from coord.errors import CoordError, NotADatabase, SchemaTooNew

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema" / "sqlite"


# -- files that must be refused ---------------------------------------------------------------


def _pending_wal(path: Path, sql: str) -> None:
    """Run sql in a WAL database and crash before any checkpoint: the change stays in -wal."""
    code = (
        "import apsw, os, sys\n"
        "c = apsw.Connection(sys.argv[1])\n"
        "c.execute('PRAGMA journal_mode=WAL').fetchall()\n"
        "c.execute('PRAGMA wal_autocheckpoint=0').fetchall()\n"
        "c.execute(sys.argv[2]).fetchall()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), sql], check=True, timeout=60)
    assert Path(f"{path}-wal").stat().st_size > 0


def _sqlite(path: Path, sql: str) -> None:
    c = apsw.Connection(str(path))
    c.execute(sql).fetchall()
    c.close()


def _coord_db(path: Path) -> bytes:
    Store(path).close()
    return path.read_bytes()


def garbage(p: Path) -> None:
    p.write_bytes(random.Random(7).randbytes(8192))


def text_file(p: Path) -> None:
    p.write_text("not a database\n")


def truncated_header(p: Path) -> None:
    data = _coord_db(p)
    p.write_bytes(data[:60])


def truncated_pages(p: Path) -> None:
    data = _coord_db(p)
    p.write_bytes(data[:5000])


def other_programs_database(p: Path) -> None:
    _sqlite(p, "CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann')")


def other_programs_wal_database(p: Path) -> None:
    _pending_wal(p, "CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann')")


def other_application_id(p: Path) -> None:
    _sqlite(p, "PRAGMA application_id = 305419896; CREATE TABLE t (x); DROP TABLE t")


def other_application_id_in_wal(p: Path) -> None:
    _pending_wal(p, "PRAGMA application_id = 305419896; CREATE TABLE t (x); DROP TABLE t")


def schema_too_new(p: Path) -> None:
    _coord_db(p)
    _sqlite(p, f"PRAGMA user_version = {latest_version() + 1}")


def schema_too_new_in_wal(p: Path) -> None:
    _coord_db(p)
    _pending_wal(p, f"PRAGMA user_version = {latest_version() + 1}")


#: (maker, error type, words the message must contain). Shared with tests/cli.
BAD_FILES: list[tuple[Callable[[Path], None], type[CoordError], str]] = [
    (garbage, NotADatabase, "not an SQLite database file"),
    (text_file, NotADatabase, "not an SQLite database file"),
    (truncated_header, NotADatabase, "truncated"),
    (truncated_pages, NotADatabase, "truncated"),
    (other_programs_database, NotADatabase, "SQLite database of another program"),
    (other_programs_wal_database, NotADatabase, "SQLite database of another program"),
    (other_application_id, NotADatabase, "application_id 0x12345678 belongs to another program"),
    (other_application_id_in_wal, NotADatabase, "application_id 0x12345678"),
    (schema_too_new, SchemaTooNew, "newer than this coord supports"),
    (schema_too_new_in_wal, SchemaTooNew, "newer than this coord supports"),
]


def snapshot(db: Path) -> dict[str, str]:
    """sha256 of the database and its WAL (the -shm is SQLite's rebuildable index)."""
    out = {}
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-journal")):
        if p.exists():
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_bad(maker: Callable[[Path], None], db: Path) -> dict[str, str]:
    maker(db)
    for p in db.parent.iterdir():
        p.chmod(0o600)
    before = snapshot(db)
    assert before
    return before


@pytest.mark.parametrize(("maker", "error", "words"), BAD_FILES, ids=[m.__name__ for m, _, _ in BAD_FILES])
def test_refused_and_left_untouched(
    db_path: Path, maker: Callable[[Path], None], error: type[CoordError], words: str
) -> None:
    before = make_bad(maker, db_path)
    with pytest.raises(error) as e:
        Store(db_path)
    msg = str(e.value)
    assert str(db_path) in msg and words in msg
    assert e.value.exit_code == 1
    if error is NotADatabase:
        assert "left untouched" in msg and "move it away" in msg
    else:
        assert "upgrade coord" in msg
    assert snapshot(db_path) == before
    # Asking again (a second process, or a retry) changes nothing either.
    with pytest.raises(error):
        Store(db_path)
    assert snapshot(db_path) == before


# -- files that are adopted -------------------------------------------------------------------


def test_empty_file_becomes_a_database(db_path: Path) -> None:
    db_path.touch(mode=0o600)
    with Store(db_path) as s:
        assert s.value("PRAGMA user_version") == latest_version()
        assert s.value("PRAGMA application_id") == APPLICATION_ID


def test_blank_sqlite_file_becomes_a_database(db_path: Path) -> None:
    _sqlite(db_path, "CREATE TABLE t (x); DROP TABLE t")
    db_path.chmod(0o600)
    assert db_path.stat().st_size > 0
    with Store(db_path) as s:
        assert s.value("PRAGMA user_version") == latest_version()


def test_new_database_is_stamped(store: Store) -> None:
    assert store.value("PRAGMA application_id") == APPLICATION_ID
    assert store.value("PRAGMA user_version") == latest_version() == migrations()[-1][0]
    assert {r["name"] for r in store.rows("SELECT name FROM counters")} == {
        "incarnation", "term", "revision"}
    # Terms are seeded from the wall clock in ms, so a recreated database's terms are higher.
    term = store.value("SELECT value FROM counters WHERE name = 'term'")
    assert abs(term - time.time() * 1000) < 600_000
    assert store.rows("SELECT kind, detail FROM events") == [
        {"kind": "migrated",
         "detail": f'{{"from_version": 0, "pid": {os.getpid()}, "to_version": {latest_version()}}}'}]


# -- the ladder -------------------------------------------------------------------------------


def _version_1_database(path: Path) -> None:
    c = apsw.Connection(str(path))
    c.execute("PRAGMA journal_mode=WAL").fetchall()
    with c:
        c.execute(migrations()[0][2]).fetchall()
        c.execute("INSERT INTO counters (name, value) VALUES ('incarnation', 3), ('term', 42), "
                  "('revision', 0)")
        c.execute("INSERT INTO meta (key, value) VALUES ('boot_id', 'old'), ('created_at', '1')")
        c.execute(f"PRAGMA application_id={APPLICATION_ID}")
        c.execute("PRAGMA user_version=1")
    c.close()
    path.chmod(0o600)


def test_upgrade_from_version_1_keeps_data(db_path: Path) -> None:
    _version_1_database(db_path)
    with Store(db_path) as s:
        assert s.value("PRAGMA user_version") == latest_version()
        assert s.value("SELECT value FROM counters WHERE name = 'term'") == 42
        views = {r["name"] for r in s.rows("SELECT name FROM sqlite_schema WHERE type = 'view'")}
        assert "live_instances" in views
        migrated = s.rows("SELECT detail FROM events WHERE kind = 'migrated'")
        assert [r["detail"] for r in migrated] == [
            f'{{"from_version": 1, "pid": {os.getpid()}, "to_version": {latest_version()}}}']


def test_failed_migration_leaves_nothing_behind(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = (*coord.backend.sqlite.migrations._migrations(), (latest_version() + 1, "999_broken.sql",
                                             "CREATE TABLE fine (x); SELECT * FROM no_such_table;"))
    monkeypatch.setattr(coord.backend.sqlite.migrations, "_migrations", lambda: broken)
    with pytest.raises(apsw.SQLError):
        Store(db_path)
    c = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    assert c.execute("PRAGMA user_version").fetchall() == [(0,)]
    assert c.execute("SELECT count(*) FROM sqlite_schema").fetchall() == [(0,)]
    c.close()


def test_schema_files_are_numbered_and_commented() -> None:
    files = sorted(SCHEMA_DIR.glob("*.sql"))
    numbers = [int(f.name[:3]) for f in files]
    assert numbers == list(range(1, len(numbers) + 1))  # once each, in order, no gaps
    assert [(n, name) for n, name, _ in migrations()] == [(int(f.name[:3]), f.name) for f in files]
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0].startswith("--"), f"{f.name} must open with a comment"
        for i, line in enumerate(lines):
            if re.match(r"CREATE (TABLE|VIEW) ", line):
                above = [x for x in lines[:i] if x.strip()][-1]
                assert above.startswith("--"), f"{f.name}: {line!r} has no comment above it"


# -- many processes at once -------------------------------------------------------------------

OPENER = """
import os, sys, time
import coord
go = sys.argv[2]
print("waiting", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
coord.Store(sys.argv[1]).close()
print("opened", flush=True)
"""


@pytest.mark.parametrize("start", ["new", "version 1"])
def test_ten_processes_migrate_exactly_once(tmp_path: Path, start: str) -> None:
    for round in range(2 if start == "new" else 1):
        d = tmp_path / f"r{round}"
        d.mkdir(mode=0o700)
        db, go = d / "coord.db", tmp_path / f"go{round}"
        if start == "version 1":
            _version_1_database(db)
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(db), str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(10)]
        try:
            for p in procs:
                assert p.stdout is not None
                assert p.stdout.readline().strip() == "waiting"
            go.touch()  # all ten start opening within a millisecond or two
            results = [p.communicate(timeout=120) for p in procs]
        finally:
            reap_children(procs)
        assert [p.returncode for p in procs] == [0] * 10, [err for _, err in results]
        with Store(db) as s:
            migrated = s.rows("SELECT detail FROM events WHERE kind = 'migrated'")
            assert len(migrated) == 1, migrated
            assert s.value("SELECT count(*) FROM meta WHERE key = 'created_at'") == 1
            assert s.value("PRAGMA user_version") == latest_version()
            assert coord.check.check(s) == []
