"""The PostgreSQL engine's wake-up: what makes a waiter look at the database again.

* A waiter on this host and boot is nudged on its instance's datagram socket after the
  commit, as on SQLite (``coord.nudge``); a pidfd wakes it at once when a watched process
  of this host exits.
* Across hosts: ``NOTIFY`` sent by the writing transaction (``pg_notify``, delivered at its
  commit) reaches the store's ``LISTEN`` connection (``.listen``: one per store and process,
  one thread, started by the first waiter that names a channel), which wakes the waiters
  interested in that channel.
* Polling is the fallback and the truth's guarantee: a waiter re-checks at least every
  ``POLL_MAX`` seconds (a growing interval from 2 ms), or every ``POLL_LISTENING`` seconds
  while all of its channels are LISTENed on a live connection (then no shorter polls: the
  NOTIFY is the wake-up, and the listener pokes every waiter when it (re)connects). A notification is only a
  hint: it is lost while the LISTEN connection is down, so after every reconnect every
  waiter re-checks; a wake-up is never later than the polling bound.

Channels (the API for capabilities; queues use it as messages do):

* A channel is a coord name, ``"<kind>:<name>"``: ``coord.backend.inbox_channel(id)`` for an
  instance's messages, ``coord.backend.queue_channel(name)`` for a queue's jobs. The engine
  maps it to a server channel of the deployment (``listen.channel_name``).
* A writer announces, inside its transaction: ``wakeup.notify(c, [queue_channel(q)])``
  (one ``pg_notify`` per distinct channel; the server drops duplicates within a
  transaction, and a rolled-back transaction notifies nobody).
* A waiter names its channels: ``store.backend.wakeup.wait_for(check, timeout,
  channels=[queue_channel(q)])`` (SQLite's wake-up takes and ignores them).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from ... import nudge
from .listen import Listener, channel_name, drain

if TYPE_CHECKING:
    from .connection import Conn, PgDb
    from .listen import Interest

T = TypeVar("T")

#: The longest a waiter goes without re-checking the database (seconds).
POLL_MAX = 0.05
#: The same while every channel it waits on is LISTENed on a live connection.
POLL_LISTENING = 0.5
#: The first (shortest) polling interval.
POLL_MIN = 0.002


class PgWakeup:
    """``coord.backend.Wakeup``."""

    def __init__(self, db: PgDb) -> None:
        self._db = db
        self.listener = Listener(db)

    def wait_for(
        self,
        check: Callable[[], T | None],
        timeout: float | None,
        *,
        sock: socket.socket | None = None,
        watch_pids: Callable[[], Iterable[int]] | None = None,
        watch_fds: Callable[[], Iterable[int]] | None = None,
        channels: Iterable[str] = (),
        notified: bool = False,
    ) -> T | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        fds: dict[int, int] = {}
        wanted_channels = list(channels)
        interest: Interest | None = None
        if wanted_channels and (timeout is None or timeout > 0):
            interest = self.listener.interest(wanted_channels)
        def floor() -> float:
            # While every channel is LISTENed, a commit's NOTIFY (or the nudge) wakes the
            # waiter: short polls would only repeat the check (two statements, say) for
            # nothing. Otherwise the growing interval from POLL_MIN is the wake-up.
            return POLL_LISTENING if interest is not None and interest.listening else POLL_MIN

        interval = floor()
        try:
            while True:
                result = check()
                if result is not None:
                    return result
                if watch_pids is not None:
                    _watch(fds, set(watch_pids()))
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                bound = POLL_LISTENING if interest is not None and interest.listening \
                    else POLL_MAX
                slice_ = min(interval, bound)
                if deadline is not None:
                    slice_ = min(slice_, deadline - now)
                watched = list(fds.values())
                if watch_fds is not None:
                    watched.extend(watch_fds())
                # A nudge that a NOTIFY heard here repeats would only cost one more check,
                # after the one the NOTIFY's wake-up made.
                heard = notified and interest is not None and interest.listening
                if sock is not None and not heard:
                    watched.append(sock.fileno())
                if interest is not None:
                    watched.append(interest.fd)
                ready = nudge.readable(watched, slice_)
                hinted = False
                if sock is not None and sock.fileno() in ready:
                    nudge.drain(sock)
                    hinted = True
                if interest is not None and interest.fd in ready:
                    drain(interest.fd)
                    hinted = True
                interval = floor() if hinted else min(interval * 2, bound)
        finally:
            for fd in fds.values():
                os.close(fd)
            if interest is not None:
                interest.close()

    def notify(self, c: Conn, channels: Iterable[str]) -> None:
        """Inside a writing transaction: announce its commit to the waiters on ``channels``
        (coord channel names; see the module docstring)."""
        names = sorted({channel_name(self._db.location.schema, ch) for ch in channels})
        if names:
            c.execute("SELECT pg_notify(ch, '') FROM unnest(%s::text[]) AS ch", (names,))

    @staticmethod
    def nudge(paths: Iterable[str | None]) -> None:
        """After a commit: wake this host's instances whose nudge sockets are at ``paths``."""
        nudge.nudge(paths)

    def close(self) -> None:
        self.listener.close()


def _watch(fds: dict[int, int], wanted: set[int]) -> None:
    """Keep a pidfd open for each pid in ``wanted`` (and only those)."""
    for pid in list(fds):
        if pid not in wanted:
            os.close(fds.pop(pid))
    for pid in wanted - fds.keys():
        fd = nudge.pidfd(pid)
        if fd is not None:
            fds[pid] = fd
