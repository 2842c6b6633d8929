"""The PostgreSQL engine bound to one store: its services and its operations per
capability."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adhoc import PgAdhoc
from .checks import PgChecks
from .clock import ServerClock
from .connection import PgDb
from .death_rule import PgDeathRule, rebase_boot
from .events import PgEvents
from .instances import PgInstances
from .kv import PgKv
from .leases import PgLeases
from .liveness import PgLiveness
from .messages import PgMessages
from .opening import PgMeta, open_schema
from .processes import PgProcesses
from .queues import PgQueues
from .trees import PgTrees
from .wakeup import PgWakeup

if TYPE_CHECKING:
    from ...db import Store
    from .url import PgLocation



class PostgresBackend:
    """``coord.backend.Backend`` on PostgreSQL."""

    name = "postgresql"

    def __init__(self, store: Store, location: PgLocation) -> None:
        self.db = PgDb(location)
        self.clock = ServerClock(self.db, store.clock.mono)
        self.liveness = PgLiveness(store, self.clock, self.db)
        self.wakeup = PgWakeup(self.db)
        self.instances = PgInstances(self.db, self.liveness)
        self.events = PgEvents(self.db)
        self.kv = PgKv(self.db, self.liveness)
        self.messages = PgMessages(self.db, self.wakeup)
        self.leases = PgLeases(self.db, self.clock, self.liveness, self.kv)
        self.death = PgDeathRule(self.db, self.clock, self.liveness)
        self.trees = PgTrees(self.db)
        self.processes = PgProcesses(self.db)
        self.checks = PgChecks(self.db)
        self.queues = PgQueues(self.db, self.clock)
        self.meta = PgMeta(self.db)
        self.adhoc = PgAdhoc(store)

    def open(self) -> None:
        open_schema(self.db)
        rebase_boot(self.db)

    def abandon_transaction(self) -> None:
        """End this thread's interrupted transaction (see ``PgDb.abandon_transaction``)."""
        self.db.abandon_transaction()

    def close(self) -> None:
        self.wakeup.close()
        self.db.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.db.where}>"
