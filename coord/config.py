"""Every default timing and limit, in one place.

Each can be set on a ``Config`` passed to ``Store``, or from the environment as
``COORD_<NAME>`` in upper case (e.g. ``COORD_INSTANCE_TTL=30``), which is how the CLI and
cron jobs pick them up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from .errors import InvalidArgument


@dataclass(frozen=True)
class Config:
    instance_ttl: float = 15.0  # an instance without a heartbeat for this long is hung
    heartbeat: float = 5.0  # how often the background heartbeat renews instance and leases
    lease_ttl: float = 15.0  # a lease not renewed for this long expires
    renew_deadline: float = 10.0  # a holder that could not renew for this long steps down
    claim_lease: float = 60.0  # a claimed job returns to ready after this long
    message_ttl: float = 3600.0  # undelivered messages are reaped after this long
    result_retention: float = 7 * 86400.0  # done/dead/cancelled jobs are purged after this long
    events_max_rows: int = 10_000
    events_max_age: float = 7 * 86400.0
    payload_limit: int = 1 << 20  # bytes of JSON text
    payload_max_depth: int = 64
    reap_batch: int = 500  # rows per reaper transaction, so a reap never blocks writers long
    kill_grace: float = 5.0  # TERM, then KILL after this long
    busy_timeout_ms: int = 5000

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
