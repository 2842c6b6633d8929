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
What a claim and an ack touch is kept small: see ``schema/004_queue_hot.sql``.

**Death**: a claimer looks at the holders of its queue's claims (at most every
``SCAN_INTERVAL`` while busy, at once when it finds nothing ready) and applies the death
rule (``coord.reaper``) to any it finds dead, so a dead worker's job goes back at once, not
after its lease. A waiting claimer also watches the holders' pids, so a death wakes it.

**Waiting** is ``coord.nudge.wait_for``: a put (or release, or retry due now) nudges the
instances that may claim from the queue, and waiters also wake when the database changes
or when the next delayed job or claim lease falls due.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from . import nudge
from .backend import JOB_FIELDS
from .db import Row, Store
from .errors import ClaimLost, InvalidArgument, NotFound, NotRegistered, PermissionDenied
from .instances import Instance, require_live, validate_id, validate_name
from .payload import decode, encode
from .reaper import bury_dead

#: Job states as stored, and as shown ('delayed' is a ready job that is not yet due).
STATES = ("ready", "claimed", "done", "dead", "cancelled")
SHOWN_STATES = ("ready", "delayed", "claimed", "dead", "done", "cancelled")
#: What ``list_jobs`` shows by default: work not finished.
ACTIVE_STATES = ("ready", "delayed", "claimed", "dead")

#: Default attempts per job (claims, counting the first).
DEFAULT_MAX_ATTEMPTS = 5
#: Retry backoff after ``fail`` without ``retry_in``: BASE * 2**(attempts-1) seconds, at most
#: MAX, times a random factor in [0.5, 1) (jitter, so failed jobs do not retry in lockstep).
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
#: A job's result is small: at most this many bytes of JSON.
RESULT_LIMIT = 64 * 1024
#: A busy claimer looks for dead holders and expired leases at most this often (seconds).
SCAN_INTERVAL = 0.05
#: A claimer that found nothing ready looks again at most this often.
IDLE_SCAN_INTERVAL = 0.005
#: How long a process trusts its list of nudge sockets (seconds).
NUDGE_CACHE_SECONDS = 0.5
#: A max depth set on a queue that had none applies to puts at most this long after
#: (seconds): a process that saw the queue unbounded trusts that for this long.
QUEUE_CONFIG_SECONDS = 1.0
#: A process nudges the waiters of one queue at most this often (seconds); see nudge_queue.
NUDGE_INTERVAL = 0.002


# -- data ---------------------------------------------------------------------------------


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

    @functools.cached_property
    def payload(self) -> Any:
        limit, depth = self._limits
        return decode(self.payload_text, limit=limit, max_depth=depth)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "payload_text":
                d["payload"] = self.payload  # in the payload's place, decoded
            elif f.name != "_limits" and not (f.name == "token" and self.token is None):
                d[f.name] = getattr(self, f.name)
        return d


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



def _job(store: Store, r: Row | tuple[Any, ...], now: float, *, with_token: bool = False) -> Job:
    """A Job from a row: a dict, or a tuple in ``JOB_FIELDS`` order."""
    # An engine that computes the durations itself (PostgreSQL: by the server's clock)
    # hands them back beside the row; else they are computed here at ``now``.
    due_in = left = None
    if isinstance(r, dict):
        due_in, left = r.get("available_in"), r.get("expires_in")
        r = tuple(r[k] for k in JOB_FIELDS)
    (id, queue, state, priority, payload, dedupe_key, attempts, max_attempts, available,
     created_at, claimed_by, token, expires, last_error, result, finished_at) = r
    if due_in is not None:
        avail = float(due_in) if state == "ready" else 0.0
    else:
        avail = available - now if state == "ready" and available > now else 0.0
    if left is not None:
        expires = now + float(left)
    return Job(
        id=id,
        queue=queue,
        state="delayed" if avail > 0 else state,
        priority=priority,
        attempts=attempts,
        max_attempts=max_attempts,
        payload_text=payload,
        dedupe_key=dedupe_key,
        token=token if with_token else None,
        instance_id=claimed_by,
        created_at=created_at,
        available_in=avail,
        expires_in=None if expires is None else expires - now,
        last_error=last_error,
        result=None if result is None else decode(result),
        finished_at=finished_at,
        _limits=_limits(store),
    )


def _limits(store: Store) -> tuple[int, int]:
    return store.config.payload_limit, store.config.payload_max_depth


def _name(queue: str) -> str:
    return validate_name(queue, "queue name")


def _token(job_or_token: Job | str) -> str:
    if isinstance(job_or_token, Job):
        if job_or_token.token is None:
            raise InvalidArgument(f"job {job_or_token.id} carries no claim token")
        return job_or_token.token
    if not isinstance(job_or_token, str) or not job_or_token:
        raise InvalidArgument("a claim token is a non-empty string")
    return job_or_token


