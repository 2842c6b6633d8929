"""What engine operations return: frozen records of stored state, values still as stored.

Payloads and values stay JSON text here: decoding and validating them is the capability
modules' work (``coord.payload``), so every engine hands back the same shapes. Times named
``*_at`` are wall-clock seconds, for people; an engine never returns its expiry clock's
readings, only durations computed from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: An instance incarnation: (instance id, incarnation). What every holding is bound to.
Member = tuple[str, int]

#: A lease's term and its holder's instance row as a waiting candidate last saw them: a hint
#: for the takeover when that holder has ended (the engine judges it again).
Seen = tuple[int, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class KvRecord:
    """One row of the key-value table."""

    key: str
    value: str  # JSON text
    version: int
    owner_id: str | None
    owner_incarnation: int | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One stored envelope (see ``coord.messages`` for what each field means)."""

    id: str
    kind: str  # 'message', 'request' or 'reply'
    sender_id: str
    sender_incarnation: int
    recipient_id: str
    topic: str
    payload: str  # JSON text
    correlation_id: str | None
    reply_to: str | None
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Problem:
    """A broken invariant found by an engine's check: ``pending`` when the reaper will
    repair it (an expired row not yet removed), not a defect."""

    detail: str
    pending: bool = False


# -- leases (step 3 of coord.backend's plan) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One lease row. ``expires_in`` is computed by the engine from its own clock (negative
    once the TTL has passed; None when free). ``pgid``/``pg_start_token`` name the process
    group recorded for the term and ``pg_holder`` the instance whose tree runs in it; they
    stay after the holder's end until the group is proven empty."""

    name: str
    holder: Member | None
    term: int | None
    ttl: float | None
    acquired_at: float | None
    renewed_at: float | None
    expires_in: float | None
    pgid: int | None
    pg_start_token: int | None
    pg_holder: Member | None


@dataclass(frozen=True, slots=True)
class LeaseTaken:
    """What taking a lease found: the new term, the previous holder's id, the previous
    term's recorded group (pgid, leader start token) and tree owner — the new holder ends
    them first — and ``dead``, a previous holder proven dead (id, incarnation, verdict)
    whose death rule the caller applies after the commit (failover does not wait for it)."""

    term: int
    previous_holder: str | None
    previous_group: tuple[int, int] | None
    previous_tree: Member | None
    dead: tuple[str, int, str] | None
