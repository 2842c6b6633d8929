"""The engine protocol's operations on the store itself: its schema ladder and read-only
ad-hoc queries (see ``coord.backend`` for the protocol as a whole)."""

from __future__ import annotations

from typing import Any, Protocol

# -- the store itself: its schema ladder and read-only ad-hoc queries ---------------------------


class MetaOps(Protocol):
    """The engine's schema ladder: numbered migrations (SQLite: ``schema/sqlite/``,
    ``PRAGMA user_version``). Numbers only grow; a store at version N applies every
    migration above N."""

    def migrate(self) -> None:
        """Create or upgrade the store to ``latest()``. Anything that is not a store of
        this engine this code can use is refused — ``NotADatabase``, ``SchemaTooNew`` —
        and left untouched (nothing written to it). Many processes migrating one new store
        at once migrate it exactly once; each migration run records a 'migrated' event
        (from_version, to_version, pid)."""
        ...

    def version(self) -> int:
        """The store's schema version."""
        ...

    def latest(self) -> int:
        """The schema version this code writes."""
        ...


#: (column names, rows) of one statement of an ad-hoc query.
AdhocResult = tuple[list[str], list[tuple[Any, ...]]]


class AdhocOps(Protocol):
    """Read-only ad-hoc queries in the engine's own dialect (``coord sql``)."""

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> list[AdhocResult]:
        """Run every statement of ``sql`` and return (column names, rows) of each one that
        has result columns, in order (columns known even without rows). The engine itself
        guarantees that nothing run here can change the store or reach outside it — writes
        (also inside a CTE), transactions, attaching other databases, setting options,
        loading extensions: ``ReadOnlyViolation``, before anything runs — never string
        matching. SQL that does not compile or bind: ``InvalidArgument``. It never blocks
        writers."""
        ...
