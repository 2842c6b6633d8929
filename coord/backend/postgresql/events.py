"""The PostgreSQL engine's event log: the ``events`` table. ``log_event`` writes inside the
caller's transaction, stamped with the server's clock; ``PgEvents`` reads it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .connection import Conn

if TYPE_CHECKING:
    from .connection import PgDb, Row

_COLUMNS = "id, at, kind, instance_id, subject, detail"
_INSERT = ("INSERT INTO events (at, kind, instance_id, subject, detail) "
           "VALUES (coord_now(), %s, %s, %s, %s)")


def log_event(c: Conn, kind: str, instance_id: str | None = None, subject: str | None = None,
              **detail: Any) -> None:
    """Record an event inside the caller's transaction."""
    c.execute(_INSERT, (kind, instance_id, subject, json.dumps(detail, sort_keys=True)))


class PgEvents:
    """``coord.backend.EventLog`` (reading; the writers call ``log_event``)."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    def list(
        self, *, after: int, limit: int, oldest_first: bool,
        kinds: Sequence[str] | None = None, instance_id: str | None = None,
        since: float | None = None,
    ) -> list[Row]:
        where: list[str] = ["id > %s"]
        params: list[Any] = [after]
        if kinds:
            where.append("kind = ANY(%s)")
            params.append(list(kinds))
        if instance_id is not None:
            where.append("instance_id = %s")
            params.append(instance_id)
        if since is not None:
            where.append("at >= %s")
            params.append(since)
        cond = " AND ".join(where)  # fixed fragments only; values are bound
        if oldest_first:
            sql = f"SELECT {_COLUMNS} FROM events WHERE {cond} ORDER BY id LIMIT %s"  # noqa: S608
        else:
            sql = (f"SELECT {_COLUMNS} FROM (SELECT * FROM events WHERE {cond} "  # noqa: S608
                   "ORDER BY id DESC LIMIT %s) e ORDER BY id")
        rows = self._db.rows(sql, (*params, limit))
        for r in rows:
            r["detail"] = json.loads(r["detail"])
        return rows
