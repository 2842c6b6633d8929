"""Hearing at once that a holder's liveness session ended, from the server.

A dying process's pidfd becomes readable only at the very end of its exit, after the kernel
has released each of its server sessions — and each released session wakes a backend that
ends on the same cores first. The server knows sooner: a waiter blocked on the advisory lock
that the holder's liveness session holds gets it the moment that session's backend ends.
So the first waiter for a lease held on this host also keeps one statement pending on a
connection of its own, ``pg_advisory_xact_lock_shared(key)`` (granted and released at once,
in its own transaction, when the session ends), and selects on that connection's socket.

A granted lock is only a wake-up, never the proof: a session also ends when the server
terminates it or restarts, with the holder alive. The proof stays the host's own: the
holder's lock file comes free when its process exits, before the kernel releases any of its
sockets (POSIX record locks go as each descriptor is closed; sockets are released after all
are closed), so a waiter woken by the session's end finds the lock file already free when the
holder died, and held when it did not.

The statement waits ``WAIT_SLICE`` seconds at most (``lock_timeout`` for its transaction
alone) and is sent again when it timed out, so an abandoned wait ends by itself and its
connection is reused.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
from psycopg import pq

from ...errors import CoordError
from .connection import Conn, PgDb
from .liveness import LIVE_KEY

#: Seconds one pending wait lasts on the server before it is sent again.
WAIT_SLICE = 2.0
#: Idle watch connections kept per store for the next watch.
KEEP_IDLE = 2

# lock_timeout for this statement's transaction alone, set before the wait starts (the
# target list is evaluated in order).
_WAIT = ("SELECT set_config('lock_timeout', $1, true), pg_advisory_xact_lock_shared("
         + LIVE_KEY.replace("%s", "$2", 1).replace("%s", "$3", 1) + ")").encode()
_LOCK_TIMEOUT = f"{int(WAIT_SLICE * 1000)}ms".encode()
_TEXT3 = [25, 25, 25]  # the parameters' type: text


class SessionWatches:
    """The watch connections of one store: lent to one ``SessionWatch`` at a time."""

    def __init__(self, db: PgDb) -> None:
        self._db = db
        self._idle: list[Conn] = []
        self._draining: list[Conn] = []  # a wait still pending on the server
        self._lock = threading.Lock()

    def watch(self, lock_path: str) -> SessionWatch:
        """A watch on the liveness session of the registration whose lock file is
        ``lock_path`` (named by its token: ``<token>.lock``)."""
        return SessionWatch(self, self._db.location.schema, Path(lock_path).stem)

    def lend(self) -> Conn:
        with self._lock:
            self._settle()
            if self._idle:
                return self._idle.pop()
        return self._db.connect()

    def give_back(self, c: Conn) -> None:
        with self._lock:
            if c.closed or c.broken:
                self._db.discard(c)
            elif c.pgconn.is_busy() or c.pgconn.transaction_status != pq.TransactionStatus.IDLE:
                self._draining.append(c)
            else:
                self._idle.append(c)
            self._settle()

    def _settle(self) -> None:
        """Take the drained connections back (their wait ended: timed out or granted)."""
        still = []
        for c in self._draining:
            if _finished(c) is None:  # (what it says is of no use now)
                still.append(c)
            elif c.pgconn.transaction_status == pq.TransactionStatus.IDLE:
                self._idle.append(c)
            else:
                self._db.discard(c)
        self._draining = still
        while len(self._idle) > KEEP_IDLE:
            self._db.discard(self._idle.pop(0))


def _finished(c: Conn) -> str | None:
    """Without blocking: None while the pending wait runs, else how it ended — "granted"
    (the watched session ended), "timeout" (its slice passed) or "failed" — every result of
    it read."""
    pg = c.pgconn
    try:
        pg.consume_input()
        if pg.is_busy():
            return None
        how = "failed"
        while (res := pg.get_result()) is not None:
            if res.status == pq.ExecStatus.TUPLES_OK:
                how = "granted"
            elif res.error_field(pq.DiagnosticField.SQLSTATE) == b"55P03":
                how = "timeout"  # lock_not_available: lock_timeout passed
    except psycopg.Error:
        return "failed"
    return how


class SessionWatch:
    """One holder's liveness session, watched from the server (see the module)."""

    def __init__(self, pool: SessionWatches, schema: str, token: str) -> None:
        self._pool = pool
        self._params = [_LOCK_TIMEOUT, schema.encode(), token.encode()]
        self._conn: Conn | None = None
        self._state = "new"  # waiting, then ended (the session did), or off (not watching)

    def _send(self, c: Conn) -> bool:
        try:
            c.pgconn.send_query_params(_WAIT, self._params, param_types=_TEXT3)
        except (psycopg.Error, OSError):
            return False
        return True

    def fds(self) -> list[int]:
        """The socket to select on (the wait sent first); empty once the session ended, or
        when it cannot be watched (the pidfd still is)."""
        if self._state == "new":
            try:
                c = self._pool.lend()
            except (psycopg.Error, CoordError):
                self._state = "off"
                return []
            self._conn, self._state = c, "waiting" if self._send(c) else "off"
            if self._state == "off":
                self.close()
        return [self._conn.pgconn.socket] if self._conn is not None else []

    def ended(self) -> bool:
        """Whether the watched session has ended (a hint: see the module). A wait whose
        slice passed is sent again."""
        c = self._conn
        if self._state != "waiting" or c is None:
            return self._state == "ended"
        how = _finished(c)
        if how is None:
            return False
        if how == "timeout" and self._send(c):
            return False
        self._state = "ended" if how == "granted" else "off"
        self.close()
        return self._state == "ended"

    def close(self) -> None:
        c, self._conn = self._conn, None
        if c is not None:
            self._pool.give_back(c)
