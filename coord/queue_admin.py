"""Queues: maintenance of waiting and finished jobs and of whole queues — cancel, requeue,
purge, adopt (see ``coord.queues`` for the rules)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .db import Store
from .errors import InvalidArgument, PermissionDenied
from .instances import validate_id
from .queue_jobs import queue_name
from .queue_put import nudge_queue
from .reaper import bury_dead


def cancel(store: Store, job_id: int) -> None:
    """Cancel a job that is not claimed and not finished (ready, delayed or dead)."""
    store.backend.queues.cancel(job_id)


def requeue(store: Store, job_id: int) -> None:
    """Put a dead or cancelled job back: ready at once, with a fresh set of attempts."""
    nudge_queue(store, store.backend.queues.requeue(job_id))


def requeue_dead(store: Store, queue: str) -> int:
    """Requeue every dead job of ``queue``; returns how many."""
    queue_name(queue)
    n = store.backend.queues.requeue_dead(queue)
    if n:
        nudge_queue(store, queue)
    return n


def purge(store: Store, queue: str, *, everything: bool = False) -> int:
    """Delete the finished jobs (done, dead, cancelled) of ``queue``, which frees their
    dedupe keys; with ``everything``, delete the queue itself and all its jobs (claims
    included: their holders get ``ClaimLost``). Returns how many jobs were deleted."""
    queue_name(queue)
    return store.backend.queues.purge(queue, everything)


@dataclass(frozen=True)
class Adoption:
    """What ``adopt`` moved."""

    instance_id: str  # the dead instance whose queues were adopted
    to: str | None  # the new owner, when queues changed hands
    to_queue: str | None  # the queue jobs moved into, when they did
    queues: list[str]
    jobs: int  # jobs moved into to_queue
    left: int  # jobs not moved (a job with the same dedupe key is already there)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def adopt(
    store: Store, from_id: str, *, to: str | None = None, to_queue: str | None = None
) -> Adoption:
    """Take over the private queues of the dead instance ``from_id``: give them to the
    instance id ``to`` (the queues keep their names), or move their waiting jobs (ready,
    delayed, dead) into the queue ``to_queue``. A live owner's queues are refused."""
    validate_id(from_id)
    if (to is None) == (to_queue is None):
        raise InvalidArgument("adopt needs exactly one of: a new owner, or a queue to move jobs to")
    if to is not None:
        validate_id(to)
    if to_queue is not None:
        queue_name(to_queue)
    row = store.backend.instances.by_id(from_id)
    if row is not None:
        alive, verdict = store.backend.liveness.judge(row)
        if alive:
            raise PermissionDenied(f"instance {from_id!r} is alive; only a dead one's queues are adopted")
        if row["status"] == "alive":
            bury_dead(store, [row], verdict)  # its claims go back first

    names, moved, left = store.backend.queues.adopt(from_id, to, to_queue)
    result = Adoption(from_id, to, to_queue, names, moved, left)
    for name in result.queues if to is not None else [to_queue] if to_queue else []:
        nudge_queue(store, name)
    return result
