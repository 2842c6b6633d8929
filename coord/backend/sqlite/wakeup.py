"""The SQLite engine's wake-up: a datagram nudge to the waiting instance's socket after a
commit, ``PRAGMA data_version`` polling between nudges, pidfds for deaths (``coord.nudge``)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from ... import nudge

if TYPE_CHECKING:
    from ...db import Store

T = TypeVar("T")


class SqliteWakeup:
    """``coord.backend.Wakeup``."""

    def __init__(self, store: Store) -> None:
        self._store = store

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
        # ``channels``, ``notified``: SQLite's nudges and data_version already cover every
        # commit; ``watch_fds``: it arms no takeover (``LeaseOps.arm``).
        return nudge.wait_for(self._store, check, timeout, sock=sock, watch_pids=watch_pids)

    @staticmethod
    def nudge(paths: Iterable[str | None]) -> None:
        """After a commit: wake the instances whose nudge sockets are at ``paths``."""
        nudge.nudge(paths)
