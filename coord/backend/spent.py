"""Replies a waiting requester took and has not deleted yet, per instance of this process:
each engine deletes them in that instance's next write instead of a transaction of their own
(a round trip fewer per request)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from .records import Member

C = TypeVar("C")  # an engine's connection
T = TypeVar("T")


class SpentReplies:
    """The taken replies of each instance (``Member``); safe across threads."""

    def __init__(self) -> None:
        self._by: dict[Member, set[str]] = {}
        self._lock = threading.Lock()

    def of(self, me: Member) -> list[str]:
        """The ids ``me``'s next write is to delete."""
        with self._lock:
            return list(self._by.get(me, ()))

    def add(self, me: Member, ids: Iterable[str]) -> None:
        with self._lock:
            self._by.setdefault(me, set()).update(ids)

    def deleted(self, me: Member, ids: list[str]) -> None:
        """Those of ``ids`` are gone (a write of ``me`` deleted them)."""
        if not ids:
            return
        with self._lock:
            left = self._by.get(me, set()).difference(ids)
            if left:
                self._by[me] = left
            else:
                self._by.pop(me, None)

    def write(self, me: Member, write: Callable[[Callable[[C], T]], T], fn: Callable[[C], T],
              drop: Callable[[C, Member, list[str]], None]) -> T:
        """``write(fn)`` (an engine's write transaction) for ``me``, also deleting in it
        (``drop``) the replies ``me`` has taken since its last write."""
        spent = self.of(me)
        if not spent:
            return write(fn)

        def txn(c: C) -> T:
            result = fn(c)
            drop(c, me, spent)
            return result

        result = write(txn)
        self.deleted(me, spent)
        return result
