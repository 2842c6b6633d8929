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

import apsw

from . import nudge
from .db import Row, Store, fetch, scalar
from .errors import (
    ClaimLost,
    InvalidArgument,
    NotFound,
    NotRegistered,
    PermissionDenied,
    QueueFull,
)
from .events import log_event
from .instances import Instance, Probe, judge, require_live, validate_id, validate_name
from .payload import decode, encode
from .reaper import bury_dead, release_claims

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
#: A process nudges the waiters of one queue at most this often (seconds); see _nudge_queue.
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


_COLUMNS = (
    "id, queue, state, priority, payload, dedupe_key, attempts, max_attempts, available_mono, "
    "created_at, claimed_by, claim_token, claim_expires_mono, last_error, result, finished_at"
)


def _job(store: Store, r: Row | tuple[Any, ...], now: float, *, with_token: bool = False) -> Job:
    """A Job from a row: a dict, or a tuple in _COLUMNS order."""
    if isinstance(r, dict):
        r = tuple(r[k] for k in _COLUMN_NAMES)
    (id, queue, state, priority, payload, dedupe_key, attempts, max_attempts, available,
     created_at, claimed_by, token, expires, last_error, result, finished_at) = r
    avail = available - now if state == "ready" and available > now else 0.0
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


_COLUMN_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))


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


def _claim_id(token: str) -> int:
    """The job a claim token names: tokens are ``<job id>-<random>``, so a claim is found by
    its row id and the whole token compared (no index on tokens). -1 for a token that names
    no job: it matches no claim."""
    head, sep, _ = token.partition("-")
    return int(head) if sep and head.isascii() and head.isdigit() else -1


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

    def txn(c: apsw.Connection) -> None:
        rows = fetch(c, "SELECT owner_id FROM queues WHERE name = ?", (name,))
        if not rows:
            c.execute(
                "INSERT INTO queues (name, owner_id, max_depth, created_at) VALUES (?, ?, ?, ?)",
                (name, owner, max_depth, store.wall()),
            )
            return
        if rows[0]["owner_id"] != owner:
            have = rows[0]["owner_id"]
            raise InvalidArgument(
                f"queue {name!r} already exists and is "
                + (f"private to {have!r}" if have else "shared")
            )
        if max_depth is not None:
            c.execute("UPDATE queues SET max_depth = ? WHERE name = ?", (max_depth, name))

    store.write(txn)


def _queue_row(c: apsw.Connection, store: Store, name: str) -> tuple[str | None, int | None]:
    """(owner, max_depth) of a queue, creating it shared if it does not exist."""
    for owner, depth in c.execute("SELECT owner_id, max_depth FROM queues WHERE name = ?", (name,)):
        return owner, depth
    c.execute(
        "INSERT INTO queues (name, owner_id, max_depth, created_at) VALUES (?, NULL, NULL, ?)",
        (name, store.wall()),
    )
    return None, None


# -- nudges -------------------------------------------------------------------------------

_nudge_cache: dict[tuple[int, str], tuple[float, list[tuple[str, str]]]] = {}
_nudged: dict[tuple[int, str], float] = {}  # (id(store), queue) -> last nudge
_UNKNOWN = "\0unknown"


def _nudge_queue(store: Store, queue: str, owner: str | None = _UNKNOWN) -> None:
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
        owner = store.value("SELECT owner_id FROM queues WHERE name = ?", (queue,))
    hit = _nudge_cache.get((pid, path))
    if hit is None or now - hit[0] > NUDGE_CACHE_SECONDS:
        rows = [
            (str(r[0]), str(r[1]))
            for r in store.conn().execute(
                "SELECT id, nudge_path FROM instances WHERE status = 'alive' "
                "AND nudge_path IS NOT NULL"
            )
        ]
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

        def txn(c: apsw.Connection) -> int | None:
            params = (text, prio, store.mono() + wait, attempts, store.wall(), queue)
            if known:
                try:
                    c.execute(_INSERT_PLAIN_FAST, params)
                except apsw.ConstraintError:  # the queue is gone: take the general path
                    return None
                return c.last_insert_rowid()
            c.execute(_INSERT_FAST, params)
            return c.last_insert_rowid() if c.changes() else None

        job_id = store.write(txn)
        if job_id is not None:
            _unbounded[key] = time.monotonic()
            _nudge_queue(store, queue)
            return job_id
        _unbounded.pop(key, None)
    return _put_rows(store, queue, [row])[0]


