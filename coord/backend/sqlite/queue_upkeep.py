"""The SQLite engine's queues, off the hot path: creating a queue's row, cancel, requeue,
purge, adopt, and reading jobs and counts for people (``SqliteQueues`` in ``queues.py``
adds the hot path: put, claim, ack and the rest of a claim's life)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import apsw

from ...errors import InvalidArgument, NotFound
from .connection import scalar
from .death import release_claims
from .events import log_event

if TYPE_CHECKING:
    from ...db import Row, Store

#: A job row's columns, in the order of ``JOB_FIELDS``: the durations from the engine's now
#: (?1), which every statement that reads them binds first.
_COLUMNS = (
    "id, queue, state, priority, payload, dedupe_key, attempts, max_attempts, "
    "CASE WHEN state = 'ready' AND available_mono > ?1 THEN available_mono - ?1 ELSE 0.0 END "
    "AS available_in, created_at, claimed_by, claim_expires_mono - ?1 AS expires_in, "
    "last_error, result, finished_at"
)


def queue_row(c: apsw.Connection, store: Store, name: str) -> tuple[str | None, int | None]:
    """(owner, max_depth) of a queue inside the caller's transaction, creating it shared if
    it does not exist."""
    for owner, depth in c.execute("SELECT owner_id, max_depth FROM queues WHERE name = ?", (name,)):
        return owner, depth
    c.execute(
        "INSERT INTO queues (name, owner_id, max_depth, created_at) VALUES (?, NULL, NULL, ?)",
        (name, store.wall()),
    )
    return None, None


def _job_state(c: apsw.Connection, job_id: int) -> str:
    for (state,) in c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)):
        return str(state)
    raise NotFound("job", job_id)


class QueueUpkeep:
    """The operations of ``coord.backend.QueueOps`` off the hot path."""

    _store: Store

    def cancel(self, job_id: int) -> None:
        store = self._store

        def txn(c: apsw.Connection) -> None:
            now = store.mono()
            if c.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, finished_mono = ? "
                "WHERE id = ? AND state IN ('ready', 'dead') RETURNING 1",
                (store.wall(), now, job_id),
            ).fetchall():
                return
            state = _job_state(c, job_id)
            hint = "; fail or release it first" if state == "claimed" else ""
            raise InvalidArgument(
                f"job {job_id} is {state}: only a job that waits can be cancelled{hint}")

        store.write(txn)

    def requeue(self, job_id: int) -> str:
        store = self._store

        def txn(c: apsw.Connection) -> str:
            got = c.execute(
                "UPDATE jobs SET state = 'ready', attempts = 0, available_mono = ?, "
                "finished_at = NULL, finished_mono = NULL, result = NULL "
                "WHERE id = ? AND state IN ('dead', 'cancelled') RETURNING queue",
                (store.mono(), job_id),
            ).fetchall()
            if got:
                return str(got[0][0])
            state = _job_state(c, job_id)
            raise InvalidArgument(
                f"job {job_id} is {state}: only a dead or cancelled job can be requeued")

        return store.write(txn)

    def requeue_dead(self, queue: str) -> int:
        store = self._store
        return store.write(lambda c: len(c.execute(
            "UPDATE jobs SET state = 'ready', attempts = 0, available_mono = ?, "
            "finished_at = NULL, finished_mono = NULL, result = NULL "
            "WHERE queue = ? AND state = 'dead' RETURNING 1",
            (store.mono(), queue),
        ).fetchall()))

    def purge(self, queue: str, everything: bool) -> int:
        def txn(c: apsw.Connection) -> int:
            if not c.execute("SELECT 1 FROM queues WHERE name = ?", (queue,)).fetchall():
                raise NotFound("queue", queue)
            if everything:
                n = len(c.execute("DELETE FROM jobs WHERE queue = ? RETURNING 1",
                                  (queue,)).fetchall())
                c.execute("DELETE FROM queues WHERE name = ?", (queue,))
                return n
            return len(c.execute(
                "DELETE FROM jobs WHERE queue = ? AND state IN ('done', 'dead', 'cancelled') "
                "RETURNING 1", (queue,),
            ).fetchall())

        return self._store.write(txn)

    def adopt(self, from_id: str, to: str | None, to_queue: str | None
              ) -> tuple[list[str], int, int]:
        store = self._store

        def txn(c: apsw.Connection) -> tuple[list[str], int, int]:
            names = [str(r[0]) for r in c.execute(
                "SELECT name FROM queues WHERE owner_id = ? ORDER BY name", (from_id,))]
            if not names:
                raise NotFound("private queue of instance", from_id)
            # A claim by an incarnation of from_id that outlived the caller's check.
            release_claims(
                c, store.mono(), store.wall(),
                "claimed_by = ? AND queue IN (SELECT name FROM queues WHERE owner_id = ?)",
                (from_id, from_id), error=f"worker {from_id} is gone")
            moved = left = 0
            if to is not None:
                c.execute("UPDATE queues SET owner_id = ? WHERE owner_id = ?", (to, from_id))
            else:
                assert to_queue is not None
                if to_queue in names:
                    raise InvalidArgument(f"queue {to_queue!r} is one of the adopted queues")
                queue_row(c, store, to_queue)
                for name in names:
                    moved += len(c.execute(
                        "UPDATE OR IGNORE jobs SET queue = ? WHERE queue = ? "
                        "AND state IN ('ready', 'dead') RETURNING 1", (to_queue, name),
                    ).fetchall())
                    left += int(scalar(
                        c, "SELECT count(*) FROM jobs WHERE queue = ? "
                        "AND state IN ('ready', 'dead')", (name,),
                    ))
            log_event(c, store.wall(), "queue adopted", from_id, ",".join(names), to=to,
                      to_queue=to_queue, jobs=moved)
            return names, moved, left

        return store.write(txn)

    # -- reading -------------------------------------------------------------------------

    def get(self, job_id: int) -> Row | None:
        return self._store.row(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?2",  # noqa: S608
                               (self._store.mono(), job_id))

    def jobs(self, queue: str | None, state: str, limit: int | None) -> list[Row]:
        where: list[str] = []
        params: list[Any] = [self._store.mono()]
        if queue is not None:
            where.append("queue = ?2")
            params.append(queue)
        if state == "ready":
            where.append("state = 'ready' AND available_mono <= ?1")
        elif state == "delayed":
            where.append("state = 'ready' AND available_mono > ?1")
        elif state == "active":
            where.append("state IN ('ready', 'claimed', 'dead')")
        elif state != "all":
            where.append(f"state = ?{len(params) + 1}")
            params.append(state)
        sql = f"SELECT {_COLUMNS} FROM jobs"  # noqa: S608 - fixed fragments only
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY queue, priority DESC, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self._store.rows(sql, tuple(params))

    def stats(self, queue: str | None) -> list[Row]:
        sql = (
            "SELECT q.name, q.owner_id, q.max_depth, "
            "count(j.id) FILTER (WHERE j.state = 'ready' AND j.available_mono <= ?1) AS ready, "
            "count(j.id) FILTER (WHERE j.state = 'ready' AND j.available_mono > ?1) AS delayed, "
            "count(j.id) FILTER (WHERE j.state = 'claimed') AS claimed, "
            "count(j.id) FILTER (WHERE j.state = 'dead') AS dead, "
            "count(j.id) FILTER (WHERE j.state = 'done') AS done, "
            "count(j.id) FILTER (WHERE j.state = 'cancelled') AS cancelled, "
            "max(0.0, ?2 - min(j.created_at) FILTER (WHERE j.state = 'ready' "
            "AND j.available_mono <= ?1)) AS oldest_age "
            "FROM queues q LEFT JOIN jobs j ON j.queue = q.name "
        )
        now, wall = self._store.mono(), self._store.wall()
        params: tuple[Any, ...] = (now, wall)
        if queue is not None:
            sql += "WHERE q.name = ?3 "
            params = (now, wall, queue)
        return self._store.rows(sql + "GROUP BY q.name ORDER BY q.name", params)

    def problems(self) -> list[tuple[str, bool]]:
        store = self._store
        out: list[tuple[str, bool]] = []
        for r in store.rows(
            "SELECT id, state, attempts, max_attempts FROM jobs WHERE attempts < 0 "
            "OR (state = 'ready' AND attempts >= max_attempts) "
            "OR (state = 'claimed' AND (attempts < 1 OR attempts > max_attempts))"
        ):
            out.append((f"job {r['id']} is {r['state']} with {r['attempts']} of "
                        f"{r['max_attempts']} attempts", False))
        for r in store.rows(
            "SELECT id, state FROM jobs WHERE (state = 'claimed') <> "
            "(claimed_by IS NOT NULL AND claimed_incarnation IS NOT NULL "
            " AND claim_expires_mono IS NOT NULL) AND state <> 'done'"
        ):
            out.append((f"job {r['id']} is {r['state']} but its claim fields disagree", False))
        for r in store.rows(
            "SELECT j.id, j.claimed_by, q.owner_id FROM jobs j JOIN queues q ON q.name = j.queue "
            "WHERE j.state = 'claimed' AND q.owner_id IS NOT NULL AND j.claimed_by <> q.owner_id"
        ):
            out.append((f"job {r['id']} of a queue private to {r['owner_id']!r} is claimed by "
                        f"{r['claimed_by']!r}", False))
        for r in store.rows(
            "SELECT id FROM jobs WHERE state = 'claimed' AND claim_expires_mono < ?",
            (store.mono(),),
        ):
            out.append((f"job {r['id']} is claimed past its lease, awaiting release", True))
        return out
