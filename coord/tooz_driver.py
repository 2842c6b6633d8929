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
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import tooz
from tooz import coordination, locking, utils

from . import kv, leases, payload
from .backend.postgresql.url import is_url
from .db import Store
from .errors import (
    CoordError,
    InstanceIdInUse,
    InvalidArgument,
    LeaseNotAcquired,
    NotADatabase,
    NotFound,
    PayloadError,
    PayloadTooLarge,
    SchemaTooNew,
    StorageError,
    UnsafePath,
    VersionConflict,
)
from .instances import Instance, generate_id, get_instance, register, validate_id
from .paths import resolve_db_path

#: The URL scheme of the driver on a PostgreSQL store (``coord`` is a local database).
PG_SCHEME = "coord+postgresql"
#: Query options that are the driver's own, never the server's.
OPTIONS = ("timeout", "app")

T = TypeVar("T")

PREFIX = "tooz/"
GROUPS = PREFIX + "groups/"
LOCKS = PREFIX + "locks/"
LEADERS = PREFIX + "leaders/"
#: The instance label that names the tooz member an instance is.
MEMBER_LABEL = "tooz_member"


# -- names ----------------------------------------------------------------------------------


def _id(value: bytes | str, what: str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes) or not value:
        raise tooz.ToozError(f"a {what} id must be non-empty bytes or str, got {value!r}")
    return value


def _enc(value: bytes) -> str:
    return urllib.parse.quote(value, safe="")


def _dec(text: str) -> bytes:
    return urllib.parse.unquote_to_bytes(text)


def group_key(group_id: bytes) -> str:
    return GROUPS + _enc(group_id)


def members_prefix(group_id: bytes) -> str:
    return group_key(group_id) + "/members/"


def member_key(group_id: bytes, member_id: bytes) -> str:
    return members_prefix(group_id) + _enc(member_id)


def lock_lease(name: bytes) -> str:
    return LOCKS + _enc(name)


def leader_lease(group_id: bytes) -> str:
    return LEADERS + _enc(group_id)


# -- errors and results -----------------------------------------------------------------------


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """coord errors become tooz errors, at this one boundary (tooz's own pass through)."""
    try:
        yield
    except PayloadError as e:
        utils.raise_with_cause(utils.SerializationError, str(e), cause=e)
    except (UnsafePath, NotADatabase, SchemaTooNew, StorageError) as e:
        utils.raise_with_cause(coordination.ToozConnectionError, str(e), cause=e)
    except CoordError as e:
        utils.raise_with_cause(tooz.ToozError, str(e), cause=e)


def _done(fn: Callable[[], T]) -> coordination.CoordinatorResult[T]:
    """Run ``fn`` now; its result, or its error, is delivered by the result's ``get()``."""
    fut: futures.Future[T] = futures.Future()
    try:
        with _translated():
            value = fn()
    except Exception as e:
        fut.set_exception(e)
    else:
        fut.set_result(value)
    return coordination.CoordinatorResult(fut)


