"""Queues: named work queues with claims, leases, retries and a dead-letter state.

A queue is **shared** (any live instance claims from it) or **private** to one instance id
(only that id, in any incarnation, claims; anyone may put). A queue is created by
``create_queue`` or, shared, by the first ``put``.

Life of a job::

    put ─► ready ──claim──► claimed ──ack──► done (result kept for config.result_retention)
            ▲ ▲               │  │
            │ └─── release ───┤  ├─ fail, attempts left ──► ready again after a backoff
            │                 │  └─ fail, out of attempts ─► dead (last error kept)
            │                 └─ holder died, or lease expired: ready, or dead if out of attempts
            └── requeue ◄── dead, cancelled ◄── cancel (a ready or dead job)

**Order**: higher priority first, then FIFO (put order). A delayed job (``delay=``, or a
retry backoff) keeps its place and is skipped until it is due; people see it as 'delayed'.

**Attempts** are counted when a job is claimed. A claim whose holder dies (proof of death)
or whose lease runs out (a hung worker) is released with that attempt counted, and a job
out of attempts is dead-lettered instead. ``release`` gives the attempt back: the worker
hands the job back untried. ``fail`` retries with exponential backoff and jitter unless
told ``retry_in``.

**Claims** are taken in one IMMEDIATE transaction that checks the claimer is still
registered and alive, picks the best due job and updates it by id, so a job has at most one
claimer, and carry a token (``<job id>-<random>``: a claim is found by its job id and the
whole token compared). ``ack``, ``fail``, ``extend`` and ``release`` need the token and
raise ``ClaimLost`` when the claim has moved on (released, expired, redelivered): a worker
that hung and resumed can never ack a job that another worker now holds. A claim past its
lease is lost even before anyone releases it. ``claim_many`` claims up to n jobs in one
transaction and ``ack_many`` acks many, each claim on its own terms (see their docstrings).
A worker loop acks its last job (or batch) in its next claim's transaction, before the
claim: ``job = claim(..., ack=job)`` — one commit per job instead of two.
What a claim and an ack touch is kept small: see ``schema/004_queue_hot.sql``.

**Death**: a claimer looks at the holders of its queue's claims (at most every
``SCAN_INTERVAL`` while busy, at once when it finds nothing ready) and applies the death
rule (``coord.reaper``) to any it finds dead, so a dead worker's job goes back at once, not
after its lease. A waiting claimer also watches the holders' pids, so a death wakes it.

**Waiting** is ``coord.nudge.wait_for``: a put (or release, or retry due now) nudges the
instances that may claim from the queue, and waiters also wake when the database changes
or when the next delayed job or claim lease falls due.

The parts live in their own modules, all re-exported here: ``coord.queue_jobs`` (the job
record, listing, stats), ``coord.queue_put`` (queues, put and its validation, nudges),
``coord.queue_claim`` (claiming, waiting, dead holders), ``coord.queue_settle`` (ack, fail,
extend, release) and ``coord.queue_admin`` (cancel, requeue, purge, adopt).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .db import Store
from .errors import InvalidArgument
from .instances import Instance, validate_id
from .queue_admin import Adoption, adopt, cancel, purge, requeue, requeue_dead
from .queue_claim import (
    IDLE_SCAN_INTERVAL,
    SCAN_INTERVAL,
    claim,
    claim_many,
    release_dead_claims,
)
from .queue_jobs import (
    ACTIVE_STATES,
    SHOWN_STATES,
    STATES,
    Job,
    NewJob,
    QueueStats,
    get_job,
    list_jobs,
    problems,
    queue_name,
    stats,
)
from .queue_put import (
    DEFAULT_MAX_ATTEMPTS,
    NUDGE_CACHE_SECONDS,
    NUDGE_INTERVAL,
    QUEUE_CONFIG_SECONDS,
    create_queue,
    nudge_queue,
    put,
    put_many,
)
from .queue_settle import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    RESULT_LIMIT,
    ack,
    ack_many,
    backoff,
    extend,
    fail,
    release,
)

# -- a handle -----------------------------------------------------------------------------


class Queue:
    """A handle on one named queue, optionally bound to the instance that claims.

    ``Queue(store, "jobs", inst)`` uses a shared queue (created by the first put);
    ``private=True`` creates it private to ``instance``; ``max_depth`` bounds it."""

    def __init__(
        self,
        store: Store,
        name: str,
        instance: Instance | str | None = None,
        *,
        private: bool = False,
        max_depth: int | None = None,
    ) -> None:
        self.store = store
        self.name = queue_name(name)
        self.instance = instance
        if private or max_depth is not None:
            owner = None
            if private:
                if instance is None:
                    raise InvalidArgument("a private queue needs its owning instance")
                owner = instance.id if isinstance(instance, Instance) else validate_id(instance)
            create_queue(store, name, owner=owner, max_depth=max_depth)

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    def put(self, payload: Any, *, priority: int = 0, delay: float = 0.0,
            dedupe_key: str | None = None, max_attempts: int | None = None) -> int:
        return put(self.store, self.name, payload, priority=priority, delay=delay,
                   dedupe_key=dedupe_key, max_attempts=max_attempts)

    def put_many(self, jobs: Iterable[NewJob | Any]) -> list[int]:
        return put_many(self.store, self.name, jobs)

    def claim(self, *, lease: float | None = None, timeout: float | None = 0.0,
              ack: Job | str | None = None, result: Any = None) -> Job | None:
        return claim(self.store, self.name, self.instance, lease=lease, timeout=timeout,
                     ack=ack, result=result)

    def claim_many(self, n: int, *, lease: float | None = None, timeout: float | None = 0.0,
                   ack: Iterable[Job | str] = (), results: Iterable[Any] | None = None
                   ) -> list[Job]:
        return claim_many(self.store, self.name, n, self.instance, lease=lease,
                          timeout=timeout, ack=ack, results=results)

    def ack(self, job: Job | str, result: Any = None) -> None:
        ack(self.store, job, result)

    def ack_many(self, jobs: Iterable[Job | str], results: Iterable[Any] | None = None) -> None:
        ack_many(self.store, jobs, results)

    def fail(self, job: Job | str, error: str = "", *, retry_in: float | None = None) -> str:
        return fail(self.store, job, error, retry_in=retry_in)

    def extend(self, job: Job | str, lease: float | None = None) -> float:
        return extend(self.store, job, lease)

    def release(self, job: Job | str) -> None:
        release(self.store, job)

    def cancel(self, job_id: int) -> None:
        cancel(self.store, job_id)

    def requeue(self, job_id: int) -> None:
        requeue(self.store, job_id)

    def requeue_dead(self) -> int:
        return requeue_dead(self.store, self.name)

    def purge(self, *, everything: bool = False) -> int:
        return purge(self.store, self.name, everything=everything)

    def jobs(self, state: str | None = None) -> list[Job]:
        return list_jobs(self.store, self.name, state=state)

    def stats(self) -> QueueStats:
        return stats(self.store, self.name)[0]


__all__ = [
    "ACTIVE_STATES", "BACKOFF_BASE", "BACKOFF_MAX", "DEFAULT_MAX_ATTEMPTS", "IDLE_SCAN_INTERVAL",
    "NUDGE_CACHE_SECONDS", "NUDGE_INTERVAL", "QUEUE_CONFIG_SECONDS", "RESULT_LIMIT",
    "SCAN_INTERVAL", "SHOWN_STATES", "STATES",
    "Adoption", "Job", "NewJob", "Queue", "QueueStats", "ack", "ack_many", "adopt", "backoff",
    "cancel", "claim", "claim_many", "create_queue", "extend", "fail", "get_job", "list_jobs",
    "nudge_queue", "problems", "purge", "put", "put_many", "release", "release_dead_claims",
    "requeue", "requeue_dead", "stats",
]
