"""Discovery by scan: processes of the current user that look like instances but never
registered (the fallback the file-per-PID registries relied on), plus live figures."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from .errors import InvalidArgument


def live_figures(pid: int) -> dict[str, Any]:
    """RSS (bytes), lifetime-average CPU % and name of a running process; empty if gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            age = max(1e-6, _uptime_of(pid))
            return {"rss": p.memory_info().rss, "cpu_percent": round(100.0 * (t.user + t.system) / age, 1),
                    "name": p.name()}
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def _uptime_of(pid: int) -> float:
    from .identity import start_token

    token = start_token(pid)
    if token is None:
        return 0.0
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return up - token / os.sysconf("SC_CLK_TCK")


def uptime_of(pid: int) -> float | None:
    """Seconds since ``pid`` started (from the boot-relative start token), or None."""
    v = _uptime_of(pid)
    return v if v > 0 else None


def scan(pattern: str, *, exclude_pids: Iterable[int] = ()) -> list[dict[str, Any]]:
    """Processes of the current user whose command line matches ``pattern`` (a regular
    expression) and that are not in ``exclude_pids`` (the registered ones)."""
    import psutil

    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise InvalidArgument(f"bad --scan pattern {pattern!r}: {e}") from None
    me, skip = os.geteuid(), set(exclude_pids) | {os.getpid()}
    found = []
    for p in psutil.process_iter(["pid", "uids", "cmdline", "username", "name"]):
        info = p.info
        if info["pid"] in skip or not info["uids"] or info["uids"].effective != me:
            continue
        cmd = info["cmdline"] or []
        if not cmd or not rx.search(" ".join(cmd)):
            continue
        row = {"id": None, "app": None, "pid": info["pid"], "user": info["username"],
               "alive": True, "status": "unregistered", "incarnation": None, "started_at": None,
               "cmdline": cmd}
        row.update(live_figures(info["pid"]))
        row["uptime"] = uptime_of(info["pid"])
        found.append(row)
    return found
