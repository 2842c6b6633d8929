"""Read-only ad-hoc SQL (``coord sql``): reads work, every kind of write is refused by
SQLite's authorizer before it runs, and a long read never blocks writers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import coord_env, reap_children, wait_until

import coord.backend.sqlite.retry
from coord.adhoc import run_readonly
from coord.config import Config
from coord.db import Store
from coord.errors import InvalidArgument, ReadOnlyViolation


def contents(store: Store) -> dict[str, Any]:
    """Everything a write could change: every table's rows and the header pragmas."""
    out: dict[str, Any] = {p: store.value(f"PRAGMA {p}") for p in
                           ("user_version", "application_id", "journal_mode", "schema_version")}
    for (name,) in store.conn().execute("SELECT name FROM sqlite_schema WHERE type = 'table'"):
        out[name] = store.rows(f'SELECT * FROM "{name}"')
    return out


@pytest.fixture
def filled(store: Store) -> Store:
    store.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')"))
    return store


REFUSED = [
    "DELETE FROM meta",
    "WITH doomed AS (SELECT key FROM meta) DELETE FROM meta WHERE key IN doomed",
    "WITH x AS (SELECT 1) UPDATE meta SET value = 'w'",
    "INSERT INTO meta (key, value) VALUES ('a', 'b') RETURNING *",
    "REPLACE INTO meta (key, value) VALUES ('k', 'x')",
    "DROP TABLE meta",
    "DROP VIEW live_instances",
    "CREATE TABLE t (x)",
    "CREATE TEMP TABLE t (x)",
    "CREATE INDEX i ON meta (value)",
    "ALTER TABLE meta ADD COLUMN y",
    "ATTACH DATABASE '{dir}/other.db' AS other",
    "DETACH DATABASE main",
    "PRAGMA user_version = 99",
    "PRAGMA application_id = 1",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA query_only = 0",
    "PRAGMA writable_schema = ON",
    "PRAGMA wal_checkpoint(TRUNCATE)",
    "SELECT load_extension('{dir}/evil.so')",
    "SELECT fts3_tokenizer('simple')",
    "VACUUM",
    "VACUUM INTO '{dir}/copy.db'",
    "REINDEX",
    "ANALYZE",
    "BEGIN IMMEDIATE",
    "SAVEPOINT s",
    "SELECT 1; DELETE FROM meta",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_writes_are_refused(filled: Store, sql: str) -> None:
    d = filled.path.parent
    before, files = contents(filled), sorted(p.name for p in d.iterdir())
    with pytest.raises(ReadOnlyViolation, match="^read-only: only reads are allowed"):
        run_readonly(filled, sql.format(dir=d))
    assert contents(filled) == before
    assert sorted(p.name for p in d.iterdir()) == files  # no ATTACH or VACUUM INTO target


ALLOWED = [
    ("SELECT key, value FROM meta WHERE key = 'k'", ["key", "value"], [("k", "v")]),
    ("SELECT key FROM meta WHERE key = ?", ["key"], [("k",)]),
    ("SELECT * FROM live_instances", None, []),
    ("SELECT queue FROM queue_depths", ["queue"], []),
    ("PRAGMA user_version", ["user_version"], None),
    ("PRAGMA journal_mode", ["journal_mode"], [("wal",)]),
    ("PRAGMA table_info(meta)", None, None),
    ("SELECT name FROM pragma_table_info('meta') ORDER BY cid", ["name"], [("key",), ("value",)]),
    ("PRAGMA integrity_check", ["integrity_check"], [("ok",)]),
    ("PRAGMA quick_check", ["quick_check"], [("ok",)]),
    ("SELECT json_object('a', 1) AS j", ["j"], [('{"a":1}',)]),
    ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) "
     "SELECT x FROM c", ["x"], [(1,), (2,), (3,)]),
    ("SELECT 1 AS first; SELECT 2 AS second", ["second"], [(2,)]),
]


@pytest.mark.parametrize(("sql", "cols", "rows"), ALLOWED)
def test_reads_work(filled: Store, sql: str, cols: list[str] | None, rows: list[Any] | None) -> None:
    params = ("k",) if "?" in sql else ()
    got_cols, got_rows = run_readonly(filled, sql, params)
    if cols is not None:
        assert got_cols == cols
    if rows is not None:
        assert got_rows == rows


def test_columns_known_for_an_empty_result(store: Store) -> None:
    cols, rows = run_readonly(store, "SELECT * FROM live_instances")
    assert rows == [] and cols[:3] == ["id", "incarnation", "app"]


@pytest.mark.parametrize("sql", ["", "   ", "SELEC 1", "SELECT * FROM no_such_table", "SELECT ?"])
def test_bad_sql_is_a_usage_error(store: Store, sql: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        run_readonly(store, sql)
    assert e.value.exit_code == 2


LONG_QUERY = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
              "SELECT count(*) FROM meta, c")


def test_a_long_coord_sql_does_not_block_writers(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(db_path, config=Config(busy_timeout_ms=50))
    p = subprocess.Popen([sys.executable, "-m", "coord", "sql", LONG_QUERY], env=coord_env(db_path),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        n = iter(range(10**9))

        def reader_holds_a_snapshot() -> bool:
            # A write, then a passive checkpoint: it cannot copy back frames newer than an
            # open reader's snapshot, so checkpointed < logged proves the query is running.
            s.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES (?, '1')",
                                        (f"probe{next(n)}",)))
            _, logged, done = s.conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]
            return bool(done < logged)

        wait_until(reader_holds_a_snapshot, timeout=60, interval=0.05)
        monkeypatch.setattr(coord.backend.sqlite.retry, "Retrying",
                            lambda *a, **kw: pytest.fail("a writer waited for the reader"))
        for i in range(50):
            s.write(lambda c, i=i: c.execute("INSERT INTO meta (key, value) VALUES (?, '1')",
                                             (f"w{i}",)))
        assert p.poll() is None  # the query was running all along
    finally:
        reap_children([p])
        s.close()
    with Store(db_path) as fresh:
        assert fresh.value("SELECT count(*) FROM meta WHERE key LIKE 'w%'") == 50

