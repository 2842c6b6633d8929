"""The SQLite engine's death rule: each state change of ``coord.reaper``'s table, written
once (see ``coord.reaper`` for the rule and the policy that applies it).

The functions taking a connection run inside the caller's transaction, so another state
change (a takeover, a claim finding its holder dead, an ephemeral key meeting a dead owner)
applies the rule in the same transaction; ``SqliteDeathRule`` is the protocol's face of
them, one short transaction each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import apsw

from ...clock import boot_id
from ..records import Member
from .connection import fetch
from .events import Event, log_event, log_events, trim_events
from .lease_rows import forget_boot, free_held

if TYPE_CHECKING:
    from ...db import Row, Store
    from .liveness import SqliteLiveness

#: SQL for "the (id, incarnation) pairs in the JSON array bound here": [[id, inc], ...].
_MEMBERS = "SELECT value->>0, value->>1 FROM json_each(?)"
_MEMBER_IDS = "SELECT value->>0 FROM json_each(?)"

_FINISHED = "state IN ('done', 'dead', 'cancelled') AND finished_mono < ?"


def _pairs(members: Iterable[Member]) -> str:
    return json.dumps([[i, n] for i, n in members])


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
    """Return claimed jobs matching ``where`` to ready, or dead-letter those out of attempts:
    the one "back to ready". ``where`` is a fixed SQL fragment from this package, never
    user input.
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


def release_holdings_many(
    c: apsw.Connection, store: Store, members: Sequence[Member], *, reason: str
) -> dict[str, int]:
    """Release what each (id, incarnation) in ``members`` holds, inside the caller's
    transaction: one set-based statement per kind of holding, so burying a batch of
    hundreds costs a handful of statements. A capability that binds something new to
    (id, incarnation) releases it here."""
    now_mono, now_wall = store.mono(), store.wall()
    pairs = _pairs(members)
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


