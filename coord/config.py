"""Every default timing and limit, in one place.

Each can be set on a ``Config`` passed to ``Store``, or from the environment as
``COORD_<NAME>`` in upper case (e.g. ``COORD_INSTANCE_TTL=30``), which is how the CLI and
cron jobs pick them up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from .errors import InvalidArgument

#: Seconds a process tree may take to vanish after SIGKILL before it is reported as
#: surviving (SIGKILL is not instant: the kernel reaps a big tree in steps).
KILL_WAIT = 2.0


@dataclass(frozen=True)
class Config:
    instance_ttl: float = 15.0  # an instance without a heartbeat for this long is hung
    heartbeat: float = 5.0  # how often the background heartbeat renews instance and leases
    lease_ttl: float = 15.0  # a lease not renewed for this long expires
    renew_deadline: float = 8.0  # a holder that could not renew for this long steps down
    claim_lease: float = 60.0  # a claimed job returns to ready after this long
    message_ttl: float = 3600.0  # undelivered messages are reaped after this long
    result_retention: float = 7 * 86400.0  # done/dead/cancelled jobs are purged after this long
    events_max_rows: int = 10_000
    events_max_age: float = 7 * 86400.0
    payload_limit: int = 1 << 20  # bytes of JSON text
    payload_max_depth: int = 64
    reap_batch: int = 500  # rows per reaper transaction, so a reap never blocks writers long
    kill_grace: float = 3.0  # TERM, then KILL after this long
    busy_timeout_ms: int = 5000

    def renew_deadline_for(self, ttl: float) -> float:
        """How long a holder of a lease of this TTL keeps it without a renewal (< ttl)."""
        return min(self.renew_deadline, ttl * 2 / 3)

    def check_step_down(self, ttl: float | None = None, grace: float | None = None, *,
                        server_timeout: float | None = None,
                        instance_ttl: float | None = None) -> None:
        """Refuse (``InvalidArgument``, one line) timings where a holder that can no longer
        renew might still be ending its command's tree when others may take over: its renew
        deadline + ``grace`` (TERM to KILL) + ``KILL_WAIT`` must stay below the lease's
        ``ttl`` and below ``server_timeout``, the server's own end of a silent session
        (PostgreSQL), when there is one. With ``instance_ttl`` the same for the holder's
        instance: its leases also step down at the instance's renew deadline (others may
        bury it as hung a TTL after its last heartbeat). Defaults: ``lease_ttl`` and
        ``kill_grace``."""
        ttl = self.lease_ttl if ttl is None else ttl
        grace = self.kill_grace if grace is None else grace
        if not ttl > 0 or not math.isfinite(ttl):
            raise InvalidArgument(f"lease ttl must be a positive number of seconds, got {ttl:g}")
        if not grace >= 0 or not math.isfinite(grace):
            raise InvalidArgument(f"kill grace must be zero or more seconds, got {grace:g}")
        deadline = self.renew_deadline_for(ttl)
        limits = [("the lease TTL", ttl)]
        if server_timeout is not None:
            limits.append(("the server timeout", server_timeout))
        checks = [(deadline, what, limit) for what, limit in limits]
        if instance_ttl is not None:
            checks.append((self.renew_deadline_for(instance_ttl), "the instance TTL",
                           instance_ttl))
        for span, what, limit in checks:
            total = span + grace + KILL_WAIT
            if total >= limit:
                raise InvalidArgument(
                    f"timings refused: renew deadline {span:g} s + kill grace {grace:g} s + "
                    f"KILL wait {KILL_WAIT:g} s = {total:g} s is not below {what} ({limit:g} s), "
                    "so a holder could still be ending its command when another takes over; "
                    "lower the renew deadline or the grace, or raise the TTL")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        values: dict[str, float | int] = {}
        for f in fields(cls):
            raw = env.get("COORD_" + f.name.upper())
            if raw is None:
                continue
            try:
                values[f.name] = int(raw) if f.type == "int" else float(raw)
            except ValueError:
                raise InvalidArgument(f"COORD_{f.name.upper()}={raw!r} is not a number") from None
        return replace(cls(), **values)  # type: ignore[arg-type]
