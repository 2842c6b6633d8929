"""The PostgreSQL engine's one place that makes a lease free, inside a caller's transaction:
a holder's release or step-down, an operator's release, the death rule's lease part and
expiry. The lease row is locked (``FOR UPDATE``) before it is compared with the term, so a
concurrent take, renewal or release of the same lease waits and then sees it free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..records import Member
from .clock import LEASE_EXPIRY
from .connection import Conn, fetch
from .death import MEMBERS, free_lease_row, split
from .events import log_event

_HELD = ("SELECT holder_id, holder_incarnation, expires_mono FROM leases "
         "WHERE name = %s AND term = %s AND holder_id IS NOT NULL FOR UPDATE")
_HELD_LAPSED = ("SELECT holder_id, holder_incarnation, expires_mono FROM leases "  # noqa: S608 - fixed fragments
                "WHERE name = %s AND term = %s AND holder_id IS NOT NULL "
                f"AND {LEASE_EXPIRY} < coord_now() FOR UPDATE")

_HELD_BY = ("SELECT name, term, holder_id FROM leases WHERE (holder_id, holder_incarnation) "  # noqa: S608 - fixed text
            "IN (" + MEMBERS + ") ORDER BY name FOR UPDATE")


def free_term(c: Conn, name: str, term: int, reason: str, holder: Member | None = None,
              *, lapsed: bool = False, **detail: Any) -> bool:
    """Make the lease free if it is still held in ``term`` (by ``holder`` when given; only
    when past its TTL with ``lapsed``), with its 'lease released' (or 'lease expired')
    event; ``detail`` joins the event."""
    rows = fetch(c, _HELD_LAPSED if lapsed else _HELD, (name, term))
    if not rows:
        return False
    held = (rows[0]["holder_id"], int(rows[0]["holder_incarnation"]))
    if holder is not None and held != (holder[0], int(holder[1])):
        return False
    free_lease_row(c, name, term, reason)
    kind = "lease expired" if reason == "expired" else "lease released"
    log_event(c, kind, held[0], name, term=term, reason=reason, **detail)
    return True


def free_held(c: Conn, members: Sequence[Member], reason: str) -> int:
    """Free every lease held by one of ``members`` (the death rule's part), one event per
    lease. Returns how many."""
    if not members:
        return 0
    held = fetch(c, _HELD_BY, split(members))
    for h in held:
        free_lease_row(c, h["name"], h["term"], reason)
        log_event(c, "lease released", h["holder_id"], h["name"], term=h["term"],
                  reason=reason)
    return len(held)


def expire_lapsed(c: Conn) -> int:
    """Free every lease whose TTL has passed by the server's clock. Returns how many."""
    lapsed = fetch(c, "SELECT name, term FROM leases WHERE holder_id IS NOT NULL "  # noqa: S608 - fixed fragments
                   f"AND {LEASE_EXPIRY} < coord_now() ORDER BY name")
    return sum(free_term(c, r["name"], int(r["term"]), "expired", lapsed=True) for r in lapsed)