def kept(c: apsw.Connection, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` still own something that keeps a tombstone: running processes, or a
    private queue with ready or claimed jobs."""
    if not ids:
        return set()
    rows = c.execute(
        "SELECT DISTINCT instance_id FROM processes WHERE status = 'running' "
        "AND instance_id IN (SELECT value FROM json_each(?1)) "
        "UNION SELECT DISTINCT q.owner_id FROM queues q "
        "WHERE q.owner_id IN (SELECT value FROM json_each(?1)) AND EXISTS "
        "(SELECT 1 FROM jobs j WHERE j.queue = q.name AND j.state IN ('ready', 'claimed'))",
        (json.dumps(list(ids)),),
    ).fetchall()
    return {str(r[0]) for r in rows}


def bury(c: apsw.Connection, store: Store, id: str, incarnation: int, *, reason: str) -> bool:
    """Apply the death rule to (id, incarnation) inside the caller's transaction.

    ``reason`` is 'left' for a clean exit, else the verdict ('died', 'hung', 'reboot').
    Returns False when that incarnation is no longer the registered one (nothing to do).
    """
    return bool(bury_many(c, store, [(id, incarnation)], reason=reason))


def bury_many(
    c: apsw.Connection, store: Store, members: Sequence[Member], *, reason: str
) -> list[Member]:
    """``bury`` for a batch, in set-based statements; returns the members it buried (those
    still registered as alive with that incarnation — so a second reaper buries nothing).

    Events: 'left' for a clean exit, else 'died'; 'reaped' when the row goes at once because
    nothing keeps a tombstone (a clean exit's row just goes)."""
    if not members:
        return []
    live = [
        (str(r[0]), int(r[1]))  # type: ignore[arg-type]
        for r in c.execute(
            "SELECT id, incarnation FROM instances "
            f"WHERE status = 'alive' AND (id, incarnation) IN ({_MEMBERS})",
            (_pairs(members),),
        ).fetchall()
    ]
    if not live:
        return []
    release_holdings_many(c, store, live, reason=reason)
    now_wall = store.wall()
    c.execute(
        "UPDATE instances SET status = 'dead', ended_at = ?1, end_reason = ?2 WHERE (id, incarnation) "
        "IN (SELECT value->>0, value->>1 FROM json_each(?3))",
        (now_wall, reason, _pairs(live)),
    )
    keep = kept(c, [i for i, _ in live])
    gone = [i for i, _ in live if i not in keep]
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


def bury_if_still_dead(
    c: apsw.Connection, store: Store, rows: Sequence[Row], verdict: str
) -> list[Member]:
    """Bury the rows judged dead, re-checked inside the transaction: a death proven by the
    kernel is final, so only the incarnation (no takeover since) is re-checked; a 'hung'
    verdict is re-checked against a heartbeat that may have come in since."""
    members = [(r["id"], r["incarnation"]) for r in rows]
    if verdict == "hung":
        fresh = fetch(
            c,
            "SELECT id, incarnation FROM instances WHERE status = 'alive' AND (id, incarnation) "
            "IN (SELECT value->>0, value->>1 FROM json_each(?1)) AND ?2 - heartbeat_mono > ttl",
            (json.dumps(members), store.mono()),
        )
        members = [(r["id"], r["incarnation"]) for r in fresh]
    return bury_many(c, store, members, reason=verdict)


class SqliteDeathRule:
    """``coord.backend.DeathRule``: one short transaction per call."""

    def __init__(self, store: Store, liveness: SqliteLiveness) -> None:
        self._store = store
        self._liveness = liveness

    def alive(self) -> list[Row]:
        return self._store.rows(
            "SELECT id, incarnation, status, end_reason, boot_id, pidns, pid, start_token, "
            "lock_path, nudge_path, heartbeat_mono, ttl FROM instances WHERE status = 'alive'")

    def bury(self, rows: Sequence[Row], verdict: str) -> list[Member]:
        store = self._store
        buried = store.write(lambda c: bury_if_still_dead(c, store, rows, verdict))
        done = set(buried)
        # Their lock files and sockets are nobody's now.
        self._liveness.forget(r for r in rows if (r["id"], r["incarnation"]) in done)
        return buried

    def running_processes(self) -> list[Row]:
        return self._store.rows(
            "SELECT id, pid, start_token, boot_id FROM processes WHERE status = 'running'")

    def mark_exited(self, ids: Sequence[int]) -> None:
        wall = self._store.wall()
        self._store.write(lambda c: c.executemany(
            "UPDATE processes SET status = 'exited', ended_at = ? WHERE id = ? AND status = 'running'",
            [(wall, i) for i in ids]))

    def expired(self, retention: float) -> dict[str, int]:
        now, value = self._store.mono(), self._store.value
        return {
            "claims": int(value("SELECT count(*) FROM jobs WHERE state = 'claimed' "
                                "AND claim_expires_mono < ?", (now,))),
            "messages": int(value("SELECT count(*) FROM messages WHERE expires_mono < ?", (now,))),
            "jobs": int(value(f"SELECT count(*) FROM jobs WHERE {_FINISHED}",
                              (now - retention,))),
        }

    def release_expired_claims(self, limit: int) -> int:
        store = self._store
        now_mono, now_wall = store.mono(), store.wall()
        return store.write(lambda c: release_claims(
            c, now_mono, now_wall, "claim_expires_mono < ?", (now_mono,),
            error="claim lease expired", limit=limit))

    def _delete(self, sql: str, params: tuple[Any, ...]) -> int:
        return self._store.write(lambda c: len(c.execute(sql, params).fetchall()))

    def expire_messages(self, limit: int) -> int:
        return self._delete(
            "DELETE FROM messages WHERE rowid IN (SELECT rowid FROM messages "
            "WHERE expires_mono < ? LIMIT ?) RETURNING 1", (self._store.mono(), limit))

    def purge_finished_jobs(self, retention: float, limit: int) -> int:
        return self._delete(
            f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {_FINISHED} "
            "LIMIT ?) RETURNING 1", (self._store.mono() - retention, limit))

    def tombstones(self) -> list[str]:
        return [r["id"] for r in self._store.rows("SELECT id FROM instances WHERE status = 'dead'")]

    def keeping(self, ids: Sequence[str]) -> set[str]:
        return kept(self._store.conn(), ids)

    def drop_tombstones(self, ids: Sequence[str]) -> int:
        store = self._store

        def txn(c: apsw.Connection) -> int:
            found = [str(r[0]) for r in c.execute(
                "SELECT id FROM instances WHERE status = 'dead' "
                "AND id IN (SELECT value FROM json_each(?))", (json.dumps(list(ids)),))]
            keep = kept(c, found)
            gone = [i for i in found if i not in keep]
            if gone:
                c.execute("DELETE FROM instances WHERE id IN (SELECT value FROM json_each(?))",
                          (json.dumps(gone),))
                wall = store.wall()
                log_events(c, [(wall, "reaped", i, None, {}) for i in gone])
            return len(gone)

        return store.write(txn)

    def trim_events(self, max_rows: int, max_age: float) -> int:
        store = self._store
        return store.write(lambda c: trim_events(c, now_wall=store.wall(), max_rows=max_rows,
                                                 max_age=max_age))

    def checkpoint(self) -> tuple[int, int, int]:
        # PASSIVE never waits for anyone, so it never blocks writers (heartbeats). Under
        # constant traffic some reader always pins old frames and the WAL never restarts, so
        # a TRUNCATE is then tried with a zero busy timeout: it succeeds only at a quiet
        # instant and otherwise gives up at once.
        result = self._store.checkpoint("PASSIVE")
        if result[1] > 0:  # frames in the WAL: try to empty it
            result = self._store.checkpoint("TRUNCATE", wait_ms=0)
        return result

    def rebase_boot(self) -> bool:
        return rebase_boot(self._store)


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
