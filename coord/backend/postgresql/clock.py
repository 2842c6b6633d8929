"""The PostgreSQL engine's expiry clock: the server's (``coord_now()``, in SQL). Every
``*_mono`` column holds its readings; the engine's SQL stamps and compares them with
``coord_now()`` itself, so no client's clock enters a verdict. ``now()`` reads it for the
few callers that show an age."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .opening import server_epoch

if TYPE_CHECKING:
    from .connection import PgDb


class ServerClock:
    """``coord.backend.ExpiryClock`` read from the server."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    def now(self) -> float:
        return float(self._db.value("SELECT coord_now()"))

    def epoch(self) -> str:
        return server_epoch(self._db.conn())
