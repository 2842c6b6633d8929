"""Instances: register, heartbeat, liveness by proof of death, deregister.

An instance holds a POSIX record lock on its own lock file beside the database for its whole
life (see ``coord.identity``); the kernel drops it the instant the process dies, which is the
proof of death. A hung instance is seen dead when its heartbeat is older than its TTL.
Everything an instance holds is bound to (id, incarnation); every registration bumps the
incarnation, and taking over a dead instance's id releases what the old incarnation held in
the same transaction (``coord.reaper.release_holdings``).
"""

from __future__ import annotations

import atexit
import getpass
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import apsw

from . import nudge
from .clock import boot_id
from .db import Row, Store, fetch, next_counter
from .errors import InstanceIdInUse, InvalidArgument, NotFound, NotRegistered
from .events import log_event
from .identity import (
    DEAD_STATES,
    FREE,
    hold_lock,
    lock_state,
    pid_namespace,
    proc_stat,
    start_token,
)

log = logging.getLogger("coord")

_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@")

# (id, incarnation) of every instance registered by this process and not yet closed.
_LOCAL: dict[tuple[str, int], Instance] = {}
# The lock files this process holds (from before its row is committed until the descriptor
# is closed). A row with our own pid is judged from here: probing our own lock file would
# release it, and the set is filled before the row exists, so a reaper thread of ours never
# sees a registration of ours half-way.
_OWN_LOCKS: set[str] = set()
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
    return f"{base}-{secrets.token_hex(3)}"


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


class Probe:
    """What the kernel says about pids and lock files, asked once per pid and per lock file.

    One probe serves one listing or one reap, so a thousand rows that share a handful of
    processes cost a handful of /proc reads. Make a new one for every fresh look: a probe
    never forgets, and a process it saw alive may have died since.
    """

    def __init__(self) -> None:
        self.boot_id = boot_id()
        self.pidns = pid_namespace()
        self.pid = os.getpid()
        self._procs: dict[int, tuple[int, str] | None] = {}
        self._locks: dict[str, tuple[str, int | None]] = {}

    def proc(self, pid: int) -> tuple[int, str] | None:
        """(start token, state) of ``pid``, or None when it does not exist."""
        try:
            return self._procs[pid]
        except KeyError:
            found = self._procs[pid] = proc_stat(pid)
            return found

    def lock(self, path: str) -> tuple[str, int | None]:
        try:
            return self._locks[path]
        except KeyError:
            found = self._locks[path] = lock_state(path)
            return found


def judge(
    store: Store, row: Row, now_mono: float | None = None, *, probe: Probe | None = None
) -> tuple[bool, str]:
    """Liveness verdict for an instance row: (alive, status word).

    Dead needs proof — another boot; the pid gone, reused (another start token) or a
    zombie; its lock file present and unlocked — or an expired heartbeat (status 'hung').
    Age alone never kills an instance whose heartbeat is current, and the wall clock is
    never read. ``row`` needs: id, incarnation, status, end_reason, boot_id, pidns, pid,
    start_token, lock_path, heartbeat_mono, ttl.
    """
    if row["status"] == "dead":
        return False, row["end_reason"] or "dead"
    pr = probe or Probe()
    if row["boot_id"] != pr.boot_id:
        return False, "reboot"
    same_ns = row["pidns"] == pr.pidns
    if same_ns:
        st = pr.proc(row["pid"])
        if st is None or st[0] != row["start_token"] or st[1] in DEAD_STATES:
            return False, "died"
    if same_ns and row["pid"] == pr.pid:
        # Our own process: never probe our own lock file (closing the probe would drop it).
        with _LOCAL_LOCK:
            held = row["lock_path"] in _OWN_LOCKS
        if not held:
            return False, "died"  # registered here once and closed, or never by us
    elif pr.lock(row["lock_path"])[0] == FREE:
        return False, "died"
    # HELD, or MISSING/UNKNOWN (no proof either way): the heartbeat decides.
    now = store.mono() if now_mono is None else now_mono
    if now - row["heartbeat_mono"] > row["ttl"]:
        return False, "hung"
    return True, "alive"


def _json(text: str) -> Any:
    # The common empty values skip the parser (a listing parses two per row).
    if text == "{}":
        return {}
    if text == "[]":
        return []
    return json.loads(text)