def _when(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


# -- capabilities: JSON when they are JSON data, else tooz's own msgpack ----------------------

#: The one key of a kv value that holds capabilities which are not JSON data (bytes — tooz
#: before 9 passes ``b""`` by default —, sets, datetimes ...): base64 of tooz's msgpack, as
#: tooz's other drivers store every capability. Never unpickled: msgpack is data only.
PACKED = "tooz.msgpack"


def _is_packed(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and PACKED in value


def _caps_value(store: Store, caps: Any) -> Any:
    """The kv value for ``caps``: themselves when they are JSON data, else packed."""
    if not _is_packed(caps):  # a dict that looks packed is packed itself, so reads agree
        try:
            payload.encode(caps, limit=store.config.payload_limit,
                           max_depth=store.config.payload_max_depth)
            return caps
        except PayloadTooLarge:
            raise
        except PayloadError:
            pass
    try:
        blob = utils.dumps(caps)
    except TypeError as e:  # msgpack's word for "no serializer for this type"
        utils.raise_with_cause(utils.SerializationError, str(e), cause=e)
    return {PACKED: base64.b64encode(blob).decode("ascii")}


def _caps(value: Any) -> Any:
    """Capabilities from a kv value (see ``_caps_value``)."""
    if _is_packed(value) and isinstance(value[PACKED], str):
        try:
            blob = base64.b64decode(value[PACKED], validate=True)
        except ValueError as e:
            utils.raise_with_cause(utils.SerializationError, str(e), cause=e)
        return utils.loads(blob)
    return value


# -- stores: one per database per process -----------------------------------------------------

_STORES: dict[str, tuple[Store, int]] = {}
_STORES_LOCK = threading.Lock()


def _server_url(parsed: Any) -> str:
    """The PostgreSQL URL a ``coord+postgresql://`` URL names: its own scheme, and the query
    without the driver's options (the rest — ``schema``, ``host``, ``sslmode`` … — kept as
    written)."""
    kept = [p for p in parsed.query.split("&")
            if p and p.split("=", 1)[0] not in OPTIONS]
    url = f"postgresql://{parsed.netloc}{parsed.path}"
    return url + ("?" + "&".join(kept) if kept else "")


def _open_store(path: str) -> Store:
    """The shared Store of the database at ``path`` (an absolute path that ``resolve_db_path``
    gave); each call is one more user, each ``_close_store`` one fewer."""
    with _STORES_LOCK:
        found = _STORES.get(path)
        store = found[0] if found else Store(path)
        _STORES[path] = (store, (found[1] if found else 0) + 1)
        return store


def _close_store(path: str) -> None:
    with _STORES_LOCK:
        store, users = _STORES[path]
        if users > 1:
            _STORES[path] = (store, users - 1)
            return
        del _STORES[path]
    store.close()


# -- locks ----------------------------------------------------------------------------------


def _wait(store: Store, ready: Callable[[], tuple[bool, list[int]]],
          deadline: float | None) -> bool:
    """Wait until ``ready()`` says (True, _) or ``deadline`` (monotonic; None: for ever).
    ``ready`` also names the pids whose exit should wake us (holders that may die)."""
    pids: list[int] = []

    def check() -> bool | None:
        nonlocal pids
        ok, pids = ready()
        return True if ok else None

    while True:
        left = None if deadline is None else deadline - store.mono()
        if left is not None and left <= 0:
            return bool(check())
        # Slices of at most a second: an expiring TTL moves no data_version.
        if store.backend.wakeup.wait_for(check, 1.0 if left is None else min(1.0, left),
                                         watch_pids=lambda: pids):
            return True


class CoordLock(locking.Lock):
    """A tooz lock: the coord lease ``tooz/locks/<name>``, held by the coordinator's instance.

    Exclusive holders hold the lease. Shared holders each hold an ephemeral kv key
    ``tooz/locks/<name>/shared/<instance>.<token>`` instead, written *before* they look at
    the lease, while an exclusive holder takes the lease *before* it looks for shared keys:
    whichever looks second sees the other, so the two never both hold the lock (at worst
    both back off). A waiting exclusive holder keeps the lease while the shared holders
    drain, so new shared holders cannot starve it. Dead holders' leases and keys are free
    at once (coord's death rule).

    Not re-entrant. Any thread may release it. The lease is renewed in the background while
    held; ``is_still_owner()`` asks the database.
    """

    def __init__(self, driver: CoordDriver, name: bytes) -> None:
        super().__init__(name)
        self._driver = driver
        self.lease_name = lock_lease(name)
        self.shared_prefix = self.lease_name + "/shared/"
        self._lease: leases.Lease | None = None
        self._shared: list[str] = []  # this object's shared keys, newest last
        self._mutex = threading.Lock()

    def acquire(
        self,
        blocking: bool | float = True,
        shared: bool = False,
        timeout: float | None = None,
    ) -> bool:
        wait, limit = utils.convert_blocking(blocking, timeout)
        inst = self._driver._instance()
        store = inst.store
        deadline = None if limit is None else store.mono() + max(0.0, limit)
        with _translated():
            if shared:
                return self._acquire_shared(inst, wait, deadline)
            return self._acquire_exclusive(inst, wait, limit, deadline)

    def _acquire_exclusive(self, inst: Instance, wait: bool, limit: float | None,
                           deadline: float | None) -> bool:
        ttl = self._driver.timeout
        if not wait:
            lease = leases.try_acquire(inst, self.lease_name, ttl=ttl)
        else:
            try:
                lease = leases.acquire(inst, self.lease_name, ttl=ttl, timeout=limit)
            except LeaseNotAcquired:
                lease = None
        if lease is None:
            return False
        if not self._no_shared()[0] and not (wait and _wait(inst.store, self._no_shared, deadline)):
            lease.release()
            return False
        with self._mutex:
            self._lease = lease
        with self._driver._state:
            self._driver._held.add(lease)
        return True

    def _acquire_shared(self, inst: Instance, wait: bool, deadline: float | None) -> bool:
        store = inst.store
        while True:
            key = f"{self.shared_prefix}{inst.id}.{secrets.token_hex(6)}"
            kv.set(store, key, {"member": _enc(self._driver._member_id)}, owner=inst)
            if self._no_exclusive()[0]:
                with self._mutex:
                    self._shared.append(key)
                return True
            kv.delete(store, key)
            if not wait or not _wait(store, self._no_exclusive, deadline):
                return False

    def _no_exclusive(self) -> tuple[bool, list[int]]:
        """Is the lease free (or its holder dead or expired)? And the holder's pid."""
        info = leases.get_lease(self._driver._store_or_fail(), self.lease_name)
        if info.holder is None or not info.alive or (info.expires_in or 0.0) < 0:
            return True, []
        return False, [info.holder_pid] if info.holder_pid else []

    def _no_shared(self) -> tuple[bool, list[int]]:
        """No live shared holder? And their pids."""
        store = self._driver._store_or_fail()
        found = kv.list_keys(store, self.shared_prefix)
        pids = []
        for owner in {e.owner_id for e in found if e.owner_id is not None}:
            with contextlib.suppress(NotFound):
                pids.append(get_instance(store, owner).pid)
        return not found, pids

    def _current(self, lease: leases.Lease) -> bool:
        info = leases.get_lease(lease.store, self.lease_name)
        return (lease.held and info.term == lease.term
                and (info.holder, info.holder_incarnation) == lease.holder)

    def release(self) -> bool:
        """Release (the latest shared hold first); False when this lock object did not hold
        it, or its hold was lost or broken."""
        with self._mutex:
            key = self._shared.pop() if self._shared else None
            lease = None
            if key is None:
                lease, self._lease = self._lease, None
        with _translated():
            if key is not None:
                return kv.delete(self._driver._store_or_fail(), key)
            if lease is None:
                return False
            with self._driver._state:
                self._driver._held.discard(lease)
            was_ours = self._current(lease)
            lease.release()
        return was_ours

    def is_still_owner(self) -> bool:
        lease, keys = self._lease, list(self._shared)
        with _translated():
            if keys:
                store = self._driver._store_or_fail()
                return any(kv.get(store, k) is not None for k in keys)
            return lease is not None and self._current(lease)

    def heartbeat(self) -> bool:
        """Renew now; False when not held (renewal also runs in the background, and shared
        holds need none: they last as long as the coordinator's instance)."""
        lease = self._lease
        if lease is None:
            return bool(self._shared) and self.is_still_owner()
        with _translated():
            return lease.renew()

    @property
    def acquired(self) -> bool:
        lease = self._lease
        return bool(self._shared) or (lease is not None and lease.held)

    def break_(self) -> bool:
        """Free the lock whoever holds it (for operators and tests); waiters take it at once.
        The former holders' ``release()`` then returns False."""
        store = self._driver._store_or_fail()
        with _translated():
            broken = False
            for e in kv.list_keys(store, self.shared_prefix):
                broken = kv.delete(store, e.key) or broken
            info = leases.get_lease(store, self.lease_name)
            if info.holder is not None and info.term is not None \
                    and info.holder_incarnation is not None:
                freed = leases.release(store, self.lease_name, info.term,
                                       (info.holder, info.holder_incarnation), "broken")
                broken = freed or broken
            return broken


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
        super().__init__(_id(member_id, "member"), parsed_url, options)
        self._member_id = _id(member_id, "member")
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
        self._store: Store | None = None
        self._store_path = ""
        self._inst: Instance | None = None
        self._leaders: dict[bytes, leases.Lease] = {}
        self._held: set[leases.Lease] = set()  # the exclusive locks' leases
        self._state = threading.Lock()

    # -- life cycle ---------------------------------------------------------------------

    def _start(self) -> None:
        with _translated():
            # Resolved now: ``coord://`` follows COORD_DB as it is when the coordinator starts.
            env = os.environ.get("COORD_DB", "")
            if self._url is not None:
                path = self._url
            elif not self._path and is_url(env):
                path = env
            else:
                path = str(resolve_db_path(self._path or None))
            store = _open_store(path)
            try:
                self._inst = self._register(store)
            except BaseException:
                _close_store(path)
                raise
        self._store, self._store_path = store, path
        self._leaders = {}

    def _register(self, store: Store) -> Instance:
        """This member as a coord instance: its id is the member id when that is a valid,
        free instance id; else (another live coordinator of the same member, or characters
        an instance id cannot have) a generated one. The label names the member either way."""
        text = self._member_id.decode("utf-8", "replace")
        kw: dict[str, Any] = {"app": self.app, "labels": {MEMBER_LABEL: _enc(self._member_id)},
                              "ttl": self.timeout, "handle_signals": False}
        try:
            return register(store, validate_id(text), **kw)
        except (InvalidArgument, InstanceIdInUse):
            return register(store, generate_id(text), **kw)

    def _stop(self) -> None:
        inst, self._inst = self._inst, None
        with self._state:
            held = [*self._held, *self._leaders.values()]
            self._held, self._leaders = set(), {}
        for lease in held:  # released, not lost: waiters are told at once
            with contextlib.suppress(CoordError):
                lease.release()
        if inst is not None:
            inst.close()  # and whatever else it held: member keys, shared locks
        if self._store is not None:
            self._store = None
            _close_store(self._store_path)

    def _instance(self) -> Instance:
        inst = self._inst
        if inst is None:
            raise tooz.ToozError("the coordinator is not started")
        if inst.lost.is_set() or inst.closed:
            raise tooz.ToozError(
                f"coord instance {inst.id} was declared dead (hung past its timeout): its "
                "groups, locks and leadership are gone; stop() and start() the coordinator")
        return inst

    def _store_or_fail(self) -> Store:
        store = self._store
        if store is None:
            raise tooz.ToozError("the coordinator is not started")
        return store

    @property
    def instance_id(self) -> str | None:
        """The id of this coordinator's coord instance (None when not started)."""
        return self._inst.id if self._inst is not None else None

    def heartbeat(self) -> float:
        """Renew now (the instance's own thread does this anyway); seconds to the next beat."""
        inst = self._instance()
        with _translated():
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
            gid = _id(group_id, "group")
            try:
                kv.cas(self._store_or_fail(), group_key(gid), {}, version=0)
            except VersionConflict:
                raise coordination.GroupAlreadyExist(gid) from None

        return _done(op)

    def get_groups(self) -> coordination.CoordinatorResult[list[bytes]]:
        def op() -> list[bytes]:
            out = []
            for e in kv.list_keys(self._store_or_fail(), GROUPS):
                rest = e.key[len(GROUPS):]
                if rest and "/" not in rest:
                    out.append(_dec(rest))
            return out

        return _done(op)

    def delete_group(self, group_id: bytes) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            gid = _id(group_id, "group")
            store = self._store_or_fail()
            entry = kv.get(store, group_key(gid))
            if entry is None:
                raise coordination.GroupNotCreated(gid)
            if kv.list_keys(store, members_prefix(gid)):
                raise coordination.GroupNotEmpty(gid)
            try:
                kv.delete(store, group_key(gid), version=entry.version)
            except VersionConflict:
                raise coordination.GroupNotCreated(gid) from None

        return _done(op)

    def join_group(
        self, group_id: bytes, capabilities: coordination.Capabilities | None = None
    ) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            gid = _id(group_id, "group")
            inst = self._instance()
            store = inst.store
            self._require_group(store, gid)
            key = member_key(gid, self._member_id)
            try:
                kv.cas(store, key, _caps_value(store, capabilities), version=0, owner=inst)
            except VersionConflict:
                raise coordination.MemberAlreadyExist(gid, self._member_id) from None
            # A group deleted meanwhile (delete_group saw no member yet): undo, like tooz's
            # other drivers, which refuse to join a group that does not exist.
            if not self._group_exists(store, gid):
                kv.delete(store, key)
                raise coordination.GroupNotCreated(gid)
            self._joined_groups.add(gid)

        return _done(op)

    def leave_group(self, group_id: bytes) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            gid = _id(group_id, "group")
            store = self._store_or_fail()
            self._require_group(store, gid)
            if not kv.delete(store, member_key(gid, self._member_id)):
                raise coordination.MemberNotJoined(gid, self._member_id)
            self._joined_groups.discard(gid)

        return _done(op)

    def _members(self, group_id: bytes) -> list[kv.Entry]:
        gid = _id(group_id, "group")
        store = self._store_or_fail()
        # Members first, then the group: a group deleted in between answers GroupNotCreated
        # rather than a member list of a group that no longer exists.
        prefix = members_prefix(gid)
        found = kv.list_keys(store, prefix)
        self._require_group(store, gid)
        return found

    def get_members(self, group_id: bytes) -> coordination.CoordinatorResult[set[bytes]]:
        def op() -> set[bytes]:
            prefix = members_prefix(_id(group_id, "group"))
            return {_dec(e.key[len(prefix):]) for e in self._members(group_id)}

        return _done(op)

    def get_members_with_capabilities(
        self, group_id: bytes
    ) -> coordination.CoordinatorResult[dict[bytes, coordination.Capabilities | None]]:
        def op() -> dict[bytes, coordination.Capabilities | None]:
            prefix = members_prefix(_id(group_id, "group"))
            return {_dec(e.key[len(prefix):]): _caps(e.value) for e in self._members(group_id)}

        return _done(op)

    def _member(self, group_id: bytes, member_id: bytes) -> kv.Entry:
        gid, mid = _id(group_id, "group"), _id(member_id, "member")
        store = self._store_or_fail()
        entry = kv.get(store, member_key(gid, mid))
        if entry is None:
            self._require_group(store, gid)
            raise coordination.MemberNotJoined(gid, mid)
        return entry

    def get_member_capabilities(
        self, group_id: bytes, member_id: bytes
    ) -> coordination.CoordinatorResult[coordination.Capabilities | None]:
        return _done(lambda: _caps(self._member(group_id, member_id).value))

    def get_member_info(
        self, group_id: bytes, member_id: bytes
    ) -> coordination.CoordinatorResult[dict[str, Any]]:
        def op() -> dict[str, Any]:
            e = self._member(group_id, member_id)
            return {"capabilities": _caps(e.value), "created_at": _when(e.created_at),
                    "updated_at": _when(e.updated_at), "instance_id": e.owner_id}

        return _done(op)

    def update_capabilities(
        self, group_id: bytes, capabilities: coordination.Capabilities
    ) -> coordination.CoordinatorResult[None]:
        def op() -> None:
            inst = self._instance()
            entry = self._member(group_id, self._member_id)
            try:
                kv.cas(inst.store, entry.key, _caps_value(inst.store, capabilities),
                       version=entry.version, owner=inst)
            except VersionConflict:  # left (or was removed) meanwhile
                raise coordination.MemberNotJoined(group_id, self._member_id) from None

        return _done(op)

    # -- watchers and leader election ---------------------------------------------------

    def run_watchers(self, timeout: float | None = None) -> list[Any]:
        result: list[Any] = super().run_watchers(timeout=timeout)
        self.run_elect_coordinator()
        return result

    def run_elect_coordinator(self) -> None:
        """Contend (without waiting) for the leadership of every group with an
        elected-as-leader watcher; run those hooks when newly elected."""
        for group_id, hooks in list(self._hooks_elected_leader.items()):
            gid = _id(group_id, "group")
            with self._state:
                held = self._leaders.get(gid)
                if held is not None and held.held:
                    continue
            inst = self._instance()
            with _translated():
                lease = leases.try_acquire(inst, leader_lease(gid), ttl=self.timeout)
            if lease is None:
                continue
            with self._state:
                self._leaders[gid] = lease
            hooks.run(coordination.LeaderElected(group_id, self._member_id))

    def stand_down_group_leader(self, group_id: bytes) -> bool:
        """Give up the leadership of ``group_id``; True when this coordinator held it."""
        gid = _id(group_id, "group")
        with self._state:
            lease = self._leaders.pop(gid, None)
        if lease is None or not lease.held:
            return False
        with _translated():
            lease.release()
        return True

    def get_leader(self, group_id: bytes) -> coordination.CoordinatorResult[bytes | None]:  # type: ignore[override]
        def op() -> bytes | None:
            store = self._store_or_fail()
            info = leases.get_lease(store, leader_lease(_id(group_id, "group")))
            if info.holder is None or not info.alive:
                return None
            try:
                holder = get_instance(store, info.holder)
            except NotFound:
                return None
            if holder.incarnation != info.holder_incarnation:
                return None
            label = holder.labels.get(MEMBER_LABEL)
            return _dec(label) if isinstance(label, str) else info.holder.encode("utf-8")

        return _done(op)

    # -- locks --------------------------------------------------------------------------

    def get_lock(self, name: bytes) -> CoordLock:
        return CoordLock(self, _id(name, "lock"))

