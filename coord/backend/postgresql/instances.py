"""The PostgreSQL engine's registry: the ``instances`` table (see ``coord.instances`` for
the rules). A takeover and a deregistration apply the death rule (``.death``) in the same
transaction; registering an id first takes a transaction lock on that id, so two hosts
registering it at once queue instead of both inserting."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ...errors import InstanceIdInUse
from ..records import Member
from .connection import Conn, fetch, scalar
from .death import bury_many, release_holdings_many
from .events import log_event
from .liveness import machine_id

if TYPE_CHECKING:
    from .connection import PgDb, Row
    from .liveness import PgLiveness

#: The columns ``register`` takes in ``fields``, in the table's order.
FIELDS = ("app", "pid", "start_token", "boot_id", "pidns", "uid", "user", "host", "cmdline",
          "cwd", "labels", "lock_path", "nudge_path", "ttl", "watchdog")
_COLUMNS = ", ".join('"user"' if f == "user" else f for f in (*FIELDS, "machine_id"))
_INSERT = (
    f"INSERT INTO instances (id, incarnation, status, {_COLUMNS}, started_at, heartbeat_at, "
    "heartbeat_mono) VALUES (%s, %s, 'alive', " + ", ".join(["%s"] * (len(FIELDS) + 1))
    + ", coord_now(), coord_now(), coord_now()) "
    "ON CONFLICT (id) DO UPDATE SET incarnation = excluded.incarnation, status = 'alive', "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", "))
    + ", started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
    "heartbeat_mono = excluded.heartbeat_mono, ended_at = NULL, end_reason = NULL")
#: The advisory-lock key space of registrations (see ``register``).
LOCK_SPACE_ID = 0x636F6F73


class PgInstances:
    """``coord.backend.InstanceOps``."""

    def __init__(self, db: PgDb, liveness: PgLiveness) -> None:
        self._db = db
        self._liveness = liveness

    # -- reads --------------------------------------------------------------------------------

    def get(self, member: Member) -> Row | None:
        return self._db.row("SELECT * FROM instances WHERE id = %s AND incarnation = %s", member)

    def by_id(self, id: str) -> Row | None:
        return self._db.row("SELECT * FROM instances WHERE id = %s", (id,))

    def by_ids(self, ids: Iterable[str]) -> dict[str, Row]:
        return {r["id"]: r for r in self._db.rows(
            "SELECT * FROM instances WHERE id = ANY(%s)", (sorted(ids),))}

    def registration(self, id: str) -> tuple[int, str] | None:
        row = self._db.row("SELECT incarnation, status FROM instances WHERE id = %s", (id,))
        return None if row is None else (int(row["incarnation"]), str(row["status"]))

    def list(self, app: str | None = None) -> list[Row]:
        if app is None:
            return self._db.rows("SELECT * FROM instances ORDER BY started_at, id")
        return self._db.rows(
            "SELECT * FROM instances WHERE app = %s ORDER BY started_at, id", (app,))

    # -- writes -------------------------------------------------------------------------------

    def register(self, id: str, fields: Mapping[str, Any]) -> tuple[int, Row | None]:
        previous: list[Row] = []
        look = self._liveness.look()

        def txn(c: Conn) -> int:
            c.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_SPACE_ID, id))
            old = fetch(c, "SELECT * FROM instances WHERE id = %s FOR UPDATE", (id,))
            previous[:] = old
            if old:
                alive, verdict = self._liveness.judge(old[0], look)
                if alive:
                    raise InstanceIdInUse(id, old[0]["pid"])
                if old[0]["status"] == "alive":
                    log_event(c, "died", id, None, incarnation=old[0]["incarnation"],
                              reason=verdict)
                release_holdings_many(c, [(id, old[0]["incarnation"])], reason="taken over")
            inc = int(scalar(c, "SELECT nextval('incarnation_seq')"))
            c.execute(_INSERT, (id, inc, *[fields[k] for k in FIELDS], machine_id()))
            if old:
                log_event(c, "took over", id, None, previous=old[0]["incarnation"],
                          incarnation=inc)
            log_event(c, "joined", id, fields["app"], incarnation=inc, pid=fields["pid"])
            return inc

        inc = self._db.write(txn)
        proof = self._liveness.proof_at(fields["lock_path"])
        if proof is not None:
            proof.bind((id, inc), float(fields["ttl"]))
        if previous:
            self._liveness.forget(previous)
        return inc, (previous[0] if previous else None)

    def heartbeat(self, member: Member) -> bool:
        # Our own registration heartbeats on its liveness connection, which checks its lock.
        proof = self._liveness.by_member(member)
        if proof is not None:
            return proof.heartbeat()
        return bool(self._db.write(lambda c: fetch(
            c, "UPDATE instances SET heartbeat_mono = coord_now(), heartbeat_at = coord_now() "
            "WHERE id = %s AND incarnation = %s AND status = 'alive' RETURNING 1", member)))

    def changes(self) -> object:
        row = self._db.row("SELECT max(incarnation) AS top, count(*) AS n FROM instances "
                           "WHERE status = 'alive'")
        return None if row is None else (row["top"], row["n"])

    def deregister(self, member: Member) -> bool:
        return bool(self._db.write(lambda c: bury_many(c, [member], reason="left")))
