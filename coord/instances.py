"""Instances: register, heartbeat, liveness by proof of death, deregister.

An instance holds a POSIX record lock on its own lock file beside the database for its whole
life (see ``coord.identity``); the kernel drops it the instant the process dies, which is the
proof of death. A hung instance is seen dead when its heartbeat is older than its TTL.
Everything an instance holds is bound to (id, incarnation); every registration bumps the
incarnation, and taking over a dead instance's id releases what the old incarnation held in
the same transaction. The rows, the proof of life and the verdict are the store's engine's
(``store.backend.instances`` and ``store.backend.liveness``); this module keeps the rules,
the heartbeat and the public API.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from . import nudge
from .backend import Proof

# The SQLite engine's verdict, named here for the modules that still judge rows themselves
# (``coord.queues``, ``coord.leases``) until their steps of ``coord.backend``'s plan.
from .backend.sqlite.liveness import Probe, judge, unlink
from .clock import boot_id
from .db import Row, Store
from .errors import InvalidArgument, NotFound, NotRegistered
from .identity import pid_namespace, start_token
from .locations import redact_words

__all__ = ["Probe", "judge"]  # re-exported (see above)

log = logging.getLogger("coord")

_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@")

# (id, incarnation) of every instance registered by this process and not yet closed.
_LOCAL: dict[tuple[str, int], Instance] = {}
_LOCAL_LOCK = threading.Lock()


def validate_id(value: str, what: str = "instance id") -> str:
    if not value or len(value) > 200 or not set(value) <= _ID_CHARS:
        raise InvalidArgument(
            f"invalid {what} {value!r}: use 1-200 letters, digits and - _ . : @"
        )
    return value


def validate_name(value: str, what: str) -> str:
    """A lease or queue name: a plain string, global in one database ("app/name" advised)."""
    if not isinstance(value, str) or not value or len(value) > 1000 or "\0" in value:
        raise InvalidArgument(f"invalid {what} {value!r}: use 1-1000 characters, no NUL")
    return value


def generate_id(app: str) -> str:
    """A readable unique id: ``<app>-<short random>``."""
    base = "".join(c if c in _ID_CHARS else "-" for c in app)[:60] or "coord"
    return f"{base}-{os.urandom(3).hex()}"


@dataclass(frozen=True)
class InstanceInfo:
    """One row of the registry with its liveness verdict."""

    id: str
    incarnation: int
    app: str
    status: str  # 'alive', or why it is not: 'died', 'hung', 'left', 'reboot', 'taken over'
    alive: bool
    pid: int
    start_token: int
    boot_id: str
    pidns: str
    uid: int
    user: str
    host: str
    cmdline: list[str]
    cwd: str
    labels: dict[str, Any]
    lock_path: str
    nudge_path: str | None
    ttl: float
    watchdog: float | None
    started_at: float
    heartbeat_at: float
    heartbeat_age: float | None
    ended_at: float | None
    tombstone: bool

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["cmdline"] = list(self.cmdline)
        return d


def _json(text: str) -> Any:
    # The common empty values skip the parser (a listing parses two per row).
    if text == "{}":
        return {}
    if text == "[]":
        return []
    return json.loads(text)


def _info(verdict: tuple[bool, str], row: Row, age: float | None) -> InstanceInfo:
    alive, status = verdict
    fields = {
        "id": row["id"],
        "incarnation": row["incarnation"],
        "app": row["app"],
        "status": status,
        "alive": alive,
        "pid": row["pid"],
        "start_token": row["start_token"],
        "boot_id": row["boot_id"],
        "pidns": row["pidns"],
        "uid": row["uid"],
        "user": row["user"],
        "host": row["host"],
        "cmdline": _json(row["cmdline"]),
        "cwd": row["cwd"],
        "labels": _json(row["labels"]),
        "lock_path": row["lock_path"],
        "nudge_path": row["nudge_path"],
        "ttl": row["ttl"],
        "watchdog": row["watchdog"],
        "started_at": row["started_at"],
        "heartbeat_at": row["heartbeat_at"],
        "heartbeat_age": age,
        "ended_at": row["ended_at"],
        "tombstone": row["status"] == "dead",
    }
    # A frozen dataclass's __init__ sets each field through object.__setattr__, which is a
    # third of a thousand-row listing; filling __dict__ directly builds the same object.
    info = object.__new__(InstanceInfo)
    info.__dict__.update(fields)
    return info


def list_instances(
    store: Store, *, include_dead: bool = False, app: str | None = None
) -> list[InstanceInfo]:
    """Registered instances with their liveness; only live ones unless ``include_dead``."""
    backend = store.backend
    rows = backend.instances.list(app)
    look = backend.liveness.look()
    judge_row, age = backend.liveness.judge, backend.liveness.heartbeat_age
    out = [_info(judge_row(r, look), r, age(r, look)) for r in rows]
    return out if include_dead else [i for i in out if i.alive]


def problems(
    store: Store, rows: Mapping[str, Row], verdicts: Mapping[str, tuple[bool, str]]
) -> list[tuple[str, bool]]:
    """The registry's invariants, for ``coord.check``: (detail, pending) pairs. Pending means
    awaiting the reaper (a death not yet buried, a tombstone with nothing left to keep)."""
    out: list[tuple[str, bool]] = []
    for id, row in rows.items():
        alive, verdict = verdicts[id]
        if row["status"] == "alive":
            if row["ended_at"] is not None or row["end_reason"] is not None:
                out.append((f"{id} is registered but has an end ({row['end_reason']})", False))
            if not alive:
                out.append((f"{id} is {verdict}, awaiting the reaper", True))
        elif row["ended_at"] is None or not row["end_reason"]:
            out.append((f"tombstone {id} has no end time or reason", False))
    tombs = [id for id, row in rows.items() if row["status"] == "dead"]
    kept = store.backend.death.keeping(tombs)
    out += [(f"tombstone {id} keeps nothing, awaiting the reaper", True)
            for id in tombs if id not in kept]
    return out


def get_instance(store: Store, id: str) -> InstanceInfo:
    """The instance registered as ``id`` (alive or a tombstone), with its verdict."""
    backend = store.backend
    row = backend.instances.by_id(id)
    if row is None:
        raise NotFound("instance", id)
    look = backend.liveness.look()
    return _info(backend.liveness.judge(row, look), row, backend.liveness.heartbeat_age(row, look))


def require_live(store: Store, id: str | None) -> InstanceInfo:
    """The live instance named ``id`` (from COORD_INSTANCE_ID when None), for CLI commands
    that act as an instance."""
    id = id or os.environ.get("COORD_INSTANCE_ID")
    if not id:
        raise NotRegistered(None)
    try:
        info = get_instance(store, id)
    except NotFound:
        raise NotRegistered(id, "not registered") from None
    if not info.alive:
        raise NotRegistered(id, info.status)
    return info


class _IdAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("instance_id", self.extra["instance_id"] if self.extra else "")
        kwargs["extra"] = extra
        return f"[{extra['instance_id']}] {msg}", kwargs


HeartbeatHook = Callable[["Instance"], None]


@dataclass(eq=False)
class Instance:
    """A registered instance of this process. Use ``register()`` to make one.

    Its heartbeat thread (own connection) renews it every ``config.heartbeat`` seconds and
    runs the hooks other modules add (lease renewal, opportunistic reaping). ``close()``
    (or leaving the ``with`` block, SIGTERM, or interpreter exit) deregisters it.
    """

    store: Store
    id: str
    incarnation: int
    app: str
    ttl: float
    watchdog: float | None
    lock_path: str
    nudge_path: str
    _proof: Proof
    sock: socket.socket
    pid: int = field(default_factory=os.getpid)
    hooks: list[HeartbeatHook] = field(default_factory=list)
    closed: bool = False
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _last_beat: float = 0.0
    #: ``store.mono()`` when the last renewal of the registration that succeeded was sent
    #: (registration counts): the server stamped its heartbeat no earlier, so others judge
    #: it hung no earlier than a TTL after this.
    renewed_mono: float = 0.0
    _close_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def log(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        """A logger whose every line carries this instance's id."""
        return _IdAdapter(log, {"instance_id": self.id})

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def beat(self) -> None:
        """Report progress; with a watchdog set, the heartbeat stops when beats stop."""
        self._last_beat = self.store.mono()

    @property
    def stuck(self) -> bool:
        """With a watchdog: no ``beat()`` for longer than it. A stuck instance neither
        heartbeats nor runs its heartbeat hooks (no lease renewal), so it is seen hung."""
        return self.watchdog is not None and self.store.mono() - self._last_beat > self.watchdog

    def heartbeat(self) -> bool:
        """Renew the registration now. False when it was lost (declared dead, taken over)."""
        if self.stuck:
            return True  # stuck: let the TTL run out so others see us as hung
        sent = self.store.mono()
        if not self.store.backend.instances.heartbeat((self.id, self.incarnation)):
            if not self.lost.is_set():
                self.log.warning("registration lost (declared dead or taken over)")
            self.lost.set()
            return False
        self.renewed_mono = max(self.renewed_mono, sent)
        return True

    @property
    def renew_deadline_at(self) -> float | None:
        """``store.mono()`` by which a holder of leases must have stepped down if the
        registration is not renewed meanwhile: others may bury this instance as hung (and
        take its leases) a TTL after its last heartbeat, whatever the leases' own expiry.
        None without a heartbeat thread (its owner renews and judges for itself)."""
        if self._thread is None:
            return None
        return self.renewed_mono + self.store.config.renew_deadline_for(self.ttl)

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: the configured interval, but at least three beats per
        TTL (so ``register(ttl=1)`` works with the default config)."""
        return min(self.store.config.heartbeat, self.ttl / 3)

    def _run(self) -> None:
        interval = wait = self.heartbeat_interval
        while not self._stop.wait(wait):
            wait = interval
            if self.stuck:
                continue
            try:
                if not self.heartbeat():
                    return  # lost for good: that incarnation can never come back
            except Exception as e:  # keep beating; a transient error must not kill us
                self.log.warning("heartbeat failed: %s", e)
                # Soon again: the leases' step-down deadline counts from the last beat.
                wait = min(interval / 4, 0.25)
                continue
            for hook in list(self.hooks):
                try:
                    hook(self)
                except Exception as e:  # one failing hook must not starve the others
                    self.log.warning("heartbeat hook %s failed: %s", getattr(hook, "__name__", hook), e)

    def start(self) -> None:
        self._last_beat = self.store.mono()
        t = threading.Thread(target=self._run, name=f"coord-heartbeat-{self.id}", daemon=True)
        self._thread = t
        t.start()

    def close(self) -> None:
        """Deregister: release everything held, leave a tombstone only if it still owns
        queued jobs or running processes. Only in the process that registered."""
        if os.getpid() != self.pid:
            return
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            self.store.backend.instances.deregister((self.id, self.incarnation))
        except Exception as e:
            self.log.warning("deregistration failed: %s", e)
        with _LOCAL_LOCK:
            _LOCAL.pop((self.id, self.incarnation), None)
        unlink(self.nudge_path)
        self.sock.close()
        self._proof.release()


def register(
    store: Store,
    id: str | None = None,
    *,
    app: str | None = None,
    labels: Mapping[str, Any] | None = None,
    ttl: float | None = None,
    watchdog: float | None = None,
    cmdline: list[str] | None = None,
    heartbeat: bool = True,
    handle_signals: bool = True,
) -> Instance:
    """Register an instance of ``app`` and start its heartbeat.

    The id comes from ``id``, else ``COORD_INSTANCE_ID``, else is generated. An id held by a
    live instance raises ``InstanceIdInUse``; a dead one's id is taken over (new incarnation,
    the old one's leases, claims and ephemeral keys released, its private queue kept).
    """
    app = app or os.path.basename(sys.argv[0] or "python") or "coord"
    id = validate_id(id or os.environ.get("COORD_INSTANCE_ID") or generate_id(app))
    ttl = store.config.instance_ttl if ttl is None else ttl
    if ttl <= 0:
        raise InvalidArgument(f"ttl must be positive, got {ttl}")
    token = os.urandom(8).hex()
    backend = store.backend
    proof = backend.liveness.prove(token, ttl)
    nudge_path = nudge.socket_path(str(store.side_dir("sock") / f"{token}.sock"))
    try:
        sock = nudge.bind(nudge_path)
    except BaseException:
        proof.release()
        raise
    mypid = os.getpid()
    tok = start_token(mypid)
    assert tok is not None
    fields = {
        "app": app, "pid": mypid, "start_token": tok, "boot_id": boot_id(),
        "pidns": pid_namespace(), "uid": os.geteuid(), "user": username(),
        "host": socket.gethostname(),
        "cmdline": json.dumps(redact_words(cmdline if cmdline is not None else _own_cmdline())),
        "cwd": _cwd(), "labels": json.dumps(dict(labels or {}), sort_keys=True),
        "lock_path": proof.where, "nudge_path": nudge_path, "ttl": ttl, "watchdog": watchdog,
    }
    sent = store.mono()
    try:
        inc, _ = backend.instances.register(id, fields)
    except BaseException:
        sock.close()
        proof.release()
        unlink(nudge_path)
        raise
    inst = Instance(
        store=store, id=id, incarnation=inc, app=app, ttl=ttl, watchdog=watchdog,
        lock_path=proof.where, nudge_path=nudge_path, _proof=proof, sock=sock,
        renewed_mono=sent,
    )
    with _LOCAL_LOCK:
        _LOCAL[(id, inc)] = inst
    _INSTANCES.add(inst)
    if handle_signals:
        _install_sigterm()
    if heartbeat:
        inst.start()
    inst.log.debug("registered (incarnation %d)", inc)
    return inst


def _own_cmdline() -> list[str]:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return list(sys.argv)


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return ""


def username() -> str:
    """This process's user name (its uid when it has none)."""
    import getpass  # here: it loads the terminal modules, which no listing needs

    try:
        return getpass.getuser()
    except Exception:
        return str(os.geteuid())


# -- shutdown: atexit and SIGTERM close what this pid registered --------------------------

_INSTANCES: weakref.WeakSet[Instance] = weakref.WeakSet()
_REGISTERED_PID = os.getpid()
_sigterm_installed = False


def close_all() -> None:
    """Deregister every instance this process registered (not those inherited by fork)."""
    for inst in list(_INSTANCES):
        if inst.pid == os.getpid():
            inst.close()


atexit.register(close_all)


def _on_sigterm(signum: int, frame: object) -> None:
    for inst in list(_INSTANCES):
        if inst.pid == os.getpid():
            inst.store.abandon_transaction()
    close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_sigterm() -> None:
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True
