"""The PostgreSQL engine's recorded process trees: tree rows of ``processes`` (the groups
recorded on ``leases`` are the lease engine's; see ``coord.tree`` for the rules). Rows are
host-local facts: only a process on the owner's host and boot signals or probes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..records import Member
from .connection import Conn, fetch

if TYPE_CHECKING:
    from .connection import PgDb, Row

_INSERT = ('INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, pgid, '
           'name, cmdline, cwd, "user", labels, started_at, tree, log_path) '
           "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, coord_now(), %s, %s) "
           "RETURNING id")
_EXITED = ("UPDATE processes SET status = 'exited', ended_at = coalesce(ended_at, coord_now()) "
           "WHERE status = 'running' AND id = ANY(%s)")
_MEMBERS = ("SELECT id, instance_id, incarnation, pid, pgid, start_token, boot_id "
            "FROM processes WHERE tree = 1 AND status = 'running'")


class PgTrees:
    """``coord.backend.TreeOps``."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    def record(self, rows: Sequence[tuple[Any, ...]], gone: Sequence[int]) -> list[int]:
        def txn(c: Conn) -> list[int]:
            ids = [int(fetch(c, _INSERT, tuple(r))[0]["id"]) for r in rows]
            if gone:
                c.execute(_EXITED, (list(gone),))
            return ids

        return self._db.write(txn)

    def mark_exited(self, ids: Sequence[int]) -> None:
        self._db.write(lambda c: c.execute(_EXITED, (list(ids),)))

    def members(self, owner: Member | None = None) -> list[Row]:
        if owner is None:
            return self._db.rows(_MEMBERS + " ORDER BY id")
        return self._db.rows(_MEMBERS + " AND instance_id = %s AND incarnation = %s ORDER BY id",
                             owner)
