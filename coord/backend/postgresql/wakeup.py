"""The PostgreSQL engine's wake-up: the host-local datagram nudge (as on SQLite) and pidfds
for deaths, polling the database between them (``LISTEN/NOTIFY`` comes next)."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from ... import nudge

T = TypeVar("T")

#: The longest a waiter goes without re-checking the database.
POLL_MAX = 0.05


class PgWakeup:
    """``coord.backend.Wakeup``."""

    def wait_for(
        self,
        check: Callable[[], T | None],
        timeout: float | None,
        *,
        sock: socket.socket | None = None,
        watch_pids: Callable[[], Iterable[int]] | None = None,
    ) -> T | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        fds: dict[int, int] = {}
        interval = 0.002
        try:
            while True:
                result = check()
                if result is not None:
                    return result
                if watch_pids is not None:
                    wanted = set(watch_pids())
                    for pid in list(fds):
                        if pid not in wanted:
                            os.close(fds.pop(pid))
                    for pid in wanted - fds.keys():
                        fd = nudge.pidfd(pid)
                        if fd is not None:
                            fds[pid] = fd
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                slice_ = interval if deadline is None else min(interval, deadline - now)
                watched = list(fds.values()) + ([sock.fileno()] if sock is not None else [])
                ready = select.select(watched, [], [], slice_)[0]
                if sock is not None and sock.fileno() in ready:
                    nudge.drain(sock)
                    interval = 0.002
                else:
                    interval = min(interval * 2, POLL_MAX)
        finally:
            for fd in fds.values():
                os.close(fd)

    @staticmethod
    def nudge(paths: Iterable[str | None]) -> None:
        nudge.nudge(paths)
