"""The SQLite engine: one database file in WAL mode, opened through apsw, on one host.

One file per capability, each holding that capability's SQL, and the engine's three
services: ``clock`` (CLOCK_MONOTONIC with the boot id), ``liveness`` (record lock, pid +
start token, pidfd) and ``wakeup`` (datagram nudge, ``PRAGMA data_version``). Opening a
store (create, migrate, boot rebase) is ``opening``; the schema ladder (``schema/sqlite/``
under ``PRAGMA user_version``) is ``migrations``, read-only ad-hoc SQL ``adhoc``. The
connections, pragmas, transactions and the translation of apsw errors are ``connection``
(``Store.write``/``rows``/``conn`` hand over to it), the fork rule for SQLite files
``forking``, the busy retry ``retry``.

Importing this package registers the engine as ``sqlite``; its modules load when the first
store is opened (so ``import coord`` stays cheap).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .. import register_engine

if TYPE_CHECKING:
    from ...db import Store
    from .engine import SqliteBackend


def _open(store: Store) -> SqliteBackend:
    from .engine import SqliteBackend

    return SqliteBackend(store)


def _refuse(path: str) -> None:
    # Only a process that has loaded the fork rule can have inherited a database open (its
    # state is what a fork copies), so one that has not needs neither it nor apsw yet.
    forking = sys.modules.get(f"{__name__}.forking")
    if forking is not None:
        forking.refuse_if_forked(path)


register_engine("sqlite", _open, _refuse)
