"""What `coord watch` shows: one snapshot of instances, leases, queues and recent events,
and the queue rates between two snapshots.

A snapshot is plain rows (dicts with the CLI's JSON words); drawing them is the CLI's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .db import Store

__all__ = ["Snapshot", "snapshot"]


@dataclass
class Snapshot:
    """Rows for each pane of the dashboard, taken at ``taken`` (monotonic seconds)."""

    taken: float
    instances: list[dict[str, Any]] = field(default_factory=list)
    leases: list[dict[str, Any]] = field(default_factory=list)
    queues: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def rates_since(self, before: Snapshot | None) -> None:
        """Set each queue's ``rate``: jobs finished (done or dead) per second since
        ``before`` (None on the first snapshot or for a new queue)."""
        old = {q["id"]: q for q in (before.queues if before else [])}
        dt = self.taken - before.taken if before else 0.0
        for q in self.queues:
            prev = old.get(q["id"])
            finished = q["done"] + q["dead"]
            q["rate"] = (None if prev is None or dt <= 0
                         else max(0.0, (finished - prev["done"] - prev["dead"]) / dt))


def snapshot(store: Store, *, events: int = 10) -> Snapshot:
    """The dashboard's rows now: instances that are alive or not yet reaped (with RSS, CPU
    and heartbeat age of live ones), leases, queues, and the last ``events`` events."""
    from .discovery import live_figures
    from .events import list_events
    from .instances import list_instances
    from .leases import list_leases
    from .queues import stats

    snap = Snapshot(taken=time.monotonic())
    for i in list_instances(store, include_dead=True):
        row = {"id": i.id, "app": i.app, "pid": i.pid, "alive": i.alive, "status": i.status,
               "heartbeat_age": i.heartbeat_age, "rss": None, "cpu_percent": None}
        if i.alive:
            figures = live_figures(i.pid)
            row["rss"], row["cpu_percent"] = figures.get("rss"), figures.get("cpu_percent")
        snap.instances.append(row)
    for lease in list_leases(store):
        snap.leases.append({"id": lease.name, "instance_id": lease.holder, "term": lease.term,
                            "alive": lease.alive, "expires_in": lease.expires_in})
    for q in stats(store):
        snap.queues.append({"id": q.id, "instance_id": q.instance_id, "ready": q.ready,
                            "delayed": q.delayed, "claimed": q.claimed, "dead": q.dead,
                            "done": q.done, "rate": None})
    snap.events = list_events(store, limit=events)
    return snap
