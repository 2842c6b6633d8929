"""Queues: claiming jobs, waiting for them, and giving back the claims of dead holders
(see ``coord.queues`` for the rules)."""

from __future__ import annotations

import os
import socket
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from .backend import queue_channel
from .db import Row, Store
from .errors import InvalidArgument, NotRegistered
from .instances import Instance, require_live
from .queue_jobs import Job, claim_token, make_job, payload_limits, queue_name
from .queue_settle import ack_pairs, result_text
from .reaper import bury_dead

#: A busy claimer looks for dead holders and expired leases at most this often (seconds).
SCAN_INTERVAL = 0.05
#: A claimer that found nothing ready looks again at most this often.
IDLE_SCAN_INTERVAL = 0.005


class _Holder(NamedTuple):
    id: str
    incarnation: int
    sock: socket.socket | None


def _holder(store: Store, who: Instance | str | None) -> _Holder:
    if isinstance(who, Instance):
        if who.closed:
            raise NotRegistered(who.id, "it was closed")
        return _Holder(who.id, who.incarnation, who.sock)
    info = require_live(store, who)
    return _Holder(info.id, info.incarnation, None)


def _try_claim(store: Store, queue: str, h: _Holder, lease: float, n: int = 1,
               acks: list[tuple[str, str | None]] | None = None) -> list[Job]:
    """One claim transaction: ``acks`` first (see ``claim_many``); the claimer must be
    registered and alive, and the queue shared or its own; then up to ``n`` due jobs in
    claim order ([] when none is due)."""
    if acks:
        got = store.backend.queues.claim(queue, h.id, h.incarnation, lease, n, acks)
    else:
        got = store.backend.queues.claim(queue, h.id, h.incarnation, lease, n)
    limits = payload_limits(store)
    return [
        make_job(job_id, queue, "claimed", prio, attempts + 1, max_attempts, payload, key,
                 token, h.id, created, 0.0, lease, error, None, None, limits)
        for token, (job_id, prio, payload, key, attempts, max_attempts, created, error) in got
    ]


# When this process last scanned each queue, per open Store: id(store) -> (a weak reference
# to the store, {queue: store.mono() of the scan}); a clock that went back counts as due.
_scanned: dict[int, tuple[weakref.ref[Store], dict[str, float]]] = {}


def _forget_scans(key: int) -> Callable[[weakref.ref[Store]], None]:
    return lambda _: _scanned.pop(key, None) and None


def _scan_due(store: Store, queue: str, interval: float) -> bool:
    # No lock: two threads that both scan at once do no harm.
    now = store.mono()
    entry = _scanned.get(id(store))
    if entry is None or entry[0]() is not store:
        entry = _scanned[id(store)] = (weakref.ref(store, _forget_scans(id(store))), {})
    if 0 <= now - entry[1].get(queue, float("-inf")) < interval:
        return False
    entry[1][queue] = now
    return True


def release_dead_claims(store: Store, queue: str, *, skip: str | None = None) -> int:
    """Apply the death rule to every dead holder of a claim in ``queue`` and release claims
    past their lease. Returns how many claims went back (or were dead-lettered).

    The claim path calls this by itself; it is public for tools and tests."""
    released = 0
    released += store.backend.queues.release_expired(queue)
    liveness = store.backend.liveness
    look: object | None = None  # read only when a holder is to be judged (a clock read)
    by_verdict: dict[str, list[Row]] = {}
    orphans: list[tuple[str, int]] = []
    for r in store.backend.queues.holders(queue):
        if r["id"] is None or r["incarnation"] != r["claimed_incarnation"] or r["status"] == "dead":
            orphans.append((r["claimed_by"], r["claimed_incarnation"]))
            continue
        if r["id"] == skip:
            continue
        if look is None:
            look = liveness.look()
        alive, verdict = liveness.judge(r, look)
        if not alive:
            by_verdict.setdefault(verdict, []).append(r)
    for verdict, rows in by_verdict.items():
        before = store.backend.queues.claimed(queue)
        bury_dead(store, rows, verdict)
        after = store.backend.queues.claimed(queue)
        released += before - after
    for who, inc in orphans:
        # Claims of an incarnation that is no longer registered: whatever ended it should
        # have released them; release them now.
        released += store.backend.queues.release_gone(who, inc)
    return released


_RESLICE = object()


