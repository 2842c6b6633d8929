"""The engine protocol's queue operations, added by step 4 of ``coord.backend``'s plan (see
``coord.backend`` for the protocol as a whole; ``coord.queues`` for the rules: validation,
waiting, retries and their backoff, the death rule's policy for claims)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..db import Row

#: The fields of a job row, in the order ``get`` and ``jobs`` return them. Times: ``*_at`` are
#: wall-clock seconds, for people; ``available_in`` (seconds until a ready job is due, 0 when
#: due or not ready) and ``expires_in`` (seconds left on a claim's lease, negative past it;
#: None unless claimed) are durations the engine computes from its own clock, so that a
#: caller never compares its clock with the engine's.
JOB_FIELDS = (
    "id", "queue", "state", "priority", "payload", "dedupe_key", "attempts", "max_attempts",
    "available_in", "created_at", "claimed_by", "expires_in", "last_error", "result",
    "finished_at",
)

#: A job to put, validated: (payload JSON text, priority, delay in seconds, dedupe key,
#: max attempts).
NewJobRow = tuple[str, int, float, "str | None", int]
#: A job to import, validated: (payload JSON text, priority, dedupe key, max attempts,
#: attempts already made, state 'ready' or 'dead', created_at, last error).
ImportRow = tuple[str, int, "str | None", int, int, str, float, "str | None"]


class QueueOps(Protocol):
    """Queues and their jobs. Claims carry a token ``<job id>-<random>``: an operation on a
    claim finds it by the job id and compares the whole token, and a claim past its lease
    is lost. Every operation on a claim that finds it merely expired releases it (its
    attempt counted) in the same transaction. Claims whose holder is gone or whose lease
    ran out go back to ready (or dead, out of attempts) through the death rule's one
    "back to ready". Expiry and delays are stamped from the engine's clock, and what is
    read back of them is a duration from that clock (never one of its readings)."""

    # -- queues
    def create(self, name: str, owner: str | None, max_depth: int | None) -> None:
        """Create the queue, or keep it (its max depth updated when given);
        ``InvalidArgument`` when it exists with another owner."""
        ...

    def owner(self, queue: str) -> str | None:
        """The owner of a private queue (None: shared, or no such queue)."""
        ...

    def nudge_paths(self) -> list[tuple[str, str]]:
        """(instance id, nudge address) of every live instance that can be nudged."""
        ...

    # -- put
    def put(self, queue: str, text: str, priority: int, delay: float, max_attempts: int,
            known: bool) -> int | None:
        """The common put: one ready job without a dedupe key into an existing queue
        without a max depth (``known``: the caller saw that lately); its id, or None when
        the queue is missing or bounded (then ``put_rows``)."""
        ...

    def put_rows(self, queue: str, rows: Sequence[NewJobRow]
                 ) -> tuple[list[int], bool, str | None]:
        """Put jobs in one transaction, creating the queue shared if needed: (the ids in
        order — existing ids for dedupe repeats —, whether any was added, the queue's
        owner). ``QueueFull`` past the max depth."""
        ...

    def import_jobs(self, queue: str, rows: Sequence[ImportRow], path: str
                    ) -> tuple[list[tuple[int, bool]], str | None]:
        """Add imported jobs in one transaction, due now, creating the queue shared if
        needed; a dead one is finished now, a dedupe repeat not added; with a 'queue
        imported' event naming ``path`` when any was added. ([(id, added)] in order, the
        queue's owner). ``QueueFull`` past the max depth."""
        ...

    # -- claims
    def claim(self, queue: str, id: str, incarnation: int, lease: float, n: int,
              acks: Sequence[tuple[str, str | None]] = ()
              ) -> list[tuple[str, tuple[Any, ...]]]:
        """In one transaction: first ack each (token, result) of ``acks`` (a worker's last
        jobs, as ``ack_many``: the claims still held are acked); when any claim had moved
        on, commit and raise ``ClaimLost`` naming those, claiming nothing. Then
        ``NotRegistered`` unless (id, incarnation) is alive, ``PermissionDenied`` for
        another's private queue (either raised after the acks commit); then up to ``n`` due
        jobs in claim order, claimed for ``lease`` seconds: [(token, (id, priority,
        payload, dedupe_key, attempts before this claim, max_attempts, created_at,
        last_error))]."""
        ...

    def ready(self, queue: str) -> bool:
        """A job is ready and due."""
        ...

    def next_due(self, queue: str) -> float | None:
        """Seconds until the next delayed job falls due or the next claim lease runs out
        (0 or less when one already has); None when neither is pending."""
        ...

    def holders(self, queue: str) -> list[Row]:
        """The distinct (claimed_by, claimed_incarnation) of its claims, each with the
        holder's instance row columns (None when it has no row)."""
        ...

    def claimed(self, queue: str) -> int:
        """How many of its jobs are claimed."""
        ...

    def release_expired(self, queue: str) -> int:
        """Release its claims past their lease; how many."""
        ...

    def release_gone(self, who: str, incarnation: int) -> int:
        """Release the claims of an incarnation that is no longer registered; how many."""
        ...

    def ack(self, token: str, result: str | None) -> bool:
        """Done, keeping ``result`` (JSON text); False when the claim has moved on."""
        ...

    def ack_many(self, pairs: Sequence[tuple[str, str | None]]) -> list[str]:
        """Ack each (token, result) in one transaction; the tokens whose claim had moved on
        (the others are acked)."""
        ...

    def fail(self, token: str, error: str, retry_in: Callable[[int], float]
             ) -> tuple[str, str, float | None] | None:
        """A failed attempt: dead out of attempts (with its event), else ready again after
        ``retry_in(attempts)`` seconds. (new state, queue, delay), or None when the claim
        has moved on."""
        ...

    def extend(self, token: str, lease: float) -> bool:
        """The claim's lease ``lease`` seconds from now; False when it has moved on."""
        ...

    def release(self, token: str) -> str | None:
        """Hand back untried (the attempt given back): its queue, or None when the claim
        has moved on."""
        ...

    # -- waiting jobs, dead letters, whole queues
    def cancel(self, job_id: int) -> None:
        """Cancel a ready or dead job; ``NotFound``, or ``InvalidArgument`` naming its state."""
        ...

    def requeue(self, job_id: int) -> str:
        """A dead or cancelled job ready again with fresh attempts; its queue.
        ``NotFound``, or ``InvalidArgument`` naming its state."""
        ...

    def requeue_dead(self, queue: str) -> int:
        """Requeue every dead job of ``queue``; how many."""
        ...

    def purge(self, queue: str, everything: bool) -> int:
        """Delete its finished jobs (``everything``: the queue and all its jobs); how many
        jobs. ``NotFound`` for no such queue."""
        ...

    def adopt(self, from_id: str, to: str | None, to_queue: str | None
              ) -> tuple[list[str], int, int]:
        """Give ``from_id``'s private queues to ``to``, or move their waiting jobs into
        ``to_queue`` (created shared if needed), releasing any claim of ``from_id`` left in
        them, with its event: (queue names, jobs moved, jobs left). ``NotFound`` when it
        owns none."""
        ...

    # -- reading
    def get(self, job_id: int) -> Row | None:
        """The job's row (``JOB_FIELDS``)."""
        ...

    def jobs(self, queue: str | None, state: str, limit: int | None) -> list[Row]:
        """Rows (``JOB_FIELDS``) in claim order of ``state`` (one of
        ``coord.queues.SHOWN_STATES``, 'active' or 'all'); 'ready' and 'delayed' are told
        apart at the engine's now, the same now the rows' durations are computed at."""
        ...

    def stats(self, queue: str | None) -> list[Row]:
        """Per queue (or the one): name, owner_id, max_depth and the counts ready, delayed
        (at the engine's now, as ``jobs``), claimed, dead, done, cancelled, and
        ``oldest_age``: the seconds since the oldest due ready job was put (None when there
        is none)."""
        ...

    def problems(self) -> list[tuple[str, bool]]:
        """The queues' own invariants: [(problem, pending)]."""
        ...
