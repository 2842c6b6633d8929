"""The SQLite engine's leases: ``leases`` (one row per name) and ``lease_terms`` (one row per
term held), terms from the ``term`` counter (seeded from the wall clock in milliseconds, so
a wiped database never reuses one), expiry on ``expires_mono`` (CLOCK_MONOTONIC).

Making a lease free is written once, in ``lease_rows`` (``free_term``/``free_held``); the
death rule, the reaper's expiry and the boot rebase call it inside their own transactions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import apsw

from ...errors import LeaseLost, NotRegistered
from ..records import LeaseRecord, LeaseTaken, Member, Seen
from .clock import MonotonicClock
from .connection import fetch, next_counter, scalar
from .events import log_event
from .lease_rows import end_term, expire_lapsed, free_held, free_term
from .liveness import SqliteLiveness
from .queues import put_in

if TYPE_CHECKING:
    from ...db import Row, Store
    from ..queue_ops import NewJobRow
    from .kv import SqliteKv

#: Statements of a fenced write: (SQL, parameters).
Statements = Sequence[tuple[str, "tuple[Any, ...] | dict[str, Any]"]]


def _record(row: Row, now: float) -> LeaseRecord:
    held = row["holder_id"] is not None
    return LeaseRecord(
        name=row["name"],
        holder=(row["holder_id"], row["holder_incarnation"]) if held else None,
        term=row["term"], ttl=row["ttl"], acquired_at=row["acquired_at"],
        renewed_at=row["renewed_at"],
        expires_in=(row["expires_mono"] - now) if held and row["expires_mono"] is not None
        else None,
        pgid=row["pgid"], pg_start_token=row["pg_start_token"],
        pg_holder=(row["pg_holder_id"], row["pg_holder_incarnation"])
        if row["pg_holder_id"] is not None else None,
    )


# -- the capability's operations ---------------------------------------------------------------


class SqliteLeases:
    """``coord.backend.LeaseOps``."""

    def __init__(self, store: Store, clock: MonotonicClock, liveness: SqliteLiveness,
                 kv: SqliteKv) -> None:
        self._store = store
        self._clock = clock
        self._liveness = liveness
        self._kv = kv

    # -- reads --------------------------------------------------------------------------------

    def get(self, name: str) -> LeaseRecord | None:
        row = self._store.row("SELECT * FROM leases WHERE name = ?", (name,))
        return None if row is None else _record(row, self._clock.now())

    def every(self, *, held_only: bool = False) -> list[LeaseRecord]:
        sql = "SELECT * FROM leases"
        if held_only:
            sql += " WHERE holder_id IS NOT NULL"
        now = self._clock.now()
        return [_record(r, now) for r in self._store.rows(sql + " ORDER BY name")]

    def recorded_groups(self, owner: Member | None = None) -> list[LeaseRecord]:
        """The leases with a recorded group and its tree's owner (of ``owner`` only)."""
        sql = "SELECT * FROM leases WHERE pgid IS NOT NULL AND pg_holder_id IS NOT NULL"
        params: tuple[Any, ...] = ()
        if owner is not None:
            sql += " AND pg_holder_id = ? AND pg_holder_incarnation = ?"
            params = owner
        now = self._clock.now()
        return [_record(r, now) for r in self._store.rows(sql, params)]

    def terms_of(self, holder: Member) -> tuple[int, ...]:
        """Every term ``holder`` held, of any lease."""
        return tuple(int(r["term"]) for r in self._store.rows(
            "SELECT term FROM lease_terms WHERE holder_id = ? AND holder_incarnation = ?",
            holder))

    # -- the rules ----------------------------------------------------------------------------

    @staticmethod
    def arm(me: Member, name: str, ttl: float, seen: Seen) -> None:
        return None  # the holder's pidfd is the first to hear of its death here

    def take(self, me: Member, name: str, ttl: float, seen: Seen | None = None
             ) -> LeaseTaken | str:
        """Take ``name`` if it is free, expired, or its holder is dead; else the holder's id
        (also ``me``'s own id when it holds it: leases are not re-entrant). ``NotRegistered``
        when ``me`` is not a live incarnation. ``seen`` is not needed here: the look is a
        local read inside the one writer's transaction."""
        store = self._store

        def txn(c: apsw.Connection) -> LeaseTaken | str:
            now_mono, now_wall = self._clock.now(), store.wall()
            row_me = fetch(c, "SELECT status FROM instances WHERE id = ? AND incarnation = ?", me)
            if not row_me or row_me[0]["status"] != "alive":
                raise NotRegistered(me[0], "closed, declared dead or taken over")
            rows = fetch(c, "SELECT * FROM leases WHERE name = ?", (name,))
            row = rows[0] if rows else None
            previous = dead = None
            reason = "free"
            if row is not None and row["holder_id"] is not None:
                previous = row["holder_id"]
                holder = (row["holder_id"], row["holder_incarnation"])
                if holder == tuple(me) and row["expires_mono"] >= now_mono:
                    return me[0]
                hrow = fetch(c, "SELECT * FROM instances WHERE id = ? AND incarnation = ?", holder)
                alive, verdict = self._liveness.judge(hrow[0]) if hrow else (False, "gone")
                if hrow and hrow[0]["status"] == "alive" and not alive:
                    # Proof of death (or a hung heartbeat): take the lease now; the rest of
                    # the death rule follows in its own transaction.
                    dead = (holder[0], holder[1], verdict)
                    reason = verdict
                elif row["expires_mono"] is None or row["expires_mono"] < now_mono:
                    reason = "expired"
                elif not alive:
                    reason = verdict
                else:
                    return str(row["holder_id"])
                # The UPDATE below rewrites the row: only the term's history is ended here.
                end_term(c, name, row["term"], previous, reason, now_wall)
            term = next_counter(c, "term")
            expires = now_mono + ttl
            if row is None:
                c.execute(
                    "INSERT INTO leases (name, holder_id, holder_incarnation, term, ttl, "
                    "acquired_at, renewed_at, expires_mono) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, *me, term, ttl, now_wall, now_wall, expires),
                )
            else:
                # pgid/pg_start_token stay: the new holder ends that group before anything.
                c.execute(
                    "UPDATE leases SET holder_id = ?, holder_incarnation = ?, term = ?, ttl = ?, "
                    "acquired_at = ?, renewed_at = ?, expires_mono = ? WHERE name = ?",
                    (*me, term, ttl, now_wall, now_wall, expires, name),
                )
            c.execute(
                "INSERT INTO lease_terms (name, term, holder_id, holder_incarnation, acquired_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, term, *me, now_wall),
            )
            log_event(c, now_wall, "leader changed", me[0], name, term=term, previous=previous,
                      reason=reason)
            group = tree = None
            if row is not None and row["pgid"] is not None and row["pg_start_token"] is not None:
                group = (int(row["pgid"]), int(row["pg_start_token"]))
            if row is not None and row["pg_holder_id"] is not None:
                tree = (str(row["pg_holder_id"]), int(row["pg_holder_incarnation"]))
            return LeaseTaken(term, previous, group, tree, dead)

        return store.write(txn)

    def renew(self, name: str, term: int, holder: Member, ttl: float) -> bool:
        """Extend the TTL from now while ``term`` is ``holder``'s and unexpired; an expired
        own term is made free (with its event) and False returned."""
        store = self._store

        def txn(c: apsw.Connection) -> bool:
            now_mono, now_wall = self._clock.now(), store.wall()
            ok = fetch(
                c,
                "UPDATE leases SET renewed_at = ?, expires_mono = ? WHERE name = ? AND term = ? "
                "AND holder_id = ? AND holder_incarnation = ? AND expires_mono >= ? RETURNING 1",
                (now_wall, now_mono + ttl, name, term, *holder, now_mono),
            )
            if ok:
                return True
            free_term(c, name, term, "expired", now_wall, holder)
            return False

        return store.write(txn)

    def release(self, name: str, term: int, holder: Member | None, reason: str,
                **detail: Any) -> bool:
        """Free ``name`` if still held in ``term`` (by ``holder`` when given); ``detail``
        joins the event. False when it was not."""
        store = self._store
        return store.write(lambda c: free_term(c, name, term, reason, store.wall(), holder,
                                               **detail))

    def release_dead_holders(self, members: Sequence[Member], reason: str) -> int:
        """Free every lease held by one of ``members`` (the death rule's lease part, in its
        own transaction). Returns how many."""
        store = self._store
        return store.write(lambda c: free_held(c, list(members), reason, store.wall()))

    def expire(self) -> int:
        """Free every lease whose TTL has passed. Returns how many."""
        store = self._store
        return store.write(lambda c: expire_lapsed(c, self._clock.now(), store.wall()))

    def lapsed(self) -> int:
        """How many held leases are past their TTL (what ``expire`` would free)."""
        return int(self._store.value(
            "SELECT count(*) FROM leases WHERE holder_id IS NOT NULL AND expires_mono < ?",
            (self._clock.now(),)))

    def record_group(self, name: str, term: int, pgid: int | None, token: int | None,
                     holder: Member | None) -> None:
        """Record (or clear) the term's process group and its tree's owner; ``LeaseLost``
        unless ``term`` is current."""
        def txn(c: apsw.Connection) -> None:
            self._require(c, name, term)
            hid, hinc = holder if holder is not None else (None, None)
            c.execute("UPDATE leases SET pgid = ?, pg_start_token = ?, pg_holder_id = ?, "
                      "pg_holder_incarnation = ? WHERE name = ? AND term = ?",
                      (pgid, token, hid, hinc, name, term))

        self._store.write(txn)

    def clear_groups(self, groups: Iterable[tuple[str, int, int]]) -> None:
        """Forget these (lease name, pgid, leader start token) recorded groups, proven
        empty — unless a group was recorded anew meanwhile."""
        todo = list(groups)
        if todo:
            self._store.write(lambda c: c.executemany(
                "UPDATE leases SET pgid = NULL, pg_start_token = NULL, pg_holder_id = NULL, "
                "pg_holder_incarnation = NULL WHERE name = ? AND pgid = ? AND pg_start_token = ?",
                todo))

    def forget(self, name: str) -> bool:
        def txn(c: apsw.Connection) -> bool:
            if scalar(c, "SELECT 1 FROM leases WHERE name = ? AND holder_id IS NOT NULL",
                      (name,)):
                return False
            c.execute("DELETE FROM lease_terms WHERE name = ?", (name,))
            c.execute("DELETE FROM leases WHERE name = ?", (name,))
            return c.changes() > 0

        return self._store.write(txn)

    # -- fenced operations --------------------------------------------------------------------

    def fenced(self, name: str, term: int, statements: Statements) -> list[list[Row]]:
        """Engine-specific: run SQLite statements in one transaction, only while ``term``
        is current; their rows. ``LeaseLost`` otherwise."""
        def txn(c: apsw.Connection) -> list[list[Row]]:
            self._require(c, name, term)
            return [fetch(c, sql, params) for sql, params in statements]

        return self._store.write(txn)

    def fenced_kv_set(self, name: str, term: int, key: str, value: str,
                      owner: Member | None) -> int:
        """``KvOps.set`` in the same transaction as the check that ``term`` is current."""
        def txn(c: apsw.Connection) -> int:
            self._require(c, name, term)
            return self._kv.set_in(c, key, value, owner)

        return self._store.write(txn)

    def fenced_kv_cas(self, name: str, term: int, key: str, value: str, version: int,
                      owner: Member | None) -> int:
        """``KvOps.cas`` in the same transaction as the check that ``term`` is current."""
        def txn(c: apsw.Connection) -> int:
            self._require(c, name, term)
            return self._kv.cas_in(c, key, value, version, owner)

        return self._store.write(txn)

    def fenced_queue_put(self, name: str, term: int, queue: str, rows: Sequence[NewJobRow]
                         ) -> tuple[list[int], bool, str | None]:
        """``QueueOps.put_rows`` in the same transaction as the check that ``term`` is
        current."""
        def txn(c: apsw.Connection) -> tuple[list[int], bool, str | None]:
            self._require(c, name, term)
            return put_in(c, self._store, queue, rows)

        return self._store.write(txn)

    def _require(self, c: apsw.Connection, name: str, term: int) -> None:
        if not scalar(c, "SELECT 1 FROM leases WHERE name = ? AND term = ? AND holder_id IS NOT "
                         "NULL AND expires_mono >= ?", (name, term, self._clock.now())):
            raise LeaseLost(name, term)