def claim(
    store: Store,
    queue: str,
    instance: Instance | str | None = None,
    *,
    lease: float | None = None,
    timeout: float | None = 0.0,
    ack: Job | str | None = None,
    result: Any = None,
) -> Job | None:
    """Claim the next job of ``queue`` for ``instance`` (an ``Instance``, a live instance's
    id, or None for ``COORD_INSTANCE_ID``), waiting up to ``timeout`` seconds (None: until
    a job comes).

    Returns the job, with ``token``, claimed for ``lease`` seconds (default
    ``config.claim_lease``), or None when nothing arrived in time. Raises
    ``PermissionDenied`` for another instance's private queue, ``NotRegistered`` when the
    claimer's registration has ended.

    ``ack``: the job (or token) this worker has just finished, acked with ``result`` in the
    same transaction as the claim, before it — what ``ack`` then ``claim`` do, in one
    commit instead of two (a worker loop: ``job = claim(..., ack=job)``). If that claim
    has moved on, ``ClaimLost`` is raised and nothing is claimed; once acked, the ack
    stands whatever the claim then finds (nothing due, or a refusal)."""
    acks = None if ack is None else [(claim_token(ack), result_text(store, result))]
    got = _claim(store, queue, 1, instance, lease, timeout, acks)
    return got[0] if got else None


def claim_many(
    store: Store,
    queue: str,
    n: int,
    instance: Instance | str | None = None,
    *,
    lease: float | None = None,
    timeout: float | None = 0.0,
    ack: Iterable[Job | str] = (),
    results: Iterable[Any] | None = None,
) -> list[Job]:
    """Claim up to ``n`` jobs of ``queue`` in one transaction, in claim order, for a worker
    that takes batches; each has its own token and lease, and is acked, failed, extended or
    released on its own (or acked together with ``ack_many``). Waits up to ``timeout``
    seconds for the first job, then takes what is due; [] when nothing arrived in time.
    Otherwise as ``claim``.

    ``ack`` (with ``results``, as ``ack_many``'s): the last batch, acked in the claim's
    transaction before it. The claims still held are acked; if any had moved on,
    ``ClaimLost`` names those (``ClaimLost.tokens``) and nothing is claimed."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidArgument(f"claim_many needs a count of at least 1, got {n!r}")
    acks = ack_pairs(store, ack, results)
    return _claim(store, queue, n, instance, lease, timeout, acks or None)


def _claim(
    store: Store, queue: str, n: int, instance: Instance | str | None, lease: float | None,
    timeout: float | None, acks: list[tuple[str, str | None]] | None,
) -> list[Job]:
    queue_name(queue)
    h = _holder(store, instance)
    if lease is None:
        lease = store.config.claim_lease
    elif not (lease > 0):
        raise InvalidArgument(f"lease must be positive, got {lease!r}")
    if timeout is not None and not (timeout >= 0):
        raise InvalidArgument(f"timeout must be zero or more seconds, got {timeout!r}")
    if _scan_due(store, queue, SCAN_INTERVAL):
        release_dead_claims(store, queue, skip=h.id)
    jobs = _try_claim(store, queue, h, lease, n, acks)
    if jobs:
        return jobs
    if _scan_due(store, queue, IDLE_SCAN_INTERVAL) and release_dead_claims(store, queue, skip=h.id):
        jobs = _try_claim(store, queue, h, lease, n)
    if jobs or timeout == 0:
        return jobs
    return _wait_claim(store, queue, h, lease, n,
                       float("inf") if timeout is None else store.mono() + timeout)


def _wait_claim(
    store: Store, queue: str, h: _Holder, lease: float, n: int, deadline: float
) -> list[Job]:
    me, liveness = os.getpid(), store.backend.liveness
    channels = [queue_channel(queue)]

    def watch() -> list[int]:
        return [pid for r in store.backend.queues.holders(queue)
                if r["pid"] and r["status"] == "alive"
                and (pid := liveness.watchable_pid(r)) is not None and pid != me]

    while True:
        now = store.mono()
        if now >= deadline:
            return []
        due_in = store.backend.queues.next_due(queue)
        due = None if due_in is None else now + due_in
        until = deadline if due is None else min(deadline, max(due, now + IDLE_SCAN_INTERVAL))
        slice_end = until

        def check(slice_end: float = slice_end) -> Any:
            if not store.backend.queues.ready(queue):
                if _scan_due(store, queue, IDLE_SCAN_INTERVAL):
                    if release_dead_claims(store, queue, skip=h.id):
                        return _try_claim(store, queue, h, lease, n) or None
                due_in = store.backend.queues.next_due(queue)
                if due_in is not None and store.mono() + due_in + 0.001 < slice_end:
                    return _RESLICE
                return None
            return _try_claim(store, queue, h, lease, n) or None

        wait = None if until == float("inf") else max(0.0, until - now)
        got = store.backend.wakeup.wait_for(check, wait, sock=h.sock, watch_pids=watch,
                                            channels=channels)
        if isinstance(got, list):
            return got
        if got is None and store.mono() >= deadline:
            return []
        if _scan_due(store, queue, IDLE_SCAN_INTERVAL):
            release_dead_claims(store, queue, skip=h.id)
