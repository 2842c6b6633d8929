"""Queues: the job as a caller sees it, and reading jobs and queues (see ``coord.queues``
for the rules). The engine hands back rows whose times are durations from its own clock
(seconds until due, seconds left on a claim, a queue's oldest age); nothing here reads an
engine clock."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .backend import JOB_FIELDS
from .db import Row, Store
from .errors import InvalidArgument, NotFound
from .instances import validate_name
from .payload import decode

#: Job states as stored, and as shown ('delayed' is a ready job that is not yet due).
STATES = ("ready", "claimed", "done", "dead", "cancelled")
SHOWN_STATES = ("ready", "delayed", "claimed", "dead", "done", "cancelled")
#: What ``list_jobs`` shows by default: work not finished.
ACTIVE_STATES = ("ready", "delayed", "claimed", "dead")


class _Decoded:
    """A job's payload, decoded and validated on first read and then kept in the job's
    ``__dict__``, where later reads find it first (a descriptor without ``__set__``): unlike
    ``functools.cached_property`` (a lock per read on Python 3.11), it costs one call, once.
    Two threads reading it first at once both decode it; either result is the same value."""

    def __get__(self, job: Job | None, owner: type | None = None) -> Any:
        if job is None:
            return self
        limit, depth = job._limits
        value = decode(job.payload_text, limit=limit, max_depth=depth)
        job.__dict__["payload"] = value
        return value


@dataclass(frozen=True)
class Job:
    """One job as seen now. ``token`` is set only on the jobs ``claim`` (or ``claim_many``)
    returned.

    ``payload`` is decoded and validated when first read, not when the job is fetched: a
    worker that needs only the id or the token pays nothing for it, and a payload that fails
    validation (``PayloadError``) reaches a worker that holds the claim and can ``fail`` it."""

    id: int
    queue: str
    state: str  # one of SHOWN_STATES
    priority: int
    attempts: int
    max_attempts: int
    payload_text: str = field(repr=False)  # the payload as stored (JSON text)
    dedupe_key: str | None
    token: str | None
    instance_id: str | None  # who holds it (claimed) or who acked it (done)
    created_at: float
    available_in: float  # seconds until due; 0 when due
    expires_in: float | None  # seconds left on the claim lease
    last_error: str | None
    result: Any
    finished_at: float | None
    _limits: tuple[int, int] = field(repr=False, compare=False)  # (payload limit, max depth)

    payload = _Decoded()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "payload_text":
                d["payload"] = self.payload  # in the payload's place, decoded
            elif f.name != "_limits" and not (f.name == "token" and self.token is None):
                d[f.name] = getattr(self, f.name)
        return d


#: Job's fields in order, for ``make_job``.
_JOB_ATTRS = tuple(f.name for f in fields(Job))


def make_job(*values: Any) -> Job:
    """A Job from its field values in order, without the frozen dataclass's ``__init__``,
    which sets each of its seventeen fields through ``object.__setattr__``: on the claim
    path that was a tenth of the Python time."""
    job: Job = object.__new__(Job)
    job.__dict__.update(zip(_JOB_ATTRS, values, strict=True))
    return job


@dataclass(frozen=True)
class NewJob:
    """One job for ``put_many``."""

    payload: Any
    priority: int = 0
    delay: float = 0.0
    dedupe_key: str | None = None
    max_attempts: int | None = None


@dataclass(frozen=True)
class QueueStats:
    """Counts for one queue. ``instance_id`` is the owner of a private queue (None: shared),
    ``alive`` its liveness; ``oldest_age`` is the age in seconds of the oldest job that is
    ready and due (None when there is none)."""

    id: str
    instance_id: str | None
    alive: bool | None
    max_depth: int | None
    ready: int
    delayed: int
    claimed: int
    dead: int
    done: int
    cancelled: int
    oldest_age: float | None

    @property
    def name(self) -> str:
        return self.id

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def job_from_row(store: Store, r: Row | tuple[Any, ...]) -> Job:
    """A Job from an engine row: a dict, or a tuple in ``JOB_FIELDS`` order."""
    if isinstance(r, dict):
        r = tuple(r[k] for k in JOB_FIELDS)
    (id, queue, state, priority, payload, dedupe_key, attempts, max_attempts, available_in,
     created_at, claimed_by, expires_in, last_error, result, finished_at) = r
    avail = float(available_in) if state == "ready" and available_in > 0 else 0.0
    return Job(
        id=id,
        queue=queue,
        state="delayed" if avail > 0 else state,
        priority=priority,
        attempts=attempts,
        max_attempts=max_attempts,
        payload_text=payload,
        dedupe_key=dedupe_key,
        token=None,
        instance_id=claimed_by,
        created_at=created_at,
        available_in=avail,
        expires_in=expires_in,
        last_error=last_error,
        result=None if result is None else decode(result),
        finished_at=finished_at,
        _limits=payload_limits(store),
    )


def payload_limits(store: Store) -> tuple[int, int]:
    """(payload limit, max depth) a job's payload is decoded with."""
    return store.config.payload_limit, store.config.payload_max_depth


