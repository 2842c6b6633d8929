"""The SQLite engine's recorded process trees: tree rows of ``processes`` and the process
groups recorded on ``leases`` (see ``coord.tree`` for the rules)."""

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

    def groups(self, owner: Member | None = None) -> list[Row]:
        # 'over': the lease expired or moved on since the group was recorded.
        cols = ("name, pgid, pg_start_token, pg_holder_id, pg_holder_incarnation, "
                "(holder_id IS NOT pg_holder_id OR holder_incarnation IS NOT pg_holder_incarnation "
                "OR expires_mono IS NULL OR expires_mono < ?) AS over")
        now = self._store.mono()
        if owner is None:
            return self._store.rows(
                f"SELECT {cols} FROM leases "  # noqa: S608
                "WHERE pgid IS NOT NULL AND pg_holder_id IS NOT NULL", (now,))
        return self._store.rows(
            f"SELECT {cols} FROM leases WHERE pg_holder_id = ? "  # noqa: S608
            "AND pg_holder_incarnation = ? AND pgid IS NOT NULL", (now, *owner))

    def terms(self, owner: Member) -> tuple[int, ...]:
        return tuple(int(r["term"]) for r in self._store.rows(
            "SELECT term FROM lease_terms WHERE holder_id = ? AND holder_incarnation = ?", owner))

    def clear_groups(self, groups: Sequence[tuple[str, int, int]]) -> None:
        self._store.write(lambda c: c.executemany(
            "UPDATE leases SET pgid = NULL, pg_start_token = NULL, pg_holder_id = NULL, "
            "pg_holder_incarnation = NULL WHERE name = ? AND pgid = ? AND pg_start_token = ?",
            list(groups)))
