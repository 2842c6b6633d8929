"""The SQLite engine's tracked processes: the ``processes`` table (see ``coord.processes``
for the rules)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import apsw

from ..records import Member
from .connection import scalar
from .events import log_event

if TYPE_CHECKING:
    from ...db import Row, Store

_INSERT = (
    "INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, pgid, "
    "name, cmdline, cwd, user, labels, log_path, started_at, status, ended_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
)


class SqliteProcesses:
    """``coord.backend.ProcessOps``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def track(self, owner: Member, fields: Sequence[Any], *, running: bool) -> int:
        store = self._store

        def txn(c: apsw.Connection) -> int:
            wall = store.wall()
            row_id = int(scalar(c, _INSERT, (*owner, *fields, wall,
                                             *(("running", None) if running else ("exited", wall)))))
            if running:
                log_event(c, wall, "process started", owner[0], fields[4], process=row_id,
                          pid=fields[0])
            return row_id

        return store.write(txn)

    def record_exit(self, id: int, owner_id: str, code: int | None, sig: int | None) -> None:
        store = self._store
        store.write(lambda c: c.execute(
            "UPDATE processes SET status = 'exited', ended_at = coalesce(ended_at, ?), "
            "exit_code = ?, signal = ? WHERE id = ? AND instance_id = ?",
            (store.wall(), code, sig, id, owner_id)))

    def record_ended(self, ended: Sequence[tuple[Row, str, int | None, int | None]],
                     kind: str) -> None:
        store = self._store

        def txn(c: apsw.Connection) -> None:
            wall = store.wall()
            for row, how, ec, sig in ended:
                c.execute(
                    "UPDATE processes SET status = 'exited', ended_at = coalesce(ended_at, ?), "
                    "exit_code = CASE WHEN exit_code IS NULL AND signal IS NULL THEN ? "
                    "ELSE exit_code END, "
                    "signal = CASE WHEN exit_code IS NULL AND signal IS NULL THEN ? "
                    "ELSE signal END WHERE id = ?",
                    (wall, ec, sig, row["id"]),
                )
                log_event(c, wall, kind, row["instance_id"], row["name"], process=row["id"],
                          pid=row["pid"], how=how)

        store.write(txn)

    def get(self, id: int) -> Row | None:
        return self._store.row("SELECT * FROM processes WHERE id = ?", (id,))

    def by_ids(self, ids: Iterable[int]) -> dict[int, Row]:
        return {r["id"]: r for r in self._store.rows(
            "SELECT * FROM processes WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(ids)),))}

    def list(self, instance_id: str | None = None, *, running: bool = False) -> list[Row]:
        if instance_id is not None:
            return self._store.rows(
                "SELECT * FROM processes WHERE instance_id = ? ORDER BY id", (instance_id,))
        if running:
            return self._store.rows("SELECT * FROM processes WHERE status = 'running' "
                                    "ORDER BY instance_id, id")
        return self._store.rows("SELECT * FROM processes ORDER BY instance_id, id")
