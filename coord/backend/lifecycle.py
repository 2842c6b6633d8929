"""The engine protocol's operations added by step 2 of ``coord.backend``'s plan: what
proves an instance alive, the registry's writes, the death rule's state changes, the
recorded process trees, tracked processes and the invariant checks (see ``coord.backend``
for the protocol as a whole)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .records import Member, Problem

if TYPE_CHECKING:
    from ..db import Row


class Proof(Protocol):
    """What a live instance holds to prove it lives; its death (or ``release``) ends it."""

    where: str  # recorded in the instance's row (SQLite: its lock file)

    def release(self) -> None: ...


class InstanceWrites(Protocol):
    """The registry's own operations. Every registration takes the next value of the
    incarnation counter."""

    def by_id(self, id: str) -> Row | None:
        """The row registered as ``id`` (alive or a tombstone), or None."""
        ...

    def list(self, app: str | None = None) -> list[Row]:
        """Every row (of ``app``), oldest registration first."""
        ...

    def register(self, id: str, fields: Mapping[str, Any]) -> tuple[int, Row | None]:
        """Register ``id`` with the columns ``fields`` (app, pid, start_token, boot_id,
        pidns, uid, user, host, cmdline, cwd, labels, lock_path, nudge_path, ttl,
        watchdog), stamped with the engine's clock; returns (incarnation, the predecessor's
        row or None). ``InstanceIdInUse`` while a live instance holds the id; a dead one's
        death is recorded and what it held released (reason 'taken over') in the same
        transaction."""
        ...

    def heartbeat(self, member: Member) -> bool:
        """Renew; False when that incarnation is no longer registered and alive."""
        ...

    def changes(self) -> object:
        """A cheap token that differs whenever registrations may have changed since it was
        taken (SQLite: the database's data version; PostgreSQL: the registry's newest
        incarnation and its count of live rows)."""
        ...

    def deregister(self, member: Member) -> bool:
        """The death rule for a clean exit (reason 'left'); False when not registered."""
        ...


class DeathRule(Protocol):
    """The death rule's state changes (``coord.reaper`` holds the rule and the policy: what
    to apply when, in which batches, or only to count). Each call is one short
    transaction that re-checks its condition, so it is safe beside another reaper."""

    def alive(self) -> list[Row]:
        """The rows registered as alive (the reaper judges them)."""
        ...

    def bury(self, rows: Sequence[Row], verdict: str) -> list[Member]:
        """Apply the death rule to rows judged dead with ``verdict``: release their leases,
        return their claims to ready (or dead-letter them), delete their ephemeral keys,
        requests and replies, re-offer what they were delivered; keep a tombstone while
        they own queued jobs or running processes. A 'hung' verdict is re-checked against
        the heartbeat. Returns the members buried."""
        ...

    def running_processes(self) -> list[Row]:
        """id, pid, start_token, boot_id of every tracked process still marked running."""
        ...

    def mark_exited(self, ids: Sequence[int]) -> None: ...

    def expired(self, retention: float) -> dict[str, int]:
        """What the expiry steps would change now (for a dry run): 'claims',
        'messages', and 'jobs' finished more than ``retention`` seconds ago."""
        ...

    def release_expired_claims(self, limit: int) -> int:
        """Return up to ``limit`` claims past their lease to ready (or dead-letter them)."""
        ...

    def expire_messages(self, limit: int) -> int: ...

    def purge_finished_jobs(self, retention: float, limit: int) -> int: ...

    def tombstones(self) -> list[str]: ...

    def keeping(self, ids: Sequence[str]) -> set[str]:
        """Which of these ids still own something that keeps a tombstone."""
        ...

    def drop_tombstones(self, ids: Sequence[str]) -> int:
        """Delete those tombstones that nothing keeps any more."""
        ...

    def trim_events(self, max_rows: int, max_age: float) -> int: ...

    def checkpoint(self) -> tuple[int, int, int]:
        """Shrink the engine's log if nobody is in the way (SQLite: the WAL); never blocks
        writers."""
        ...

    def rebase_boot(self) -> bool:
        """After a reboot: bury every instance of the old boot and carry remaining
        durations over to the new clock, once. False when there was nothing to do."""
        ...


class TreeOps(Protocol):
    """What a `coord run`/`elect`/`lock` wrapper records of its process tree: tree rows of
    the tracked processes. (The process group recorded on the lease it holds is the lease
    capability's: ``LeaseOps.recorded_groups``, ``terms_of``, ``clear_groups``.)"""

    def record(self, rows: Sequence[tuple[Any, ...]], gone: Sequence[int]) -> list[int]:
        """One transaction: insert tree rows — (instance id, incarnation, pid, start token,
        boot id, pgid, name, cmdline JSON, cwd, user, labels JSON, tree flag, log path),
        started now — and mark the rows ``gone`` exited; returns the new rows' ids."""
        ...

    def mark_exited(self, ids: Sequence[int]) -> None: ...

    def members(self, owner: Member | None = None) -> list[Row]:
        """Running tree rows (of ``owner``): id, instance_id, incarnation, pid, pgid,
        start_token, boot_id."""
        ...


class ProcessOps(Protocol):
    """The processes an instance tracks (``track``/``spawn``), bound to (id, incarnation)."""

    def track(self, owner: Member, fields: Sequence[Any], *, running: bool) -> int:
        """Record a process — ``fields``: pid, start token, boot id, pgid, name, cmdline
        JSON, cwd, user, labels JSON, log path — started now; ``running`` False records one
        that already ended. A running one gets a 'process started' event. Returns its id."""
        ...

    def record_exit(self, id: int, owner_id: str, code: int | None, sig: int | None) -> None:
        """Its end as its owner saw it (exit code, or the signal that ended it)."""
        ...

    def record_ended(self, ended: Sequence[tuple[Row, str, int | None, int | None]],
                     kind: str) -> None:
        """Rows coord ended: (row, how, exit code, signal); an end already recorded stays.
        One ``kind`` event per row."""
        ...

    def get(self, id: int) -> Row | None: ...

    def by_ids(self, ids: Iterable[int]) -> dict[int, Row]: ...

    def list(self, instance_id: str | None = None, *, running: bool = False) -> list[Row]:
        """Rows of ``instance_id`` in id order, else every row (only running ones with
        ``running``) by instance, then id."""
        ...


class CheckOps(Protocol):
    """The invariant checks that need only the database (``coord.check`` adds those that
    need liveness), and the storage facts ``coord doctor`` reports. Problems come as
    (check name, ``Problem``)."""

    def storage(self, *, integrity: bool) -> list[tuple[str, Problem]]:
        """The store itself: integrity (when asked: it reads every page), the schema version
        and identity, counters never below a used value."""
        ...

    def holdings(self) -> list[tuple[str, str, int]]:
        """(what, holder id, holder incarnation) of every held lease, claimed job and
        ephemeral key: each holder must be registered and alive."""
        ...

    def free_groups(self) -> list[tuple[str, int]]:
        """(lease, pgid) of free leases still recording their last holder's group."""
        ...

    def problems(self) -> list[tuple[str, Problem]]:
        """Liveness-free invariants of leases, terms, jobs and processes."""
        ...

    def facts(self) -> dict[str, Any]:
        """journal_mode, schema_version, supported_schema_version, application_id,
        busy_retries, counts (rows per table); PostgreSQL adds server_version, schema,
        settings and idle_lock_holders."""
        ...

    def figures(self) -> dict[str, int | float]:
        """Cheap figures for ``coord metrics``: messages_pending (not yet acknowledged) and
        the engine's own (SQLite: wal_bytes; PostgreSQL: schema_version,
        server_version_num, idle_lock_holders)."""
        ...
