"""The event log: a bounded history of what happened (joined, left, died, reaped, ...).

Reading goes through the store's engine (``store.backend.events``). The writers
``log_event``, ``log_events`` and ``trim_events`` run inside an SQLite transaction of their
caller: they are the SQLite engine's, named here for the modules whose transactions are not
yet behind the engine seam (``coord.backend``'s plan), and leave with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .backend.sqlite.events import Event, log_event, log_events, trim_events

if TYPE_CHECKING:
    from .db import Row, Store

__all__ = ["Event", "list_events", "log_event", "log_events", "record_event", "trim_events"]


def record_event(store: Store, kind: str, instance_id: str | None = None,
                 subject: str | None = None, **detail: Any) -> None:
    """Record one event in its own transaction (for callers outside one, e.g. the CLI)."""
    store.backend.events.record(kind, instance_id, subject, **detail)


def list_events(
    store: Store, *, after: int = 0, limit: int = 100, oldest_first: bool = False,
    kinds: Sequence[str] | None = None, instance_id: str | None = None,
    since: float | None = None,
) -> list[Row]:
    """Events with id greater than ``after``, in id order: the newest ``limit`` of them, or
    with ``oldest_first`` the first ``limit`` (to page forward without skipping any).
    Optionally only those of the given ``kinds``, of ``instance_id``, or recorded at or after
    ``since`` (wall-clock seconds)."""
    return store.backend.events.list(after=after, limit=limit, oldest_first=oldest_first,
                                     kinds=kinds, instance_id=instance_id, since=since)
