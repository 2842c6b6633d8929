"""The PostgreSQL engine's ``DeathRule``: each state change of ``coord.reaper``'s table, one
short transaction each, every expiry compared in SQL with ``coord_now()`` by the one rule
(``.clock``: held back after a step of that clock; a sweep that freed something verifies the
clock before it commits). The in-transaction parts shared with takeovers and claims are in
``.death``.

Host-local facts stay host-local: tracked processes are probed and marked exited only for
rows of this host's boot, and a boot rebase buries only this machine's rows of a boot that
is over (another host's rows are that host's to judge, or the heartbeat's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...clock import boot_id
from ..records import Member
from .clock import CLAIM_EXPIRY, HEARTBEAT_EXPIRY, MESSAGE_EXPIRY
from .connection import Conn, fetch
from .death import MEMBERS, bury_many, kept, release_claims, split
from .events import log_event
from .liveness import machine_id

if TYPE_CHECKING:
    from .clock import ServerClock
    from .connection import PgDb, Row
    from .liveness import PgLiveness

#: A message past its lifetime; the first term (implied by the second) lets the expiry index
#: find the candidates.
_MESSAGE_EXPIRED = f"expires_mono < coord_now() AND {MESSAGE_EXPIRY} < coord_now()"
_FINISHED = "state IN ('done', 'dead', 'cancelled') AND finished_mono < coord_now() - %s"


def bury_if_still_dead(c: Conn, rows: Sequence[Row], verdict: str) -> list[Member]:
    """Bury rows judged dead, re-checked in the transaction: a 'hung' verdict against a
    heartbeat that may have come in since (by the server's clock)."""
    members = [(r["id"], int(r["incarnation"])) for r in rows]
    if verdict == "hung" and members:
        ids, incs = split(members)
        members = [(r["id"], int(r["incarnation"])) for r in fetch(
            c, "SELECT id, incarnation FROM instances WHERE status = 'alive' AND "  # noqa: S608 - fixed fragments, values bound
            f"(id, incarnation) IN ({MEMBERS}) AND {HEARTBEAT_EXPIRY} < coord_now() "
            "ORDER BY id FOR UPDATE", (ids, incs))]
    return bury_many(c, members, reason=verdict)


class PgDeathRule:
    """``coord.backend.DeathRule``."""

    def __init__(self, db: PgDb, clock: ServerClock, liveness: PgLiveness) -> None:
        self._db = db
        self._clock = clock
        self._liveness = liveness

    def alive(self) -> list[Row]:
        return self._db.rows(
            "SELECT id, incarnation, status, end_reason, boot_id, machine_id, pidns, pid, "
            "start_token, lock_path, nudge_path, heartbeat_mono, ttl FROM instances "
            "WHERE status = 'alive'")

    def bury(self, rows: Sequence[Row], verdict: str) -> list[Member]:
        buried = self._db.write(lambda c: bury_if_still_dead(c, rows, verdict))
        done = set(buried)
        self._liveness.forget(r for r in rows if (r["id"], r["incarnation"]) in done)
        return buried

    def running_processes(self) -> list[Row]:
        # Only this boot's: another host's pids mean nothing here.
        return self._db.rows(
            "SELECT id, pid, start_token, boot_id FROM processes WHERE status = 'running' "
            "AND boot_id = %s", (boot_id(),))

    def mark_exited(self, ids: Sequence[int]) -> None:
        self._db.write(lambda c: c.execute(
            "UPDATE processes SET status = 'exited', ended_at = coord_now() "
            "WHERE id = ANY(%s) AND status = 'running'", (list(ids),)))

    def expired(self, retention: float) -> dict[str, int]:
        row = self._db.row(
            "SELECT (SELECT count(*) FROM jobs WHERE state = 'claimed' "  # noqa: S608 - fixed fragments, values bound
            f"AND {CLAIM_EXPIRY} < coord_now()) AS claims, "
            f"(SELECT count(*) FROM messages WHERE {_MESSAGE_EXPIRED}) AS messages, "
            f"(SELECT count(*) FROM jobs WHERE {_FINISHED}) AS jobs", (retention,))
        assert row is not None
        return {k: int(v) for k, v in row.items()}

    def release_expired_claims(self, limit: int) -> int:
        return self._db.write(lambda c: self._clock.verified(c, release_claims(
            c, f"{CLAIM_EXPIRY} < coord_now()", (), error="claim lease expired", limit=limit)))

    def expire_messages(self, limit: int) -> int:
        return self._db.write(lambda c: self._clock.verified(c, c.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages "  # noqa: S608 - fixed fragments
            f"WHERE {_MESSAGE_EXPIRED} LIMIT %s FOR UPDATE SKIP LOCKED)", (limit,)).rowcount))

    def purge_finished_jobs(self, retention: float, limit: int) -> int:
        return self._db.write(lambda c: c.execute(
            f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {_FINISHED} "  # noqa: S608 - fixed fragments, values bound
            "LIMIT %s FOR UPDATE SKIP LOCKED)", (retention, limit)).rowcount)

    def tombstones(self) -> list[str]:
        return [r["id"] for r in self._db.rows(
            "SELECT id FROM instances WHERE status = 'dead' ORDER BY id")]

    def keeping(self, ids: Sequence[str]) -> set[str]:
        return kept(self._db.conn(), ids)

    def drop_tombstones(self, ids: Sequence[str]) -> int:
        def txn(c: Conn) -> int:
            # Locked, so a takeover of the id (which locks it too) queues behind us.
            found = [r["id"] for r in fetch(
                c, "SELECT id FROM instances WHERE status = 'dead' AND id = ANY(%s) "
                "ORDER BY id FOR UPDATE", (list(ids),))]
            keep = kept(c, found)
            gone = [i for i in found if i not in keep]
            if gone:
                c.execute("DELETE FROM instances WHERE id = ANY(%s)", (gone,))
                for i in gone:
                    log_event(c, "reaped", i)
            return len(gone)

        return self._db.write(txn)

    def trim_events(self, max_rows: int, max_age: float) -> int:
        def txn(c: Conn) -> int:
            n = c.execute("DELETE FROM events WHERE at < coord_now() - %s", (max_age,)).rowcount
            n += c.execute(
                "DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC "
                "LIMIT 1 OFFSET %s)", (max_rows,)).rowcount
            n += c.execute("DELETE FROM lease_terms WHERE released_at IS NOT NULL "
                           "AND released_at < coord_now() - %s", (max_age,)).rowcount
            return n

        return self._db.write(txn)

    def checkpoint(self) -> tuple[int, int, int]:
        return (0, 0, 0)  # the server's own checkpointer keeps its log small

    def rebase_boot(self) -> bool:
        return rebase_boot(self._db)


