"""The SQLite engine's expiry clock: CLOCK_MONOTONIC of this boot (the store's clock, which
tests inject), with the boot id as its epoch. Every ``*_mono`` column holds its readings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...clock import boot_id

if TYPE_CHECKING:
    from ...db import Store


class MonotonicClock:
    """``coord.backend.ExpiryClock``: shared by all processes of one boot, unmoved by wall
    clock changes, paused in suspend."""

    __slots__ = ("now",)

    def __init__(self, store: Store) -> None:
        # The store's clock is read on every call (a test may swap its functions).
        self.now = store.mono

    def epoch(self) -> str:
        return boot_id()
