"""The PostgreSQL engine's expiry clock: the server's (``coord_now()``, in SQL). Every
``*_mono`` column holds its readings; the engine's SQL stamps and compares them with
``coord_now()`` itself, so no client's clock enters a verdict. ``now()`` reads it for the
few callers that show an age, and for the registry's verdicts.

A step of the server's clock (someone sets it, a virtual machine resumes) would make every
heartbeat look old at once. The server has no monotonic clock to notice it with, but each
reader has one: between two readings of one process the server's clock cannot advance more
than the reader's own monotonic clock did from the start of the first call to the end of
the second (each reading is taken inside its call). More than ``STEP_TOLERANCE`` beyond that
is a step forward: it is recorded on the server (``server_epoch.held_since``, an event
'clock stepped'), and an instance whose last heartbeat is older than the step is then judged
from the step instead, so it has one TTL to heartbeat again (``coord.backend.postgresql.
liveness.judge``). A reader's first reading has nothing to compare with: a step is caught by
the first process that reads the clock twice around it (the reaper, a long-lived instance,
a listing loop); until then a one-shot reader sees what the step did. A step backward only
makes heartbeats look younger (verdicts come later): it is not acted on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...clock import SYSTEM
from .events import log_event
from .opening import server_epoch

if TYPE_CHECKING:
    from .connection import Conn, PgDb

#: Seconds the server's clock may run ahead of a reader's monotonic clock between two of
#: its readings before it counts as a step.
STEP_TOLERANCE = 1.0

_READ = "SELECT coord_now() AS now, (SELECT held_since FROM server_epoch) AS held"
_HOLD = (
    "INSERT INTO server_epoch (token, since, held_since) VALUES (md5(random()::text), "
    "extract(epoch FROM clock_timestamp()), coord_now()) "
    "ON CONFLICT (one) DO UPDATE SET held_since = excluded.held_since RETURNING held_since")


class ServerClock:
    """``coord.backend.ExpiryClock`` read from the server; ``mono`` is this process's
    monotonic clock (the store's), used only to notice a step of the server's."""

    def __init__(self, db: PgDb, mono: Callable[[], float] = SYSTEM.mono) -> None:
        self._db = db
        self._mono = mono
        # An injected clock (a test's manual clock) may stand still while real time passes,
        # and the server's clock with it: real time then counts as well.
        self._real = None if mono is SYSTEM.mono else SYSTEM.mono
        self._lock = threading.Lock()
        # (own clock before the call, server's reading, own clock after, real clock after)
        # of the last reading.
        self._last: tuple[float, float, float, float] | None = None
        #: The server's reading at the last step seen (by any process since the server's
        #: start), or None: heartbeats older than it are judged from it.
        self.held_since: float | None = None

    def now(self) -> float:
        before = self._mono()
        row = self._db.row(_READ)
        after = self._mono()
        assert row is not None
        self.held_since = None if row["held"] is None else float(row["held"])
        now = float(row["now"])
        self.observe(now, before, after)
        return now

    def observe(self, now: float, before: float, after: float) -> None:
        """Compare a reading of ``coord_now()`` taken by a call that ran between ``before``
        and ``after`` on this store's monotonic clock with the previous one; record a step.
        Any statement that returns ``coord_now()`` can feed it (a heartbeat, for one)."""
        real = self._real() if self._real is not None else 0.0
        with self._lock:
            last, self._last = self._last, (before, now, after, real)
        if last is not None:
            step = (now - last[1]) - (after - last[0]) - (real - last[3])
            if step > STEP_TOLERANCE:
                self.held_since = self._db.write(lambda c: self._hold(c, step))

    @staticmethod
    def _hold(c: Conn, step: float) -> float:
        row = c.execute(_HOLD).fetchone()
        assert row is not None
        log_event(c, "clock stepped", None, None, at_least_s=round(step, 3))
        return float(row["held_since"])

    def epoch(self) -> str:
        return server_epoch(self._db.conn())
