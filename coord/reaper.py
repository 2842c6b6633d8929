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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import apsw

from .backend.sqlite.lease_rows import forget_boot, free_held
from .clock import boot_id
from .db import Row, Store, fetch
from .events import Event, log_event, log_events, trim_events
from .identity import ProcIdentity, still_running

#: SQL for "the (id, incarnation) pairs in the JSON array bound here": [[id, inc], ...].
_MEMBERS = "SELECT value->>0, value->>1 FROM json_each(?)"
_MEMBER_IDS = "SELECT value->>0 FROM json_each(?)"


def release_holdings(
    c: apsw.Connection, store: Store, id: str, incarnation: int, *, reason: str
) -> dict[str, int]:
    """Release what (id, incarnation) holds, inside the caller's transaction."""
    return release_holdings_many(c, store, [(id, incarnation)], reason=reason)


def release_holdings_many(
    c: apsw.Connection, store: Store, members: Sequence[tuple[str, int]], *, reason: str
) -> dict[str, int]:
    """Release what each (id, incarnation) in ``members`` holds, inside the caller's
    transaction: one set-based statement per kind of holding, so burying a batch of
    hundreds costs a handful of statements. This is the death rule's one place: a capability
    that binds something new to (id, incarnation) releases it here."""
    now_mono, now_wall = store.mono(), store.wall()
    pairs = json.dumps([[i, n] for i, n in members])
    counts: dict[str, int] = {}
    counts["leases"] = free_held(c, members, reason, now_wall)
    # Claims: find the holders with claims (few), then release each with its own error text.
    claimers = fetch(
        c,
        "SELECT DISTINCT claimed_by, claimed_incarnation FROM jobs WHERE state = 'claimed' "
        f"AND (claimed_by, claimed_incarnation) IN ({_MEMBERS})",
        (pairs,),
    )
    counts["claims"] = sum(
        release_claims(
            c, now_mono, now_wall, "claimed_by = ? AND claimed_incarnation = ?",
            (h["claimed_by"], h["claimed_incarnation"]), error=f"worker {h['claimed_by']} {reason}",
        )
        for h in claimers
    )
    counts["ephemeral_keys"] = len(
        c.execute(
            f"DELETE FROM kv WHERE (owner_id, owner_incarnation) IN ({_MEMBERS}) RETURNING 1",
            (pairs,),
        ).fetchall()
    )
    # Its unanswered requests are dropped, and replies on their way to it discarded.
    counts["requests"] = len(
        c.execute(
            "DELETE FROM messages WHERE kind = 'request' "
            f"AND (sender_id, sender_incarnation) IN ({_MEMBERS}) RETURNING 1",
            (pairs,),
        ).fetchall()
    )
    c.execute(f"DELETE FROM messages WHERE kind = 'reply' AND recipient_id IN ({_MEMBER_IDS})",
              (pairs,))
    # Delivered but never acknowledged: the next incarnation gets them again.
    c.execute(
        "UPDATE messages SET delivered_incarnation = NULL "
        f"WHERE acked = 0 AND (recipient_id, delivered_incarnation) IN ({_MEMBERS})",
        (pairs,),
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
    return id in _kept(c, [id])


def _kept(c: apsw.Connection, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` still own something that keeps a tombstone: running processes, or a
    private queue with ready or claimed jobs."""
    if not ids:
        return set()
    arr = json.dumps(list(ids))
    rows = c.execute(
        "SELECT DISTINCT instance_id FROM processes WHERE status = 'running' "
        "AND instance_id IN (SELECT value FROM json_each(?1)) "
        "UNION SELECT DISTINCT q.owner_id FROM queues q "
        "WHERE q.owner_id IN (SELECT value FROM json_each(?1)) AND EXISTS "
        "(SELECT 1 FROM jobs j WHERE j.queue = q.name AND (j.state = 'ready' OR j.state = 'claimed'))",
        (arr,),
    ).fetchall()
    return {str(r[0]) for r in rows}


def bury(
    c: apsw.Connection, store: Store, id: str, incarnation: int, *, reason: str
) -> bool:
    """Apply the death rule to (id, incarnation) inside the caller's transaction.

    ``reason`` is 'left' for a clean exit, else the verdict ('died', 'hung', 'reboot').
    Returns False when that incarnation is no longer the registered one (nothing to do).
    """
    return bool(bury_many(c, store, [(id, incarnation)], reason=reason))


def bury_many(
    c: apsw.Connection, store: Store, members: Sequence[tuple[str, int]], *, reason: str
) -> list[tuple[str, int]]:
    """``bury`` for a batch, in set-based statements; returns the members it buried (those
    still registered as alive with that incarnation — so a second reaper buries nothing).

    Events: 'left' for a clean exit, else 'died'; 'reaped' when the row goes at once because
    nothing keeps a tombstone (a clean exit's row just goes)."""
    if not members:
        return []
    pairs = json.dumps([[i, n] for i, n in members])
    live = [
        (str(r[0]), int(r[1]))  # type: ignore[arg-type]
        for r in c.execute(
            "SELECT id, incarnation FROM instances "
            f"WHERE status = 'alive' AND (id, incarnation) IN ({_MEMBERS})",
            (pairs,),
        ).fetchall()
    ]
    if not live:
        return []
    release_holdings_many(c, store, live, reason=reason)
    now_wall = store.wall()
    live_pairs = json.dumps([[i, n] for i, n in live])
    c.execute(
        "UPDATE instances SET status = 'dead', ended_at = ?1, end_reason = ?2 WHERE (id, incarnation) "
        "IN (SELECT value->>0, value->>1 FROM json_each(?3))",
        (now_wall, reason, live_pairs),
    )
    kept = _kept(c, [i for i, _ in live])
    gone = [i for i, _ in live if i not in kept]
    if gone:
        c.execute("DELETE FROM instances WHERE id IN (SELECT value FROM json_each(?))",
                  (json.dumps(gone),))
    kind = "left" if reason == "left" else "died"
    events: list[Event] = [(now_wall, kind, i, None, {"incarnation": n, "reason": reason})
                           for i, n in live]
    if kind == "died":
        events += [(now_wall, "reaped", i, None, {}) for i in gone]
    log_events(c, events)
    return live


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


def reap(store: Store, *, dry_run: bool = False, checkpoint: bool = True,
         trees: bool = True) -> ReapReport:
    """Apply the death rule to every dead instance and expire what has expired.

    ``trees``: also end the recorded process trees of dead `coord run`/`elect`/`lock`
    instances (``coord.tree.end_dead_trees``; it waits up to the kill grace). The elected
    reaper passes False and does that in a thread of its own, off the heartbeat."""
    from .instances import Probe, _unlink_many, judge

    report = ReapReport(dry_run=dry_run)
    cfg = store.config
    batch = max(1, cfg.reap_batch)
    now, probe = store.mono(), Probe()
    dead: dict[str, list[Row]] = {}
    for row in store.rows(
        "SELECT id, incarnation, status, end_reason, boot_id, pidns, pid, start_token, "
        "lock_path, nudge_path, heartbeat_mono, ttl FROM instances WHERE status = 'alive'"
    ):
        alive, verdict = judge(store, row, now, probe=probe)
        if not alive:
            dead.setdefault(verdict, []).append(row)
    for verdict, rows in dead.items():
        for i in range(0, len(rows), batch):
            part = rows[i : i + batch]
            if dry_run:
                buried = {(r["id"], r["incarnation"]) for r in part}
            else:
                buried = set(store.write(_burier(store, part, verdict)))
            done = [r for r in part if (r["id"], r["incarnation"]) in buried]
            report.dead += [{"id": r["id"], "incarnation": r["incarnation"], "reason": verdict}
                            for r in done]
            if not dry_run:  # their lock files and sockets are nobody's now
                _unlink_many(p for r in done for p in (r["lock_path"], r["nudge_path"]))

    if trees and not dry_run:
        from .tree import end_dead_trees

        report.trees_ended = len(end_dead_trees(store))
    elif trees:
        from .tree import dead_trees

        report.trees_ended = sum(1 for t in dead_trees(store) if t.members or t.groups)
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
        report.leases_expired = store.backend.leases.lapsed()
    else:
        report.leases_expired = store.backend.leases.expire()
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
    for i in range(0, len(tombs), batch):
        ids = tombs[i : i + batch]
        if dry_run:
            kept = _kept(store.conn(), ids)
            report.tombstones_removed += sum(1 for t in ids if t not in kept)
        else:
            report.tombstones_removed += store.write(_tomb_dropper(store, ids))
    if not dry_run:
        report.events_trimmed = store.write(
            lambda c: trim_events(c, now_wall=store.wall(), max_rows=cfg.events_max_rows,
                                  max_age=cfg.events_max_age))
        if checkpoint:
            checkpoint_wal(store)
    return report


def checkpoint_wal(store: Store) -> tuple[int, int, int]:
    """Copy the WAL back into the database, and shrink it when nobody is in the way.

    PASSIVE never waits for anyone, so it never blocks writers (heartbeats). Under constant
    traffic some reader always pins old frames and the WAL never restarts, so a TRUNCATE is
    then tried with a zero busy timeout: it succeeds only at a quiet instant and otherwise
    gives up at once instead of holding every writer behind a waiting checkpoint.
    Returns SQLite's (busy, log frames, checkpointed frames) of the last attempt.
    """
    result = store.checkpoint("PASSIVE")
    if result[1] > 0:  # frames in the WAL: try to empty it
        result = store.checkpoint("TRUNCATE", wait_ms=0)
    return result


def _mark_exited(ids: list[int], wall: float) -> Callable[[apsw.Connection], None]:
    def txn(c: apsw.Connection) -> None:
        c.executemany(
            "UPDATE processes SET status = 'exited', ended_at = ? WHERE id = ? AND status = 'running'",
            [(wall, i) for i in ids],
        )

    return txn


def _burier(store: Store, rows: list[Row], verdict: str) -> Callable[[apsw.Connection], list[tuple[str, int]]]:
    return lambda c: _bury_if_still_dead(c, store, rows, verdict)


def bury_dead(store: Store, rows: list[Row], verdict: str) -> list[tuple[str, int]]:
    """Apply the death rule now to instance rows that ``judge`` found dead with ``verdict``
    (re-checked inside one transaction): for whoever notices a death first, e.g. a claimer
    finding a dead instance's claims, so they are released at once and not after a lease."""
    return store.write(_burier(store, rows, verdict))


def _tomb_dropper(store: Store, ids: list[str]) -> Callable[[apsw.Connection], int]:
    return lambda c: _drop_tombstones(c, store, ids)


def _bury_if_still_dead(
    c: apsw.Connection, store: Store, rows: list[Row], verdict: str
) -> list[tuple[str, int]]:
    """Bury the rows judged dead, re-checked inside the transaction: a death proven by the
    kernel is final, so only the incarnation (no takeover since) is re-checked; a 'hung'
    verdict is re-checked against a heartbeat that may have come in since."""
    members = [(r["id"], r["incarnation"]) for r in rows]
    if verdict == "hung":
        now = store.mono()
        fresh = fetch(
            c,
            "SELECT id, incarnation FROM instances WHERE status = 'alive' AND (id, incarnation) "
            "IN (SELECT value->>0, value->>1 FROM json_each(?1)) AND ?2 - heartbeat_mono > ttl",
            (json.dumps(members), now),
        )
        members = [(r["id"], r["incarnation"]) for r in fresh]
    return bury_many(c, store, members, reason=verdict)


def _drop_tombstones(c: apsw.Connection, store: Store, ids: list[str]) -> int:
    found = [str(r[0]) for r in c.execute(
        "SELECT id FROM instances WHERE status = 'dead' AND id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    )]
    kept = _kept(c, found)
    gone = [i for i in found if i not in kept]
    if gone:
        c.execute("DELETE FROM instances WHERE id IN (SELECT value FROM json_each(?))",
                  (json.dumps(gone),))
        wall = store.wall()
        log_events(c, [(wall, "reaped", i, None, {}) for i in gone])
    return len(gone)


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
        # A recorded process group of the old boot names nothing now (pids start over).
        forget_boot(c)
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