# The common put in one statement: it adds the job only to an existing queue without a max
# depth (a new queue, or one with a max depth, takes _put_rows). Once a process has seen
# that a queue has no max depth, it inserts without looking for QUEUE_CONFIG_SECONDS (the
# foreign key still proves the queue exists).
_INSERT_FAST = (
    "INSERT INTO jobs (payload, priority, available_mono, max_attempts, created_at, queue) "
    "SELECT ?, ?, ?, ?, ?, name FROM queues WHERE name = ? AND max_depth IS NULL"
)
_INSERT_PLAIN_FAST = (
    "INSERT INTO jobs (payload, priority, available_mono, max_attempts, created_at, queue) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
#: (id(store), queue) -> when this process last saw that the queue has no max depth.
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
    def txn(c: apsw.Connection) -> tuple[list[int], bool, str | None]:
        now, wall = store.mono(), store.wall()
        owner, max_depth = _queue_row(c, store, queue)
        ids = _insert(
            c, queue, max_depth,
            [(text, prio, now + delay, key, att, 0, "ready", wall, None) for
             text, prio, delay, key, att in rows],
            now, wall,
        )
        return [i for i, _ in ids], any(new for _, new in ids), owner

    ids, added, owner = store.write(txn)
    if added:
        _nudge_queue(store, queue, owner)
    return ids


#: (payload, priority, available_mono, dedupe_key, max_attempts, attempts, state, created_at,
#: last_error) of a row to insert.
_NewRow = tuple[str, int, float, str | None, int, int, str, float, str | None]

_INSERT = (
    "INSERT INTO jobs (queue, payload, priority, available_mono, dedupe_key, max_attempts, "
    "attempts, state, created_at, last_error, finished_at, finished_mono) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (queue, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING RETURNING id"
)
# The common case, a ready job without a dedupe key, in the plainest statement.
_INSERT_PLAIN = (
    "INSERT INTO jobs (queue, payload, priority, available_mono, max_attempts, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


def _insert(
    c: apsw.Connection, queue: str, max_depth: int | None, rows: list[_NewRow],
    now: float, wall: float,
) -> list[tuple[int, bool]]:
    """Insert rows into ``queue`` inside the caller's transaction: [(id, added)]. A row in
    a finished state (dead) is finished now. Raises ``QueueFull`` past ``max_depth``."""
    depth = None
    if max_depth is not None:
        depth = int(scalar(
            # An OR, not IN: then it counts in jobs_active (see schema/004_queue_hot.sql).
            c, "SELECT count(*) FROM jobs WHERE (state = 'ready' OR state = 'claimed') "
            "AND queue = ?", (queue,),
        ))
    out: list[tuple[int, bool]] = []
    for text, prio, avail, key, max_att, att, state, created, error in rows:
        ready = state == "ready"
        if depth is not None and max_depth is not None and depth >= max_depth and ready:
            existing = _existing(c, queue, key)
            if existing is None:
                raise QueueFull(queue, depth)
            out.append((existing, False))
            continue
        if key is None and ready and att == 0 and error is None:
            c.execute(_INSERT_PLAIN, (queue, text, prio, avail, max_att, created))
            out.append((c.last_insert_rowid(), True))
        else:
            finished = (None, None) if ready else (wall, now)
            got = c.execute(
                _INSERT,
                (queue, text, prio, avail, key, max_att, att, state, created, error, *finished),
            ).fetchall()
            if not got:
                existing = _existing(c, queue, key)
                assert existing is not None
                out.append((existing, False))
                continue
            out.append((int(got[0][0]), True))  # type: ignore[arg-type]
        if depth is not None and ready:
            depth += 1
    return out


def _existing(c: apsw.Connection, queue: str, key: str | None) -> int | None:
    if key is None:
        return None
    for (i,) in c.execute("SELECT id FROM jobs WHERE queue = ? AND dedupe_key = ?", (queue, key)):
        return int(i)
    return None


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


# The claim's first statement: may this incarnation claim here (registered and alive, and
# the queue shared or its own), and the best due job, in one read inside the claim's own
# transaction, so a buried instance's claim never commits. The job comes from jobs_active:
# (state, queue) then priority DESC, id, which is claim order (schema/004_queue_hot.sql).
# `queue = CAST(? AS TEXT)`, not `queue = ?`: with a bare parameter compared to an indexed
# column and an ORDER BY, SQLite prepares the statement again whenever that parameter is
# bound — every claim (measured: the cached statement cost what an uncached one does). The
# cast keeps the prepared statement (apsw's cache) valid: the pick costs a quarter.
# The job's columns are read here rather than by the UPDATE's RETURNING, which costs more
# (SQLite collects RETURNING rows in a temporary table).
_JOB_COLUMNS = "id, priority, payload, dedupe_key, attempts, max_attempts, created_at, last_error"
_PICK = (
    "SELECT (SELECT 1 FROM instances WHERE id = ?1 AND incarnation = ?2 AND status = 'alive'), "
    "(SELECT owner_id FROM queues WHERE name = ?3), "
    "j.id, j.priority, j.payload, j.dedupe_key, j.attempts, j.max_attempts, j.created_at, "
    "j.last_error FROM (SELECT 1) LEFT JOIN jobs j ON j.id = (SELECT id FROM jobs "
    "WHERE state = 'ready' AND queue = CAST(?3 AS TEXT) AND available_mono <= ?4 "
    "ORDER BY priority DESC, id LIMIT 1)"
)
# The next due jobs after the first, for claim_many.
_MORE = (
    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'ready' AND queue = CAST(? AS TEXT) "  # noqa: S608
    "AND available_mono <= ? AND id <> ? ORDER BY priority DESC, id LIMIT ?"
)
# Then each job by its row id. Selecting first and updating by id is about twice as fast as
# one UPDATE … WHERE id = (SELECT …): SQLite runs that in two passes, since the statement
# changes the index its subquery reads. Both run in one IMMEDIATE transaction: no race.
_CLAIM = (
    "UPDATE jobs SET state = 'claimed', claim_token = ?, claimed_by = ?, claimed_incarnation = ?, "
    "claim_expires_mono = ?, claimed_at = ?, attempts = attempts + 1 WHERE id = ?"
)


def _try_claim(store: Store, queue: str, h: _Holder, lease: float, n: int = 1) -> list[Job]:
    """One claim transaction: the claimer must be registered and alive, and the queue shared
    or its own; then up to ``n`` due jobs in claim order ([] when none is due)."""

    def txn(c: apsw.Connection) -> list[tuple[str, tuple[Any, ...]]]:
        now = store.mono()
        ((alive, owner, *first),) = c.execute(_PICK, (h.id, h.incarnation, queue, now))
        if not alive:
            raise NotRegistered(h.id, "its registration has ended (declared dead or taken over)")
        if owner is not None and owner != h.id:
            raise PermissionDenied(f"queue {queue!r} is private to instance {owner!r}")
        if first[0] is None:
            return []
        rows = [tuple(first)]
        if n > 1:
            rows += c.execute(_MORE, (queue, now, first[0], n - 1)).fetchall()
        wall, until = store.wall(), now + lease
        # With the job id, a token is unique; the random part makes it unguessable.
        out = [(f"{row[0]}-{random.getrandbits(64):016x}", row) for row in rows]
        args = [(token, h.id, h.incarnation, until, wall, row[0]) for token, row in out]
        if len(args) == 1:  # executemany costs more than execute for one row
            c.execute(_CLAIM, args[0])
        else:
            c.executemany(_CLAIM, args)
        return out

    got = store.write(txn)
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
    return store.rows(
        "SELECT h.claimed_by, h.claimed_incarnation, i.* FROM "
        "(SELECT DISTINCT claimed_by, claimed_incarnation FROM jobs "
        " WHERE queue = ? AND state = 'claimed') h "
        "LEFT JOIN instances i ON i.id = h.claimed_by",
        (queue,),
    )


def release_dead_claims(store: Store, queue: str, *, skip: str | None = None) -> int:
    """Apply the death rule to every dead holder of a claim in ``queue`` and release claims
    past their lease. Returns how many claims went back (or were dead-lettered).

    The claim path calls this by itself; it is public for tools and tests."""
    released = 0
    now = store.mono()
    if store.value(
        "SELECT 1 FROM jobs WHERE queue = ? AND state = 'claimed' AND claim_expires_mono < ? "
        "LIMIT 1", (queue, now),
    ):
        released += store.write(lambda c: release_claims(
            c, store.mono(), store.wall(), "queue = ? AND claim_expires_mono < ?",
            (queue, store.mono()), error="claim lease expired"))
    probe = Probe()
    by_verdict: dict[str, list[Row]] = {}
    orphans: list[tuple[str, int]] = []
    for r in _holders(store, queue):
        if r["id"] is None or r["incarnation"] != r["claimed_incarnation"] or r["status"] == "dead":
            orphans.append((r["claimed_by"], r["claimed_incarnation"]))
            continue
        if r["id"] == skip:
            continue
        alive, verdict = judge(store, r, now, probe=probe)
        if not alive:
            by_verdict.setdefault(verdict, []).append(r)
    for verdict, rows in by_verdict.items():
        before = store.value(
            "SELECT count(*) FROM jobs WHERE queue = ? AND state = 'claimed'", (queue,))
        bury_dead(store, rows, verdict)
        after = store.value(
            "SELECT count(*) FROM jobs WHERE queue = ? AND state = 'claimed'", (queue,))
        released += int(before) - int(after)
    for who, inc in orphans:
        # Claims of an incarnation that is no longer registered: whatever ended it should
        # have released them; release them now.
        released += store.write(_orphan_releaser(store, who, inc))
    return released


def _orphan_releaser(store: Store, who: str, inc: int) -> Callable[[apsw.Connection], int]:
    return lambda c: release_claims(
        c, store.mono(), store.wall(), "claimed_by = ? AND claimed_incarnation = ?",
        (who, inc), error=f"worker {who} is gone")


def _next_due(store: Store, queue: str, now: float) -> float | None:
    """When the next delayed job falls due or the next claim lease runs out."""
    got = store.value(
        "SELECT min(t) FROM (SELECT min(available_mono) AS t FROM jobs "
        "WHERE queue = ?1 AND state = 'ready' AND available_mono > ?2 "
        "UNION ALL SELECT min(claim_expires_mono) FROM jobs WHERE queue = ?1 AND state = 'claimed')",
        (queue, now),
    )
    return None if got is None else float(got)


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
    me, ns = os.getpid(), Probe().pidns
    ready_sql = (
        "SELECT 1 FROM jobs WHERE state = 'ready' AND queue = ? AND available_mono <= ? LIMIT 1"
    )

    def watch() -> list[int]:
        return [r["pid"] for r in _holders(store, queue)
                if r["pid"] and r["pidns"] == ns and r["pid"] != me and r["status"] == "alive"]

    while True:
        now = store.mono()
        if now >= deadline:
            return []
        due = _next_due(store, queue, now)
        until = deadline if due is None else min(deadline, max(due, now + IDLE_SCAN_INTERVAL))
        slice_end = until

        def check(slice_end: float = slice_end) -> Any:
            now = store.mono()
            if not store.value(ready_sql, (queue, now)):
                if _scan_due(store, queue, IDLE_SCAN_INTERVAL):
                    if release_dead_claims(store, queue, skip=h.id):
                        return _try_claim(store, queue, h, lease, n) or None
                due = _next_due(store, queue, now)
                if due is not None and due + 0.001 < slice_end:
                    return _RESLICE
                return None
            return _try_claim(store, queue, h, lease, n) or None

        wait = None if until == float("inf") else max(0.0, until - now)
        got = nudge.wait_for(store, check, wait, sock=h.sock, watch_pids=watch)
        if isinstance(got, list):
            return got
        if got is None and store.mono() >= deadline:
            return []
        if _scan_due(store, queue, IDLE_SCAN_INTERVAL):
            release_dead_claims(store, queue, skip=h.id)


# -- ack, fail, extend, release -----------------------------------------------------------

_LOST = object()


def _expired_release(c: apsw.Connection, store: Store, token: str, now: float) -> object:
    """The claim is gone or past its lease: if merely expired, release it now (the attempt
    counted). Always returns the _LOST marker, raised as ClaimLost after the commit."""
    release_claims(c, now, store.wall(),
                   "id = ? AND claim_token = ? AND claim_expires_mono < ?",
                   (_claim_id(token), token, now), error="claim lease expired")
    return _LOST


# An ack finds the claim by its job id and compares the token: a claim that moved on (or a
# lease past its end) changes nothing.
_ACK = (
    "UPDATE jobs SET state = 'done', claim_token = NULL, claim_expires_mono = NULL, "
    "result = ?, finished_at = ?, finished_mono = ? "
    "WHERE id = ? AND claim_token = ? AND claim_expires_mono >= ?"
)


def _result_text(store: Store, result: Any) -> str | None:
    return None if result is None else encode(
        result, limit=min(RESULT_LIMIT, store.config.payload_limit),
        max_depth=store.config.payload_max_depth)


def _acked(c: apsw.Connection, store: Store, tok: str, text: str | None, now: float,
           wall: float) -> bool:
    """Ack one claim inside the caller's transaction; False (and an expired claim released)
    when the claim has moved on."""
    c.execute(_ACK, (text, wall, now, _claim_id(tok), tok, now))
    if c.changes():
        return True
    _expired_release(c, store, tok, now)
    return False


def ack(store: Store, token: Job | str, result: Any = None) -> None:
    """Mark the claimed job done, keeping ``result`` (small JSON) for the retention period.
    Raises ``ClaimLost`` if the claim has moved on."""
    tok, text = _token(token), _result_text(store, result)
    if not store.write(lambda c: _acked(c, store, tok, text, store.mono(), store.wall())):
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

    def txn(c: apsw.Connection) -> list[str]:
        now, wall = store.mono(), store.wall()
        pairs = list(zip(toks, texts, strict=True))
        # Usually every claim is still held: ack them all in one executemany, and only when
        # fewer rows changed than claims were given, undo that and go claim by claim.
        c.execute("SAVEPOINT ack_many")
        before = c.total_changes()
        c.executemany(_ACK, [(text, wall, now, _claim_id(tok), tok, now) for tok, text in pairs])
        if c.total_changes() - before == len(pairs):
            c.execute("RELEASE ack_many")
            return []
        c.execute("ROLLBACK TO ack_many")
        c.execute("RELEASE ack_many")
        return [tok for tok, text in pairs if not _acked(c, store, tok, text, now, wall)]

    lost = store.write(txn)
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

    def txn(c: apsw.Connection) -> object:
        now, wall = store.mono(), store.wall()
        rows = fetch(
            c,
            "SELECT id, queue, attempts, max_attempts, claimed_by FROM jobs "
            "WHERE id = ? AND claim_token = ? AND claim_expires_mono >= ?",
            (_claim_id(tok), tok, now),
        )
        if not rows:
            return _expired_release(c, store, tok, now)
        j = rows[0]
        if j["attempts"] >= j["max_attempts"]:
            c.execute(
                "UPDATE jobs SET state = 'dead', claim_token = NULL, claimed_by = NULL, "
                "claimed_incarnation = NULL, claim_expires_mono = NULL, last_error = ?, "
                "finished_at = ?, finished_mono = ? WHERE id = ?",
                (error, wall, now, j["id"]),
            )
            log_event(c, wall, "job dead-lettered", j["claimed_by"], j["queue"], job=j["id"],
                      error=error)
            return ("dead", j["queue"], None)
        delay = backoff(j["attempts"]) if retry_in is None else retry_in
        c.execute(
            "UPDATE jobs SET state = 'ready', claim_token = NULL, claimed_by = NULL, "
            "claimed_incarnation = NULL, claim_expires_mono = NULL, last_error = ?, "
            "available_mono = ? WHERE id = ?",
            (error, now + delay, j["id"]),
        )
        return ("ready", j["queue"], delay)

    got = store.write(txn)
    if got is _LOST:
        raise ClaimLost(tok)
    assert isinstance(got, tuple)
    state, queue, delay = got
    if state == "ready" and delay == 0:
        _nudge_queue(store, queue)
    return str(state)


def extend(store: Store, token: Job | str, lease: float | None = None) -> float:
    """Renew the claim's lease to ``lease`` seconds from now (default
    ``config.claim_lease``); returns the seconds granted. Raises ``ClaimLost``."""
    tok = _token(token)
    lease = store.config.claim_lease if lease is None else lease
    if not (lease > 0):
        raise InvalidArgument(f"lease must be positive, got {lease!r}")

    def txn(c: apsw.Connection) -> object:
        now = store.mono()
        if c.execute(
            "UPDATE jobs SET claim_expires_mono = ? WHERE id = ? AND claim_token = ? "
            "AND claim_expires_mono >= ? RETURNING 1",
            (now + lease, _claim_id(tok), tok, now),
        ).fetchall():
            return None
        return _expired_release(c, store, tok, now)

    if store.write(txn) is _LOST:
        raise ClaimLost(tok)
    return lease


def release(store: Store, token: Job | str) -> None:
    """Hand the job back untried: ready again at once, the attempt given back.
    Raises ``ClaimLost``."""
    tok = _token(token)

    def txn(c: apsw.Connection) -> object:
        now = store.mono()
        got = c.execute(
            "UPDATE jobs SET state = 'ready', claim_token = NULL, claimed_by = NULL, "
            "claimed_incarnation = NULL, claim_expires_mono = NULL, "
            "attempts = max(attempts - 1, 0), available_mono = ? "
            "WHERE id = ? AND claim_token = ? AND claim_expires_mono >= ? RETURNING queue",
            (now, _claim_id(tok), tok, now),
        ).fetchall()
        if got:
            return str(got[0][0])
        return _expired_release(c, store, tok, now)

    got = store.write(txn)
    if got is _LOST:
        raise ClaimLost(tok)
    _nudge_queue(store, str(got))


# -- cancel, requeue, purge, adopt --------------------------------------------------------


def _job_state(c: apsw.Connection, job_id: int) -> str:
    for (state,) in c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)):
        return str(state)
    raise NotFound("job", job_id)


