"""Opening an SQLite store: create the file, bring its schema to this coord's version
(``.migrations``), and after a reboot apply the death rule to the old boot once. It runs
above ``Store`` (called from the engine's ``open``), so the store itself imports neither the
migrations nor the death rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import paths
from .death import rebase_boot
from .migrations import migrate

if TYPE_CHECKING:
    from ...db import Store


def open_store(store: Store) -> None:
    """Make ``store``'s database usable (inside the caller's error translation)."""
    paths.create_db_file(store.path)
    migrate(store)
    rebase_boot(store)
