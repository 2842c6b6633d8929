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
its running processes      kept and listed as orphans until they end or are killed
its instance row           a tombstone (status 'dead') while it owns queued jobs or running
                           processes; deleted when nothing remains
=========================  ===================================================================

``reap()`` is idempotent and safe beside live instances and beside another reaper: every
change re-checks its condition inside its own short transaction, in bounded batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import apsw

from .clock import boot_id
from .db import Store, fetch
from .events import log_event, trim_events
from .identity import ProcIdentity, still_running


def release_holdings(
    c: apsw.Connection, store: Store, id: str, incarnation: int, *, reason: str
) -> dict[str, int]:
    """Release what (id, incarnation) holds, inside the caller's transaction."""
    now_mono, now_wall = store.mono(), store.wall()
    counts: dict[str, int] = {}
    leases = fetch(
        c,
        "UPDATE leases SET holder_id = NULL, holder_incarnation = NULL, expires_mono = NULL "
        "WHERE holder_id = ? AND holder_incarnation = ? RETURNING name, term",
        (id, incarnation),
    )
    for lease in leases:
        c.execute(
            "UPDATE lease_terms SET released_at = ?, reason = ? WHERE name = ? AND term = ?",
            (now_wall, reason, lease["name"], lease["term"]),
        )
        log_event(c, now_wall, "lease released", id, lease["name"], term=lease["term"], reason=reason)
    counts["leases"] = len(leases)
    counts["claims"] = release_claims(
        c, now_mono, now_wall, "claimed_by = ? AND claimed_incarnation = ?", (id, incarnation),
        error=f"worker {id} {reason}",
    )
    counts["ephemeral_keys"] = len(
        c.execute(
            "DELETE FROM kv WHERE owner_id = ? AND owner_incarnation = ? RETURNING 1",
            (id, incarnation),
        ).fetchall()
    )
    # Its unanswered requests are dropped, and replies on their way to it discarded.
    counts["requests"] = len(
        c.execute(
            "DELETE FROM messages WHERE kind = 'request' AND sender_id = ? "
            "AND sender_incarnation = ? RETURNING 1",
            (id, incarnation),
        ).fetchall()
    )
    c.execute("DELETE FROM messages WHERE kind = 'reply' AND recipient_id = ?", (id,))
    # Delivered but never acknowledged: the next incarnation gets them again.
    c.execute(
        "UPDATE messages SET delivered_incarnation = NULL "
        "WHERE recipient_id = ? AND delivered_incarnation = ? AND acked = 0",
        (id, incarnation),
    )
    return counts


def release_claims(
    c: apsw.Connection,
    now_mono: float,
    now_wall: float,
    where: str,
    params: tuple[Any, ...],
    *,
    error: str,
    limit: int = -1,
) -> int:
    """Return claimed jobs matching ``where`` to ready, or dead-letter those out of attempts.

    ``where`` is a fixed SQL fragment from this package, never user input.
    """
    sel = f"SELECT id FROM jobs WHERE state = 'claimed' AND {where} LIMIT {int(limit)}"
    dead = fetch(
        c,
        "UPDATE jobs SET state = 'dead', claim_token = NULL, claimed_by = NULL, "
        "claimed_incarnation = NULL, claim_expires_mono = NULL, last_error = ?, "
        "finished_at = ?, finished_mono = ? "
        f"WHERE id IN ({sel}) AND attempts >= max_attempts RETURNING id, queue",
        (error, now_wall, now_mono, *params),
    )
    for job in dead:
        log_event(c, now_wall, "job dead-lettered", None, job["queue"], job=job["id"], error=error)
    ready = c.execute(
        "UPDATE jobs SET state = 'ready', claim_token = NULL, claimed_by = NULL, "
        "claimed_incarnation = NULL, claim_expires_mono = NULL, last_error = ?, "
        f"available_mono = ? WHERE id IN ({sel}) RETURNING 1",
        (error, now_mono, *params),
    ).fetchall()
    return len(dead) + len(ready)


def _keeps_tombstone(c: apsw.Connection, id: str) -> bool:
    return bool(
        c.execute(
            "SELECT EXISTS (SELECT 1 FROM processes WHERE instance_id = ? AND status = 'running') "
            "OR EXISTS (SELECT 1 FROM jobs JOIN queues ON queues.name = jobs.queue "
            "WHERE queues.owner_id = ? AND jobs.state IN ('ready', 'claimed'))",
            (id, id),
        ).fetchall()[0][0]
    )


