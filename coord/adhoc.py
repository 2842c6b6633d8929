"""Read-only ad-hoc SQL for people and scripts (``coord sql``).

Safety comes from SQLite itself, not from string matching: the connection is opened
read-only, and an authorizer allows only reads, SELECTs, read-only functions and a short list
of informational pragmas. Writes (also inside ``WITH``), ATTACH, transactions, pragma
assignments and ``load_extension`` are refused before they run.
"""

from __future__ import annotations

from typing import Any

import apsw

from .db import Store, translated
from .errors import InvalidArgument, ReadOnlyViolation

# Pragmas that take a table or index name as their argument and only read.
_NAME_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list",
})
# Pragmas allowed only without an argument (with one, most of them write).
_READ_PRAGMAS = _NAME_PRAGMAS | frozenset({
    "user_version", "application_id", "journal_mode", "page_count", "page_size",
    "freelist_count", "data_version", "schema_version", "compile_options", "database_list",
    "table_list", "function_list", "pragma_list", "collation_list", "encoding",
})
_DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})

_ALLOWED = {apsw.SQLITE_READ, apsw.SQLITE_SELECT, apsw.SQLITE_RECURSIVE}


def _authorizer(op: int, p1: str | None, p2: str | None, db: str | None, trigger: str | None) -> int:
    if op in _ALLOWED:
        return apsw.SQLITE_OK
    if op == apsw.SQLITE_FUNCTION:
        return apsw.SQLITE_DENY if (p2 or "").lower() in _DENIED_FUNCTIONS else apsw.SQLITE_OK
    if op == apsw.SQLITE_PRAGMA:
        name = (p1 or "").lower()
        if name in _NAME_PRAGMAS or (name in _READ_PRAGMAS and p2 is None):
            return apsw.SQLITE_OK
        return apsw.SQLITE_DENY
    return apsw.SQLITE_DENY


def run_readonly(store: Store, sql: str, params: tuple[Any, ...] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` read-only; returns (column names, rows). Raises ReadOnlyViolation."""
    if not sql.strip():
        raise InvalidArgument("empty query")
    with translated(str(store.path)):
        conn = apsw.Connection(str(store.path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(store.config.busy_timeout_ms)
        conn.authorizer = _authorizer
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
            try:
                cols = [d[0] for d in cur.get_description()]
            except apsw.ExecutionCompleteError:
                cols = []
            rows = list(cur)
        except apsw.AuthError as e:
            raise ReadOnlyViolation(f"only reads are allowed ({e})") from None
        except apsw.ReadOnlyError as e:
            raise ReadOnlyViolation(f"only reads are allowed ({e})") from None
        except apsw.SQLError as e:
            if "not authorized" in str(e):
                raise ReadOnlyViolation(f"only reads are allowed ({e})") from None
            raise InvalidArgument(f"SQL error: {e}") from None
        return cols, rows
    finally:
        conn.close()
