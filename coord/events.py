"""The event log: a bounded history of what happened (joined, left, died, reaped, ...)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import apsw

from .db import Row, Store


def log_event(
    conn: apsw.Connection,
    at: float,
    kind: str,
    instance_id: str | None = None,
    subject: str | None = None,
    **detail: Any,
) -> None:
    """Record an event inside the caller's transaction."""
    conn.execute(
        "INSERT INTO events (at, kind, instance_id, subject, detail) VALUES (?, ?, ?, ?, ?)",
        (at, kind, instance_id, subject, json.dumps(detail, sort_keys=True)),
    )


def record_event(store: Store, kind: str, instance_id: str | None = None,
                 subject: str | None = None, **detail: Any) -> None:
    """Record one event in its own transaction (for callers outside one, e.g. the CLI)."""
    store.write(lambda c: log_event(c, store.wall(), kind, instance_id, subject, **detail))


#: One event for ``log_events``: (at, kind, instance_id, subject, detail).
Event = tuple[float, str, str | None, str | None, dict[str, Any]]


# json.dumps(..., sort_keys=True) builds a new encoder on every call; a reaper burying
# thousands reuses one (same output).
_encode = json.JSONEncoder(sort_keys=True).encode


def log_events(conn: apsw.Connection, events: Iterable[Event]) -> None:
    """Record many events inside the caller's transaction (one prepared statement)."""
    conn.executemany(
        "INSERT INTO events (at, kind, instance_id, subject, detail) VALUES (?, ?, ?, ?, ?)",
        [(at, kind, iid, subj, _encode(detail) if detail else "{}")
         for at, kind, iid, subj, detail in events],
    )


_COLUMNS = "id, at, kind, instance_id, subject, detail"


def list_events(
    store: Store, *, after: int = 0, limit: int = 100, oldest_first: bool = False,
    kinds: Sequence[str] | None = None, instance_id: str | None = None,
    since: float | None = None,
) -> list[Row]:
    """Events with id greater than ``after``, in id order: the newest ``limit`` of them, or
    with ``oldest_first`` the first ``limit`` (to page forward without skipping any).
    Optionally only those of the given ``kinds``, of ``instance_id``, or recorded at or after
    ``since`` (wall-clock seconds)."""
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
    rows = store.rows(sql, (*params, limit))
    for r in rows:
        r["detail"] = json.loads(r["detail"])
    return rows


def trim_events(conn: apsw.Connection, *, now_wall: float, max_rows: int, max_age: float) -> int:
    """Drop events older than ``max_age`` or beyond the newest ``max_rows``."""
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
