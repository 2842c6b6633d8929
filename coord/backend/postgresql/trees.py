"""The PostgreSQL engine's recorded process trees: tree rows of ``processes`` (see
``coord.tree`` for the rules). Only a coord process on the tree's host and boot ends or
probes its members, so ``members`` lists this boot's rows alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...clock import boot_id
from ..records import Member
from .connection import Conn, fetch

if TYPE_CHECKING:
    from .connection import PgDb, Row

_INSERT = ("INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, pgid, "
           'name, cmdline, cwd, "user", labels, started_at, tree, log_path) '
           "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, coord_now(), %s, %s) "
           "RETURNING id")
_EXITED = ("UPDATE processes SET status = 'exited', ended_at = coalesce(ended_at, coord_now()) "
           "WHERE status = 'running' AND id = ANY(%s)")
_COLS = "id, instance_id, incarnation, pid, pgid, start_token, boot_id"


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
            return self._db.rows(
                f"SELECT {_COLS} FROM processes WHERE tree = 1 AND status = 'running' "  # noqa: S608 - fixed fragments, values bound
                "AND boot_id = %s ORDER BY id", (boot_id(),))
        return self._db.rows(
            f"SELECT {_COLS} FROM processes WHERE instance_id = %s AND incarnation = %s "  # noqa: S608 - fixed fragments, values bound
            "AND tree = 1 AND status = 'running' AND boot_id = %s ORDER BY id",
            (*owner, boot_id()))
