"""Waiting that costs almost nothing and wakes fast.

The database is the only source of truth; a nudge is just a hint to look again. Each live
instance binds a datagram socket beside the database; whoever commits something another
instance waits for sends one byte to it. Between nudges a waiter polls ``PRAGMA data_version``
(about 5 µs, it moves on other connections' commits) with a short, growing interval, and it
can also watch pids through ``pidfd_open`` so the death of a holder wakes it at once.
"""

from __future__ import annotations

import atexit
import os
import select
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .db import Store

T = TypeVar("T")

#: Polling interval bounds between nudges (seconds).
POLL_MIN = 0.0005
POLL_MAX = 0.02


#: The longest path a unix socket can bind (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def socket_path(path: str) -> str:
    """``path`` itself, or, when it is too long for a unix socket (a database deep in the
    tree), an abstract-namespace name written ``@coord-<hash>``: no file, no length limit.
    A nudge is only a hint to look again, so a stray datagram from elsewhere costs nothing."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    import hashlib

    return "@coord-" + hashlib.sha256(os.fsencode(path)).hexdigest()[:32]


def is_abstract(path: str | None) -> bool:
    """Whether ``path`` (from ``socket_path``) names an abstract socket: no file to remove."""
    return path is not None and path.startswith("@")


def _address(path: str) -> str:
    return "\0" + path[1:] if is_abstract(path) else path


def bind(path: str) -> socket.socket:
    """Bind a non-blocking datagram socket at ``path`` (as returned by ``socket_path``; a
    stale file there is replaced)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if not is_abstract(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        s.bind(_address(path))
        if not is_abstract(path):
            os.chmod(path, 0o600)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


_sender: socket.socket | None = None
_sender_pid = 0


@atexit.register
def _close_sender() -> None:
    if _sender is not None and _sender_pid == os.getpid():
        _sender.close()


def nudge(paths: Iterable[str | None]) -> None:
    """Wake the waiters bound at ``paths``; a missing or full socket is ignored (a hint)."""
    global _sender, _sender_pid
    if _sender is None or _sender_pid != os.getpid():
        _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _sender.setblocking(False)
        _sender_pid = os.getpid()
    for p in paths:
        if not p:
            continue
        try:
            _sender.sendto(b"!", _address(p))
        except OSError:
            pass


def pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits, or None if it cannot be had."""
    if pid <= 0 or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None



def readable(fds: list[int], timeout: float | None) -> list[int]:
    """The descriptors of ``fds`` that are readable (or hung up) within ``timeout`` seconds
    (None: no limit). poll, not select: a process with more than 1 024 descriptors open
    (a server with many connections) must still wait."""
    if not fds:
        if timeout is not None and timeout > 0:
            time.sleep(timeout)
        return []
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [fd for fd, _ in poller.poll(ms)]

def wait_for(
    store: Store,
    check: Callable[[], T | None],
    timeout: float | None,
    *,
    sock: socket.socket | None = None,
    watch_pids: Callable[[], Iterable[int]] | None = None,
) -> T | None:
    """Call ``check`` until it returns something other than None, or ``timeout`` passes.

    ``check`` runs again whenever the database changes (data_version), a nudge arrives on
    ``sock``, or a pid named by ``watch_pids`` exits. Returns None on timeout.
    """
    deadline = None if timeout is None else store.mono() + timeout
    interval = POLL_MIN
    fds: dict[int, int] = {}
    try:
        while True:
            version = store.data_version()
            result = check()
            if result is not None:
                return result
            if watch_pids is not None:
                wanted = set(watch_pids())
                for pid in list(fds):
                    if pid not in wanted:
                        os.close(fds.pop(pid))
                for pid in wanted - fds.keys():
                    fd = pidfd(pid)
                    if fd is not None:
                        fds[pid] = fd
            while True:
                now = store.mono()
                if deadline is not None and now >= deadline:
                    return None
                slice_ = interval if deadline is None else min(interval, deadline - now)
                watched = list(fds.values()) + ([sock.fileno()] if sock is not None else [])
                ready = readable(watched, slice_)
                if sock is not None and sock.fileno() in ready:
                    drain(sock)
                    break
                if ready:  # a watched pid exited
                    break
                interval = min(interval * 2, POLL_MAX)
                if store.data_version() != version:
                    interval = POLL_MIN
                    break
    finally:
        for fd in fds.values():
            os.close(fd)


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(64):
            pass
    except (BlockingIOError, InterruptedError):
        pass
