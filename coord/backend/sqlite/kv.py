"""The SQLite engine's key-value table: ``kv``, versions from the ``revision`` counter."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import apsw

from ...errors import NotRegistered, VersionConflict
from ..records import KvRecord, Member, Problem
from .connection import fetch, next_counter
from .death import bury
from .liveness import SqliteLiveness

if TYPE_CHECKING:
    from ...db import Row, Store

def _record(row: Row) -> KvRecord:
    return KvRecord(
        key=row["key"], value=row["value"], version=row["version"], owner_id=row["owner_id"],
        owner_incarnation=row["owner_incarnation"], created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class SqliteKv:
    """``coord.backend.KvOps``."""

    def __init__(self, store: Store, liveness: SqliteLiveness) -> None:
        self._store = store
        self._liveness = liveness

    def get(self, key: str) -> KvRecord | None:
        rows = self._store.rows("SELECT * FROM kv WHERE key = ?", (key,))
        return _record(rows[0]) if rows else None

    def prefixed(self, prefix: str) -> list[KvRecord]:
        return [_record(r) for r in self._store.rows(
            "SELECT * FROM kv "
            "WHERE key >= ?1 AND substr(key, 1, length(?1)) = ?1 ORDER BY key",
            (prefix,),
        )]

    def set(self, key: str, value: str, owner: Member | None) -> int:
        return self._store.write(lambda c: self._write(c, key, value, owner))

    def cas(self, key: str, value: str, version: int, owner: Member | None) -> int:
        return self._store.write(lambda c: self.cas_in(c, key, value, version, owner))

    # -- inside a caller's transaction (the fenced operations of the leases) -----------------

    def set_in(self, c: apsw.Connection, key: str, value: str, owner: Member | None) -> int:
        """``set`` inside the caller's transaction."""
        return self._write(c, key, value, owner)

    def cas_in(self, c: apsw.Connection, key: str, value: str, version: int,
               owner: Member | None) -> int:
        """``cas`` inside the caller's transaction."""
        row = self._current(c, key)
        found = row["version"] if row is not None else None
        if (found or 0) != version:
            raise VersionConflict(key, version, found)
        return self._write(c, key, value, owner)

    def delete(self, key: str, version: int | None) -> bool:
        def txn(c: apsw.Connection) -> bool:
            row = self._current(c, key)
            found = row["version"] if row is not None else None
            if version is not None and found != version:
                raise VersionConflict(key, version, found)
            if row is None:
                return False
            c.execute("DELETE FROM kv WHERE key = ?", (key,))
            return True

        return self._store.write(txn)

    def drop_orphaned(self, entries: Iterable[tuple[str, int]]) -> None:
        stale = list(entries)
        if stale:
            self._store.write(lambda c: c.executemany(
                "DELETE FROM kv WHERE key = ? AND version = ? AND owner_id IS NOT NULL", stale))

    def problems(self) -> list[Problem]:
        store, out = self._store, []
        for r in store.rows("SELECT version, group_concat(key, ', ') AS keys FROM kv "
                            "GROUP BY version HAVING count(*) > 1"):
            out.append(Problem(f"keys {r['keys']} share version {r['version']}"))
        for r in store.rows("SELECT key FROM kv WHERE NOT json_valid(value)"):
            out.append(Problem(f"key {r['key']!r}: value is not valid JSON"))
        for r in store.rows("SELECT key FROM kv WHERE updated_at < created_at"):
            out.append(Problem(f"key {r['key']!r} was updated before it was created"))
        return out

    # -- inside a transaction ----------------------------------------------------------------

    def _current(self, c: apsw.Connection, key: str) -> Row | None:
        """The key's row, or None — also when it is ephemeral and its owner is dead (the
        owner is then buried in this transaction)."""
        rows = fetch(c, "SELECT * FROM kv WHERE key = ?", (key,))
        if not rows:
            return None
        row = rows[0]
        if row["owner_id"] is None:
            return row
        inst = fetch(c, "SELECT * FROM instances WHERE id = ? AND incarnation = ?",
                     (row["owner_id"], row["owner_incarnation"]))
        if inst and inst[0]["status"] == "alive":
            alive, verdict = self._liveness.judge(inst[0])
            if alive:
                return row
            bury(c, self._store, row["owner_id"], row["owner_incarnation"], reason=verdict)
        c.execute("DELETE FROM kv WHERE key = ? AND version = ?", (key, row["version"]))
        return None

    def _write(self, c: apsw.Connection, key: str, value: str, owner: Member | None) -> int:
        if owner is not None and not c.execute(
            "SELECT 1 FROM instances WHERE id = ? AND incarnation = ? AND status = 'alive'",
            owner,
        ).fetchall():
            raise NotRegistered(owner[0], "an ephemeral key needs a live owner")
        version = next_counter(c, "revision")
        now = self._store.wall()
        c.execute(
            "INSERT INTO kv (key, value, version, owner_id, owner_incarnation, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
            "value = excluded.value, version = excluded.version, owner_id = excluded.owner_id, "
            "owner_incarnation = excluded.owner_incarnation, updated_at = excluded.updated_at",
            (key, value, version, *(owner or (None, None)), now, now),
        )
        return version
