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

Every other expiry is held back alike, in SQL: ``coord_expiry(stamp, ttl)`` (schema version
2) is when a row stamped to expire at ``stamp`` expires, no sooner than one ``ttl`` after the
step was seen; each table's stamp and ttl are named once below (``LEASE_EXPIRY`` …). A
verdict that frees something on expiry (a takeover, a claim or lease released, a message
removed) reads the clock in its own transaction (``checked``, ``verify``): when that reading
is the one that finds the step, the verdict did not count the hold, and the transaction is
run again (the hold is committed on a connection of its own first). A refused renewal,
fenced write, extension or ack reads the clock likewise (``verify``, ``stepped``) before it
counts as lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from psycopg import errors as pgerrors

from ...clock import SYSTEM
from .connection import fetch, translated
from .events import log_event
from .opening import server_epoch

if TYPE_CHECKING:
    from .connection import Conn, PgDb, Row

#: Seconds the server's clock may run ahead of a reader's monotonic clock between two of
#: its readings before it counts as a step.
STEP_TOLERANCE = 1.0

#: When each kind of row expires, by the one rule (``coord_expiry`` in the schema): a lease
#: (its TTL), a claim (its lease), a message (its lifetime), a heartbeat (its TTL).
LEASE_EXPIRY = "coord_expiry(expires_mono, ttl)"
CLAIM_EXPIRY = "coord_expiry(claim_expires_mono, claim_lease)"
MESSAGE_EXPIRY = "coord_expiry(expires_mono, expires_mono - created_at)"
HEARTBEAT_EXPIRY = "coord_expiry(heartbeat_mono + ttl, ttl)"

_READ = "SELECT coord_now() AS now, (SELECT held_since FROM server_epoch) AS held"
_HOLD = (
    "INSERT INTO server_epoch (token, since, held_since) VALUES (md5(random()::text), "
    "extract(epoch FROM clock_timestamp()), coord_now()) "
    "ON CONFLICT (one) DO UPDATE SET held_since = "
    "greatest(server_epoch.held_since, excluded.held_since) RETURNING held_since")


class ServerClock:
    """``coord.backend.ExpiryClock`` read from the server; ``mono`` is this process's
    monotonic clock (the store's), used only to notice a step of the server's."""

    def __init__(self, db: PgDb, mono: Callable[[], float] = SYSTEM.mono) -> None:
        self._db = db
        #: The store's own monotonic clock (what a lease's deadlines count on).
        self.mono = mono
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
        return self._read()[0]

    def stepped(self) -> bool:
        """Read the server's clock: whether this reading found a step, or a hold recorded
        since the last (a refusal made just before may not have counted it: it is tried
        again)."""
        held = self.held_since
        return self._read()[1] or self.held_since != held

    def _read(self) -> tuple[float, bool]:
        before = self.mono()
        row = self._db.row(_READ)
        after = self.mono()
        assert row is not None
        self.held_since = None if row["held"] is None else float(row["held"])
        now = float(row["now"])
        return now, self.observe(now, before, after)

    def observe(self, now: float, before: float, after: float) -> bool:
        """Compare a reading of ``coord_now()`` taken by a call that ran between ``before``
        and ``after`` on this store's monotonic clock with the previous one; record a step,
        and say whether one was found. Any statement that returns ``coord_now()`` can feed
        it (a claim, for one)."""
        real = self._real() if self._real is not None else 0.0
        with self._lock:
            last, self._last = self._last, (before, now, after, real)
        if last is None:
            return False
        step = (now - last[1]) - (after - last[0]) - (real - last[3])
        if step <= STEP_TOLERANCE:
            return False
        self.held_since = self._hold(step)
        return True

    def rows(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """A read whose first row carries ``now_mono`` (a reading of ``coord_now()``),
        observed."""
        before = self.mono()
        rows = self._db.rows(sql, params)
        if rows:
            self.observe(float(rows[0]["now_mono"]), before, self.mono())
        return rows

    def checked(self, c: Conn, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
                ) -> list[Row]:
        """The rows of a statement of the caller's transaction whose first row carries
        ``now_mono``. When that reading finds a step, a verdict made on it did not count
        the hold: the transaction is rolled back to be run again (as after a lost race)."""
        before = self.mono()
        rows = fetch(c, sql, params)
        if rows and self.observe(float(rows[0]["now_mono"]), before, self.mono()):
            raise pgerrors.SerializationFailure("the server's clock stepped: run again")
        return rows

    def verify(self, c: Conn) -> None:
        """At the end of a transaction whose verdicts freed or refused something on expiry:
        run it again if the server's clock stepped before them (see ``checked``)."""
        self.checked(c, "SELECT coord_now() AS now_mono")

    def verified(self, c: Conn, freed: int) -> int:
        """``freed`` (how many rows a verdict freed on expiry), verified when not 0."""
        if freed:
            self.verify(c)
        return freed

    def _hold(self, step: float) -> float:
        """Record the step, on a connection of its own: committed whatever becomes of the
        transaction the reading was taken in."""
        c = self._db.connect()
        try:
            with translated(self._db.where), c.transaction():
                row = c.execute(_HOLD).fetchone()
                assert row is not None
                log_event(c, "clock stepped", None, None, at_least_s=round(step, 3))
        finally:
            self._db.discard(c)
        return float(row["held_since"])

    def epoch(self) -> str:
        return server_epoch(self._db.conn())
