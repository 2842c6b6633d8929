"""The SQLite engine's reads of the registry for other capabilities (the instances
capability's own SQL moves here in step 2 of ``coord.backend``'s plan)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..records import Member

if TYPE_CHECKING:
    from ...db import Row, Store


class SqliteInstances:
    """``coord.backend.InstanceReads``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, member: Member) -> Row | None:
        return self._store.row(
            "SELECT * FROM instances WHERE id = ? AND incarnation = ?", member)

    def by_ids(self, ids: Iterable[str]) -> dict[str, Row]:
        return {
            r["id"]: r
            for r in self._store.rows(
                "SELECT * FROM instances WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(ids)),),
            )
        }

    def registration(self, id: str) -> tuple[int, str] | None:
        row = self._store.row("SELECT incarnation, status FROM instances WHERE id = ?", (id,))
        return None if row is None else (int(row["incarnation"]), str(row["status"]))
