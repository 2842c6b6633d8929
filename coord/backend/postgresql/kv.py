"""The PostgreSQL engine's key-value table: ``kv``, versions from ``revision_seq``.

READ COMMITTED does not serialise writers, so every compare-and-set and delete locks the
key's row (``FOR UPDATE``) before comparing its version, and a create-only write (version 0)
is an ``INSERT … ON CONFLICT DO NOTHING`` that reports the row another writer committed
first. An ephemeral key's owner row is locked before the key's row (instances before the
rows they hold, the order the death rule locks in), and a write of an ephemeral key holds
its owner's row ``FOR SHARE``: a concurrent burial of the owner waits for the write, then
deletes the key with the rest of what the owner held.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ...errors import NotRegistered, VersionConflict
from ..records import KvRecord, Member, Problem
from .connection import Conn, fetch
from .death import bury_many

if TYPE_CHECKING:
    from .connection import PgDb, Row
    from .liveness import PgLiveness


#: A new row (created and updated at one reading of the clock); its ON CONFLICT follows.
_INSERT = ("INSERT INTO kv (key, value, version, owner_id, owner_incarnation, created_at, "
           "updated_at) SELECT %s, %s, nextval('revision_seq'), %s, %s, t.now, t.now "
           "FROM (SELECT coord_now() AS now) t ")


def _record(row: Row) -> KvRecord:
    return KvRecord(
        key=row["key"], value=row["value"], version=int(row["version"]),
        owner_id=row["owner_id"],
        owner_incarnation=None if row["owner_incarnation"] is None
        else int(row["owner_incarnation"]),
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


class PgKv:
    """``coord.backend.KvOps``."""

    def __init__(self, db: PgDb, liveness: PgLiveness) -> None:
        self._db = db
        self._liveness = liveness

    def get(self, key: str) -> KvRecord | None:
        row = self._db.row("SELECT * FROM kv WHERE key = %s", (key,))
        return None if row is None else _record(row)

    def prefixed(self, prefix: str) -> list[KvRecord]:
        return [_record(r) for r in self._db.rows(
            # Byte order, as on SQLite, whatever the database's collation.
            'SELECT * FROM kv WHERE starts_with(key, %s) ORDER BY key COLLATE "C"', (prefix,))]

    def set(self, key: str, value: str, owner: Member | None) -> int:
        return self._db.write(lambda c: self.set_in(c, key, value, owner))

    def cas(self, key: str, value: str, version: int, owner: Member | None) -> int:
        return self._db.write(lambda c: self.cas_in(c, key, value, version, owner))

    def delete(self, key: str, version: int | None) -> bool:
        def txn(c: Conn) -> bool:
            row = self._current(c, key)
            found = None if row is None else int(row["version"])
            if version is not None and found != version:
                raise VersionConflict(key, version, found)
            if row is None:
                return False
            c.execute("DELETE FROM kv WHERE key = %s", (key,))
            return True

        return self._db.write(txn)

    def drop_orphaned(self, entries: Iterable[tuple[str, int]]) -> None:
        stale = list(entries)
        if stale:
            self._db.write(lambda c: c.cursor().executemany(
                "DELETE FROM kv WHERE key = %s AND version = %s AND owner_id IS NOT NULL",
                stale))

    def problems(self) -> list[Problem]:
        db, out = self._db, []
        for r in db.rows("SELECT version, string_agg(key, ', ' ORDER BY key COLLATE \"C\") "
                         "AS keys FROM kv GROUP BY version HAVING count(*) > 1"):
            out.append(Problem(f"keys {r['keys']} share version {r['version']}"))
        for r in db.rows('SELECT key FROM kv WHERE NOT coord_is_json(value) ORDER BY key COLLATE "C"'):
            out.append(Problem(f"key {r['key']!r}: value is not valid JSON"))
        for r in db.rows('SELECT key FROM kv WHERE updated_at < created_at ORDER BY key COLLATE "C"'):
            out.append(Problem(f"key {r['key']!r} was updated before it was created"))
        return out

    # -- inside a caller's transaction (also the fenced operations of the leases) -----------

    def set_in(self, c: Conn, key: str, value: str, owner: Member | None) -> int:
        """``set`` inside the caller's transaction."""
        self.lock_owner(c, owner)
        return int(fetch(
            c,
            _INSERT + "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "version = excluded.version, owner_id = excluded.owner_id, "
            "owner_incarnation = excluded.owner_incarnation, updated_at = excluded.updated_at "
            "RETURNING version",
            (key, value, *(owner or (None, None))))[0]["version"])

    def cas_in(self, c: Conn, key: str, value: str, version: int,
               owner: Member | None) -> int:
        """``cas`` inside the caller's transaction."""
        row = self._current(c, key)
        found = None if row is None else int(row["version"])
        if (found or 0) != version:
            raise VersionConflict(key, version, found)
        self.lock_owner(c, owner)
        params = (key, value, *(owner or (None, None)))
        if row is not None:  # locked by _current: nobody changes it before we commit
            return int(fetch(
                c, "UPDATE kv SET value = %(v)s, version = nextval('revision_seq'), "
                "owner_id = %(o)s, owner_incarnation = %(n)s, updated_at = coord_now() "
                "WHERE key = %(k)s RETURNING version",
                dict(zip(("k", "v", "o", "n"), params, strict=True)))[0]["version"])
        made = fetch(
            c, _INSERT + "ON CONFLICT (key) DO NOTHING RETURNING version", params)
        if made:
            return int(made[0]["version"])
        # Another writer created it since we looked (and committed: the insert waited).
        raced = fetch(c, "SELECT version FROM kv WHERE key = %s", (key,))
        raise VersionConflict(key, version, int(raced[0]["version"]) if raced else None)

    def lock_owner(self, c: Conn, owner: Member | None) -> None:
        """Hold ``owner``'s row until commit; ``NotRegistered`` unless it is alive."""
        if owner is not None and not fetch(
            c, "SELECT 1 FROM instances WHERE id = %s AND incarnation = %s "
            "AND status = 'alive' FOR SHARE", owner,
        ):
            raise NotRegistered(owner[0], "an ephemeral key needs a live owner")

    def _current(self, c: Conn, key: str) -> Row | None:
        """The key's row, locked until commit, or None — also when it is ephemeral and its
        owner is dead (the owner is then buried in this transaction)."""
        for _ in range(10):
            peek = fetch(c, "SELECT owner_id, owner_incarnation FROM kv WHERE key = %s", (key,))
            owner = (peek[0]["owner_id"], peek[0]["owner_incarnation"]) if peek else (None, None)
            inst = None
            if owner[0] is not None:  # the owner's row first, then the key's
                found = fetch(c, "SELECT * FROM instances WHERE id = %s AND incarnation = %s "
                              "FOR UPDATE", owner)
                inst = found[0] if found else None
            rows = fetch(c, "SELECT * FROM kv WHERE key = %s FOR UPDATE", (key,))
            row = rows[0] if rows else None
            if row is not None and (row["owner_id"], row["owner_incarnation"]) != owner:
                continue  # rewritten meanwhile by another owner: look again
            break
        else:
            raise VersionConflict(key, 0, None)
        if row is None or row["owner_id"] is None:
            return row
        if inst is not None and inst["status"] == "alive":
            alive, verdict = self._liveness.judge(inst)
            if alive:
                return row
            bury_many(c, [(inst["id"], int(inst["incarnation"]))], reason=verdict)
        c.execute("DELETE FROM kv WHERE key = %s AND version = %s", (key, row["version"]))
        return None