def _info(store: Store, row: Row, now_mono: float, probe: Probe) -> InstanceInfo:
    alive, status = judge(store, row, now_mono, probe=probe)
    same_boot = row["boot_id"] == probe.boot_id
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
        "heartbeat_age": (now_mono - row["heartbeat_mono"]) if same_boot else None,
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
    sql = "SELECT * FROM instances"
    params: tuple[Any, ...] = ()
    if app is not None:
        sql += " WHERE app = ?"
        params = (app,)
    now, probe = store.mono(), Probe()
    out = [_info(store, r, now, probe) for r in store.rows(sql + " ORDER BY started_at, id", params)]
    return out if include_dead else [i for i in out if i.alive]


def problems(
    store: Store, rows: Mapping[str, Row], verdicts: Mapping[str, tuple[bool, str]]
) -> list[tuple[str, bool]]:
    """The registry's invariants, for ``coord.check``: (detail, pending) pairs. Pending means
    awaiting the reaper (a death not yet buried, a tombstone with nothing left to keep)."""
    from .reaper import _kept

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
    kept = _kept(store.conn(), tombs)
    out += [(f"tombstone {id} keeps nothing, awaiting the reaper", True)
            for id in tombs if id not in kept]
    return out


def get_instance(store: Store, id: str) -> InstanceInfo:
    row = store.row("SELECT * FROM instances WHERE id = ?", (id,))
    if row is None:
        raise NotFound("instance", id)
    return _info(store, row, store.mono(), Probe())