def cancel(store: Store, job_id: int) -> None:
    """Cancel a job that is not claimed and not finished (ready, delayed or dead)."""

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
        raise InvalidArgument(f"job {job_id} is {state}: only a job that waits can be cancelled{hint}")

    store.write(txn)


def requeue(store: Store, job_id: int) -> None:
    """Put a dead or cancelled job back: ready at once, with a fresh set of attempts."""

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
        raise InvalidArgument(f"job {job_id} is {state}: only a dead or cancelled job can be requeued")

    _nudge_queue(store, store.write(txn))


def requeue_dead(store: Store, queue: str) -> int:
    """Requeue every dead job of ``queue``; returns how many."""
    _name(queue)
    n = store.write(lambda c: len(c.execute(
        "UPDATE jobs SET state = 'ready', attempts = 0, available_mono = ?, finished_at = NULL, "
        "finished_mono = NULL, result = NULL WHERE queue = ? AND state = 'dead' RETURNING 1",
        (store.mono(), queue),
    ).fetchall()))
    if n:
        _nudge_queue(store, queue)
    return n


def purge(store: Store, queue: str, *, everything: bool = False) -> int:
    """Delete the finished jobs (done, dead, cancelled) of ``queue``, which frees their
    dedupe keys; with ``everything``, delete the queue itself and all its jobs (claims
    included: their holders get ``ClaimLost``). Returns how many jobs were deleted."""
    _name(queue)

    def txn(c: apsw.Connection) -> int:
        if not c.execute("SELECT 1 FROM queues WHERE name = ?", (queue,)).fetchall():
            raise NotFound("queue", queue)
        if everything:
            n = len(c.execute("DELETE FROM jobs WHERE queue = ? RETURNING 1", (queue,)).fetchall())
            c.execute("DELETE FROM queues WHERE name = ?", (queue,))
            return n
        return len(c.execute(
            "DELETE FROM jobs WHERE queue = ? AND state IN ('done', 'dead', 'cancelled') "
            "RETURNING 1", (queue,),
        ).fetchall())

    return store.write(txn)


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
    row = store.row("SELECT * FROM instances WHERE id = ?", (from_id,))
    if row is not None:
        alive, verdict = judge(store, row)
        if alive:
            raise PermissionDenied(f"instance {from_id!r} is alive; only a dead one's queues are adopted")
        if row["status"] == "alive":
            bury_dead(store, [row], verdict)  # its claims go back first

    def txn(c: apsw.Connection) -> Adoption:
        names = [str(r[0]) for r in c.execute(
            "SELECT name FROM queues WHERE owner_id = ? ORDER BY name", (from_id,))]
        if not names:
            raise NotFound("private queue of instance", from_id)
        # A claim by an incarnation of from_id that outlived the row check above.
        release_claims(c, store.mono(), store.wall(),
                       "claimed_by = ? AND queue IN (SELECT name FROM queues WHERE owner_id = ?)",
                       (from_id, from_id), error=f"worker {from_id} is gone")
        moved = left = 0
        if to is not None:
            c.execute("UPDATE queues SET owner_id = ? WHERE owner_id = ?", (to, from_id))
        else:
            assert to_queue is not None
            if to_queue in names:
                raise InvalidArgument(f"queue {to_queue!r} is one of the adopted queues")
            _queue_row(c, store, to_queue)
            for name in names:
                moved += len(c.execute(
                    "UPDATE OR IGNORE jobs SET queue = ? WHERE queue = ? "
                    "AND state IN ('ready', 'dead') RETURNING 1", (to_queue, name),
                ).fetchall())
                left += int(scalar(
                    c, "SELECT count(*) FROM jobs WHERE queue = ? AND state IN ('ready', 'dead')",
                    (name,),
                ))
        log_event(c, store.wall(), "queue adopted", from_id, ",".join(names), to=to,
                  to_queue=to_queue, jobs=moved)
        return Adoption(from_id, to, to_queue, names, moved, left)

    result = store.write(txn)
    for name in result.queues if to is not None else [to_queue] if to_queue else []:
        _nudge_queue(store, name)
    return result