# -- queues -------------------------------------------------------------------------------


def create_queue(
    store: Store, name: str, *, owner: str | None = None, max_depth: int | None = None
) -> None:
    """Create a queue: shared (``owner`` None) or private to the instance id ``owner``.

    An existing queue is kept (its ``max_depth`` updated when given); asking for a
    different owner than it has raises ``InvalidArgument`` (use ``adopt`` to move one)."""
    _name(name)
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
) -> int:
    """Add one job and return its id. With ``dedupe_key``, a job with that key already in
    the queue (in any state, until it is purged) is not added again: its id is returned.
    Raises ``QueueFull`` when the queue has a max depth and that many jobs wait."""
    _name(queue)
    row = _checked(store, payload, priority, delay, dedupe_key, max_attempts)
    if dedupe_key is None:
        text, prio, wait, _, attempts = row
        key = (id(store), queue)
        known = time.monotonic() - _unbounded.get(key, float("-inf")) < QUEUE_CONFIG_SECONDS

        job_id = store.backend.queues.put(queue, text, prio, wait, attempts, known)
        if job_id is not None:
            _unbounded[key] = time.monotonic()
            nudge_queue(store, queue)
            return job_id
        _unbounded.pop(key, None)
    return _put_rows(store, queue, [row])[0]


#: (id(store), queue) -> when this process last saw that the queue has no max depth: then
#: a put inserts without looking for QUEUE_CONFIG_SECONDS (the engine still proves the queue
#: exists).
_unbounded: dict[tuple[int, str], float] = {}


def put_many(store: Store, queue: str, jobs: Iterable[NewJob | Any]) -> list[int]:
    """Add many jobs in one transaction (all or none); each item is a ``NewJob`` or a bare
    payload. Returns the job ids in order (existing ids for dedupe repeats)."""
    _name(queue)
    rows = []
    for item in jobs:
        j = item if isinstance(item, NewJob) else NewJob(item)
        rows.append(_checked(store, j.payload, j.priority, j.delay, j.dedupe_key, j.max_attempts))
    return _put_rows(store, queue, rows) if rows else []


def _checked(
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
    store: Store, queue: str, rows: list[tuple[str, int, float, str | None, int]]
) -> list[int]:
    ids, added, owner = store.backend.queues.put_rows(queue, rows)
    if added:
        nudge_queue(store, queue, owner)
    return ids


# -- claim --------------------------------------------------------------------------------


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


def _try_claim(store: Store, queue: str, h: _Holder, lease: float, n: int = 1) -> list[Job]:
    """One claim transaction: the claimer must be registered and alive, and the queue shared
    or its own; then up to ``n`` due jobs in claim order ([] when none is due)."""
    got = store.backend.queues.claim(queue, h.id, h.incarnation, lease, n)
    limits = _limits(store)
    return [
        Job(id=job_id, queue=queue, state="claimed", priority=prio, attempts=attempts + 1,
            max_attempts=max_attempts, payload_text=payload, dedupe_key=key, token=token,
            instance_id=h.id, created_at=created, available_in=0.0, expires_in=lease,
            last_error=error, result=None, finished_at=None, _limits=limits)
        for token, (job_id, prio, payload, key, attempts, max_attempts, created, error) in got
    ]


# When this process last scanned each queue of each open Store for dead holders and
# expired leases (by the store's own clock; a clock that went back counts as due).
# When this process last scanned each queue, per open Store: id(store) -> (a weak reference
# to the store, {queue: store.mono() of the scan}).
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


def _holders(store: Store, queue: str) -> list[Row]:
    """The distinct holders of claims in ``queue``, with their instance rows (if any)."""
    return store.backend.queues.holders(queue)


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
    for r in _holders(store, queue):
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


def _next_due(store: Store, queue: str) -> float | None:
    """When the next delayed job falls due or the next claim lease runs out, on the store's
    own clock (``store.mono()``), whatever clock the engine stamps with."""
    due = store.backend.queues.next_due(queue)
    if due is None:
        return None
    # The engine's clock need not be this process's (PostgreSQL: the server's).
    return store.mono() + (due - store.backend.clock.now())


_RESLICE = object()


def claim(
    store: Store,
    queue: str,
    instance: Instance | str | None = None,
    *,
    lease: float | None = None,
    timeout: float | None = 0.0,
) -> Job | None:
    """Claim the next job of ``queue`` for ``instance`` (an ``Instance``, a live instance's
    id, or None for ``COORD_INSTANCE_ID``), waiting up to ``timeout`` seconds (None: until
    a job comes).

    Returns the job, with ``token``, claimed for ``lease`` seconds (default
    ``config.claim_lease``), or None when nothing arrived in time. Raises
    ``PermissionDenied`` for another instance's private queue, ``NotRegistered`` when the
    claimer's registration has ended."""
    got = claim_many(store, queue, 1, instance, lease=lease, timeout=timeout)
    return got[0] if got else None


