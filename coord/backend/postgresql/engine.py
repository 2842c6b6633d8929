"""The PostgreSQL engine bound to one store: its services and its operations per
capability. An operation not yet written for this engine raises ``NotImplementedError``
naming it, never a wrong answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from .clock import ServerClock
from .connection import PgDb
from .instances import PgInstances
from .liveness import PgLiveness
from .opening import open_schema
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


class PostgresBackend:
    """``coord.backend.Backend`` on PostgreSQL."""

    name = "postgresql"

    def __init__(self, store: Store, location: PgLocation) -> None:
        self.db = PgDb(location)
        self.clock = ServerClock(self.db, store.clock.mono)
        self.liveness = PgLiveness(store, self.clock)
        self.wakeup = PgWakeup()
        self.instances = PgInstances(self.db, self.liveness)
        self.events: Any = NotYet("events")
        self.kv: Any = NotYet("kv")
        self.messages: Any = NotYet("messages")
        self.leases: Any = NotYet("leases")
        self.death: Any = NotYet("death")
        self.trees: Any = NotYet("trees")
        self.processes: Any = NotYet("processes")
        self.checks: Any = NotYet("checks")
        self.queues: Any = NotYet("queues")

    def open(self) -> None:
        open_schema(self.db)

    def close(self) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.db.where}>"
