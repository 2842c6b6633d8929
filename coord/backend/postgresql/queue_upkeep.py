"""The PostgreSQL engine's queues, off the hot path: cancel, requeue, purge, adopt, and
reading jobs and counts for people (``PgQueues`` in ``queues.py`` adds the hot path; the
SQLite engine's ``queue_upkeep.py`` is the reference behaviour). Durations read back are
computed in SQL from one reading of ``coord_now()`` per statement."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import errors as pgerrors

from ...errors import InvalidArgument, NotFound
from .clock import CLAIM_EXPIRY
from .connection import Conn, fetch, scalar
from .death import release_claims
from .events import log_event
from .queue_rows import job_state, notify

if TYPE_CHECKING:
    from .connection import PgDb, Row

#: One reading of the server's clock for a whole statement, ``n.t`` (``coord_now()`` is
#: volatile: a subquery in a join is run again on every rescan, and the rows of one listing
#: would each see another now; a materialized CTE runs once).
_NOW = "WITH n AS MATERIALIZED (SELECT coord_now() AS t) "

#: A job row's columns, in the order of ``JOB_FIELDS``: the durations from ``n.t``.
_COLUMNS = (
    "id, queue, state, priority, payload, dedupe_key, attempts, max_attempts, "
    "CASE WHEN state = 'ready' AND available_mono > n.t THEN available_mono - n.t "
    "ELSE 0.0 END AS available_in, created_at, claimed_by, "
    f"{CLAIM_EXPIRY} - n.t AS expires_in, last_error, result, finished_at"
)

#: The creation time of a queue's oldest due ready job (in ``stats``).
_OLDEST = ("min(j.created_at) FILTER (WHERE j.state = 'ready' AND j.available_mono <= n.t)")


class PgQueueUpkeep:
    """The operations of ``coord.backend.QueueOps`` off the hot path."""

    _db: PgDb

    def cancel(self, job_id: int) -> None:
        def txn(c: Conn) -> None:
            if fetch(c, "UPDATE jobs SET state = 'cancelled', finished_at = coord_now(), "
                     "finished_mono = coord_now() WHERE id = %s AND state IN ('ready', 'dead') "
                     "RETURNING 1", (job_id,)):
                return
            state = job_state(c, job_id)
            hint = "; fail or release it first" if state == "claimed" else ""
            raise InvalidArgument(
                f"job {job_id} is {state}: only a job that waits can be cancelled{hint}")

        self._db.write(txn)

    def requeue(self, job_id: int) -> str:
        def txn(c: Conn) -> str:
            got = fetch(c, "UPDATE jobs SET state = 'ready', attempts = 0, "
                        "available_mono = coord_now(), finished_at = NULL, finished_mono = NULL, "
                        "result = NULL WHERE id = %s AND state IN ('dead', 'cancelled') "
                        "RETURNING queue", (job_id,))
            if got:
                notify(c, [got[0]["queue"]])
                return str(got[0]["queue"])
            state = job_state(c, job_id)
            raise InvalidArgument(
                f"job {job_id} is {state}: only a dead or cancelled job can be requeued")

        return self._db.write(txn)

    def requeue_dead(self, queue: str) -> int:
        def txn(c: Conn) -> int:
            n = c.execute("UPDATE jobs SET state = 'ready', attempts = 0, "
                          "available_mono = coord_now(), finished_at = NULL, "
                          "finished_mono = NULL, result = NULL "
                          "WHERE queue = %s AND state = 'dead'", (queue,)).rowcount
            if n:
                notify(c, [queue])
            return n

        return self._db.write(txn)

    def purge(self, queue: str, everything: bool) -> int:
        def txn(c: Conn) -> int:
            # FOR UPDATE: no put into the queue runs meanwhile (see the module docstring).
            if not fetch(c, "SELECT 1 FROM queues WHERE name = %s FOR UPDATE", (queue,)):
                raise NotFound("queue", queue)
            if everything:
                n = c.execute("DELETE FROM jobs WHERE queue = %s", (queue,)).rowcount
                c.execute("DELETE FROM queues WHERE name = %s", (queue,))
                return n
            return c.execute("DELETE FROM jobs WHERE queue = %s "
                             "AND state IN ('done', 'dead', 'cancelled')", (queue,)).rowcount

        return self._db.write(txn)

    def adopt(self, from_id: str, to: str | None, to_queue: str | None
              ) -> tuple[list[str], int, int]:
        def txn(c: Conn) -> tuple[list[str], int, int]:
            # The owner's queues locked (in name order): a second adoption waits, then finds
            # them no longer its own; no put or move into them runs meanwhile.
            names = [str(r["name"]) for r in fetch(
                c, "SELECT name FROM queues WHERE owner_id = %s ORDER BY name FOR UPDATE",
                (from_id,))]
            if not names:
                raise NotFound("private queue of instance", from_id)
            # A claim by an incarnation of from_id that outlived the caller's check.
            release_claims(c, "claimed_by = %s AND queue = ANY(%s)", (from_id, names),
                           error=f"worker {from_id} is gone")
            moved = left = 0
            if to is not None:
                c.execute("UPDATE queues SET owner_id = %s WHERE name = ANY(%s)", (to, names))
            else:
                assert to_queue is not None
                if to_queue in names:
                    raise InvalidArgument(f"queue {to_queue!r} is one of the adopted queues")
                # Made shared if needed, and locked FOR UPDATE: no insert (with a dedupe key)
                # into it races the moves below.
                c.execute("INSERT INTO queues (name, owner_id, max_depth, created_at) "
                          "VALUES (%s, NULL, NULL, coord_now()) ON CONFLICT (name) DO NOTHING",
                          (to_queue,))
                if not fetch(c, "SELECT 1 AS one FROM queues WHERE name = %s FOR UPDATE",
                             (to_queue,)):
                    raise pgerrors.SerializationFailure(f"queue {to_queue!r} deleted meanwhile")
                for name in names:
                    # A job whose dedupe key is already in to_queue stays (as UPDATE OR IGNORE).
                    moved += c.execute(
                        "UPDATE jobs j SET queue = %s WHERE j.queue = %s "
                        "AND j.state IN ('ready', 'dead') AND (j.dedupe_key IS NULL OR NOT "
                        "EXISTS (SELECT 1 FROM jobs o WHERE o.queue = %s "
                        "AND o.dedupe_key = j.dedupe_key))", (to_queue, name, to_queue),
                    ).rowcount
                    left += int(scalar(c, "SELECT count(*) FROM jobs WHERE queue = %s "
                                       "AND state IN ('ready', 'dead')", (name,)))
                if moved:
                    notify(c, [to_queue])
            if to is not None:
                notify(c, names)
            log_event(c, "queue adopted", from_id, ",".join(names), to=to,
                      to_queue=to_queue, jobs=moved)
            return names, moved, left

        return self._db.write(txn)

    # -- reading -------------------------------------------------------------------------

    def get(self, job_id: int) -> Row | None:
        return self._db.row(f"{_NOW}SELECT {_COLUMNS} FROM jobs, n WHERE id = %s",  # noqa: S608
                            (job_id,))

    def jobs(self, queue: str | None, state: str, limit: int | None) -> list[Row]:
        # 'ready' and 'delayed' are told apart at the now the rows' durations are read at.
        where: list[str] = []
        params: list[Any] = []
        if queue is not None:
            where.append("queue = %s")
            params.append(queue)
        if state == "ready":
            where.append("state = 'ready' AND available_mono <= n.t")
        elif state == "delayed":
            where.append("state = 'ready' AND available_mono > n.t")
        elif state == "active":
            where.append("state IN ('ready', 'claimed', 'dead')")
        elif state != "all":
            where.append("state = %s")
            params.append(state)
        sql = f"{_NOW}SELECT {_COLUMNS} FROM jobs, n"  # noqa: S608 - fixed fragments only
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY queue, priority DESC, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self._db.rows(sql, tuple(params))

    def stats(self, queue: str | None) -> list[Row]:
        # created_at is stamped from coord_now() too: the oldest age is read on one clock.
        sql = (
            f"{_NOW}SELECT q.name, q.owner_id, q.max_depth, "  # noqa: S608 - fixed fragments only
            "count(j.id) FILTER (WHERE j.state = 'ready' AND j.available_mono <= n.t) AS ready, "
            "count(j.id) FILTER (WHERE j.state = 'ready' AND j.available_mono > n.t) AS delayed, "
            "count(j.id) FILTER (WHERE j.state = 'claimed') AS claimed, "
            "count(j.id) FILTER (WHERE j.state = 'dead') AS dead, "
            "count(j.id) FILTER (WHERE j.state = 'done') AS done, "
            "count(j.id) FILTER (WHERE j.state = 'cancelled') AS cancelled, "
            # greatest() skips a NULL: no due ready job must stay NULL, not become 0.
            f"CASE WHEN {_OLDEST} IS NOT NULL THEN greatest(0.0, n.t - {_OLDEST}) END "
            "AS oldest_age "
            "FROM queues q CROSS JOIN n LEFT JOIN jobs j ON j.queue = q.name "
        )
        params: tuple[Any, ...] = ()
        if queue is not None:
            sql += "WHERE q.name = %s "
            params = (queue,)
        rows = self._db.rows(sql + "GROUP BY q.name, n.t ORDER BY q.name", params)
        for r in rows:
            for k in ("ready", "delayed", "claimed", "dead", "done", "cancelled"):
                r[k] = int(r[k])
        return rows

    def problems(self) -> list[tuple[str, bool]]:
        db = self._db
        out: list[tuple[str, bool]] = []
        for r in db.rows(
            "SELECT id, state, attempts, max_attempts FROM jobs WHERE attempts < 0 "
            "OR (state = 'ready' AND attempts >= max_attempts) "
            "OR (state = 'claimed' AND (attempts < 1 OR attempts > max_attempts))"
        ):
            out.append((f"job {r['id']} is {r['state']} with {r['attempts']} of "
                        f"{r['max_attempts']} attempts", False))
        for r in db.rows(
            "SELECT id, state FROM jobs WHERE (state = 'claimed') <> "
            "(claimed_by IS NOT NULL AND claimed_incarnation IS NOT NULL "
            " AND claim_expires_mono IS NOT NULL) AND state <> 'done'"
        ):
            out.append((f"job {r['id']} is {r['state']} but its claim fields disagree", False))
        for r in db.rows(
            "SELECT j.id, j.claimed_by, q.owner_id FROM jobs j JOIN queues q ON q.name = j.queue "
            "WHERE j.state = 'claimed' AND q.owner_id IS NOT NULL AND j.claimed_by <> q.owner_id"
        ):
            out.append((f"job {r['id']} of a queue private to {r['owner_id']!r} is claimed by "
                        f"{r['claimed_by']!r}", False))
        for r in db.rows(
            f"SELECT id FROM jobs WHERE state = 'claimed' AND {CLAIM_EXPIRY} < coord_now()"  # noqa: S608 - fixed fragments
        ):
            out.append((f"job {r['id']} is claimed past its lease, awaiting release", True))
        return out