def claim_many(
    store: Store,
    queue: str,
    n: int,
    instance: Instance | str | None = None,
    *,
    lease: float | None = None,
    timeout: float | None = 0.0,
) -> list[Job]:
    """Claim up to ``n`` jobs of ``queue`` in one transaction, in claim order, for a worker
    that takes batches; each has its own token and lease, and is acked, failed, extended or
    released on its own (or acked together with ``ack_many``). Waits up to ``timeout``
    seconds for the first job, then takes what is due; [] when nothing arrived in time.
    Otherwise as ``claim``."""
    _name(queue)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidArgument(f"claim_many needs a count of at least 1, got {n!r}")
    h = _holder(store, instance)
    lease = store.config.claim_lease if lease is None else lease
    if not (lease > 0):
        raise InvalidArgument(f"lease must be positive, got {lease!r}")
    if timeout is not None and not (timeout >= 0):
        raise InvalidArgument(f"timeout must be zero or more seconds, got {timeout!r}")
    if _scan_due(store, queue, SCAN_INTERVAL):
        release_dead_claims(store, queue, skip=h.id)
    jobs = _try_claim(store, queue, h, lease, n)
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

    def watch() -> list[int]:
        return [pid for r in _holders(store, queue)
                if r["pid"] and r["status"] == "alive"
                and (pid := liveness.watchable_pid(r)) is not None and pid != me]

    while True:
        now = store.mono()
        if now >= deadline:
            return []
        due = _next_due(store, queue)
        until = deadline if due is None else min(deadline, max(due, now + IDLE_SCAN_INTERVAL))
        slice_end = until

        def check(slice_end: float = slice_end) -> Any:
            if not store.backend.queues.ready(queue):
                if _scan_due(store, queue, IDLE_SCAN_INTERVAL):
                    if release_dead_claims(store, queue, skip=h.id):
                        return _try_claim(store, queue, h, lease, n) or None
                due = _next_due(store, queue)
                if due is not None and due + 0.001 < slice_end:
                    return _RESLICE
                return None
            return _try_claim(store, queue, h, lease, n) or None

        wait = None if until == float("inf") else max(0.0, until - now)
        got = store.backend.wakeup.wait_for(check, wait, sock=h.sock, watch_pids=watch)
        if isinstance(got, list):
            return got
        if got is None and store.mono() >= deadline:
            return []
        if _scan_due(store, queue, IDLE_SCAN_INTERVAL):
            release_dead_claims(store, queue, skip=h.id)


# -- ack, fail, extend, release -----------------------------------------------------------


def _result_text(store: Store, result: Any) -> str | None:
    return None if result is None else encode(
        result, limit=min(RESULT_LIMIT, store.config.payload_limit),
        max_depth=store.config.payload_max_depth)


def ack(store: Store, token: Job | str, result: Any = None) -> None:
    """Mark the claimed job done, keeping ``result`` (small JSON) for the retention period.
    Raises ``ClaimLost`` if the claim has moved on."""
    tok, text = _token(token), _result_text(store, result)
    if not store.backend.queues.ack(tok, text):
        raise ClaimLost(tok)


def ack_many(
    store: Store, tokens: Iterable[Job | str], results: Iterable[Any] | None = None
) -> None:
    """Ack many claims in one transaction (``results``, if given, pairs one result with each
    claim, as ``ack``'s). Each claim counts on its own: the claims still held are acked and
    committed, and then ``ClaimLost`` is raised naming every claim that had moved on
    (``ClaimLost.tokens``) — those jobs were not acked, whoever holds them now."""
    toks = [_token(t) for t in tokens]
    texts = [None] * len(toks) if results is None else [_result_text(store, r) for r in results]
    if len(texts) != len(toks):
        raise InvalidArgument(f"ack_many got {len(toks)} claims but {len(texts)} results")
    if not toks:
        return

    lost = store.backend.queues.ack_many(list(zip(toks, texts, strict=True)))
    if lost:
        raise ClaimLost(*lost)


def backoff(attempts: int) -> float:
    """The default retry delay after the ``attempts``-th attempt failed (with jitter)."""
    base = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** max(0, min(attempts - 1, 60)))
    return base * random.uniform(0.5, 1.0)


def fail(store: Store, token: Job | str, error: str = "", *, retry_in: float | None = None) -> str:
    """Record a failed attempt. The job is retried after ``retry_in`` seconds (default: an
    exponential backoff with jitter) or, out of attempts, dead-lettered with ``error``.
    Returns the job's new state, 'ready' or 'dead'. Raises ``ClaimLost``."""
    tok = _token(token)
    if retry_in is not None and not (retry_in >= 0):
        raise InvalidArgument(f"retry_in must be zero or more seconds, got {retry_in!r}")
    error = str(error)[:4000]

    def delay(attempts: int) -> float:
        return backoff(attempts) if retry_in is None else retry_in

    got = store.backend.queues.fail(tok, error, delay)
    if got is None:
        raise ClaimLost(tok)
    state, queue, wait = got
    if state == "ready" and wait == 0:
        nudge_queue(store, queue)
    return str(state)


