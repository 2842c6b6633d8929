"""SQL straight at a test's store, on either engine: for tests that look at rows, or write
rows around coord, where the public API has no word for it. SQLite's ``?`` placeholders are
written ``%s`` for PostgreSQL; the statement is otherwise the same on both (the schemas have
the same tables and columns)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import coord


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


def sql_rows(store: coord.Store, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The rows of one read."""
    if store.engine == "sqlite":
        return store.rows(sql, tuple(params))
    return store.backend.db.rows(_pg(sql), tuple(params))  # type: ignore[attr-defined,no-any-return]


def sql_value(store: coord.Store, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first column of the first row, or None."""
    rows = sql_rows(store, sql, params)
    return next(iter(rows[0].values())) if rows else None


def sql_write(store: coord.Store, sql: str, many: Sequence[Sequence[Any]]) -> None:
    """Run one statement once per parameter tuple of ``many``, in one transaction."""
    if store.engine == "sqlite":
        store.write(lambda c: c.executemany(sql, [tuple(p) for p in many]))
        return
    store.backend.db.write(  # type: ignore[attr-defined]
        lambda c: c.cursor().executemany(_pg(sql), [tuple(p) for p in many]))
