"""Queues: creating them, putting jobs (with their validation) and nudging the claimers
(see ``coord.queues`` for the rules)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from . import nudge
from .db import Store
from .errors import InvalidArgument
from .instances import validate_id
from .kv import Fence
from .payload import encode
from .queue_jobs import NewJob, queue_name

#: Default attempts per job (claims, counting the first).
DEFAULT_MAX_ATTEMPTS = 5
#: How long a process trusts its list of nudge sockets (seconds).
NUDGE_CACHE_SECONDS = 0.5
#: A max depth set on a queue that had none applies to puts at most this long after
#: (seconds): a process that saw the queue unbounded trusts that for this long.
QUEUE_CONFIG_SECONDS = 1.0
#: A process nudges the waiters of one queue at most this often (seconds); see nudge_queue.
NUDGE_INTERVAL = 0.002


def create_queue(
    store: Store, name: str, *, owner: str | None = None, max_depth: int | None = None
) -> None:
    """Create a queue: shared (``owner`` None) or private to the instance id ``owner``.

    An existing queue is kept (its ``max_depth`` updated when given); asking for a
    different owner than it has raises ``InvalidArgument`` (use ``adopt`` to move one)."""
    queue_name(name)
    if owner is not None:
        validate_id(owner)
    if max_depth is not None and max_depth < 1:
        raise InvalidArgument(f"max depth must be at least 1, got {max_depth}")

    _unbounded.pop((id(store), name), None)

    store.backend.queues.create(name, owner, max_depth)


# -- nudges -------------------------------------------------------------------------------

_nudge_cache: dict[tuple[int, str], tuple[float, list[tuple[str, str]]]] = {}
_nudged: dict[tuple[int, str], float] = {}  # (id(store), queue) -> last nudge
_UNKNOWN = "\0unknown"


def nudge_queue(store: Store, queue: str, owner: str | None = _UNKNOWN) -> None:
    """Wake the instances that may claim from ``queue``: its owner, or every live one.

    At most one nudge per NUDGE_INTERVAL for one queue: a waiter woken that recently is
    still polling the database at a short interval (``coord.nudge.wait_for`` restarts its
    polling at half a millisecond), so it sees the next commit anyway. No lock: a race
    costs at most one nudge more or less, and a nudge is only a hint."""
    now, key = time.monotonic(), (id(store), queue)
    if now - _nudged.get(key, float("-inf")) < NUDGE_INTERVAL:
        return
    _nudged[key] = now
    pid, path = os.getpid(), str(store.path)
    if owner == _UNKNOWN:
        owner = store.backend.queues.owner(queue)
    hit = _nudge_cache.get((pid, path))
    if hit is None or now - hit[0] > NUDGE_CACHE_SECONDS:
        rows = store.backend.queues.nudge_paths()
        hit = _nudge_cache[(pid, path)] = (now, rows)
    nudge.nudge(p for i, p in hit[1] if owner is None or i == owner)


# -- put ----------------------------------------------------------------------------------


def put(
    store: Store,
    queue: str,
    payload: Any,
    *,
    priority: int = 0,
    delay: float = 0.0,
    dedupe_key: str | None = None,
    max_attempts: int | None = None,
    fence: Fence | None = None,
) -> int:
    """Add one job and return its id. With ``dedupe_key``, a job with that key already in
    the queue (in any state, until it is purged) is not added again: its id is returned.
    Raises ``QueueFull`` when the queue has a max depth and that many jobs wait. With
    ``fence`` (a held lease), only while its term is the current, unexpired one, in the same
    transaction: ``LeaseLost`` otherwise, and nothing is stored."""
    queue_name(queue)
    row = checked_job(store, payload, priority, delay, dedupe_key, max_attempts)
    if dedupe_key is None and fence is None:
        text, prio, wait, _, attempts = row
        key = (id(store), queue)
        now = time.monotonic()
        known = now - _unbounded.get(key, float("-inf")) < QUEUE_CONFIG_SECONDS
        job_id = store.backend.queues.put(queue, text, prio, wait, attempts, known)
        if job_id is not None:
            if not known:  # the engine looked: unbounded, for the next QUEUE_CONFIG_SECONDS
                _unbounded[key] = now
            nudge_queue(store, queue)
            return job_id
        _unbounded.pop(key, None)
    return _put_rows(store, queue, [row], fence)[0]


#: (id(store), queue) -> when this process last looked and saw that the queue has no max
#: depth: then a put inserts without looking for QUEUE_CONFIG_SECONDS (the engine still
#: proves the queue exists), and looks again after — a put that did not look does not renew
#: it, so a producer that never pauses still sees a max depth set meanwhile.
_unbounded: dict[tuple[int, str], float] = {}


def put_many(store: Store, queue: str, jobs: Iterable[NewJob | Any], *,
             fence: Fence | None = None) -> list[int]:
    """Add many jobs in one transaction (all or none); each item is a ``NewJob`` or a bare
    payload. Returns the job ids in order (existing ids for dedupe repeats). ``fence``: as
    ``put``'s."""
    queue_name(queue)
    rows = []
    for item in jobs:
        j = item if isinstance(item, NewJob) else NewJob(item)
        rows.append(checked_job(store, j.payload, j.priority, j.delay, j.dedupe_key,
                                j.max_attempts))
    return _put_rows(store, queue, rows, fence) if rows else []


def checked_job(
    store: Store, payload: Any, priority: int, delay: float, dedupe_key: str | None,
    max_attempts: int | None,
) -> tuple[str, int, float, str | None, int]:
    """Validate one job: (payload text, priority, delay, dedupe key, max attempts)."""
    cfg = store.config
    text = encode(payload, limit=cfg.payload_limit, max_depth=cfg.payload_max_depth)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise InvalidArgument(f"priority must be an integer, got {priority!r}")
    if not isinstance(delay, (int, float)) or not (delay >= 0):  # also refuses NaN
        raise InvalidArgument(f"delay must be zero or more seconds, got {delay!r}")
    attempts = DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts
    if not isinstance(attempts, int) or attempts < 1:
        raise InvalidArgument(f"max attempts must be at least 1, got {attempts!r}")
    if dedupe_key is not None and (not isinstance(dedupe_key, str) or not dedupe_key):
        raise InvalidArgument("a dedupe key is a non-empty string")
    return text, priority, float(delay), dedupe_key, attempts


def _put_rows(
    store: Store, queue: str, rows: list[tuple[str, int, float, str | None, int]],
    fence: Fence | None = None,
) -> list[int]:
    if fence is None:
        ids, added, owner = store.backend.queues.put_rows(queue, rows)
    else:
        ids, added, owner = store.backend.leases.fenced_queue_put(fence.name, fence.term,
                                                                  queue, rows)
    if added:
        nudge_queue(store, queue, owner)
    return ids
