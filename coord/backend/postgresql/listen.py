"""One ``LISTEN`` connection per store and process, kept by one thread: it turns the
server's notifications into wake-ups of the waiters that registered interest in a channel.

A notification is a hint, never the truth: it is lost while the connection is down (a
server restart, ``pg_terminate_backend``, a network cut), so after every (re)connect the
thread LISTENs again on every wanted channel and then pokes *every* waiter, which re-checks
the database. Until a waiter's channels are LISTENed on the current connection it is told
so (``Interest.listening`` is False) and polls at the short interval; a waiter is poked
when the connection is lost, so that it starts doing so at once.

A channel stays LISTENed ``LINGER`` seconds after its last waiter left, so a waiter that
loops (a requester, a worker) costs no LISTEN/UNLISTEN per wait.

The thread owns its connection alone (psycopg holds a connection's lock while it waits for
notifications): other threads only change the set of wanted channels and wake the thread
through a pipe. A connection that stays silent is pinged now and then, so a half-open one
(a cut without a reset) is found and replaced too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from ...errors import CoordError
from ...nudge import readable
from .queue_rows import channel as queue_channel

if TYPE_CHECKING:
    from .connection import Conn, PgDb

#: Seconds of silence after which the thread pings its connection.
PING_INTERVAL = 5.0
#: Seconds a channel nobody waits on any more stays LISTENed.
LINGER = 10.0
#: Longest pause between two attempts to reconnect (seconds); the first is at once.
RECONNECT_MAX = 2.0
#: PostgreSQL truncates identifiers (so channel names) at 63 bytes.
_NAME_MAX = 63


def channel_name(schema: str, channel: str) -> str:
    """The server's channel for a coord channel of one deployment (channels are per
    database, so the schema is part of the name); hashed when too long for an identifier."""
    if channel.startswith("queue:"):  # the name the queues' own NOTIFYs use, in SQL
        return queue_channel(schema, channel.removeprefix("queue:"))
    name = f"coord.{schema}.{channel}"
    if len(name.encode()) <= _NAME_MAX:
        return name
    return "coord#" + hashlib.sha256(name.encode()).hexdigest()[:40]


_INBOX_NAME = "('coord.' || current_schema() || '.inbox:' || {id})"
#: ``channel_name`` of the inbox of the instance whose id is the SQL expression ``{id}``,
#: computed by the server (in the deployment's search_path), for statements that learn the
#: recipient as they run.
INBOX_CHANNEL_SQL = (
    f"CASE WHEN octet_length({_INBOX_NAME}) <= {_NAME_MAX} THEN {_INBOX_NAME} ELSE 'coord#' || "
    f"left(encode(sha256(convert_to({_INBOX_NAME}, 'UTF8')), 'hex'), 40) END")


# Every listener of this process, for the after-fork hook.
_LISTENERS: weakref.WeakSet[Listener] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The thread is not inherited, and its lock may have been held by it at the fork.
    for listener in list(_LISTENERS):
        listener._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _poke(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        os.write(fd, b"!")


def drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 512):
            pass


class Interest:
    """One waiter's channels; ``fd`` becomes readable when it should check again."""

    def __init__(self, listener: Listener, names: frozenset[str]) -> None:
        self._listener = listener
        self.names = names
        self.fd, self._w = _pipe()
        self.listening = False  # every channel LISTENed on the current connection

    def poke(self) -> None:
        _poke(self._w)

    def quiet(self) -> bool:
        """Nothing was announced on its channels since it was taken, as far as the live
        connection can tell (they were LISTENed all along and it was never poked)."""
        return self.listening and not readable([self.fd], 0)

    def close(self) -> None:
        self._listener.forget(self)
        os.close(self.fd)
        os.close(self._w)


