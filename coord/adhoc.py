"""Read-only ad-hoc SQL for people and scripts (``coord sql``).

The query is in the engine's own dialect and runs through its ``adhoc`` operation
(``coord.backend.AdhocOps``), which guarantees that nothing it runs can write: the SQLite
engine opens a read-only connection with an authorizer that allows only reads (see
``coord.backend.sqlite.adhoc``).
"""

from __future__ import annotations

from typing import Any

from .backend import AdhocResult
from .db import Store
from .errors import InvalidArgument

__all__ = ["Result", "run_readonly", "run_readonly_all"]

#: (column names, rows) of one statement.
Result = AdhocResult


def run_readonly(store: Store, sql: str, params: tuple[Any, ...] = ()) -> Result:
    """Run ``sql`` on a read-only connection; return (column names, rows) of its last
    statement (its columns are known even when it returns no rows).

    Raises ``ReadOnlyViolation`` for anything but a read, and ``InvalidArgument`` for SQL
    that does not compile. Readers never block writers (WAL).
    """
    results = run_readonly_all(store, sql, params)
    return results[-1] if results else ([], [])


def run_readonly_all(store: Store, sql: str, params: tuple[Any, ...] = ()) -> list[Result]:
    """Like ``run_readonly``, but (column names, rows) of every statement in ``sql`` that
    has result columns, in order."""
    if not sql.strip():
        raise InvalidArgument("empty query")
    return store.backend.adhoc.run(sql, params)
