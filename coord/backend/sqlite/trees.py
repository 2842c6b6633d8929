"""The SQLite engine's recorded process trees: tree rows of ``processes`` (the groups
recorded on ``leases`` are the lease engine's; see ``coord.tree`` for the rules)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import apsw

from ..records import Member

if TYPE_CHECKING:
    from ...db import Row, Store

_INSERT = ("INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, pgid, "
           "name, cmdline, cwd, user, labels, started_at, tree, log_path) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id")

_EXITED = ("UPDATE processes SET status = 'exited', ended_at = coalesce(ended_at, ?) "
           "WHERE status = 'running' AND id IN (SELECT value FROM json_each(?))")


class SqliteTrees:
    """``coord.backend.TreeOps``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def record(self, rows: Sequence[tuple[Any, ...]], gone: Sequence[int]) -> list[int]:
        store = self._store

        def txn(c: apsw.Connection) -> list[int]:
            wall = store.wall()
            ids = [int(c.execute(_INSERT, (*r[:11], wall, *r[11:])).fetchall()[0][0])  # type: ignore[arg-type]
                   for r in rows]
            if gone:
                c.execute(_EXITED, (wall, json.dumps(list(gone))))
            return ids

        return store.write(txn)

    def mark_exited(self, ids: Sequence[int]) -> None:
        store = self._store
        store.write(lambda c: c.execute(_EXITED, (store.wall(), json.dumps(list(ids)))))

    def members(self, owner: Member | None = None) -> list[Row]:
        cols = "id, instance_id, incarnation, pid, pgid, start_token, boot_id"
        if owner is None:
            return self._store.rows(
                f"SELECT {cols} FROM processes WHERE tree = 1 AND status = 'running'")  # noqa: S608
        return self._store.rows(
            f"SELECT {cols} FROM processes WHERE instance_id = ? AND incarnation = ? "  # noqa: S608
            "AND tree = 1 AND status = 'running'", owner)
