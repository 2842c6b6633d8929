"""The engine protocol's lease operations (step 3 of ``coord.backend``'s plan; see
``coord.backend`` for the protocol as a whole)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .queue_ops import NewJobRow
from .records import LeaseRecord, LeaseTaken, Member, Seen

if TYPE_CHECKING:
    from ..db import Row


# -- step 3: leases ----------------------------------------------------------------------------
# Done: coord.leases (split into lease_rules, lease_keeper and leases), elect, wrapper,
# runner and the tooz driver reach leases only through these operations; tree's lease reads
# too. Freeing a lease is written once (SQLite: ``sqlite/lease_rows.py``), also for the death
# rule (``release_dead_holders``), the reaper's expiry and the boot rebase. The fenced queue
# put (``fenced_queue_put``) is the queue engine's put inside the term's check.


class Armed(Protocol):
    """A takeover sent ahead (``LeaseOps.arm``), until its ``poll`` gives what it took or
    it is closed."""

    def fds(self) -> list[int]:
        """Descriptors the waiter selects on (readable when ``poll`` may have news); empty
        once it is over."""
        ...

    def poll(self) -> LeaseTaken | None:
        """The lease it took, committed on the engine's proof of the holder's death; None
        while it waits or once it is over without."""
        ...

    @property
    def running(self) -> bool:
        """The takeover runs on the server now (the holder's end was heard): its answer is
        on its way, and the waiter's own look would only race it."""
        ...

    @property
    def sent_at(self) -> float:
        """``store.mono()`` when the takeover that took was last sent: its term's deadlines
        count from then (it ran on the server later)."""
        ...

    def close(self) -> None: ...


class LeaseOps(Protocol):
    """Leases fenced by terms. Every change of holder takes the next value of one global
    term counter (never reused: seeded so that a wiped store does not repeat a term);
    one history row per term held. Expiry is stamped from the engine's clock, ``ttl``
    seconds on; every change of holder, release and expiry records its event."""

    def get(self, name: str) -> LeaseRecord | None: ...

    def every(self, *, held_only: bool = False) -> list[LeaseRecord]:
        """Every lease (only those with a holder recorded), by name."""
        ...

    def recorded_groups(self, owner: Member | None = None) -> list[LeaseRecord]:
        """Leases whose row records a process group and its tree's owner (``owner``'s)."""
        ...

    def terms_of(self, holder: Member) -> tuple[int, ...]:
        """Every term ``holder`` held, of any lease."""
        ...

    def take(self, me: Member, name: str, ttl: float, seen: Seen | None = None
             ) -> LeaseTaken | str:
        """Take ``name`` when free, expired, or its holder is judged dead (the lease is
        freed and taken in one transaction; the dead holder is returned for the caller to
        bury); else the current holder's id. ``NotRegistered`` when ``me`` is not alive.
        ``seen``: the term and holder a waiter last saw (an engine may use it to skip its
        own look when that holder is proven dead; never trusted without the proof)."""
        ...

    def arm(self, me: Member, name: str, ttl: float, seen: Seen) -> Armed | None:
        """A takeover of the term ``seen`` sent ahead, to be taken the moment its holder is
        proven dead (an engine that hears of a death before the kernel's pidfd says so);
        None when the engine has none (SQLite: the pidfd is the first to know)."""
        ...

    def renew(self, name: str, term: int, holder: Member, ttl: float) -> bool:
        """Extend while ``term`` is ``holder``'s and unexpired; False (and an expired own
        term freed) otherwise."""
        ...

    def release(self, name: str, term: int, holder: Member | None, reason: str,
                **detail: Any) -> bool:
        """Free ``name`` if still held in ``term`` (by ``holder`` when given; None: by
        whoever holds it, for an operator). ``detail`` joins the event."""
        ...

    def release_dead_holders(self, members: Sequence[Member], reason: str) -> int:
        """The death rule's lease part: free every lease held by one of ``members``."""
        ...

    def expire(self) -> int:
        """Free every lease whose TTL has passed; how many."""
        ...

    def lapsed(self) -> int:
        """How many held leases are past their TTL."""
        ...

    def record_group(self, name: str, term: int, pgid: int | None, token: int | None,
                     holder: Member | None) -> None:
        """Record (or clear) the term's process group; ``LeaseLost`` unless current."""
        ...

    def clear_groups(self, groups: Iterable[tuple[str, int, int]]) -> None:
        """Forget these (name, pgid, start token) groups, proven empty, unless re-recorded."""
        ...

    def forget(self, name: str) -> bool:
        """Delete a free lease's row and its history of terms (False, nothing deleted, while
        it is held or when there is none). The term counter never goes back, so a later
        holder still gets a higher term."""
        ...

    def fenced(self, name: str, term: int,
               statements: Sequence[tuple[str, tuple[Any, ...] | dict[str, Any]]]
               ) -> list[list[Row]]:
        """Engine-specific statements (SQLite: SQL with ``?``; PostgreSQL: SQL with ``%s``)
        in one transaction, only while ``term`` is current, else ``LeaseLost``."""
        ...

    def fenced_kv_set(self, name: str, term: int, key: str, value: str,
                      owner: Member | None) -> int:
        """``KvOps.set`` only while ``term`` is current, in one transaction."""
        ...

    def fenced_kv_cas(self, name: str, term: int, key: str, value: str, version: int,
                      owner: Member | None) -> int:
        """``KvOps.cas`` only while ``term`` is current, in one transaction."""
        ...

    def fenced_queue_put(self, name: str, term: int, queue: str, rows: Sequence[NewJobRow]
                         ) -> tuple[list[int], bool, str | None]:
        """``QueueOps.put_rows`` only while ``term`` is current, in one transaction
        (``LeaseLost`` otherwise, and nothing stored)."""
        ...