def bury(
    c: apsw.Connection, store: Store, id: str, incarnation: int, *, reason: str
) -> bool:
    """Apply the death rule to (id, incarnation) inside the caller's transaction.

    ``reason`` is 'left' for a clean exit, else the verdict ('died', 'hung', 'reboot').
    Returns False when that incarnation is no longer the registered one (nothing to do).
    """
    row = fetch(
        c,
        "SELECT status FROM instances WHERE id = ? AND incarnation = ?",
        (id, incarnation),
    )
    if not row or row[0]["status"] != "alive":
        return False
    release_holdings(c, store, id, incarnation, reason=reason)
    now_wall = store.wall()
    c.execute(
        "UPDATE instances SET status = 'dead', ended_at = ?, end_reason = ? WHERE id = ?",
        (now_wall, reason, id),
    )
    if not _keeps_tombstone(c, id):
        c.execute("DELETE FROM instances WHERE id = ?", (id,))
    log_event(c, now_wall, "left" if reason == "left" else "died", id, None,
              incarnation=incarnation, reason=reason)
    return True


@dataclass
class ReapReport:
    """What one reap did (or, with dry_run, would do)."""

    dry_run: bool = False
    dead: list[dict[str, Any]] = field(default_factory=list)
    tombstones_removed: int = 0
    processes_exited: int = 0
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


def _batched(store: Store, sql: str, params: tuple[Any, ...], dry_run: bool, count_sql: str) -> int:
    """Run a ``... LIMIT ?`` statement in batches until it changes nothing."""
    if dry_run:
        return int(store.value(count_sql, params))
    total = 0
    batch = store.config.reap_batch
    while True:
        n = store.write(lambda c: len(c.execute(sql, (*params, batch)).fetchall()))
        total += n
        if n < batch:
            return total


def reap(store: Store, *, dry_run: bool = False, checkpoint: bool = True) -> ReapReport:
    """Apply the death rule to every dead instance and expire what has expired."""
    from .instances import judge

    report = ReapReport(dry_run=dry_run)
    cfg = store.config
    now = store.mono()
    for row in store.rows("SELECT * FROM instances WHERE status = 'alive'"):
        alive, verdict = judge(store, row, now)
        if alive:
            continue
        if dry_run or store.write(_burier(store, row, verdict)):
            report.dead.append({"id": row["id"], "incarnation": row["incarnation"], "reason": verdict})

    # Processes whose identity no longer matches have ended: never signal them.
    running = store.rows(
        "SELECT id, pid, start_token, boot_id FROM processes WHERE status = 'running'"
    )
    gone = [p["id"] for p in running
            if not still_running(ProcIdentity(p["boot_id"], p["pid"], p["start_token"]))]
    if gone and not dry_run:
        wall = store.wall()
        for i in range(0, len(gone), cfg.reap_batch):
            chunk = gone[i : i + cfg.reap_batch]
            store.write(_mark_exited(chunk, wall))
    report.processes_exited = len(gone)

    now_mono, now_wall = store.mono(), store.wall()
    # Hung workers: claims past their lease.
    if dry_run:
        report.claims_released = int(store.value(
            "SELECT count(*) FROM jobs WHERE state = 'claimed' AND claim_expires_mono < ?", (now_mono,)))
    else:
        while True:
            n = store.write(lambda c: release_claims(
                c, now_mono, now_wall, "claim_expires_mono < ?", (now_mono,),
                error="claim lease expired", limit=cfg.reap_batch))
            report.claims_released += n
            if n < cfg.reap_batch:
                break
    # Hung holders: leases past their TTL.
    if dry_run:
        report.leases_expired = int(store.value(
            "SELECT count(*) FROM leases WHERE holder_id IS NOT NULL AND expires_mono < ?", (now_mono,)))
    else:
        report.leases_expired = store.write(lambda c: _expire_leases(c, now_mono, now_wall))
    report.messages_expired = _batched(
        store,
        "DELETE FROM messages WHERE rowid IN (SELECT rowid FROM messages WHERE expires_mono < ? LIMIT ?) RETURNING 1",
        (now_mono,), dry_run, "SELECT count(*) FROM messages WHERE expires_mono < ?",
    )
    report.jobs_purged = _batched(
        store,
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN ('done', 'dead', 'cancelled') "
        "AND finished_mono < ? LIMIT ?) RETURNING 1",
        (now_mono - cfg.result_retention,), dry_run,
        "SELECT count(*) FROM jobs WHERE state IN ('done', 'dead', 'cancelled') AND finished_mono < ?",
    )
    # Tombstones with nothing left to keep them.
    tombs = [r["id"] for r in store.rows("SELECT id FROM instances WHERE status = 'dead'")]
    for tid in tombs:
        if dry_run:
            keep = bool(store.value(
                "SELECT EXISTS (SELECT 1 FROM processes WHERE instance_id = ? AND status = 'running') "
                "OR EXISTS (SELECT 1 FROM jobs JOIN queues ON queues.name = jobs.queue "
                "WHERE queues.owner_id = ? AND jobs.state IN ('ready', 'claimed'))", (tid, tid)))
            report.tombstones_removed += 0 if keep else 1
        elif store.write(_tomb_dropper(store, tid)):
            report.tombstones_removed += 1
    if not dry_run:
        report.events_trimmed = store.write(
            lambda c: trim_events(c, now_wall=store.wall(), max_rows=cfg.events_max_rows,
                                  max_age=cfg.events_max_age))
        if checkpoint:
            # PASSIVE: never waits for readers, so it never blocks writers (heartbeats).
            store.conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return report


