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
* Storage is the store's engine (``store.backend.kv``); this module keeps validation, the
  payload checks, the death rule's policy for ephemeral keys and the waiting.

Port discovery, the typical use::

    kv.set(store, "web/port", 8123, owner=inst)      # the server, ephemeral
    entry = kv.get(store, "web/port")                # a client: None once the server is gone
"""

from __future__ import annotations

import builtins
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .backend import KvRecord, Member
from .db import Row, Store
from .errors import InvalidArgument
from .payload import decode, encode
from .reaper import bury_dead

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


def _entry(store: Store, rec: KvRecord) -> Entry:
    cfg = store.config
    return Entry(
        key=rec.key,
        value=decode(rec.value, limit=cfg.payload_limit, max_depth=cfg.payload_max_depth),
        version=rec.version,
        owner_id=rec.owner_id,
        owner_incarnation=rec.owner_incarnation,
        created_at=rec.created_at,
        updated_at=rec.updated_at,
    )


def _owner(owner: Owner | None) -> Member | None:
    return None if owner is None else (owner.id, owner.incarnation)


def _live(store: Store, recs: list[KvRecord]) -> tuple[list[KvRecord], list[int]]:
    """The entries whose owner (if any) is alive, and those owners' pids (for watching).

    An ephemeral key whose owner is proven dead is dropped from the answer, and the death
    rule is applied to the owner at once (which deletes the key for everyone)."""
    owners = {r.owner_id for r in recs if r.owner_id is not None}
    if not owners:
        return recs, []
    backend = store.backend
    liveness = backend.liveness
    found = backend.instances.by_ids(owners)
    look = liveness.look()
    verdicts = {i: liveness.judge(r, look) for i, r in found.items()}
    keep: list[KvRecord] = []
    pids: builtins.set[int] = builtins.set()
    dead: dict[str, list[Row]] = defaultdict(list)
    stale: list[tuple[str, int]] = []
    for r in recs:
        oid = r.owner_id
        if oid is None:
            keep.append(r)
            continue
        inst = found.get(oid)
        if inst is None or inst["incarnation"] != r.owner_incarnation or inst["status"] == "dead":
            stale.append((r.key, r.version))  # its owner is long gone
            continue
        alive, verdict = verdicts[oid]
        if not alive:
            if inst not in dead[verdict]:
                dead[verdict].append(inst)
            continue
        keep.append(r)
        pid = liveness.watchable_pid(inst)
        if pid is not None:
            pids.add(pid)
    for verdict, insts in dead.items():
        bury_dead(store, insts, verdict)
    backend.kv.drop_orphaned(stale)
    return keep, sorted(pids)


# -- the API -------------------------------------------------------------------------------


def get(store: Store, key: str) -> Entry | None:
    """The key's entry, or None (also when it was ephemeral and its owner is dead)."""
    _key(key)
    rec = store.backend.kv.get(key)
    if rec is None:
        return None
    live, _ = _live(store, [rec])
    return _entry(store, live[0]) if live else None


def list_keys(store: Store, prefix: str = "") -> list[Entry]:
    """Every live key starting with ``prefix`` (all keys for ''), in key order."""
    _key(prefix, "prefix", empty=True)
    return [_entry(store, r) for r in _live(store, store.backend.kv.prefixed(prefix))[0]]


class Fence(Protocol):
    """A lease term that fences a write (a held ``coord.leases.Lease``)."""

    @property
    def name(self) -> str: ...

    @property
    def term(self) -> int: ...


def set(store: Store, key: str, value: Any, *, owner: Owner | None = None,
        fence: Fence | None = None) -> int:
    """Set ``key`` to ``value`` whatever it was; returns the new version. With ``owner``
    the key is ephemeral, bound to that live instance incarnation; without, it persists
    (a set replaces the owner too). With ``fence`` (a lease), only while its term is the
    current, unexpired one, in the same transaction: ``LeaseLost`` otherwise."""
    _key(key)
    text = _encode(store, value)
    if fence is not None:
        return store.backend.leases.fenced_kv_set(fence.name, fence.term, key, text,
                                                  _owner(owner))
    return store.backend.kv.set(key, text, _owner(owner))


def cas(store: Store, key: str, value: Any, *, version: int, owner: Owner | None = None,
        fence: Fence | None = None) -> int:
    """Compare-and-set: write only if the key's version is still ``version`` (0: only if the
    key does not exist). Returns the new version; raises ``VersionConflict`` otherwise.
    With ``fence`` (a lease), also only while its term is current (``LeaseLost``)."""
    _key(key)
    if not isinstance(version, int) or version < 0:
        raise InvalidArgument(f"version must be a non-negative integer, got {version!r}")
    text = _encode(store, value)
    if fence is not None:
        return store.backend.leases.fenced_kv_cas(fence.name, fence.term, key, text, version,
                                                  _owner(owner))
    return store.backend.kv.cas(key, text, version, _owner(owner))


def delete(store: Store, key: str, *, version: int | None = None) -> bool:
    """Delete ``key``; False when it did not exist. With ``version``, only while the key's
    version is still that (``VersionConflict`` otherwise)."""
    _key(key)
    return store.backend.kv.delete(key, version)


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

    ops = store.backend.kv

    def read() -> tuple[dict[str, KvRecord], list[int]]:
        if prefix:
            recs = ops.prefixed(key)
        else:
            one = ops.get(key)
            recs = [] if one is None else [one]
        live, pids = _live(store, recs)
        return {r.key: r for r in live}, pids

    seen, pids = read()

    def check() -> list[Change] | None:
        nonlocal seen, pids
        now, pids = read()
        changed = sorted((r for k, r in now.items()
                          if k not in seen or seen[k].version != r.version),
                         key=lambda r: r.version)
        changes = [Change(r.key, _entry(store, r)) for r in changed]
        changes += [Change(k, None) for k in sorted(seen) if k not in now]
        seen = now
        return changes or None

    def changes() -> Iterator[Change]:
        while True:
            got = store.backend.wakeup.wait_for(check, timeout, watch_pids=lambda: pids)
            if got is None:
                return
            yield from got

    return changes()


# -- invariants (``coord.check``) -----------------------------------------------------------


def problems(store: Store) -> list[tuple[str, bool]]:
    """Broken kv invariants as (detail, pending). Ephemeral owners are checked with the
    other holders in ``coord.check``; the revision counter there too."""
    return [(p.detail, p.pending) for p in store.backend.kv.problems()]
