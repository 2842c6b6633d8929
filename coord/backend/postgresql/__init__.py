"""The PostgreSQL engine: one schema per deployment on a server shared by several hosts,
through psycopg 3 (the optional extra ``coord[postgres]``).

One file per capability, each holding that capability's SQL, and the engine's services:
``clock`` (the server's ``coord_now()``, compared only in SQL), ``liveness`` (host-local
proof of death as on SQLite for this host's instances, the server-clock heartbeat for the
others) and ``wakeup``. ``url`` parses locations with the standard library alone; the
driver is imported only when a PostgreSQL store is opened, so SQLite users pay nothing.

Importing this package registers the engine as ``postgresql``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import register_engine

if TYPE_CHECKING:
    from ...db import Store
    from .engine import PostgresBackend


def _open(store: Store) -> PostgresBackend:
    try:
        from .engine import PostgresBackend
    except ImportError as e:
        from ...errors import StorageError

        raise StorageError(store.address_shown, (
            f"the PostgreSQL driver is not installed ({e.name}): "
            "pip install 'coord[postgres]'")) from None
    assert store.location is not None
    return PostgresBackend(store, store.location)


register_engine("postgresql", _open)