def live_holder(store: Store, conn: apsw.Connection, id: str, incarnation: int) -> bool:
    """Is (id, incarnation) a live instance? For checks inside a transaction."""
    rows = fetch(conn, "SELECT * FROM instances WHERE id = ? AND incarnation = ?", (id, incarnation))
    return bool(rows) and judge(store, rows[0])[0]


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
    _lock_fd: int
    sock: socket.socket
    pid: int = field(default_factory=os.getpid)
    hooks: list[HeartbeatHook] = field(default_factory=list)
    closed: bool = False
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _last_beat: float = 0.0
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
        now_mono, now_wall = self.store.mono(), self.store.wall()
        if self.stuck:
            return True  # stuck: let the TTL run out so others see us as hung
        n = self.store.write(
            lambda c: c.execute(
                "UPDATE instances SET heartbeat_mono = ?, heartbeat_at = ? "
                "WHERE id = ? AND incarnation = ? AND status = 'alive' RETURNING 1",
                (now_mono, now_wall, self.id, self.incarnation),
            ).fetchall()
        )
        if not n:
            if not self.lost.is_set():
                self.log.warning("registration lost (declared dead or taken over)")
            self.lost.set()
            return False
        return True

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: the configured interval, but at least three beats per
        TTL (so ``register(ttl=1)`` works with the default config)."""
        return min(self.store.config.heartbeat, self.ttl / 3)

    def _run(self) -> None:
        interval = self.heartbeat_interval
        while not self._stop.wait(interval):
            if self.stuck:
                continue
            try:
                if not self.heartbeat():
                    return  # lost for good: that incarnation can never come back
            except Exception as e:  # keep beating; a transient error must not kill us
                self.log.warning("heartbeat failed: %s", e)
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
        from .reaper import bury

        try:
            self.store.write(
                lambda c: bury(c, self.store, self.id, self.incarnation, reason="left")
            )
        except Exception as e:
            self.log.warning("deregistration failed: %s", e)
        with _LOCAL_LOCK:
            _LOCAL.pop((self.id, self.incarnation), None)
        _unlink(self.lock_path, self.nudge_path)
        self.sock.close()
        with _LOCAL_LOCK:
            _OWN_LOCKS.discard(self.lock_path)
        os.close(self._lock_fd)


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
    token = secrets.token_hex(8)
    lock_path = str(store.side_dir("locks") / f"{token}.lock")
    nudge_path = nudge.socket_path(str(store.side_dir("sock") / f"{token}.sock"))
    fd = hold_lock(lock_path)
    with _LOCAL_LOCK:
        _OWN_LOCKS.add(lock_path)
    try:
        sock = nudge.bind(nudge_path)
    except BaseException:
        _release_own_lock(fd, lock_path)
        raise
    mypid = os.getpid()
    labels_json = json.dumps(dict(labels or {}), sort_keys=True)
    cmd = cmdline if cmdline is not None else _own_cmdline()
    user = _username()
    host = socket.gethostname()
    tok = start_token(mypid)
    assert tok is not None

    previous: list[Row] = []

    def txn(c: apsw.Connection) -> int:
        now_mono, now_wall = store.mono(), store.wall()
        old = fetch(c, "SELECT * FROM instances WHERE id = ?", (id,))
        previous[:] = old
        if old:
            alive, verdict = judge(store, old[0], now_mono)
            if alive:
                raise InstanceIdInUse(id, old[0]["pid"])
            from .reaper import release_holdings

            # Its death was never recorded (no reaper came by): record it now, once.
            if old[0]["status"] == "alive":
                log_event(c, now_wall, "died", id, None, incarnation=old[0]["incarnation"],
                          reason=verdict)
            release_holdings(c, store, id, old[0]["incarnation"], reason="taken over")
        inc = next_counter(c, "incarnation")
        c.execute(
            "INSERT INTO instances (id, incarnation, app, status, pid, start_token, boot_id, "
            "pidns, uid, user, host, cmdline, cwd, labels, lock_path, nudge_path, ttl, "
            "watchdog, started_at, heartbeat_at, heartbeat_mono) "
            "VALUES (?, ?, ?, 'alive', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET incarnation = excluded.incarnation, "
            "app = excluded.app, status = 'alive', pid = excluded.pid, "
            "start_token = excluded.start_token, boot_id = excluded.boot_id, "
            "pidns = excluded.pidns, uid = excluded.uid, user = excluded.user, "
            "host = excluded.host, cmdline = excluded.cmdline, cwd = excluded.cwd, "
            "labels = excluded.labels, lock_path = excluded.lock_path, "
            "nudge_path = excluded.nudge_path, ttl = excluded.ttl, "
            "watchdog = excluded.watchdog, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, heartbeat_mono = excluded.heartbeat_mono, "
            "ended_at = NULL, end_reason = NULL",
            (
                id, inc, app, mypid, tok, boot_id(), pid_namespace(), os.geteuid(), user,
                host, json.dumps(cmd), _cwd(), labels_json, lock_path, nudge_path, ttl,
                watchdog, now_wall, now_wall, now_mono,
            ),
        )
        if old:
            log_event(c, now_wall, "took over", id, None, previous=old[0]["incarnation"], incarnation=inc)
        log_event(c, now_wall, "joined", id, app, incarnation=inc, pid=mypid)
        return inc

    try:
        inc = store.write(txn)
    except BaseException:
        sock.close()
        _release_own_lock(fd, lock_path)
        _unlink(nudge_path)
        raise
    if previous:
        # The dead predecessor's lock file and socket are nobody's now.
        _unlink(previous[0]["lock_path"], previous[0]["nudge_path"])
    inst = Instance(
        store=store, id=id, incarnation=inc, app=app, ttl=ttl, watchdog=watchdog,
        lock_path=lock_path, nudge_path=nudge_path, _lock_fd=fd, sock=sock,
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


def _release_own_lock(fd: int, path: str) -> None:
    _unlink(path)
    with _LOCAL_LOCK:
        _OWN_LOCKS.discard(path)
    os.close(fd)


def _is_file(p: str | None) -> TypeGuard[str]:
    """A path on disk — not an abstract-namespace socket name (``@coord-…``, see
    ``nudge.socket_path``), which has no file, and unlinked as a path would remove a file of
    that name from the current directory."""
    return bool(p) and not nudge.is_abstract(p)


def _unlink_many(paths: Iterable[str | None]) -> None:
    """``_unlink`` for a reaper's batch: one directory descriptor per directory, so each
    file costs an unlinkat without a path walk."""
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        if _is_file(p):
            d, name = os.path.split(p)
            by_dir.setdefault(d, []).append(name)
    for d, names in by_dir.items():
        try:
            dfd = os.open(d or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for name in names:
                try:
                    os.unlink(name, dir_fd=dfd)
                except OSError:
                    pass
        finally:
            os.close(dfd)


def _unlink(*paths: str | None) -> None:
    """Remove a dead instance's lock file and socket (unlinking never drops a lock)."""
    for p in paths:
        if _is_file(p):
            try:
                os.unlink(p)
            except OSError:
                pass


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


def _username() -> str:
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