# -- reading ------------------------------------------------------------------------------


def get_job(store: Store, job_id: int) -> Job:
    r = store.row(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))  # noqa: S608
    if r is None:
        raise NotFound("job", job_id)
    return _job(store, r, store.mono())


def list_jobs(
    store: Store, queue: str | None = None, *, state: str | None = None, limit: int | None = None
) -> list[Job]:
    """Jobs in claim order (queue, then priority high to low, then FIFO). ``state`` is one
    of SHOWN_STATES, 'active' (the default: ready, delayed, claimed, dead) or 'all'."""
    state = state or "active"
    now = store.mono()
    where: list[str] = []
    params: list[Any] = []
    if queue is not None:
        where.append("queue = ?")
        params.append(_name(queue))
    if state == "ready":
        where.append("state = 'ready' AND available_mono <= ?")
        params.append(now)
    elif state == "delayed":
        where.append("state = 'ready' AND available_mono > ?")
        params.append(now)
    elif state == "active":
        where.append("state IN ('ready', 'claimed', 'dead')")
    elif state in STATES:
        where.append("state = ?")
        params.append(state)
    elif state != "all":
        raise InvalidArgument(
            f"unknown state {state!r}: use one of {', '.join(SHOWN_STATES)}, active, all")
    sql = f"SELECT {_COLUMNS} FROM jobs"  # noqa: S608 - fixed fragments only
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY queue, priority DESC, id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [_job(store, r, now) for r in store.rows(sql, tuple(params))]