def _mark_exited(ids: list[int], wall: float) -> Callable[[apsw.Connection], None]:
    def txn(c: apsw.Connection) -> None:
        c.executemany(
            "UPDATE processes SET status = 'exited', ended_at = ? WHERE id = ? AND status = 'running'",
            [(wall, i) for i in ids],
        )

    return txn


def _burier(store: Store, row: dict[str, Any], verdict: str) -> Callable[[apsw.Connection], bool]:
    return lambda c: _bury_if_still_dead(c, store, row, verdict)


def _tomb_dropper(store: Store, id: str) -> Callable[[apsw.Connection], bool]:
    return lambda c: _drop_tombstone(c, store, id)


def _bury_if_still_dead(c: apsw.Connection, store: Store, row: dict[str, Any], verdict: str) -> bool:
    from .instances import judge

    fresh = fetch(c, "SELECT * FROM instances WHERE id = ? AND incarnation = ?",
                  (row["id"], row["incarnation"]))
    if not fresh or fresh[0]["status"] != "alive" or judge(store, fresh[0])[0]:
        return False
    return bury(c, store, row["id"], row["incarnation"], reason=verdict)


def _drop_tombstone(c: apsw.Connection, store: Store, id: str) -> bool:
    rows = fetch(c, "SELECT status FROM instances WHERE id = ?", (id,))
    if not rows or rows[0]["status"] != "dead" or _keeps_tombstone(c, id):
        return False
    c.execute("DELETE FROM instances WHERE id = ?", (id,))
    log_event(c, store.wall(), "reaped", id)
    return True


def _expire_leases(c: apsw.Connection, now_mono: float, now_wall: float) -> int:
    expired = fetch(
        c,
        "UPDATE leases SET holder_id = NULL, holder_incarnation = NULL, expires_mono = NULL "
        "WHERE holder_id IS NOT NULL AND expires_mono < ? RETURNING name, term",
        (now_mono,),
    )
    for lease in expired:
        c.execute("UPDATE lease_terms SET released_at = ?, reason = 'expired' "
                  "WHERE name = ? AND term = ?", (now_wall, lease["name"], lease["term"]))
        log_event(c, now_wall, "lease expired", None, lease["name"], term=lease["term"])
    return len(expired)


def rebase_boot(store: Store) -> bool:
    """After a reboot every instance of the old boot is dead and every *_mono value
    meaningless: apply the death rule to all of them and rebase the clocks, once."""
    current = boot_id()
    if store.value("SELECT value FROM meta WHERE key = 'boot_id'") == current:
        return False

    def txn(c: apsw.Connection) -> bool:
        rows = fetch(c, "SELECT value FROM meta WHERE key = 'boot_id'")
        if rows and rows[0]["value"] == current:
            return False
        now_mono, now_wall = store.mono(), store.wall()
        for inst in fetch(c, "SELECT id, incarnation FROM instances WHERE status = 'alive'"):
            bury(c, store, inst["id"], inst["incarnation"], reason="reboot")
        c.execute("UPDATE processes SET status = 'exited', ended_at = ? WHERE status = 'running'",
                  (now_wall,))
        release_claims(c, now_mono, now_wall, "1", (), error="reboot")
        c.execute("UPDATE leases SET holder_id = NULL, holder_incarnation = NULL, expires_mono = NULL")
        # Remaining times carry over through the wall clock; a delayed job becomes due now.
        c.execute("UPDATE messages SET expires_mono = ? + (expires_at - ?)", (now_mono, now_wall))
        c.execute("UPDATE jobs SET available_mono = ? WHERE state = 'ready'", (now_mono,))
        c.execute("UPDATE jobs SET finished_mono = ? - (? - finished_at) WHERE finished_at IS NOT NULL",
                  (now_mono, now_wall))
        c.execute("UPDATE instances SET heartbeat_mono = ? - (? - heartbeat_at)", (now_mono, now_wall))
        c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('boot_id', ?)", (current,))
        log_event(c, now_wall, "reboot", None, None, boot_id=current)
        return True

    return store.write(txn)
