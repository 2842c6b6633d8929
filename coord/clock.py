"""Time: CLOCK_MONOTONIC for every expiry decision, the wall clock only for people.

CLOCK_MONOTONIC is shared by all processes of one boot, does not move when the wall clock is
set, and pauses during suspend (so leases do not all expire at resume). Its values mean
nothing across boots, which is why the database records the boot id they belong to.
Tests inject a ``Clock`` with their own functions; nothing ever sets the system clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache


def _monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class Clock:
    """A pair of clocks. ``mono`` decides, ``wall`` is recorded for people."""

    mono: Callable[[], float] = field(default=_monotonic)
    wall: Callable[[], float] = field(default=time.time)


SYSTEM = Clock()


@cache
def boot_id() -> str:
    """This boot's id; CLOCK_MONOTONIC values are comparable only within one boot."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()
