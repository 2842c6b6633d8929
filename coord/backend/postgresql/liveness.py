"""The PostgreSQL engine's liveness: proof of death across hosts.

A coord process can prove an instance dead only from the instance's own host and boot, as
on SQLite (``coord.backend.sqlite.liveness``): its pid gone or reused, or its host-local
lock file unlocked. An instance of another host or boot is dead only when its heartbeat,
stamped and compared with the server's clock, is older than its TTL ('hung'), or when a
coord process on its host proved the death and buried it (the row says 'dead'). A free
session lock on the server is never taken as proof: a reset connection, a session timeout,
``pg_terminate_backend`` or the server's crash recovery free it with the holder alive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ...identity import DEAD_STATES, FREE, pid_namespace
from ..sqlite.liveness import LockProof, PidWatch, Probe, holds_own_lock, unlink_many

if TYPE_CHECKING:
    from ...db import Row, Store
    from ...instances import InstanceInfo
    from .clock import ServerClock


def judge(row: Row, probe: Probe, now: float) -> tuple[bool, str]:
    """(alive, status word) of an instance row, ``now`` being the server's clock. After a
    step of that clock (``probe.held_since``, see ``.clock``) a heartbeat older than the
    step counts from the step: one TTL to heartbeat again before it is 'hung'."""
    if row["status"] == "dead":
        return False, row["end_reason"] or "dead"
    if row["boot_id"] == probe.boot_id:  # this host and boot: the kernel can prove a death
        same_ns = row["pidns"] == probe.pidns
        if same_ns:
            st = probe.proc(row["pid"])
            if st is None or st[0] != row["start_token"] or st[1] in DEAD_STATES:
                return False, "died"
        if same_ns and row["pid"] == probe.pid:
            if not holds_own_lock(row["lock_path"]):
                return False, "died"
        elif probe.lock(row["lock_path"])[0] == FREE:
            return False, "died"
    if now - row["heartbeat_mono"] > row["ttl"]:
        # After a step of the server's clock a heartbeat older than it counts from it.
        held = getattr(probe, "held_since", None)
        if held is None or row["heartbeat_mono"] >= held or now - held > row["ttl"]:
            return False, "hung"
    return True, "alive"


class PgLiveness:
    """``coord.backend.Liveness``."""

    def __init__(self, store: Store, clock: ServerClock) -> None:
        self._store = store
        self._clock = clock

    def look(self) -> Probe:
        probe = Probe()
        probe.now = self._clock.now()
        probe.held_since = self._clock.held_since  # type: ignore[attr-defined]
        return probe

    def judge(self, row: Row, look: object | None = None) -> tuple[bool, str]:
        probe = look if isinstance(look, Probe) else self.look()
        assert probe.now is not None
        return judge(row, probe, probe.now)

    def prove(self, token: str) -> LockProof:
        return LockProof(str(self._store.side_dir("locks") / f"{token}.lock"))

    def forget(self, rows: Iterable[Row]) -> None:
        # Only this host's files: another host's paths name files of that host.
        mine = Probe().boot_id
        unlink_many(p for r in rows if r.get("boot_id", mine) == mine
                    for p in (r.get("lock_path"), r.get("nudge_path")))

    def watchable_pid(self, row: Row) -> int | None:
        if row.get("boot_id") != Probe().boot_id or row["pidns"] != pid_namespace():
            return None
        return int(row["pid"])

    def watch(self, row: Row | InstanceInfo) -> PidWatch:
        return PidWatch(self._clock, row)  # type: ignore[arg-type]
