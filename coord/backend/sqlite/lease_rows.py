"""The SQLite engine's one place that makes a lease free, inside a caller's transaction:
a holder's release or step-down, the death rule (``free_held``), the reaper's expiry and the
boot rebase. Imports nothing of the store, so the death rule's modules can use it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import apsw

from ..records import Member
from .events import log_event, log_events


def free_term(c: apsw.Connection, name: str, term: int, reason: str, now_wall: float,
              holder: Member | None = None, **detail: Any) -> bool:
    """Make the lease free if it is still held in ``term`` (by ``holder`` when given), with
    its 'lease released' (or 'lease expired') event; ``detail`` joins the event."""
    rows = c.execute("SELECT holder_id, holder_incarnation FROM leases WHERE name = ? AND "
                     "term = ? AND holder_id IS NOT NULL", (name, term)).fetchall()
    if not rows or (holder is not None and tuple(rows[0]) != tuple(holder)):
        return False
    c.execute("UPDATE leases SET holder_id = NULL, holder_incarnation = NULL, expires_mono = NULL "
              "WHERE name = ?", (name,))
    end_term(c, name, term, str(rows[0][0]), reason, now_wall, **detail)
    return True


def end_term(c: apsw.Connection, name: str, term: int, holder_id: str, reason: str,
             now_wall: float, **detail: Any) -> None:
    """The history part of freeing a term (its lease_terms row and event), for a caller
    that rewrites the leases row itself in the same transaction (a takeover)."""
    c.execute("UPDATE lease_terms SET released_at = ?, reason = ? WHERE name = ? AND term = ?",
              (now_wall, reason, name, term))
    kind = "lease expired" if reason == "expired" else "lease released"
    log_event(c, now_wall, kind, holder_id, name, term=term, reason=reason, **detail)


def free_held(c: apsw.Connection, members: Sequence[Member], reason: str,
              now_wall: float) -> int:
    """Free every lease held by one of ``members`` (the death rule's part): set-based, one
    event per lease. Returns how many."""
    if not members:
        return 0
    pairs = json.dumps([[i, n] for i, n in members])
    held = c.execute("SELECT name, term, holder_id FROM leases WHERE (holder_id, "
                     "holder_incarnation) IN (SELECT value->>0, value->>1 FROM json_each(?))",
                     (pairs,)).fetchall()
    for name, term, _ in held:
        c.execute("UPDATE leases SET holder_id = NULL, holder_incarnation = NULL, "
                  "expires_mono = NULL WHERE name = ?", (name,))
        c.execute("UPDATE lease_terms SET released_at = ?, reason = ? WHERE name = ? AND term = ?",
                  (now_wall, reason, name, term))
    log_events(c, [(now_wall, "lease released", str(holder), str(name),
                    {"term": term, "reason": reason}) for name, term, holder in held])
    return len(held)


def expire_lapsed(c: apsw.Connection, now_mono: float, now_wall: float) -> int:
    """Free every lease whose TTL has passed (hung holders). Returns how many."""
    expired = c.execute("SELECT name, term FROM leases WHERE holder_id IS NOT NULL "
                        "AND expires_mono < ?", (now_mono,)).fetchall()
    return sum(free_term(c, str(name), int(term), "expired", now_wall)  # type: ignore[arg-type]
               for name, term in expired)


def forget_boot(c: apsw.Connection) -> None:
    """After a reboot: nobody holds anything, and a recorded group names nothing (pids
    start over)."""
    c.execute("UPDATE leases SET holder_id = NULL, holder_incarnation = NULL, expires_mono = NULL, "
              "pgid = NULL, pg_start_token = NULL, pg_holder_id = NULL, "
              "pg_holder_incarnation = NULL")