def stats(store: Store, queue: str | None = None) -> list[QueueStats]:
    """Counts per queue (every queue, or one)."""
    now, wall = store.mono(), store.wall()
    sql = (
        "SELECT q.name, q.owner_id, q.max_depth, "
        "count(j.id) FILTER (WHERE j.state = 'ready' AND j.available_mono <= ?1) AS ready, "
        "count(j.id) FILTER (WHERE j.state = 'ready' AND j.available_mono > ?1) AS delayed, "
        "count(j.id) FILTER (WHERE j.state = 'claimed') AS claimed, "
        "count(j.id) FILTER (WHERE j.state = 'dead') AS dead, "
        "count(j.id) FILTER (WHERE j.state = 'done') AS done, "
        "count(j.id) FILTER (WHERE j.state = 'cancelled') AS cancelled, "
        "min(j.created_at) FILTER (WHERE j.state = 'ready' AND j.available_mono <= ?1) AS oldest "
        "FROM queues q LEFT JOIN jobs j ON j.queue = q.name "
    )
    params: tuple[Any, ...] = (now,)
    if queue is not None:
        sql += "WHERE q.name = ?2 "
        params = (now, _name(queue))
    rows = store.rows(sql + "GROUP BY q.name ORDER BY q.name", params)
    if queue is not None and not rows:
        raise NotFound("queue", queue)
    owners = {r["owner_id"] for r in rows if r["owner_id"] is not None}
    alive: dict[str, bool] = {}
    if owners:
        probe = Probe()
        for o in owners:
            irow = store.row("SELECT * FROM instances WHERE id = ?", (o,))
            alive[o] = irow is not None and judge(store, irow, now, probe=probe)[0]
    return [
        QueueStats(
            id=r["name"], instance_id=r["owner_id"],
            alive=None if r["owner_id"] is None else alive[r["owner_id"]],
            max_depth=r["max_depth"], ready=r["ready"], delayed=r["delayed"],
            claimed=r["claimed"], dead=r["dead"], done=r["done"], cancelled=r["cancelled"],
            oldest_age=None if r["oldest"] is None else max(0.0, wall - r["oldest"]),
        )
        for r in rows
    ]


def problems(store: Store) -> list[tuple[str, bool]]:
    """Queue invariants for ``coord.check``: [(problem, pending)]; empty when healthy.
    Pending problems are claims past their lease, which the next claim or reap releases."""
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
        "SELECT id FROM jobs WHERE state = 'claimed' AND claim_expires_mono < ?", (store.mono(),)
    ):
        out.append((f"job {r['id']} is claimed past its lease, awaiting release", True))
    return out


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
    "put", "put_many", "release", "release_dead_claims", "requeue", "requeue_dead", "stats",
]