def queue_name(queue: str) -> str:
    """``queue``, validated as a queue name."""
    return validate_name(queue, "queue name")


def claim_token(job_or_token: Job | str) -> str:
    """The claim token of a claimed ``Job``, or a token given as such."""
    if isinstance(job_or_token, Job):
        if job_or_token.token is None:
            raise InvalidArgument(f"job {job_or_token.id} carries no claim token")
        return job_or_token.token
    if not isinstance(job_or_token, str) or not job_or_token:
        raise InvalidArgument("a claim token is a non-empty string")
    return job_or_token


# -- reading ------------------------------------------------------------------------------


def get_job(store: Store, job_id: int) -> Job:
    r = store.backend.queues.get(job_id)
    if r is None:
        raise NotFound("job", job_id)
    return job_from_row(store, r)


def list_jobs(
    store: Store, queue: str | None = None, *, state: str | None = None, limit: int | None = None
) -> list[Job]:
    """Jobs in claim order (queue, then priority high to low, then FIFO). ``state`` is one
    of SHOWN_STATES, 'active' (the default: ready, delayed, claimed, dead) or 'all'."""
    state = state or "active"
    if queue is not None:
        queue_name(queue)
    if state not in SHOWN_STATES and state not in ("active", "all"):
        raise InvalidArgument(
            f"unknown state {state!r}: use one of {', '.join(SHOWN_STATES)}, active, all")
    return [job_from_row(store, r) for r in store.backend.queues.jobs(queue, state, limit)]


def stats(store: Store, queue: str | None = None) -> list[QueueStats]:
    """Counts per queue (every queue, or one)."""
    if queue is not None:
        queue_name(queue)
    rows = store.backend.queues.stats(queue)
    if queue is not None and not rows:
        raise NotFound("queue", queue)
    owners = {r["owner_id"] for r in rows if r["owner_id"] is not None}
    alive: dict[str, bool] = {}
    if owners:
        liveness = store.backend.liveness
        look = liveness.look()
        for o in owners:
            irow = store.backend.instances.by_id(o)
            alive[o] = irow is not None and liveness.judge(irow, look)[0]
    return [
        QueueStats(
            id=r["name"], instance_id=r["owner_id"],
            alive=None if r["owner_id"] is None else alive[r["owner_id"]],
            max_depth=r["max_depth"], ready=r["ready"], delayed=r["delayed"],
            claimed=r["claimed"], dead=r["dead"], done=r["done"], cancelled=r["cancelled"],
            oldest_age=r["oldest_age"],
        )
        for r in rows
    ]


def problems(store: Store) -> list[tuple[str, bool]]:
    """Queue invariants for ``coord.check``: [(problem, pending)]; empty when healthy.
    Pending problems are claims past their lease, which the next claim or reap releases."""
    return store.backend.queues.problems()
