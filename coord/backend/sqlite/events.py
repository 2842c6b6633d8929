"""The SQLite engine's event log: the ``events`` table.

``log_event``, ``log_events`` and ``trim_events`` write inside the caller's transaction (an
apsw connection), for the engine's other operations; ``SqliteEvents.record`` is one event in a
transaction of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import apsw

if TYPE_CHECKING:
    from ...db import Row, Store

#: One event for ``log_events``: (at, kind, instance_id, subject, detail).
Event = tuple[float, str, str | None, str | None, dict[str, Any]]

_INSERT = "INSERT INTO events (at, kind, instance_id, subject, detail) VALUES (?, ?, ?, ?, ?)"

# json.dumps(..., sort_keys=True) builds a new encoder on every call; a reaper burying
# thousands reuses one (same output).
_encode = json.JSONEncoder(sort_keys=True).encode


def log_event(
    conn: apsw.Connection,
    at: float,
    kind: str,
    instance_id: str | None = None,
    subject: str | None = None,
    **detail: Any,
) -> None:
    """Record an event inside the caller's transaction."""
    conn.execute(_INSERT, (at, kind, instance_id, subject, json.dumps(detail, sort_keys=True)))


def log_events(conn: apsw.Connection, events: Iterable[Event]) -> None:
    """Record many events inside the caller's transaction (one prepared statement)."""
    conn.executemany(
        _INSERT,
        [(at, kind, iid, subj, _encode(detail) if detail else "{}")
         for at, kind, iid, subj, detail in events],
    )


def trim_events(conn: apsw.Connection, *, now_wall: float, max_rows: int, max_age: float) -> int:
    """Drop events older than ``max_age`` or beyond the newest ``max_rows`` (and the lease
    terms released before ``max_age``), inside the caller's transaction."""
    before = conn.total_changes()
    conn.execute("DELETE FROM events WHERE at < ?", (now_wall - max_age,))
    conn.execute(
        "DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (max_rows,),
    )
    conn.execute(
        "DELETE FROM lease_terms WHERE released_at IS NOT NULL AND released_at < ?",
        (now_wall - max_age,),
    )
    return int(conn.total_changes() - before)


_COLUMNS = "id, at, kind, instance_id, subject, detail"


class SqliteEvents:
    """``coord.backend.EventLog``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def list(
        self, *, after: int, limit: int, oldest_first: bool,
        kinds: Sequence[str] | None = None, instance_id: str | None = None,
        since: float | None = None,
    ) -> list[Row]:
        where: list[str] = ["id > ?"]
        params: list[Any] = [after]
        if kinds:
            where.append("kind IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(kinds)))
        if instance_id is not None:
            where.append("instance_id = ?")
            params.append(instance_id)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        cond = " AND ".join(where)  # fixed fragments only; values are bound
        if oldest_first:
            sql = f"SELECT {_COLUMNS} FROM events WHERE {cond} ORDER BY id LIMIT ?"  # noqa: S608
        else:
            sql = (f"SELECT {_COLUMNS} FROM (SELECT * FROM events WHERE {cond} "  # noqa: S608
                   "ORDER BY id DESC LIMIT ?) ORDER BY id")
        rows = self._store.rows(sql, (*params, limit))
        for r in rows:
            r["detail"] = json.loads(r["detail"])
        return rows

    def record(self, kind: str, instance_id: str | None = None, subject: str | None = None,
               **detail: Any) -> None:
        """Record one event in its own transaction."""
        store = self._store
        store.write(lambda c: log_event(c, store.wall(), kind, instance_id, subject, **detail))
