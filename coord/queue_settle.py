"""Queues: what a claim's holder does with it — ack, fail (retry or dead letter), extend,
release (see ``coord.queues`` for the rules)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from .db import Store
from .errors import ClaimLost, InvalidArgument
from .payload import encode
from .queue_jobs import Job, claim_token
from .queue_put import nudge_queue

#: Retry backoff after ``fail`` without ``retry_in``: BASE * 2**(attempts-1) seconds, at most
#: MAX, times a random factor in [0.5, 1) (jitter, so failed jobs do not retry in lockstep).
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
#: A job's result is small: at most this many bytes of JSON.
RESULT_LIMIT = 64 * 1024


def result_text(store: Store, result: Any) -> str | None:
    """An ack's result, validated and encoded (None for none)."""
    return None if result is None else encode(
        result, limit=min(RESULT_LIMIT, store.config.payload_limit),
        max_depth=store.config.payload_max_depth)


def ack(store: Store, token: Job | str, result: Any = None) -> None:
    """Mark the claimed job done, keeping ``result`` (small JSON) for the retention period.
    Raises ``ClaimLost`` if the claim has moved on."""
    tok, text = claim_token(token), result_text(store, result)
    if not store.backend.queues.ack(tok, text):
        raise ClaimLost(tok)


def ack_many(
    store: Store, tokens: Iterable[Job | str], results: Iterable[Any] | None = None
) -> None:
    """Ack many claims in one transaction (``results``, if given, pairs one result with each
    claim, as ``ack``'s). Each claim counts on its own: the claims still held are acked and
    committed, and then ``ClaimLost`` is raised naming every claim that had moved on
    (``ClaimLost.tokens``) — those jobs were not acked, whoever holds them now."""
    pairs = ack_pairs(store, tokens, results)
    if not pairs:
        return
    lost = store.backend.queues.ack_many(pairs)
    if lost:
        raise ClaimLost(*lost)


def ack_pairs(store: Store, tokens: Iterable[Job | str], results: Iterable[Any] | None
              ) -> list[tuple[str, str | None]]:
    """(token, result text) for each claim to ack, validated (see ``ack_many``)."""
    toks = [claim_token(t) for t in tokens]
    texts = [None] * len(toks) if results is None else [result_text(store, r) for r in results]
    if len(texts) != len(toks):
        raise InvalidArgument(f"ack_many got {len(toks)} claims but {len(texts)} results")
    return list(zip(toks, texts, strict=True))


def backoff(attempts: int) -> float:
    """The default retry delay after the ``attempts``-th attempt failed (with jitter)."""
    base = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** max(0, min(attempts - 1, 60)))
    return base * random.uniform(0.5, 1.0)


def fail(store: Store, token: Job | str, error: str = "", *, retry_in: float | None = None) -> str:
    """Record a failed attempt. The job is retried after ``retry_in`` seconds (default: an
    exponential backoff with jitter) or, out of attempts, dead-lettered with ``error``.
    Returns the job's new state, 'ready' or 'dead'. Raises ``ClaimLost``."""
    tok = claim_token(token)
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
    tok = claim_token(token)
    lease = store.config.claim_lease if lease is None else lease
    if not (lease > 0):
        raise InvalidArgument(f"lease must be positive, got {lease!r}")
    if not store.backend.queues.extend(tok, lease):
        raise ClaimLost(tok)
    return lease


def release(store: Store, token: Job | str) -> None:
    """Hand the job back untried: ready again at once, the attempt given back.
    Raises ``ClaimLost``."""
    tok = claim_token(token)
    got = store.backend.queues.release(tok)
    if got is None:
        raise ClaimLost(tok)
    nudge_queue(store, got)
