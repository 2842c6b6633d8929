"""A tooz driver: ``coord://`` gives tooz users groups, locks and leader election on one host.

OpenStack's coordination library ``tooz`` loads drivers by URL scheme from the
``tooz.backends`` entry points; coord registers ``coord`` there (install ``coord[tooz]``)::

    coordinator = tooz.coordination.get_coordinator("coord:///run/user/1000/app/coord.db", b"me")
    coordinator.start()

URL: ``coord:///absolute/path/to/coord.db``, or ``coord://`` for the default database (the
same one the ``coord`` CLI finds: ``COORD_DB``, then the user's runtime directory). On
PostgreSQL (several hosts): ``coord+postgresql://user@host:port/dbname?schema=NAME`` — the
store's PostgreSQL URL with ``coord+`` before its scheme (``coord://`` also follows a
``COORD_DB`` that is a PostgreSQL URL). Options from the query string (or keyword arguments
of ``get_coordinator``; they are not passed on to the server):

- ``timeout``: seconds a *hung* member keeps its groups, locks and leadership (the coord
  instance TTL and the lease TTL; default ``config.instance_ttl`` / ``config.lease_ttl``).
  A member whose process has *died* loses them at once, whatever the timeout.
- ``app``: the app name of the coord instance (default ``tooz``).

How tooz maps onto coord (nothing here is a store of its own; ``coord kv ls tooz/`` and
``coord leases`` show it all):

- a started coordinator is a coord **instance** (``coord.register``), labelled with its tooz
  member id; its own heartbeat thread keeps it alive, so tooz's ``heartbeat()`` is optional
  (``requires_beating`` is False);
- a group is a persistent **kv key** ``tooz/groups/<group>``, and each member an
  **ephemeral kv key** ``tooz/groups/<group>/members/<member>`` bound to the instance, whose
  value is the member's capabilities (JSON). When a member's process dies its keys vanish at
  once — every read applies coord's death rule — so ``get_members`` never lists the dead;
- a lock is a coord **lease** ``tooz/locks/<name>`` (a shared hold is an ephemeral kv key
  ``tooz/locks/<name>/shared/...`` instead, see ``CoordLock``); the leader of a group holds
  the lease ``tooz/leaders/<group>``. A lock or leadership held by a dead process is free at
  once, and a waiter wakes at that death.

Ids (bytes; str is accepted and encoded as UTF-8) appear percent-encoded in key and lease
names, so ``/`` inside an id cannot be confused with the separators. Capabilities that are
JSON data are stored as they are (readable with ``coord kv``); anything else tooz can
serialise (bytes — tooz before 9 passes ``b""`` by default —, sets, datetimes) is stored as
``{"tooz.msgpack": "<base64>"}``, tooz's own encoding, and read back as it was. Every call completes before it returns; the ``CoordAsyncResult`` is already done.

The driver is this module (groups, leader election); locks are ``coord.tooz_lock``, and what
both share (names, error translation, capabilities, stores, a coordinator's membership) is
``coord.tooz_common``.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from typing import Any

import tooz
from tooz import coordination, utils

from . import kv, leases
from .db import Store
from .errors import CoordError, InstanceIdInUse, InvalidArgument, NotFound, VersionConflict
from .instances import Instance, generate_id, get_instance, register, validate_id
from .locations import is_url
from .paths import resolve_db_path
from .tooz_common import (
    GROUPS,
    LEADERS,
    LOCKS,
    MEMBER_LABEL,
    PACKED,
    PREFIX,
    Membership,
    caps,
    caps_value,
    close_store,
    dec,
    done,
    enc,
    group_key,
    leader_lease,
    lock_lease,
    member_key,
    members_prefix,
    open_store,
    tooz_id,
    translated,
    when,
)
from .tooz_lock import CoordLock

#: The URL scheme of the driver on a PostgreSQL store (``coord`` is a local database).
PG_SCHEME = "coord+postgresql"
#: Query options that are the driver's own, never the server's.
OPTIONS = ("timeout", "app")


def _server_url(parsed: Any) -> str:
    """The PostgreSQL URL a ``coord+postgresql://`` URL names: its own scheme, and the query
    without the driver's options (the rest — ``schema``, ``host``, ``sslmode`` … — kept as
    written)."""
    kept = [p for p in parsed.query.split("&")
            if p and p.split("=", 1)[0] not in OPTIONS]
    url = f"postgresql://{parsed.netloc}{parsed.path}"
    return url + ("?" + "&".join(kept) if kept else "")

__all__ = [
    "GROUPS", "LEADERS", "LOCKS", "MEMBER_LABEL", "PACKED", "PREFIX", "CoordDriver", "CoordLock",
    "group_key", "leader_lease", "lock_lease", "member_key", "members_prefix",
]


# -- the driver ---------------------------------------------------------------------------------


class CoordDriver(coordination.CoordinationDriverCachedRunWatchers):
    """tooz coordination driver backed by a coord database (see the module docstring)."""

    CHARACTERISTICS = (
        # Liveness is proof of death (a kernel lock on the member's lock file), not a timeout;
        # the timeout only covers hung processes.
        coordination.Characteristics.NON_TIMEOUT_BASED,
        coordination.Characteristics.DISTRIBUTED_ACROSS_THREADS,
        coordination.Characteristics.DISTRIBUTED_ACROSS_PROCESSES,
        # One SQLite database: every write is one serialised transaction, and a read sees
        # every write committed before it began; every client sees the same database.
        coordination.Characteristics.LINEARIZABLE,
        coordination.Characteristics.SAME_VIEW_ACROSS_CLIENTS,
    )

    def __init__(self, member_id: bytes, parsed_url: Any, options: dict[str, Any]) -> None:
        super().__init__(tooz_id(member_id, "member"), parsed_url, options)
        self._member_id = tooz_id(member_id, "member")
        # coord's instance heartbeats in its own thread: tooz need not call heartbeat().
        self.requires_beating = False
        #: The store's PostgreSQL URL (``coord+postgresql://``), else None.
        self._url = _server_url(parsed_url) if parsed_url.scheme == PG_SCHEME else None
        if self._url is None and parsed_url.netloc:
            raise tooz.ToozError(
                f"coord:// names a database on this host, not {parsed_url.netloc!r}: use "
                "coord:///absolute/path/to/coord.db, coord:// for the default database, or "
                f"{PG_SCHEME}://host/dbname for a PostgreSQL server")
        path = "" if self._url else urllib.parse.unquote(parsed_url.path or "")
        if path and not path.startswith("/"):
            raise tooz.ToozError(f"coord:// needs an absolute database path, got {path!r}")
        self._path = path
        opts = utils.collapse(options)
        self.app = str(opts.get("app") or "tooz")
        raw = opts.get("timeout")
        try:
            self.timeout: float | None = None if raw in (None, "") else float(raw)
        except (TypeError, ValueError):
            raise tooz.ToozError(f"timeout must be a number of seconds, got {raw!r}") from None
        if self.timeout is not None and not self.timeout > 0:
            raise tooz.ToozError(f"timeout must be positive, got {raw!r}")
        self._store_path = ""
        #: This coordinator's coord instance, store and held leases (shared with its locks).
        self.membership = Membership(self._member_id)

    # -- life cycle ---------------------------------------------------------------------

    def _start(self) -> None:
        with translated():
            # Resolved now: ``coord://`` follows COORD_DB as it is when the coordinator starts.
            env = os.environ.get("COORD_DB", "")
            if self._url is not None:
                path = self._url
            elif not self._path and is_url(env):
                path = env
            else:
                path = str(resolve_db_path(self._path or None))
            store = open_store(path)
            try:
                self.membership.inst = self._register(store)
            except BaseException:
                close_store(path)
                raise
        self.membership.opened, self._store_path = store, path
        self.membership.leaders = {}

    def _register(self, store: Store) -> Instance:
        """This member as a coord instance: its id is the member id when that is a valid,
        free instance id; else (another live coordinator of the same member, or characters
        an instance id cannot have) a generated one. The label names the member either way."""
        text = self._member_id.decode("utf-8", "replace")
        kw: dict[str, Any] = {"app": self.app, "labels": {MEMBER_LABEL: enc(self._member_id)},
                              "ttl": self.timeout, "handle_signals": False}
        try:
            return register(store, validate_id(text), **kw)
        except (InvalidArgument, InstanceIdInUse):
            return register(store, generate_id(text), **kw)

    def _stop(self) -> None:
        inst, self.membership.inst = self.membership.inst, None
        with self.membership.lock:
            held = [*self.membership.held, *self.membership.leaders.values()]
            self.membership.held, self.membership.leaders = set(), {}
        for lease in held:  # released, not lost: waiters are told at once
            with contextlib.suppress(CoordError):
                lease.release()
        if inst is not None:
            inst.close()  # and whatever else it held: member keys, shared locks
        if self.membership.opened is not None:
            self.membership.opened = None
            close_store(self._store_path)

    @property
    def instance_id(self) -> str | None:
        """The id of this coordinator's coord instance (None when not started)."""
        return self.membership.inst.id if self.membership.inst is not None else None

    def heartbeat(self) -> float:
        """Renew now (the instance's own thread does this anyway); seconds to the next beat."""
        inst = self.membership.instance()
        with translated():
            inst.heartbeat()
        return inst.heartbeat_interval

    # -- groups -------------------------------------------------------------------------

    def _group_exists(self, store: Store, group_id: bytes) -> bool:
        return kv.get(store, group_key(group_id)) is not None

    def _require_group(self, store: Store, group_id: bytes) -> None:
        if not self._group_exists(store, group_id):
            raise coordination.GroupNotCreated(group_id)

    def create_group(self, group_id: bytes) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            gid = tooz_id(group_id, "group")
            try:
                kv.cas(self.membership.store(), group_key(gid), {}, version=0)
            except VersionConflict:
                raise coordination.GroupAlreadyExist(gid) from None

        return done(op)

    def get_groups(self) -> coordination.CoordinatorResult[list[bytes]]:
        def op() -> list[bytes]:
            out = []
            for e in kv.list_keys(self.membership.store(), GROUPS):
                rest = e.key[len(GROUPS):]
                if rest and "/" not in rest:
                    out.append(dec(rest))
            return out

        return done(op)

    def delete_group(self, group_id: bytes) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            gid = tooz_id(group_id, "group")
            store = self.membership.store()
            entry = kv.get(store, group_key(gid))
            if entry is None:
                raise coordination.GroupNotCreated(gid)
            if kv.list_keys(store, members_prefix(gid)):
                raise coordination.GroupNotEmpty(gid)
            try:
                kv.delete(store, group_key(gid), version=entry.version)
            except VersionConflict:
                raise coordination.GroupNotCreated(gid) from None

        return done(op)

    def join_group(
        self, group_id: bytes, capabilities: coordination.Capabilities | None = None
    ) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            gid = tooz_id(group_id, "group")
            inst = self.membership.instance()
            store = inst.store
            self._require_group(store, gid)
            key = member_key(gid, self._member_id)
            try:
                kv.cas(store, key, caps_value(store, capabilities), version=0, owner=inst)
            except VersionConflict:
                raise coordination.MemberAlreadyExist(gid, self._member_id) from None
            # A group deleted meanwhile (delete_group saw no member yet): undo, like tooz's
            # other drivers, which refuse to join a group that does not exist.
            if not self._group_exists(store, gid):
                kv.delete(store, key)
                raise coordination.GroupNotCreated(gid)
            self._joined_groups.add(gid)

        return done(op)

    def leave_group(self, group_id: bytes) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            gid = tooz_id(group_id, "group")
            store = self.membership.store()
            self._require_group(store, gid)
            if not kv.delete(store, member_key(gid, self._member_id)):
                raise coordination.MemberNotJoined(gid, self._member_id)
            self._joined_groups.discard(gid)

        return done(op)

    def _members(self, group_id: bytes) -> list[kv.Entry]:
        gid = tooz_id(group_id, "group")
        store = self.membership.store()
        # Members first, then the group: a group deleted in between answers GroupNotCreated
        # rather than a member list of a group that no longer exists.
        prefix = members_prefix(gid)
        found = kv.list_keys(store, prefix)
        self._require_group(store, gid)
        return found

    def get_members(self, group_id: bytes) -> coordination.CoordinatorResult[set[bytes]]:
        def op() -> set[bytes]:
            prefix = members_prefix(tooz_id(group_id, "group"))
            return {dec(e.key[len(prefix):]) for e in self._members(group_id)}

        return done(op)

    def get_members_with_capabilities(
        self, group_id: bytes
    ) -> coordination.CoordinatorResult[dict[bytes, coordination.Capabilities | None]]:
        def op() -> dict[bytes, coordination.Capabilities | None]:
            prefix = members_prefix(tooz_id(group_id, "group"))
            return {dec(e.key[len(prefix):]): caps(e.value) for e in self._members(group_id)}

        return done(op)

    def _member(self, group_id: bytes, member_id: bytes) -> kv.Entry:
        gid, mid = tooz_id(group_id, "group"), tooz_id(member_id, "member")
        store = self.membership.store()
        entry = kv.get(store, member_key(gid, mid))
        if entry is None:
            self._require_group(store, gid)
            raise coordination.MemberNotJoined(gid, mid)
        return entry

    def get_member_capabilities(
        self, group_id: bytes, member_id: bytes
    ) -> coordination.CoordinatorResult[coordination.Capabilities | None]:
        return done(lambda: caps(self._member(group_id, member_id).value))

    def get_member_info(
        self, group_id: bytes, member_id: bytes
    ) -> coordination.CoordinatorResult[dict[str, Any]]:
        def op() -> dict[str, Any]:
            e = self._member(group_id, member_id)
            return {"capabilities": caps(e.value), "created_at": when(e.created_at),
                    "updated_at": when(e.updated_at), "instance_id": e.owner_id}

        return done(op)

    def update_capabilities(
        self, group_id: bytes, capabilities: coordination.Capabilities
    ) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            inst = self.membership.instance()
            entry = self._member(group_id, self._member_id)
            try:
                kv.cas(inst.store, entry.key, caps_value(inst.store, capabilities),
                       version=entry.version, owner=inst)
            except VersionConflict:  # left (or was removed) meanwhile
                raise coordination.MemberNotJoined(group_id, self._member_id) from None

        return done(op)

    # -- watchers and leader election ---------------------------------------------------

    def run_watchers(self, timeout: float | None = None) -> list[Any]:
        result: list[Any] = super().run_watchers(timeout=timeout)
        self.run_elect_coordinator()
        return result

    def run_elect_coordinator(self) -> None:
        """Contend (without waiting) for the leadership of every group with an
        elected-as-leader watcher; run those hooks when newly elected."""
        for group_id, hooks in list(self._hooks_elected_leader.items()):
            gid = tooz_id(group_id, "group")
            with self.membership.lock:
                held = self.membership.leaders.get(gid)
                if held is not None and held.held:
                    continue
            inst = self.membership.instance()
            with translated():
                lease = leases.try_acquire(inst, leader_lease(gid), ttl=self.timeout)
            if lease is None:
                continue
            with self.membership.lock:
                self.membership.leaders[gid] = lease
            hooks.run(coordination.LeaderElected(group_id, self._member_id))

    def stand_down_group_leader(self, group_id: bytes) -> bool:
        """Give up the leadership of ``group_id``; True when this coordinator held it."""
        gid = tooz_id(group_id, "group")
        with self.membership.lock:
            lease = self.membership.leaders.pop(gid, None)
        if lease is None or not lease.held:
            return False
        with translated():
            lease.release()
        return True

    def get_leader(self, group_id: bytes) -> coordination.CoordinatorResult[bytes | None]:  # type: ignore[override]
        def op() -> bytes | None:
            store = self.membership.store()
            info = leases.get_lease(store, leader_lease(tooz_id(group_id, "group")))
            if info.holder is None or not info.alive:
                return None
            try:
                holder = get_instance(store, info.holder)
            except NotFound:
                return None
            if holder.incarnation != info.holder_incarnation:
                return None
            label = holder.labels.get(MEMBER_LABEL)
            return dec(label) if isinstance(label, str) else info.holder.encode("utf-8")

        return done(op)

    # -- locks --------------------------------------------------------------------------

    def get_lock(self, name: bytes) -> CoordLock:
        return CoordLock(self, tooz_id(name, "lock"))

