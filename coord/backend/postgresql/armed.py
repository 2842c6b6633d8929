"""A takeover sent ahead: the first waiter for a lease held on this host keeps it pending on
the server, where it runs the moment the holder's liveness session ends.

A dying process's pidfd becomes readable only at the very end of its exit, after the kernel
has released each of its server sessions — and each released session wakes a backend that
ends on the same cores. The server knows sooner: a statement blocked on the advisory lock the
holder's liveness session holds is granted it the moment that session's backend ends. So the
first waiter sends, on a connection of its own and in one pipeline: ``BEGIN``; a wait for that
lock (``pg_advisory_xact_lock_shared``, ``slice_for`` the lease's TTL at most: ``lock_timeout``
for that transaction alone); and the certified takeover of the term it saw (``leases``), which
the server runs right after the wait, with a snapshot of its own, under the usual row locks.
The waiter selects on that connection's socket, which becomes readable when the wait is
granted (the server flushes its answer then) and again with the takeover's.

A granted lock is only a wake-up, never the proof: a session also ends when the server
terminates it or restarts, with the holder alive. So the transaction is left open, and the
waiter commits it only on the host's own proof: the holder's lock file, free from the moment
its process exited (POSIX record locks go as each descriptor is closed; sockets are released
after every descriptor is). Without it, or when the takeover found the lease changed, the
waiter rolls back and stops; a wait that timed out is rolled back and sent again. A
pending wait nobody needs any more (the lease came another way) is ended by closing its
connection: the server rolls back whatever the statements did.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import psycopg
from psycopg import pq

from ...errors import CoordError
from ...identity import FREE, lock_state
from .connection import Conn, PgDb
from .liveness import LIVE_KEY

#: Longest a pending wait lasts on the server before it is sent again (seconds); a lease's
#: own is a twentieth of its TTL (``slice_for``).
WAIT_SLICE = 2.0
#: Idle connections kept per store for the next takeover sent ahead.
KEEP_IDLE = 2
#: The names its statements are prepared under on those connections.
TAKE_NAME, WAIT_NAME = b"coord_armed_take", b"coord_armed_wait"

T = TypeVar("T")

# lock_timeout for this transaction alone, set before the wait starts (the target list is
# evaluated in order).
_WAIT = ("SELECT set_config('lock_timeout', $1, true), pg_advisory_xact_lock_shared("
         + LIVE_KEY.replace("%s", "$2", 1).replace("%s", "$3", 1) + ")").encode()
_LOCK_NOT_AVAILABLE = b"55P03"


def slice_for(ttl: float) -> float:
    """How long one wait of a takeover of a lease of ``ttl`` lasts: the new term counts from
    when the wait was last sent (``sent_at``), so it may start up to this much early — a
    twentieth of the TTL at most, which its first renewal makes up."""
    return min(WAIT_SLICE, max(0.05, ttl / 20))


def positional(sql: str, params: dict[str, Any]) -> tuple[bytes, list[bytes | None]]:
    """``sql`` with ``%(name)s`` placeholders as libpq's ``$n`` ones, and its parameters as
    text (their types left to the server, as the driver does for strings)."""
    order: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in order:
            order.append(m.group(1))
        return f"${order.index(m.group(1)) + 1}"

    converted = re.sub(r"%\((\w+)\)s", number, sql)
    values = [None if params[k] is None else str(params[k]).encode() for k in order]
    return converted.encode(), values


class Spares:
    """Idle connections of one store for the next takeover sent ahead, each with the
    takeover prepared (``take``: its SQL and the parameters of a run that matches nothing)
    and warmed up, so that none of it is planned or compiled on the takeover's path."""

    def __init__(self, db: PgDb, take: tuple[bytes, list[bytes | None]]) -> None:
        self.db = db
        self._take = take
        # (pid, connection): a forked child never uses, nor closes, its parent's sessions.
        self._idle: list[tuple[int, Conn]] = []
        self._lock = threading.Lock()

    def lend(self) -> Conn:
        pid = os.getpid()
        with self._lock:
            self._idle = [(p, c) for p, c in self._idle if p == pid]
            while self._idle:
                c = self._idle.pop()[1]
                if not c.closed and not c.broken:
                    return c
        c = self.db.connect()
        try:
            self._prepare(c.pgconn)
        except BaseException:
            self.db.discard(c)
            raise
        return c

    def _prepare(self, pg: pq.abc.PGconn) -> None:
        sql, nothing = self._take
        for res in (pg.prepare(TAKE_NAME, sql), pg.prepare(WAIT_NAME, _WAIT)):
            _ok(res)
        # The server plans a prepared statement afresh at each of its first five runs, then
        # keeps a generic plan; the clock's PL/pgSQL is compiled at its first call.
        for _ in range(6):  # (its stub wants no NULL; this run binds none)
            _ok(pg.exec_prepared(TAKE_NAME, cast("list[bytes]", nothing)))
        _ok(pg.exec_params(b"SELECT coord_now()", None))

    def give_back(self, c: Conn) -> None:
        with self._lock:
            if (len(self._idle) < KEEP_IDLE and not c.closed and not c.broken
                    and c.pgconn.transaction_status == pq.TransactionStatus.IDLE):
                self._idle.append((os.getpid(), c))
                return
        self.db.discard(c)