def rebase_boot(db: PgDb) -> bool:
    """After this host rebooted: apply the death rule to this machine's instances of a boot
    that is over, and mark their boots' tracked processes exited. Nothing else changes: the
    server's clock did not restart, and other hosts' rows are theirs."""
    mine, current = machine_id(), boot_id()
    old = "machine_id = %s AND boot_id <> %s"
    stale = db.value(
        f"SELECT EXISTS (SELECT 1 FROM instances WHERE status = 'alive' AND {old}) OR EXISTS "  # noqa: S608 - fixed fragments, values bound
        "(SELECT 1 FROM processes p WHERE p.status = 'running' AND p.boot_id <> %s AND "
        f"p.boot_id IN (SELECT boot_id FROM instances WHERE {old}))",
        (mine, current, current, mine, current))
    if not stale:
        return False

    def txn(c: Conn) -> bool:
        members = [(r["id"], int(r["incarnation"])) for r in fetch(
            c, f"SELECT id, incarnation FROM instances WHERE status = 'alive' AND {old} "  # noqa: S608 - fixed fragments, values bound
            "ORDER BY id FOR UPDATE", (mine, current))]
        boots = [r["boot_id"] for r in fetch(
            c, f"SELECT DISTINCT boot_id FROM instances WHERE {old}", (mine, current))]  # noqa: S608 - fixed fragments, values bound
        c.execute("UPDATE processes SET status = 'exited', ended_at = coord_now() "
                  "WHERE status = 'running' AND boot_id = ANY(%s)", (boots,))
        buried = bury_many(c, members, reason="reboot")
        # The processes were what kept those tombstones.
        dead: list[Any] = [r["id"] for r in fetch(
            c, f"SELECT id FROM instances WHERE status = 'dead' AND {old}", (mine, current))]  # noqa: S608 - fixed fragments, values bound
        gone = [i for i in dead if i not in kept(c, dead)]
        if gone:
            c.execute("DELETE FROM instances WHERE id = ANY(%s)", (gone,))
        log_event(c, "reboot", None, None, boot_id=current, machine_id=mine,
                  buried=len(buried))
        return True

    return db.write(txn)
