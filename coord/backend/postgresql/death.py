"""The PostgreSQL engine's death rule, inside a caller's transaction: what burying a batch
of (id, incarnation) changes in every table (see ``coord.reaper`` for the rule). The
instance rows are locked first (``FOR UPDATE``): READ COMMITTED does not serialise writers,
so two reapers, a takeover and a claim meeting a dead holder must queue on those rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..records import Member
from .connection import Conn, fetch
from .queue_rows import notify

#: "the (id, incarnation) pairs bound here as two arrays".
MEMBERS = "SELECT * FROM unnest(%s::text[], %s::bigint[])"


def split(members: Sequence[Member]) -> tuple[list[str], list[int]]:
    """Two arrays for ``MEMBERS``."""
    return [m[0] for m in members], [int(m[1]) for m in members]


def _event_rows(c: Conn, rows: Sequence[tuple[str, str | None, str | None, dict[str, Any]]]
                ) -> None:
    if rows:
        c.cursor().executemany(
            "INSERT INTO events (at, kind, instance_id, subject, detail) "
            "VALUES (coord_now(), %s, %s, %s, %s)",
            [(k, i, s, json.dumps(d, sort_keys=True)) for k, i, s, d in rows])


def release_claims(c: Conn, where: str, params: tuple[Any, ...], *, error: str,
                   limit: int | None = None) -> int:
    """Return claimed jobs matching ``where`` to ready, or dead-letter those out of attempts:
    the one "back to ready". ``where`` is a fixed SQL fragment of this package. Locked rows
    are skipped (a worker acking one now wins)."""
    lim = "" if limit is None else f" LIMIT {int(limit)}"
    sel = f"SELECT id FROM jobs WHERE state = 'claimed' AND {where}{lim} FOR UPDATE SKIP LOCKED"
    rows = fetch(
        c,
        f"WITH picked AS ({sel}) UPDATE jobs j SET "
        "state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'ready' END, "
        "claim_token = NULL, claimed_by = NULL, claimed_incarnation = NULL, "
        "claim_expires_mono = NULL, last_error = %s, "
        "finished_at = CASE WHEN j.attempts >= j.max_attempts THEN coord_now() END, "
        "finished_mono = CASE WHEN j.attempts >= j.max_attempts THEN coord_now() END, "
        "available_mono = CASE WHEN j.attempts >= j.max_attempts THEN j.available_mono "
        "ELSE coord_now() END "
        "FROM picked WHERE j.id = picked.id RETURNING j.id, j.queue, j.state",
        (*params, error))
    _event_rows(c, [("job dead-lettered", None, r["queue"], {"job": r["id"], "error": error})
                    for r in rows if r["state"] == "dead"])
    notify(c, [r["queue"] for r in rows if r["state"] == "ready"])
    return len(rows)


def release_holdings_many(c: Conn, members: Sequence[Member], *, reason: str) -> dict[str, int]:
    """Release what each member holds, in set-based statements (see the SQLite engine's
    ``release_holdings_many`` for the list)."""
    ids, incs = split(members)
    counts: dict[str, int] = {}
    held = fetch(c, "SELECT name, term, holder_id FROM leases WHERE (holder_id, "
                 f"holder_incarnation) IN ({MEMBERS}) FOR UPDATE", (ids, incs))
    for h in held:
        free_lease_row(c, h["name"], h["term"], reason)
    _event_rows(c, [("lease released", h["holder_id"], h["name"],
                     {"term": h["term"], "reason": reason}) for h in held])
    counts["leases"] = len(held)
    claimers = fetch(c, "SELECT DISTINCT claimed_by, claimed_incarnation FROM jobs "
                     f"WHERE state = 'claimed' AND (claimed_by, claimed_incarnation) IN ({MEMBERS})",
                     (ids, incs))
    counts["claims"] = sum(
        release_claims(c, "claimed_by = %s AND claimed_incarnation = %s",
                       (h["claimed_by"], h["claimed_incarnation"]),
                       error=f"worker {h['claimed_by']} {reason}")
        for h in claimers)
    counts["ephemeral_keys"] = c.execute(
        f"DELETE FROM kv WHERE (owner_id, owner_incarnation) IN ({MEMBERS})", (ids, incs)
    ).rowcount
    counts["requests"] = c.execute(
        "DELETE FROM messages WHERE kind = 'request' "
        f"AND (sender_id, sender_incarnation) IN ({MEMBERS})", (ids, incs)).rowcount
    c.execute("DELETE FROM messages WHERE kind = 'reply' AND recipient_id = ANY(%s)", (ids,))
    c.execute("UPDATE messages SET delivered_incarnation = NULL "
              f"WHERE acked = 0 AND (recipient_id, delivered_incarnation) IN ({MEMBERS})",
              (ids, incs))
    return counts


#: A lease's NOTIFY channel in SQL, from its name (``{}``): what ``listen.channel_name`` makes
#: of ``lease_channel(name)`` in this deployment.
LEASE_CHANNEL = (
    "(SELECT CASE WHEN octet_length(ch) <= 63 THEN ch ELSE 'coord#' || "
    "substr(encode(sha256(convert_to(ch, 'UTF8')), 'hex'), 1, 40) END "
    "FROM (SELECT 'coord.' || current_schema() || '.lease:' || {} AS ch) n)"
)


def free_lease_row(c: Conn, name: str, term: int, reason: str) -> None:
    """Make the lease row free and close its term's history row (no event: callers log);
    the candidates waiting on the lease's channel, on any host, are told at the commit."""
    c.execute("UPDATE leases SET holder_id = NULL, holder_incarnation = NULL, "  # noqa: S608 - fixed text
              "expires_mono = NULL WHERE name = %s AND term = %s "
              f"RETURNING pg_notify({LEASE_CHANNEL.format('name')}, '')", (name, term))
    c.execute("UPDATE lease_terms SET released_at = coord_now(), reason = %s "
              "WHERE name = %s AND term = %s", (reason, name, term))


