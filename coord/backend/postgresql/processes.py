"""The PostgreSQL engine's tracked processes: the ``processes`` table (see
``coord.processes`` for the rules; signalling and probing stay on the process's host)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..records import Member
from .connection import Conn, scalar
from .events import log_event

if TYPE_CHECKING:
    from .connection import PgDb, Row

_INSERT = (
    "INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, pgid, "
    'name, cmdline, cwd, "user", labels, log_path, started_at, status, ended_at) '
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, coord_now(), %s, "
    "CASE WHEN %s THEN NULL ELSE coord_now() END) RETURNING id"
)


class PgProcesses:
    """``coord.backend.ProcessOps``."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    def track(self, owner: Member, fields: Sequence[Any], *, running: bool) -> int:
        def txn(c: Conn) -> int:
            row_id = int(scalar(c, _INSERT, (*owner, *fields,
                                             "running" if running else "exited", running)))
            if running:
                log_event(c, "process started", owner[0], fields[4], process=row_id,
                          pid=fields[0])
            return row_id

        return self._db.write(txn)

    def record_exit(self, id: int, owner_id: str, code: int | None, sig: int | None) -> None:
        self._db.write(lambda c: c.execute(
            "UPDATE processes SET status = 'exited', ended_at = coalesce(ended_at, coord_now()), "
            "exit_code = %s, signal = %s WHERE id = %s AND instance_id = %s",
            (code, sig, id, owner_id)))

    def record_ended(self, ended: Sequence[tuple[Row, str, int | None, int | None]],
                     kind: str) -> None:
        def txn(c: Conn) -> None:
            for row, how, ec, sig in ended:
                c.execute(
                    "UPDATE processes SET status = 'exited', "
                    "ended_at = coalesce(ended_at, coord_now()), "
                    "exit_code = CASE WHEN exit_code IS NULL AND signal IS NULL THEN %s "
                    "ELSE exit_code END, "
                    "signal = CASE WHEN exit_code IS NULL AND signal IS NULL THEN %s "
                    "ELSE signal END WHERE id = %s", (ec, sig, row["id"]))
                log_event(c, kind, row["instance_id"], row["name"], process=row["id"],
                          pid=row["pid"], how=how)

        self._db.write(txn)

    def get(self, id: int) -> Row | None:
        return self._db.row("SELECT * FROM processes WHERE id = %s", (id,))

    def by_ids(self, ids: Iterable[int]) -> dict[int, Row]:
        return {r["id"]: r for r in self._db.rows(
            "SELECT * FROM processes WHERE id = ANY(%s)", (list(ids),))}

    def list(self, instance_id: str | None = None, *, running: bool = False) -> list[Row]:
        if instance_id is not None:
            return self._db.rows(
                "SELECT * FROM processes WHERE instance_id = %s ORDER BY id", (instance_id,))
        if running:
            return self._db.rows("SELECT * FROM processes WHERE status = 'running' "
                                 "ORDER BY instance_id, id")
        return self._db.rows("SELECT * FROM processes ORDER BY instance_id, id")
