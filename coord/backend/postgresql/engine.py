"""The PostgreSQL engine bound to one store: its services and its operations per
capability. An operation not yet written for this engine raises ``NotImplementedError``
naming it, never a wrong answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ..records import Member
from .clock import ServerClock
from .connection import Conn, PgDb, Row, fetch
from .death import MEMBERS, bury_many, release_claims, split
from .events import PgEvents
from .instances import PgInstances
from .liveness import PgLiveness
from .opening import open_schema
from .queues import PgQueues
from .wakeup import PgWakeup

if TYPE_CHECKING:
    from ...db import Store
    from .url import PgLocation


class NotYet:
    """A capability whose operations are not yet written for PostgreSQL."""

    def __init__(self, capability: str) -> None:
        self._capability = capability

    def __getattr__(self, name: str) -> Any:
        def missing(*args: Any, **kwargs: Any) -> NoReturn:
            raise NotImplementedError(
                f"{self._capability}.{name} is not available on PostgreSQL yet")
        return missing


class DeathSoFar(NotYet):
    """The death rule's operations written so far on PostgreSQL: burying what a claimer or
    the reaper found dead, and the queue's expiry steps; the rest is ``NotYet``."""

    def __init__(self, db: PgDb, liveness: PgLiveness) -> None:
        super().__init__("death")
        self._db = db
        self._liveness = liveness

    def alive(self) -> list[Row]:
        return self._db.rows(
            "SELECT id, incarnation, status, end_reason, boot_id, pidns, pid, start_token, "
            "lock_path, nudge_path, heartbeat_mono, ttl FROM instances WHERE status = 'alive'")

    def bury(self, rows: Sequence[Row], verdict: str) -> list[Member]:
        members = [(str(r["id"]), int(r["incarnation"])) for r in rows]

        def txn(c: Conn) -> list[Member]:
            chosen = members
            if verdict == "hung":  # a heartbeat may have come in since the verdict
                ids, incs = split(members)
                chosen = [(str(r["id"]), int(r["incarnation"])) for r in fetch(
                    c, "SELECT id, incarnation FROM instances WHERE status = 'alive' AND "  # noqa: S608
                    f"(id, incarnation) IN ({MEMBERS}) AND coord_now() - heartbeat_mono > ttl",
                    (ids, incs))]
            return bury_many(c, chosen, reason=verdict)

        buried = self._db.write(txn)
        done = set(buried)
        self._liveness.forget(r for r in rows if (r["id"], r["incarnation"]) in done)
        return buried

    def release_expired_claims(self, limit: int) -> int:
        return self._db.write(lambda c: release_claims(
            c, "claim_expires_mono < coord_now()", (), error="claim lease expired",
            limit=limit))

    def purge_finished_jobs(self, retention: float, limit: int) -> int:
        return int(self._db.write(lambda c: c.execute(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN ('done', 'dead', "
            "'cancelled') AND finished_mono < coord_now() - %s LIMIT %s)",
            (retention, limit)).rowcount))


class PostgresBackend:
    """``coord.backend.Backend`` on PostgreSQL."""

    name = "postgresql"

    def __init__(self, store: Store, location: PgLocation) -> None:
        self.db = PgDb(location)
        self.clock = ServerClock(self.db)
        self.liveness = PgLiveness(store, self.clock)
        self.wakeup = PgWakeup()
        self.instances = PgInstances(self.db, self.liveness)
        self.events = PgEvents(self.db)
        self.kv: Any = NotYet("kv")
        self.messages: Any = NotYet("messages")
        self.leases: Any = NotYet("leases")
        self.death: Any = DeathSoFar(self.db, self.liveness)
        self.trees: Any = NotYet("trees")
        self.processes: Any = NotYet("processes")
        self.checks: Any = NotYet("checks")
        self.queues = PgQueues(self.db)

    def open(self) -> None:
        open_schema(self.db)

    def close(self) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.db.where}>"
