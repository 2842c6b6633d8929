"""The death rule, applied in one place, and the reaper that applies it to everyone.

When an instance dies (proof of death, or heartbeat TTL when hung), in one transaction:

=========================  ===================================================================
what it held               what happens
=========================  ===================================================================
leases                     released at once; the next candidate takes over with a higher term
claimed jobs               back to ready at once (the attempt was counted at claim); dead-
                           lettered instead when it was the last attempt
ephemeral keys             deleted at once
messages addressed to it   kept until their TTL (a restart with the same id still gets them);
                           delivered-but-unacked ones are offered again
pending requests it sent   dropped, and replies addressed to it discarded
its private queue          kept; ``coord queue adopt`` moves it
its process tree           a `coord run`/`elect`/`lock` wrapper's recorded tree (CMD, every
                           descendant, the recorded groups) is ended: TERM, grace, KILL,
                           identity checked; a lease row keeps the recorded group until it
                           is proven empty (``coord.tree``; not with ``run --keep-children``)
its tracked processes      (``track``/``spawn``) kept and listed as orphans until they end or
                           are killed
its instance row           a tombstone (status 'dead') while it owns queued jobs or running
                           processes; deleted when nothing remains
=========================  ===================================================================

``reap()`` is idempotent and safe beside live instances and beside another reaper: every
change re-checks its condition inside its own short transaction, in bounded batches.
Each state change is the store's engine's (``store.backend.death``); this module holds the
policy: what to apply when, in which batches, and what a dry run counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .db import Row, Store
from .identity import ProcIdentity, still_running

__all__ = ["ReapReport", "bury_dead", "checkpoint_wal", "reap"]


@dataclass
class ReapReport:
    """What one reap did (or, with dry_run, would do)."""

    dry_run: bool = False
    dead: list[dict[str, Any]] = field(default_factory=list)
    tombstones_removed: int = 0
    processes_exited: int = 0
    trees_ended: int = 0  # dead instances whose process trees were ended (TERM, grace, KILL)
    claims_released: int = 0
    leases_expired: int = 0
    messages_expired: int = 0
    jobs_purged: int = 0
    events_trimmed: int = 0

    @property
    def did_something(self) -> bool:
        return any(v for k, v in asdict(self).items() if k != "dry_run")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _batched(step: Callable[[int], int], batch: int) -> int:
    """Run ``step(batch)`` until it changes fewer than ``batch`` rows; the total changed."""
    total = 0
    while True:
        n = step(batch)
        total += n
        if n < batch:
            return total


def reap(store: Store, *, dry_run: bool = False, checkpoint: bool = True,
         trees: bool = True) -> ReapReport:
    """Apply the death rule to every dead instance and expire what has expired.

    ``trees``: also end the recorded process trees of dead `coord run`/`elect`/`lock`
    instances (``coord.tree.end_dead_trees``; it waits up to the kill grace). The elected
    reaper passes False and does that in a thread of its own, off the heartbeat."""
    report = ReapReport(dry_run=dry_run)
    cfg = store.config
    batch = max(1, cfg.reap_batch)
    death, liveness = store.backend.death, store.backend.liveness
    look = liveness.look()
    dead: dict[str, list[Row]] = {}
    for row in death.alive():
        alive, verdict = liveness.judge(row, look)
        if not alive:
            dead.setdefault(verdict, []).append(row)
    for verdict, rows in dead.items():
        for i in range(0, len(rows), batch):
            part = rows[i : i + batch]
            if dry_run:
                buried = {(r["id"], r["incarnation"]) for r in part}
            else:
                buried = set(death.bury(part, verdict))
            report.dead += [{"id": r["id"], "incarnation": r["incarnation"], "reason": verdict}
                            for r in part if (r["id"], r["incarnation"]) in buried]

    if trees and not dry_run:
        from .tree import end_dead_trees

        report.trees_ended = len(end_dead_trees(store))
    elif trees:
        from .tree import dead_trees

        report.trees_ended = sum(1 for t in dead_trees(store) if t.members or t.groups)
    # Processes whose identity no longer matches have ended: never signal them.
    gone = [p["id"] for p in death.running_processes()
            if not still_running(ProcIdentity(p["boot_id"], p["pid"], p["start_token"]))]
    if gone and not dry_run:
        for i in range(0, len(gone), batch):
            death.mark_exited(gone[i : i + batch])
    report.processes_exited = len(gone)

    if dry_run:
        would = death.expired(cfg.result_retention)
        report.claims_released = would["claims"]  # hung workers: claims past their lease
        report.leases_expired = store.backend.leases.lapsed()  # hung holders: past their TTL
        report.messages_expired = would["messages"]
        report.jobs_purged = would["jobs"]
    else:
        report.claims_released = _batched(death.release_expired_claims, batch)
        report.leases_expired = store.backend.leases.expire()
        report.messages_expired = _batched(death.expire_messages, batch)
        report.jobs_purged = _batched(
            lambda n: death.purge_finished_jobs(cfg.result_retention, n), batch)
    # Tombstones with nothing left to keep them.
    tombs = death.tombstones()
    for i in range(0, len(tombs), batch):
        ids = tombs[i : i + batch]
        if dry_run:
            kept = death.keeping(ids)
            report.tombstones_removed += sum(1 for t in ids if t not in kept)
        else:
            report.tombstones_removed += death.drop_tombstones(ids)
    if not dry_run:
        report.events_trimmed = death.trim_events(cfg.events_max_rows, cfg.events_max_age)
        if checkpoint:
            checkpoint_wal(store)
    return report


def checkpoint_wal(store: Store) -> tuple[int, int, int]:
    """Copy the engine's log back into the database, and shrink it when nobody is in the
    way; never blocks writers (``store.backend.death.checkpoint``). Returns SQLite's (busy,
    log frames, checkpointed frames) of the last attempt."""
    return store.backend.death.checkpoint()


def bury_dead(store: Store, rows: Sequence[Row], verdict: str) -> list[tuple[str, int]]:
    """Apply the death rule now to instance rows found dead with ``verdict`` (re-checked
    inside one transaction): for whoever notices a death first, e.g. a claimer finding a
    dead instance's claims, so they are released at once and not after a lease."""
    return store.backend.death.bury(rows, verdict)
