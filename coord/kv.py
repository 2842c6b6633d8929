"""Shared context: a small key-value store with versions for compare-and-set.

* Keys are plain strings, global within one database; the docs recommend ``app/name``.
  Values are JSON data (``coord.payload``), validated on the way in and out.
* Every write takes the next value of the global ``revision`` counter as the key's version,
  so a version is never reused — not even for a key deleted and created again (no ABA).
  ``cas(key, value, version=V)`` writes only while the key's version is still V (0: only if
  the key does not exist) and raises ``VersionConflict`` otherwise.
* A key may be ephemeral: bound to its owner instance (id, incarnation), it is deleted by the
  death rule when the owner leaves or dies (``coord.reaper``). Nobody has to wait for a
  reaper: every read judges the owners of the ephemeral keys it meets and, finding one dead,
  applies the death rule at once, so a SIGKILLed owner's keys are gone for everyone the
  moment its process is. ``watch`` watches the owners' pids and wakes at their death.
* ``watch(key)`` (or a prefix) yields each change as it happens.

Port discovery, the typical use::

    kv.set(store, "web/port", 8123, owner=inst)      # the server, ephemeral
    entry = kv.get(store, "web/port")                # a client: None once the server is gone
"""

from __future__ import annotations

import builtins
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import apsw

from . import nudge
from .db import Row, Store, fetch, next_counter
from .errors import InvalidArgument, NotRegistered, VersionConflict
from .identity import pid_namespace
from .instances import Probe, judge
from .payload import decode, encode
from .reaper import bury, bury_dead

#: Longest key accepted, in characters.
KEY_MAX = 1000


class Owner(Protocol):
    """Anything naming an instance incarnation: an ``Instance``, ``InstanceInfo``, ``Mailbox``."""

    @property
    def id(self) -> str: ...

    @property
    def incarnation(self) -> int: ...


@dataclass(frozen=True)
class Entry:
    """One key with its value (decoded), version, and owner when ephemeral."""

    key: str
    value: Any
    version: int
    owner_id: str | None
    owner_incarnation: int | None
    created_at: float
    updated_at: float

    @property
    def ephemeral(self) -> bool:
        return self.owner_id is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "value": self.value,
            "version": self.version,
            "ephemeral": self.ephemeral,
            "instance_id": self.owner_id,
            "incarnation": self.owner_incarnation,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Change:
    """A change seen by ``watch``: the key's new entry, or None when it was deleted."""

    key: str
    entry: Entry | None

    @property
    def deleted(self) -> bool:
        return self.entry is None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "event": "deleted" if self.entry is None else "set"}
        if self.entry is not None:
            d.update(self.entry.to_json())
        return d


def _key(key: str, what: str = "key", *, empty: bool = False) -> str:
    if (not isinstance(key, str) or len(key) > KEY_MAX or "\x00" in key
            or (not key and not empty)):
        raise InvalidArgument(f"invalid {what} {key!r}: a non-empty string of at most "
                              f"{KEY_MAX} characters, without NUL")
    return key


def _encode(store: Store, value: Any) -> str:
    cfg = store.config
    return encode(value, limit=cfg.payload_limit, max_depth=cfg.payload_max_depth)


