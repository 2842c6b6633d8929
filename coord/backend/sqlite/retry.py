"""All retry policy on SQLITE_BUSY, in one place.

apsw's busy timeout already waits inside SQLite; what reaches us is a BusyError that can
still happen when a deferred reader upgrades or a checkpoint holds the lock. We retry the
whole transaction with jittered exponential backoff, bounded by time, and then raise
``coord.errors.Busy``. The retry is entered only after a first BusyError, so the fast path
pays nothing for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import apsw

from ...errors import Busy

T = TypeVar("T")
log = logging.getLogger("coord.retry")

#: How long a write keeps retrying after SQLite's own busy timeout gave up.
RETRY_SECONDS = 10.0


def on_busy(fn: Callable[[], T], *, seconds: float | None = None, path: str = "") -> T:
    """Run ``fn``; if it raises apsw.BusyError, retry it with backoff for up to ``seconds``
    (default ``RETRY_SECONDS``, read at call time), then raise ``Busy``."""
    try:
        return fn()
    except (apsw.BusyError, apsw.LockedError):
        pass
    from tenacity import (
        RetryError,
        before_sleep_log,
        retry_if_exception_type,
        stop_after_delay,
        wait_random_exponential,
    )

    seconds = RETRY_SECONDS if seconds is None else seconds
    # The module's Retrying (tests stand in for it), tenacity's once first asked for.
    kind = globals().get("Retrying") or __getattr__("Retrying")
    retrying = kind(
        retry=retry_if_exception_type((apsw.BusyError, apsw.LockedError)),
        wait=wait_random_exponential(multiplier=0.002, max=0.25),
        stop=stop_after_delay(seconds),
        before_sleep=before_sleep_log(log, logging.DEBUG),
    )
    try:
        result: T = retrying(fn)
        return result
    except RetryError as e:
        raise Busy(seconds, path) from e.last_attempt.exception()


def __getattr__(name: str) -> Any:
    # tenacity is loaded on the first busy retry (or the first look at ``Retrying``): a
    # process that never meets a busy database never imports it.
    if name == "Retrying":
        from tenacity import Retrying

        globals()["Retrying"] = Retrying
        return Retrying
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