def extend(store: Store, token: Job | str, lease: float | None = None) -> float:
    """Renew the claim's lease to ``lease`` seconds from now (default
    ``config.claim_lease``); returns the seconds granted. Raises ``ClaimLost``."""
    tok = _token(token)
    lease = store.config.claim_lease if lease is None else lease
    if not (lease > 0):
        raise InvalidArgument(f"lease must be positive, got {lease!r}")
    if not store.backend.queues.extend(tok, lease):
        raise ClaimLost(tok)
    return lease


def release(store: Store, token: Job | str) -> None:
    """Hand the job back untried: ready again at once, the attempt given back.
    Raises ``ClaimLost``."""
    tok = _token(token)
    got = store.backend.queues.release(tok)
    if got is None:
        raise ClaimLost(tok)
    nudge_queue(store, got)


# -- cancel, requeue, purge, adopt --------------------------------------------------------


def cancel(store: Store, job_id: int) -> None:
    """Cancel a job that is not claimed and not finished (ready, delayed or dead)."""
    store.backend.queues.cancel(job_id)


def requeue(store: Store, job_id: int) -> None:
    """Put a dead or cancelled job back: ready at once, with a fresh set of attempts."""
    nudge_queue(store, store.backend.queues.requeue(job_id))


def requeue_dead(store: Store, queue: str) -> int:
    """Requeue every dead job of ``queue``; returns how many."""
    _name(queue)
    n = store.backend.queues.requeue_dead(queue)
    if n:
        nudge_queue(store, queue)
    return n


def purge(store: Store, queue: str, *, everything: bool = False) -> int:
    """Delete the finished jobs (done, dead, cancelled) of ``queue``, which frees their
    dedupe keys; with ``everything``, delete the queue itself and all its jobs (claims
    included: their holders get ``ClaimLost``). Returns how many jobs were deleted."""
    _name(queue)
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
        _name(to_queue)
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


# -- reading ------------------------------------------------------------------------------


def get_job(store: Store, job_id: int) -> Job:
    r = store.backend.queues.get(job_id)
    if r is None:
        raise NotFound("job", job_id)
    return _job(store, r, store.backend.clock.now())


def list_jobs(
    store: Store, queue: str | None = None, *, state: str | None = None, limit: int | None = None
) -> list[Job]:
    """Jobs in claim order (queue, then priority high to low, then FIFO). ``state`` is one
    of SHOWN_STATES, 'active' (the default: ready, delayed, claimed, dead) or 'all'."""
    state = state or "active"
    now = store.backend.clock.now()
    if queue is not None:
        _name(queue)
    if state not in SHOWN_STATES and state not in ("active", "all"):
        raise InvalidArgument(
            f"unknown state {state!r}: use one of {', '.join(SHOWN_STATES)}, active, all")
    return [_job(store, r, now) for r in store.backend.queues.jobs(queue, state, limit, now)]


def stats(store: Store, queue: str | None = None) -> list[QueueStats]:
    """Counts per queue (every queue, or one)."""
    now, wall = store.backend.clock.now(), store.wall()
    if queue is not None:
        _name(queue)
    rows = store.backend.queues.stats(queue, now)
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
            oldest_age=None if r["oldest"] is None else float(r["oldest_age"])
            if "oldest_age" in r else max(0.0, wall - r["oldest"]),
        )
        for r in rows
    ]


def problems(store: Store) -> list[tuple[str, bool]]:
    """Queue invariants for ``coord.check``: [(problem, pending)]; empty when healthy.
    Pending problems are claims past their lease, which the next claim or reap releases."""
    return store.backend.queues.problems()


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
        self.name = _name(name)
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

    def claim(self, *, lease: float | None = None, timeout: float | None = 0.0) -> Job | None:
        return claim(self.store, self.name, self.instance, lease=lease, timeout=timeout)

    def claim_many(self, n: int, *, lease: float | None = None,
                   timeout: float | None = 0.0) -> list[Job]:
        return claim_many(self.store, self.name, n, self.instance, lease=lease, timeout=timeout)

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
    "Adoption", "Job", "NewJob", "Queue", "QueueStats", "ack", "ack_many", "adopt", "backoff",
    "cancel", "claim", "claim_many", "create_queue", "extend", "fail", "get_job", "list_jobs", "problems", "purge",
    "nudge_queue", "put", "put_many", "release", "release_dead_claims", "requeue", "requeue_dead",
    "stats",
]