class ArmedTakeover(Generic[T]):
    """One takeover sent ahead (see the module): ``fds`` sends it; ``poll`` gives what it
    took once committed (``made`` of its row), else None."""

    def __init__(self, spares: Spares, lock_path: str, take: list[bytes | None],
                 made: Callable[[dict[str, str | None]], T], mono: Callable[[], float],
                 wait: float) -> None:
        self._spares = spares
        self._mono = mono
        #: ``mono()`` when the takeover was last sent (it runs on the server after).
        self.sent_at = mono()
        self._lock_path = lock_path
        self._wait_params = [f"{max(1, int(wait * 1000))}ms".encode(),
                             spares.db.location.schema.encode(),
                             Path(lock_path).stem.encode()]  # the registration's token
        self._take = take  # the prepared takeover's parameters
        self._made = made
        self._conn: Conn | None = None
        self._state = "new"  # waiting, then over
        # What the pipeline answered so far: results read, how the wait ended, the row.
        self._query = 0
        self._waited = "failed"
        self._row: dict[str, str | None] | None = None

    def fds(self) -> list[int]:
        """The socket to select on (the takeover sent first); empty once it is over."""
        if self._state == "new":
            try:
                self._conn = self._spares.lend()
            except (psycopg.Error, CoordError):
                self._state = "over"  # the pidfd still watches
                return []
            self._send()
        return [self._conn.pgconn.socket] if self._conn is not None else []

    def _send(self) -> None:
        assert self._conn is not None
        pg = self._conn.pgconn
        self._query, self._waited, self._row = 0, "failed", None
        self.sent_at = self._mono()
        try:
            pg.enter_pipeline_mode()
            pg.send_query_params(b"BEGIN", None)
            pg.send_query_prepared(WAIT_NAME, self._wait_params)
            # The wait's answer is sent as soon as it is granted, before the takeover runs:
            # the waiter then knows to wait for the takeover rather than race it.
            pg.send_flush_request()
            pg.send_query_prepared(TAKE_NAME, self._take)
            pg.pipeline_sync()
            pg.flush()
        except psycopg.Error:
            self._end(clean=False)
            return
        self._state = "waiting"

    def poll(self) -> T | None:
        """Without blocking (but for the commit of a takeover that just ran): what it took,
        committed on the proof; None while it waits, and once it is over without taking."""
        c = self._conn
        if self._state != "waiting" or c is None:
            return None
        pg = c.pgconn
        try:
            pg.consume_input()
            while not pg.is_busy():
                if self._read(pg.get_result()):
                    break
            else:
                return None  # the wait goes on
            pg.exit_pipeline_mode()
        except psycopg.Error:
            self._end(clean=False)
            return None
        row = self._row
        proved = row is not None and lock_state(self._lock_path)[0] == FREE
        # The driver's own round trip, the lightest there is: it is on the takeover's path.
        try:
            res = pg.exec_(b"COMMIT" if proved else b"ROLLBACK")
        except psycopg.Error:
            res = None
        if res is None or res.status != pq.ExecStatus.COMMAND_OK:
            self._end(clean=False)  # not known to be taken: the waiter's next look decides
            return None
        # An aborted transaction's COMMIT succeeds as a ROLLBACK.
        proved = proved and res.command_status == b"COMMIT"
        if proved and row is not None:
            self._end(clean=True)
            return self._made(row)
        if self._waited == "timeout":
            self._send()  # the holder lives on: wait again
        else:
            self._end(clean=True)  # its session ended with no exit, or the lease changed
        return None

    @property
    def running(self) -> bool:
        return self._state == "waiting" and self._waited == "granted"

    def _read(self, res: pq.abc.PGresult | None) -> bool:
        """One result of the pipeline (BEGIN, the wait, the takeover, the sync); whether it
        was the last."""
        if res is None:
            self._query += 1
            return False
        if res.status == pq.ExecStatus.PIPELINE_SYNC:
            return True
        if self._query == 1:
            if res.status == pq.ExecStatus.TUPLES_OK:
                self._waited = "granted"
            elif res.error_field(pq.DiagnosticField.SQLSTATE) == _LOCK_NOT_AVAILABLE:
                self._waited = "timeout"
        elif self._query == 2 and res.status == pq.ExecStatus.TUPLES_OK and res.ntuples == 1:
            self._row = {(res.fname(i) or b"").decode(): _text(res.get_value(0, i))
                         for i in range(res.nfields)}
        return False

    def _end(self, *, clean: bool) -> None:
        self._state = "over"
        c, self._conn = self._conn, None
        if c is None:
            return
        if clean:
            self._spares.give_back(c)
        else:
            # Whatever is pending ends with the connection: the server rolls it back (a
            # wait does not see the closed socket before its lock_timeout, and its
            # statements are rolled back all the same, whatever ran).
            self._spares.db.discard(c)

    def close(self) -> None:
        self._end(clean=self._state != "waiting")


def _ok(res: pq.abc.PGresult) -> None:
    if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        raise psycopg.OperationalError(
            (res.error_message or b"preparing the takeover failed").decode(errors="replace"))


def _text(v: bytes | None) -> str | None:
    return None if v is None else v.decode()
