"""What the ``coord://`` tooz driver's parts share: names of the keys and leases it uses,
the translation of coord errors into tooz's, capabilities as kv values, the stores shared
per database, and a coordinator's membership (see ``coord.tooz_driver``)."""

from __future__ import annotations

import base64
import contextlib
import datetime
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import tooz
from tooz import coordination, utils

from . import payload
from .db import Store
from .errors import (
    CoordError,
    NotADatabase,
    PayloadError,
    PayloadTooLarge,
    SchemaTooNew,
    StorageError,
    UnsafePath,
)
from .instances import Instance
from .leases import Lease

__all__ = [
    "GROUPS", "LEADERS", "LOCKS", "MEMBER_LABEL", "PACKED", "PREFIX", "Membership", "caps",
    "caps_value", "close_store", "dec", "done", "enc", "group_key", "leader_lease",
    "lock_lease", "member_key", "members_prefix", "open_store", "tooz_id", "translated", "when",
]

T = TypeVar("T")

PREFIX = "tooz/"
GROUPS = PREFIX + "groups/"
LOCKS = PREFIX + "locks/"
LEADERS = PREFIX + "leaders/"
#: The instance label that names the tooz member an instance is.
MEMBER_LABEL = "tooz_member"


# -- names ----------------------------------------------------------------------------------


def tooz_id(value: bytes | str, what: str) -> bytes:
    """A tooz id as bytes (str is encoded as UTF-8); ``ToozError`` when empty or neither."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes) or not value:
        raise tooz.ToozError(f"a {what} id must be non-empty bytes or str, got {value!r}")
    return value


def enc(value: bytes) -> str:
    """An id percent-encoded for a key or lease name (no ``/`` left in it)."""
    return urllib.parse.quote(value, safe="")


def dec(text: str) -> bytes:
    """The id that ``enc`` encoded."""
    return urllib.parse.unquote_to_bytes(text)


def group_key(group_id: bytes) -> str:
    return GROUPS + enc(group_id)


def members_prefix(group_id: bytes) -> str:
    return group_key(group_id) + "/members/"


def member_key(group_id: bytes, member_id: bytes) -> str:
    return members_prefix(group_id) + enc(member_id)


def lock_lease(name: bytes) -> str:
    return LOCKS + enc(name)


def leader_lease(group_id: bytes) -> str:
    return LEADERS + enc(group_id)


# -- errors and results -----------------------------------------------------------------------


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """coord errors become tooz errors, at this one boundary (tooz's own pass through)."""
    try:
        yield
    except PayloadError as e:
        utils.raise_with_cause(utils.SerializationError, str(e), cause=e)
    except (UnsafePath, NotADatabase, SchemaTooNew, StorageError) as e:
        utils.raise_with_cause(coordination.ToozConnectionError, str(e), cause=e)
    except CoordError as e:
        utils.raise_with_cause(tooz.ToozError, str(e), cause=e)


def done(fn: Callable[[], T]) -> coordination.CoordinatorResult[T]:
    """Run ``fn`` now; its result, or its error, is delivered by the result's ``get()``."""
    fut: futures.Future[T] = futures.Future()
    try:
        with translated():
            value = fn()
    except Exception as e:
        fut.set_exception(e)
    else:
        fut.set_result(value)
    return coordination.CoordinatorResult(fut)


def when(ts: float) -> datetime.datetime:
    """A wall-clock timestamp as an aware UTC datetime."""
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


# -- capabilities: JSON when they are JSON data, else tooz's own msgpack ----------------------

#: The one key of a kv value that holds capabilities which are not JSON data (bytes — tooz
#: before 9 passes ``b""`` by default —, sets, datetimes ...): base64 of tooz's msgpack, as
#: tooz's other drivers store every capability. Never unpickled: msgpack is data only.
PACKED = "tooz.msgpack"


def _is_packed(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and PACKED in value


def caps_value(store: Store, caps: Any) -> Any:
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


def caps(value: Any) -> Any:
    """Capabilities from a kv value (see ``caps_value``)."""
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


def open_store(path: str) -> Store:
    """The shared Store of the database at ``path`` (an absolute path that ``resolve_db_path``
    gave); each call is one more user, each ``close_store`` one fewer."""
    with _STORES_LOCK:
        found = _STORES.get(path)
        store = found[0] if found else Store(path)
        _STORES[path] = (store, (found[1] if found else 0) + 1)
        return store


def close_store(path: str) -> None:
    """One user fewer of the shared store at ``path``; the last one closes it."""
    with _STORES_LOCK:
        store, users = _STORES[path]
        if users > 1:
            _STORES[path] = (store, users - 1)
            return
        del _STORES[path]
    store.close()



# -- a coordinator's membership ------------------------------------------------------------------


class Membership:
    """A coordinator's hold on coord: its member id, its coord instance and store once
    started, and the leases it holds (exclusive locks' and leaderships'), under ``lock``."""

    def __init__(self, member_id: bytes) -> None:
        self.member_id = member_id
        self.inst: Instance | None = None
        self.opened: Store | None = None
        self.leaders: dict[bytes, Lease] = {}
        self.held: set[Lease] = set()  # the exclusive locks' leases
        self.lock = threading.Lock()

    def instance(self) -> Instance:
        """The started coordinator's live instance; ``ToozError`` otherwise."""
        inst = self.inst
        if inst is None:
            raise tooz.ToozError("the coordinator is not started")
        if inst.lost.is_set() or inst.closed:
            raise tooz.ToozError(
                f"coord instance {inst.id} was declared dead (hung past its timeout): its "
                "groups, locks and leadership are gone; stop() and start() the coordinator")
        return inst

    def store(self) -> Store:
        """The started coordinator's store; ``ToozError`` when not started."""
        store = self.opened
        if store is None:
            raise tooz.ToozError("the coordinator is not started")
        return store
