"""The SQLite engine's liveness: proof of death on one host.

An instance is dead when its boot is over, its pid is gone, reused (another start token) or
a zombie, or its record lock is free — or when its heartbeat is older than its TTL (hung).
The verdict itself is ``coord.instances.judge`` until step 2 of ``coord.backend``'s plan
moves it, with the own-lock set, into this file. A pidfd pins a watched process, so its
exit is heard at once.
"""

from __future__ import annotations

import os
import select
from typing import TYPE_CHECKING

from ... import nudge
from ...identity import ProcIdentity, pid_namespace, still_running
from ...instances import InstanceInfo, Probe, judge
from .clock import MonotonicClock

if TYPE_CHECKING:
    from ...db import Row, Store


class SqliteLiveness:
    """``coord.backend.Liveness``."""

    def __init__(self, store: Store, clock: MonotonicClock) -> None:
        self._store = store
        self._clock = clock

    def look(self) -> Probe:
        return Probe()

    def judge(self, row: Row, look: object | None = None) -> tuple[bool, str]:
        probe = look if isinstance(look, Probe) else None
        return judge(self._store, row, self._clock.now(), probe=probe)

    def watchable_pid(self, row: Row) -> int | None:
        return int(row["pid"]) if row["pidns"] == pid_namespace() else None

    def watch(self, row: Row | InstanceInfo) -> PidWatch:
        return PidWatch(self._clock, row)


class PidWatch:
    """``coord.backend.Watch`` through a pidfd (none for another pid namespace: a death
    there is seen by judging)."""

    def __init__(self, clock: MonotonicClock, row: Row | InstanceInfo) -> None:
        self._clock = clock
        self._row = row if isinstance(row, dict) else None
        pidns, pid = (row["pidns"], row["pid"]) if isinstance(row, dict) else (row.pidns, row.pid)
        self._pid: int = pid if pidns == pid_namespace() else 0
        self._fd = nudge.pidfd(self._pid)

    def pids(self) -> list[int]:
        return [self._pid] if self._fd is not None else []

    def exited(self) -> bool:
        return self._fd is not None and bool(select.select([self._fd], [], [], 0)[0])

    def pinned_alive(self) -> bool:
        # Our pidfd pins the process, so a matching start token read after opening it proves
        # the very process that registered still runs; only a registration row (not an
        # InstanceInfo, whose heartbeat is not kept on the expiry clock) can say so.
        row = self._row
        if self._fd is None or row is None or row["status"] != "alive":
            return False
        if row["boot_id"] != self._clock.epoch() or self._clock.now() - row["heartbeat_mono"] > row["ttl"]:
            return False
        return still_running(ProcIdentity(row["boot_id"], row["pid"], row["start_token"]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