class Listener:
    """The LISTEN thread of one store in one process (started by the first ``interest``)."""

    def __init__(self, db: PgDb) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._interests: dict[str, set[Interest]] = {}  # server channel -> waiters
        self._listening: set[str] = set()  # channels LISTENed on the current connection
        # When each channel last had a waiter leave (kept by the waiters, under the lock: a
        # waiter that finds its channel LISTENed does not wake the thread).
        self._left_at: dict[str, float] = {}
        self._wake_r, self._wake_w = _pipe()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stop = False
        #: The server pid of the current LISTEN connection (None while disconnected).
        self.backend_pid: int | None = None
        #: How many times the connection was (re)made.
        self.connects = 0
        #: Called by the thread with (server channel, payload) for each notification that
        #: carries a payload, before its waiters are poked.
        self.on_payload: Callable[[str, str], None] | None = None
        _LISTENERS.add(self)

    def _forked(self) -> None:
        # The parent's waiters and connection are not this process's: start afresh.
        self._lock = threading.Lock()
        self._interests = {}
        self._listening = set()
        self._left_at = {}
        self._thread = None
        self._pid = os.getpid()
        self.backend_pid = None
        self._wake_r, self._wake_w = _pipe()

    # -- waiters' side ----------------------------------------------------------------------

    def interest(self, channels: Iterable[str]) -> Interest:
        """Register a waiter for these coord channels; close the ``Interest`` when done."""
        names = frozenset(channel_name(self._db.location.schema, c) for c in channels)
        it = Interest(self, names)
        with self._lock:
            for n in names:
                self._interests.setdefault(n, set()).add(it)
            # Already LISTENed on the live connection: every notification from now on
            # reaches it, and the waiter checks after registering, so nothing committed
            # before needs a poke (which would cost it one more look).
            it.listening = self.backend_pid is not None and names <= self._listening
            self._start()
        if not it.listening:
            _poke(self._wake_w)
        return it

    def arm(self, channel: str) -> Interest | None:
        """An interest in ``channel`` taken before a write whose answer will be announced
        there (``Interest.quiet`` then tells that none came yet), or None when the channel is
        not LISTENed on the live connection now. Close it when done."""
        it = self.interest([channel])
        if it.listening:
            return it
        it.close()
        return None

    def listening(self, channel: str) -> bool:
        """Whether a coord channel is LISTENed on the live connection now."""
        name = channel_name(self._db.location.schema, channel)
        with self._lock:
            return self.backend_pid is not None and name in self._listening

    def forget(self, it: Interest) -> None:
        with self._lock:
            for n in it.names:
                left = self._interests.get(n)
                if left is not None:
                    left.discard(it)
                    if not left:
                        del self._interests[n]
                        self._left_at[n] = time.monotonic()
        # No need to wake the thread: a channel nobody waits on lingers anyway, and is
        # dropped at the thread's next pass (a notification, a new channel or a ping).

    def close(self) -> None:
        """Stop the thread (it closes its connection), then close the wake-up pipe."""
        self._stop = True
        _poke(self._wake_w)
        if self._pid != os.getpid():
            return  # the parent's: not ours to close
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
            if t.is_alive():
                return  # still selecting on the pipe: leave it open rather than pull it away
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _start(self) -> None:
        # Called under the lock (a forked child was reset by the after-fork hook).
        if self._stop or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._run, name="coord-listen", daemon=True)
        self._thread.start()

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        conn: Conn | None = None
        pause = 0.0
        try:
            while not self._stop:
                if conn is None:
                    if pause and self._sleep(pause):
                        break
                    try:
                        conn = self._connect()
                        self.backend_pid = conn.info.backend_pid
                        self.connects += 1
                        pause = 0.0
                    except CoordError:
                        pause = min(max(pause * 2, 0.05), RECONNECT_MAX)
                        continue
                try:
                    self._serve(conn)
                except (psycopg.Error, OSError):
                    self._lost(conn)
                    conn = None
        finally:
            if conn is not None:
                self._db.discard(conn)
            self.backend_pid = None

    def _connect(self) -> Conn:
        return self._db.connect()

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until woken; True when asked to stop."""
        readable([self._wake_r], seconds)
        drain(self._wake_r)
        return self._stop

    def _lost(self, conn: Conn) -> None:
        with self._lock:
            self._listening = set()
            for its in self._interests.values():
                for it in its:
                    it.listening = False
                    it.poke()  # no hint can come now: back to the short polling interval
        self.backend_pid = None
        self._db.discard(conn)

    def _serve(self, conn: Conn) -> None:
        """LISTEN on what is wanted, then deliver notifications until the connection fails
        or the thread is asked to stop."""
        fresh = True
        while not self._stop:
            self._sync(conn, everyone=fresh)
            fresh = False
            self._deliver(conn)
            ready = readable([conn.fileno(), self._wake_r], PING_INTERVAL)
            if self._wake_r in ready:
                drain(self._wake_r)
            if not ready:
                conn.execute("SELECT 1")
            self._deliver(conn)

    def _sync(self, conn: Conn, *, everyone: bool) -> None:
        with self._lock:
            wanted = set(self._interests)
            left_at = dict(self._left_at)
        new = wanted - self._listening
        for n in sorted(new):
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(n)))
        # A channel nobody waits on stays LISTENed a while: a waiter looping on it (a
        # requester, a worker) would otherwise cost a LISTEN and an UNLISTEN per wait.
        now = time.monotonic()
        dropped = set()
        for n in sorted(self._listening - wanted):
            if now - left_at.get(n, now) >= LINGER:
                conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(n)))
                dropped.add(n)
        with self._lock:
            self._listening = (self._listening | wanted) - dropped
            for n in dropped:
                self._left_at.pop(n, None)
            for its in self._interests.values():
                for it in its:
                    if everyone or (not it.listening and it.names <= self._listening):
                        it.listening = it.names <= self._listening
                        # What committed before the LISTEN sent no hint we heard: look.
                        it.poke()
                    elif it.listening and not it.names <= self._listening:
                        # It came while its channel was being dropped: poll, and be
                        # LISTENed again at the next pass.
                        it.listening = False
                        it.poke()
                        _poke(self._wake_w)

    def _deliver(self, conn: Conn) -> None:
        for note in conn.notifies(timeout=0):
            if note.payload and self.on_payload is not None:
                # Before the poke: the woken waiter finds what the payload carried.
                self.on_payload(note.channel, note.payload)
            with self._lock:
                for it in self._interests.get(note.channel, ()):
                    it.poke()


def close_schema(schema: str) -> None:
    """Stop this process's listeners of the deployment ``schema`` (of stores dropped without
    ``close``), for a schema about to be dropped."""
    for listener in list(_LISTENERS):
        if listener._db.location.schema == schema:
            listener.close()
