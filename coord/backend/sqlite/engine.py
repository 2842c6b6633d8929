"""The SQLite engine bound to one store: its services and its operations per capability."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adhoc import SqliteAdhoc
from .checks import SqliteChecks
from .clock import MonotonicClock
from .connection import SqliteDb, translated
from .death import SqliteDeathRule
from .events import SqliteEvents
from .instances import SqliteInstances
from .kv import SqliteKv
from .leases import SqliteLeases
from .liveness import SqliteLiveness
from .messages import SqliteMessages
from .migrations import SqliteMeta
from .processes import SqliteProcesses
from .queues import SqliteQueues
from .trees import SqliteTrees
from .wakeup import SqliteWakeup

if TYPE_CHECKING:
    from ...db import Store


class SqliteBackend:
    """``coord.backend.Backend`` on SQLite."""

    name = "sqlite"

    def __init__(self, store: Store) -> None:
        #: The connections and transactions.
        self.db = SqliteDb(store)
        self.clock = MonotonicClock(store)
        self.liveness = SqliteLiveness(store, self.clock)
        self.wakeup = SqliteWakeup(store)
        self.instances = SqliteInstances(store, self.liveness)
        self.events = SqliteEvents(store)
        self.kv = SqliteKv(store, self.liveness)
        self.messages = SqliteMessages(store, self.clock, self.wakeup)
        # -- step 3: leases
        self.leases = SqliteLeases(store, self.clock, self.liveness, self.kv)
        # -- step 2 --
        self.death = SqliteDeathRule(store, self.liveness)
        self.trees = SqliteTrees(store)
        self.processes = SqliteProcesses(store)
        self.checks = SqliteChecks(store)
        # -- step 4: queues
        self.queues = SqliteQueues(store)
        self.meta = SqliteMeta(store)
        self.adhoc = SqliteAdhoc(store)
        self._store = store

    def open(self) -> None:
        from .opening import open_store

        with translated(str(self._store.path)):
            open_store(self._store)

    def close(self) -> None:
        self.db.close()

    def abandon_transaction(self) -> None:
        self.db.abandon_transaction()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