def _entry(store: Store, row: Row) -> Entry:
    cfg = store.config
    return Entry(
        key=row["key"],
        value=decode(row["value"], limit=cfg.payload_limit, max_depth=cfg.payload_max_depth),
        version=row["version"],
        owner_id=row["owner_id"],
        owner_incarnation=row["owner_incarnation"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _live(store: Store, rows: list[Row]) -> tuple[list[Row], list[int]]:
    """The rows whose owner (if any) is alive, and those owners' pids (for pidfd watching).

    An ephemeral key whose owner is proven dead is dropped from the answer, and the death
    rule is applied to the owner at once (which deletes the key for everyone)."""
    owners = {r["owner_id"] for r in rows if r["owner_id"] is not None}
    if not owners:
        return rows, []
    found = {
        r["id"]: r
        for r in store.rows(
            "SELECT * FROM instances WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(owners)),),
        )
    }
    probe, now, ns = Probe(), store.mono(), pid_namespace()
    verdicts = {i: judge(store, r, now, probe=probe) for i, r in found.items()}
    keep: list[Row] = []
    pids: builtins.set[int] = builtins.set()
    dead: dict[str, list[Row]] = defaultdict(list)
    stale: list[tuple[str, int]] = []
    for r in rows:
        oid = r["owner_id"]
        if oid is None:
            keep.append(r)
            continue
        inst = found.get(oid)
        if inst is None or inst["incarnation"] != r["owner_incarnation"] or inst["status"] == "dead":
            stale.append((r["key"], r["version"]))  # its owner is long gone
            continue
        alive, verdict = verdicts[oid]
        if not alive:
            if inst not in dead[verdict]:
                dead[verdict].append(inst)
            continue
        keep.append(r)
        if inst["pidns"] == ns:
            pids.add(inst["pid"])
    for verdict, insts in dead.items():
        bury_dead(store, insts, verdict)
    if stale:
        store.write(lambda c: c.executemany(
            "DELETE FROM kv WHERE key = ? AND version = ? AND owner_id IS NOT NULL", stale))
    return keep, sorted(pids)


def _current(c: apsw.Connection, store: Store, key: str) -> Row | None:
    """Inside a transaction: the key's row, or None — also when it is ephemeral and its
    owner is dead (the owner is then buried in this transaction)."""
    rows = fetch(c, "SELECT * FROM kv WHERE key = ?", (key,))
    if not rows:
        return None
    row = rows[0]
    if row["owner_id"] is None:
        return row
    inst = fetch(c, "SELECT * FROM instances WHERE id = ? AND incarnation = ?",
                 (row["owner_id"], row["owner_incarnation"]))
    if inst and inst[0]["status"] == "alive":
        alive, verdict = judge(store, inst[0])
        if alive:
            return row
        bury(c, store, row["owner_id"], row["owner_incarnation"], reason=verdict)
    c.execute("DELETE FROM kv WHERE key = ? AND version = ?", (key, row["version"]))
    return None


def _write(c: apsw.Connection, store: Store, key: str, text: str, owner: Owner | None) -> int:
    if owner is not None and not c.execute(
        "SELECT 1 FROM instances WHERE id = ? AND incarnation = ? AND status = 'alive'",
        (owner.id, owner.incarnation),
    ).fetchall():
        raise NotRegistered(owner.id, "an ephemeral key needs a live owner")
    version = next_counter(c, "revision")
    now = store.wall()
    c.execute(
        "INSERT INTO kv (key, value, version, owner_id, owner_incarnation, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
        "version = excluded.version, owner_id = excluded.owner_id, "
        "owner_incarnation = excluded.owner_incarnation, updated_at = excluded.updated_at",
        (key, text, version,
         owner.id if owner is not None else None,
         owner.incarnation if owner is not None else None, now, now),
    )
    return version


# -- the API -------------------------------------------------------------------------------


def get(store: Store, key: str) -> Entry | None:
    """The key's entry, or None (also when it was ephemeral and its owner is dead)."""
    _key(key)
    rows, _ = _live(store, store.rows("SELECT * FROM kv WHERE key = ?", (key,)))
    return _entry(store, rows[0]) if rows else None


def list_keys(store: Store, prefix: str = "") -> list[Entry]:
    """Every live key starting with ``prefix`` (all keys for ''), in key order."""
    _key(prefix, "prefix", empty=True)
    return [_entry(store, r) for r in _live(store, _prefixed(store, prefix))[0]]


def _prefixed(store: Store, prefix: str) -> list[Row]:
    return store.rows(
        "SELECT * FROM kv WHERE key >= ?1 AND substr(key, 1, length(?1)) = ?1 ORDER BY key",
        (prefix,),
    )


def set(store: Store, key: str, value: Any, *, owner: Owner | None = None) -> int:
    """Set ``key`` to ``value`` whatever it was; returns the new version. With ``owner``
    the key is ephemeral, bound to that live instance incarnation; without, it persists
    (a set replaces the owner too)."""
    _key(key)
    text = _encode(store, value)
    return store.write(lambda c: _write(c, store, key, text, owner))


def cas(store: Store, key: str, value: Any, *, version: int, owner: Owner | None = None) -> int:
    """Compare-and-set: write only if the key's version is still ``version`` (0: only if the
    key does not exist). Returns the new version; raises ``VersionConflict`` otherwise."""
    _key(key)
    if not isinstance(version, int) or version < 0:
        raise InvalidArgument(f"version must be a non-negative integer, got {version!r}")
    text = _encode(store, value)

    def txn(c: apsw.Connection) -> int:
        row = _current(c, store, key)
        found = row["version"] if row is not None else None
        if (found or 0) != version:
            raise VersionConflict(key, version, found)
        return _write(c, store, key, text, owner)

    return store.write(txn)


def delete(store: Store, key: str, *, version: int | None = None) -> bool:
    """Delete ``key``; False when it did not exist. With ``version``, only while the key's
    version is still that (``VersionConflict`` otherwise)."""
    _key(key)

    def txn(c: apsw.Connection) -> bool:
        row = _current(c, store, key)
        found = row["version"] if row is not None else None
        if version is not None and found != version:
            raise VersionConflict(key, version, found)
        if row is None:
            return False
        c.execute("DELETE FROM kv WHERE key = ?", (key,))
        return True

    return store.write(txn)


def watch(
    store: Store, key: str, *, prefix: bool = False, timeout: float | None = None
) -> Iterator[Change]:
    """Yield each change of ``key`` (or of every key under it, with ``prefix``) made after
    this call (the starting state is read now, not at the first ``next()``).

    The iterator ends when ``timeout`` seconds pass without a change (None: never). A
    deletion — also the death of an ephemeral key's owner, seen through its pid at once —
    yields a Change whose ``entry`` is None. Changes are coalesced: each look reports the
    latest state of every key that differs from the last look (sets in version order,
    then deletions), so a key set twice, or set and deleted, between two looks shows once
    or not at all.
    """
    _key(key, "prefix" if prefix else "key", empty=prefix)
    if timeout is not None and timeout < 0:
        raise InvalidArgument(f"timeout must be non-negative, got {timeout!r}")

    def read() -> tuple[dict[str, Row], list[int]]:
        rows = _prefixed(store, key) if prefix else store.rows(
            "SELECT * FROM kv WHERE key = ?", (key,))
        live, pids = _live(store, rows)
        return {r["key"]: r for r in live}, pids

    seen, pids = read()

    def check() -> list[Change] | None:
        nonlocal seen, pids
        now, pids = read()
        changed = sorted((r for k, r in now.items()
                          if k not in seen or seen[k]["version"] != r["version"]),
                         key=lambda r: r["version"])
        changes = [Change(r["key"], _entry(store, r)) for r in changed]
        changes += [Change(k, None) for k in sorted(seen) if k not in now]
        seen = now
        return changes or None

    def changes() -> Iterator[Change]:
        while True:
            got = nudge.wait_for(store, check, timeout, watch_pids=lambda: pids)
            if got is None:
                return
            yield from got

    return changes()


# -- invariants (``coord.check``) -----------------------------------------------------------


def problems(store: Store) -> list[tuple[str, bool]]:
    """Broken kv invariants as (detail, pending). Ephemeral owners are checked with the
    other holders in ``coord.check``; the revision counter there too."""
    out: list[tuple[str, bool]] = []
    for r in store.rows("SELECT version, group_concat(key, ', ') AS keys FROM kv "
                        "GROUP BY version HAVING count(*) > 1"):
        out.append((f"keys {r['keys']} share version {r['version']}", False))
    for r in store.rows("SELECT key FROM kv WHERE NOT json_valid(value)"):
        out.append((f"key {r['key']!r}: value is not valid JSON", False))
    for r in store.rows("SELECT key FROM kv WHERE updated_at < created_at"):
        out.append((f"key {r['key']!r} was updated before it was created", False))
    return out
