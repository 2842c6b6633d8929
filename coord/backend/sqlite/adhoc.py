"""The SQLite engine's read-only ad-hoc SQL (``coord.backend.AdhocOps``, for ``coord sql``).

Safety comes from SQLite itself, not from string matching: the connection is opened
read-only, and an authorizer allows only reads, SELECTs, read-only functions and a short list
of informational pragmas. Writes (also inside ``WITH``), ATTACH, transactions, pragma
assignments and ``load_extension`` are refused before they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import apsw

from ...errors import InvalidArgument, ReadOnlyViolation
from .. import AdhocResult as Result
from .connection import translated
from .forking import close_connection, open_connection

if TYPE_CHECKING:
    from ...db import Store

# Pragmas that only read, with or without an argument (a table or index name, a limit).
_NAME_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list",
    "integrity_check", "quick_check", "foreign_key_check",
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


class SqliteAdhoc:
    """``coord.backend.AdhocOps`` on a read-only connection of its own, with the authorizer."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> list[Result]:
        store = self._store
        path = str(store.path)
        with translated(path):
            conn = open_connection(path, apsw.SQLITE_OPEN_READONLY)
        try:
            conn.set_busy_timeout(store.config.busy_timeout_ms)
            conn.authorizer = _authorizer
            cur = conn.cursor()
            results: list[Result] = []

            def next_statement(cursor: apsw.Cursor, _sql: str, _bindings: Any) -> bool:
                # Called before each statement runs: start a fresh result with its columns.
                cols = [d[0] for d in cursor.get_description()]
                if cols:
                    results.append((cols, []))
                return True

            cur.exec_trace = next_statement
            try:
                with translated(path):
                    for r in cur.execute(sql, params):
                        results[-1][1].append(tuple(r))
            except (apsw.AuthError, apsw.ReadOnlyError) as e:
                raise ReadOnlyViolation(f"only reads are allowed ({e})") from None
            except apsw.SQLError as e:
                if "not authorized" in str(e):
                    raise ReadOnlyViolation(f"only reads are allowed ({e})") from None
                raise InvalidArgument(f"SQL error: {e}") from None
            except apsw.BindingsError as e:
                raise InvalidArgument(f"SQL error: {e}") from None
            return results
        finally:
            close_connection(conn)
