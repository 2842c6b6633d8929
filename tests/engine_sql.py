"""Statements on the tables of either engine, for tests that arrange or inspect stored state
directly: both engines have the same tables and columns (what `coord sql` reads), so one
statement written with ``?`` placeholders serves both (``?`` becomes ``%s`` on PostgreSQL).

``counter(name)`` is the next value of the incarnation/term/revision counter, ``now`` the
engine's expiry clock (the value *_mono columns hold) and ``wall`` a wall-clock time, all
inside one transaction of ``txn``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import coord

T = TypeVar("T")


def _pg(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class Txn:
    """One transaction's statements (see ``txn``)."""

    def __init__(self, store: coord.Store, conn: Any) -> None:
        self._store, self._conn = store, conn
        self.pg = store.engine == "postgresql"
        self.now = store.backend.clock.now() if self.pg else store.mono()
        self.wall = time.time() if self.pg else store.wall()

    def __call__(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self.pg:
            cur = self._conn.execute(_pg(sql), params)
            return cur.fetchall() if cur.description else []
        from coord.backend.sqlite.connection import fetch

        return fetch(self._conn, sql, params)

    def counter(self, name: str) -> int:
        if self.pg:
            return int(self(f"SELECT nextval('{name}_seq') AS v")[0]["v"])
        from coord.backend.sqlite.connection import next_counter

        return next_counter(self._conn, name)


def txn(store: coord.Store, fn: Callable[[Txn], T]) -> T:
    """Run ``fn(t)`` in one write transaction of ``store``'s engine."""
    if store.engine == "postgresql":
        return store.backend.db.write(lambda c: fn(Txn(store, c)))  # type: ignore[attr-defined]
    return store.write(lambda c: fn(Txn(store, c)))


def execute(store: coord.Store, sql: str, params: tuple[Any, ...] = ()) -> None:
    """One write statement in its own transaction."""
    txn(store, lambda t: t(sql, params))


def rows(store: coord.Store, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """One read."""
    if store.engine == "postgresql":
        return store.backend.db.rows(_pg(sql), params)  # type: ignore[attr-defined, no-any-return]
    return store.rows(sql, params)


def row(store: coord.Store, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
    found = rows(store, sql, params)
    return found[0] if found else None


def value(store: coord.Store, sql: str, params: tuple[Any, ...] = ()) -> Any:
    found = rows(store, sql, params)
    return next(iter(found[0].values())) if found else None


def expiry_now(store: coord.Store) -> float:
    """The engine's expiry clock now (what *_mono columns are compared with)."""
    return float(store.backend.clock.now())


def write_many(store: coord.Store, sql: str, many: Any) -> None:
    """One statement once per parameter tuple of ``many``, in one transaction."""
    def go(t: Txn) -> None:
        for params in many:
            t(sql, tuple(params))
    txn(store, go)