def kept(c: Conn, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` still own something that keeps a tombstone: running processes, or a
    private queue with ready or claimed jobs."""
    if not ids:
        return set()
    rows = fetch(
        c,
        "SELECT DISTINCT instance_id AS id FROM processes WHERE status = 'running' "
        "AND instance_id = ANY(%(ids)s) UNION SELECT DISTINCT q.owner_id FROM queues q "
        "WHERE q.owner_id = ANY(%(ids)s) AND EXISTS (SELECT 1 FROM jobs j "
        "WHERE j.queue = q.name AND j.state IN ('ready', 'claimed'))", {"ids": list(ids)})
    return {str(r["id"]) for r in rows}


def bury_many(c: Conn, members: Sequence[Member], *, reason: str) -> list[Member]:
    """Apply the death rule to a batch; returns the members buried (those still registered
    as alive in that incarnation: a second reaper buries nothing)."""
    if not members:
        return []
    ids, incs = split(members)
    live = [(str(r["id"]), int(r["incarnation"])) for r in fetch(
        c, "SELECT id, incarnation FROM instances WHERE status = 'alive' AND "
        f"(id, incarnation) IN ({MEMBERS}) ORDER BY id FOR UPDATE", (ids, incs))]
    if not live:
        return []
    release_holdings_many(c, live, reason=reason)
    lids, lincs = split(live)
    c.execute("UPDATE instances SET status = 'dead', ended_at = coord_now(), end_reason = %s "
              f"WHERE (id, incarnation) IN ({MEMBERS})", (reason, lids, lincs))
    keep = kept(c, lids)
    gone = [i for i in lids if i not in keep]
    if gone:
        c.execute("DELETE FROM instances WHERE id = ANY(%s)", (gone,))
    kind = "left" if reason == "left" else "died"
    events: list[tuple[str, str | None, str | None, dict[str, Any]]] = [
        (kind, i, None, {"incarnation": n, "reason": reason}) for i, n in live]
    if kind == "died":
        events += [("reaped", i, None, {}) for i in gone]
    _event_rows(c, events)
    return live
