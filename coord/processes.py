"""Processes tracked per instance, named by (boot id, pid, start token).

A row is only ever signalled while its pid still carries the recorded start token, so a
reused pid is never touched; a row whose process no longer matches has exited. An instance
lists and signals its own processes (``list_processes(store, inst.id)``, ``stop``); the
view across instances (``all_=True``) is read-only.

Ending a process (``stop``, ``kill_orphans``, and the leases' ``end_group``) is one
sequence: SIGTERM (and SIGCONT, so a stopped process sees it) to the process group, a grace
period, then SIGKILL to what is left. The identity is checked once, when a pidfd is opened
on the group leader; every later signal goes through that pidfd (with
``PIDFD_SIGNAL_PROCESS_GROUP`` for the group), so it reaches the very same process, or the
group that leader created, even after the leader itself has exited — never a newcomer that
inherited the number. Without pidfd support, each signal re-checks the leader's start token
first and a group is signalled only while its leader exists.

A process is signalled as a group only when it leads its own group (pgid == pid, as every
process ``spawn`` starts does); a tracked process inside someone else's group is signalled
alone, and coord never signals its own process group.

Rows with ``tree = 1`` are the members of a `coord run`/`elect`/`lock` wrapper's process tree
(``coord.tree``): the wrapper records them, and ends them with its CMD; the death rule ends
them when the wrapper dies. Rows with ``tree = 0`` (``track``, ``spawn``) keep the rule below.

Orphans are tracked processes still running whose instance is dead: a tombstone, an older
incarnation than the registered one, or a registered row that is judged dead and not yet
buried. Ending them marks their rows exited, so the next reap drops the tombstone.

How a process ended is recorded in ``exit_code`` / ``signal``: the real status for the
owner's own children (``poll_children``, which the heartbeat also runs); for a process that
coord ended but is not the caller's child, the signal that ended it (SIGTERM or SIGKILL).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .backend.postgresql.url import redact_words
from .clock import boot_id
from .db import Row, Store
from .errors import InvalidArgument, NotFound, NotRegistered, PermissionDenied
from .identity import ProcIdentity, start_token, still_running
from .instances import Instance, require_live, username

PIDFD_SIGNAL_PROCESS_GROUP = 4  # linux/pidfd.h, Linux 6.9+

# How an ending went (returned by end_group / end_process / stop):
GONE = "gone"  # it had already ended: nothing was signalled
TERMINATED = "terminated"  # it ended within the grace period after SIGTERM
KILLED = "killed"  # it was still there after the grace period and got SIGKILL
DENIED = "denied"  # the OS refused the signal (another user's process)
SURVIVED = "survived"  # something of it still runs after SIGKILL (stuck in the kernel, or
#                        left behind by a leader that exited, without pidfd to reach them)

# pidfd_open (Linux 5.3+): signals pinned to the very process; tests switch it off to cover
# the fallback.
_USE_PIDFD = hasattr(os, "pidfd_open")


# -- tracking ------------------------------------------------------------------------------


@dataclass
class Tracked:
    """A tracked process of one of our instances."""

    instance: Instance
    id: int
    pid: int
    start_token: int
    popen: subprocess.Popen[bytes] | None = None

    def record_exit(self, returncode: int) -> None:
        """Record how our own child ended (exit code, or the signal that ended it)."""
        record_exit(self.instance, self.id, returncode)


# Our own Popen children by row id, so the owner can record their exit status.
_CHILDREN: dict[int, tuple[Instance, subprocess.Popen[Any]]] = {}
_CHILDREN_LOCK = threading.Lock()


def _adopt_popen(inst: Instance, row_id: int, popen: subprocess.Popen[Any]) -> None:
    with _CHILDREN_LOCK:
        _CHILDREN[row_id] = (inst, popen)
    if _poll_hook not in inst.hooks:
        inst.hooks.append(_poll_hook)


def _poll_hook(inst: Instance) -> None:
    poll_children(inst)


def poll_children(inst: Instance) -> list[int]:
    """Record the exit status of ``inst``'s own children that have ended; their row ids.

    The heartbeat runs this for every instance that spawned or tracked a Popen."""
    with _CHILDREN_LOCK:
        mine = [(rid, p) for rid, (i, p) in _CHILDREN.items() if i is inst]
    ended = []
    for rid, popen in mine:
        code = popen.poll()
        if code is None:
            continue
        record_exit(inst, rid, code)
        ended.append(rid)
    return ended


def _insert(
    inst: Instance,
    pid: int,
    *,
    pgid: int | None,
    cmdline: Sequence[str],
    cwd: str,
    labels: Mapping[str, Any] | None,
    log_path: str | None,
    name: str | None = None,
) -> Tracked:
    token = start_token(pid)
    if token is None:
        raise NotFound("process", pid)
    store = inst.store
    pname = name or (os.path.basename(cmdline[0]) if cmdline else str(pid))

    row_id = store.backend.processes.track(
        (inst.id, inst.incarnation),
        (pid, token, boot_id(), pgid, pname, json.dumps(redact_words(list(cmdline))), cwd,
         username(),
         json.dumps(dict(labels or {})), log_path), running=True)
    return Tracked(inst, row_id, pid, token)


def spawn(
    inst: Instance,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    labels: Mapping[str, Any] | None = None,
    log: bool = False,
    new_session: bool = True,
) -> Tracked:
    """Start ``argv`` as a tracked child of ``inst``.

    ``new_session``: own session and process group (default); otherwise only its own
    process group. ``log``: stdout and stderr go to a log file beside the database, whose
    path is recorded. The owner records its exit status (``poll_children``, run by the
    heartbeat, or ``Tracked.record_exit``).
    """
    if not argv:
        raise InvalidArgument("empty command")
    if inst.closed:
        raise NotRegistered(inst.id, "closed")
    log_path = None
    out: Any = None
    if log:
        log_path = str(inst.store.side_dir("logs") / f"{inst.id}-{os.urandom(3).hex()}.log")
        out = open(log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child
        os.chmod(log_path, 0o600)
    try:
        kwargs: dict[str, Any] = {"start_new_session": True} if new_session else {"process_group": 0}
        popen = subprocess.Popen(
            list(argv), env=dict(env) if env is not None else None, cwd=cwd,
            stdout=out, stderr=subprocess.STDOUT if out is not None else None, **kwargs,
        )
    finally:
        if out is not None:
            out.close()
    try:
        tracked = _insert(inst, popen.pid, pgid=popen.pid, cmdline=argv, cwd=cwd or os.getcwd(),
                          labels=labels, log_path=log_path)
    except NotFound:
        # It already ended: record it anyway so its exit is visible.
        tracked = Tracked(inst, _insert_gone(inst, popen.pid, argv, cwd or os.getcwd(), labels, log_path), popen.pid, 0)
    tracked.popen = popen
    _adopt_popen(inst, tracked.id, popen)
    return tracked


def _insert_gone(inst: Instance, pid: int, argv: Sequence[str], cwd: str,
                 labels: Mapping[str, Any] | None, log_path: str | None) -> int:
    return inst.store.backend.processes.track(
        (inst.id, inst.incarnation),
        (pid, 0, boot_id(), pid, os.path.basename(argv[0]), json.dumps(redact_words(list(argv))), cwd,
         username(), json.dumps(dict(labels or {})), log_path), running=False)


def track(
    inst: Instance,
    target: subprocess.Popen[Any] | int,
    *,
    labels: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Tracked:
    """Track an existing process (a Popen or a pid) as ``inst``'s.

    A process that leads its own group is later stopped with its group; one inside another
    group (e.g. ours) is stopped alone."""
    if inst.closed:
        raise NotRegistered(inst.id, "closed")
    pid = target.pid if isinstance(target, subprocess.Popen) else int(target)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        raise NotFound("process", pid) from None
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        raise NotFound("process", pid) from None
    except PermissionError:
        cwd = ""
    try:
        pgid: int | None = os.getpgid(pid)
    except ProcessLookupError:
        raise NotFound("process", pid) from None
    if isinstance(target, subprocess.Popen):
        # Just started, it may not have exec'd yet: its own arguments are the truth.
        args = target.args
        cmd = [os.fsdecode(args)] if isinstance(args, (str, bytes, os.PathLike)) else [os.fsdecode(a) for a in args]
    if not cmd:
        cmd = [_comm(pid) or str(pid)]
    t = _insert(inst, pid, pgid=pgid, cmdline=cmd, cwd=cwd, labels=labels, log_path=None,
                name=name or os.path.basename(cmd[0]))
    if isinstance(target, subprocess.Popen):
        t.popen = target
        _adopt_popen(inst, t.id, target)
    return t


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def record_exit(inst: Instance, proc_id: int, returncode: int) -> None:
    """Record the end of one of ``inst``'s processes: exit code, or signal when negative."""
    code, sig = (None, -returncode) if returncode < 0 else (returncode, None)
    inst.store.backend.processes.record_exit(proc_id, inst.id, code, sig)
    with _CHILDREN_LOCK:
        entry = _CHILDREN.get(proc_id)
        if entry is not None and entry[0] is inst:
            del _CHILDREN[proc_id]


# -- listing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """One tracked process with its verdict and, when asked, live figures.

    ``alive``: the recorded process (same boot, pid and start token) still runs; a row
    whose process no longer matches has exited, whatever its stored status says.
    ``orphan``: alive, while its instance is dead (or an older incarnation of it).
    ``status``: the live state ('sleeping', 'running', 'stopped' ...) or 'exited'.
    """

    id: int
    instance_id: str
    incarnation: int
    pid: int
    pgid: int | None
    start_token: int
    boot_id: str
    name: str
    cmdline: tuple[str, ...]
    cwd: str
    user: str
    labels: Mapping[str, Any]
    log_path: str | None
    started_at: float
    ended_at: float | None
    exit_code: int | None
    signal: int | None
    alive: bool
    orphan: bool
    status: str
    rss: int | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None
    uptime: float | None = None
    tree: bool = False  # a member of a wrapper's process tree (ended with its instance)

    @property
    def identity(self) -> ProcIdentity:
        return ProcIdentity(self.boot_id, self.pid, self.start_token)

    @property
    def leads_group(self) -> bool:
        return self.pgid is not None and self.pgid == self.pid

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cmdline"] = list(self.cmdline)
        d["labels"] = dict(self.labels)
        return d


def _verdicts(store: Store, ids: set[str]) -> dict[str, tuple[Row, bool]]:
    """For each instance id: its row and whether it is alive now."""
    out: dict[str, tuple[Row, bool]] = {}
    backend = store.backend
    look = backend.liveness.look()
    for i, row in backend.instances.by_ids(ids).items():
        out[i] = (row, backend.liveness.judge(row, look)[0])
    return out


def _info(row: Row, verdicts: Mapping[str, tuple[Row, bool]]) -> ProcessInfo:
    alive = row["status"] == "running" and still_running(
        ProcIdentity(row["boot_id"], row["pid"], row["start_token"]))
    owner = verdicts.get(row["instance_id"])
    orphan = alive and (owner is None or not owner[1] or owner[0]["status"] == "dead"
                        or owner[0]["incarnation"] != row["incarnation"])
    return ProcessInfo(
        id=row["id"], instance_id=row["instance_id"], incarnation=row["incarnation"],
        pid=row["pid"], pgid=row["pgid"], start_token=row["start_token"], boot_id=row["boot_id"],
        name=row["name"], cmdline=tuple(json.loads(row["cmdline"])), cwd=row["cwd"],
        user=row["user"], labels=json.loads(row["labels"]), log_path=row["log_path"],
        started_at=row["started_at"], ended_at=row["ended_at"], exit_code=row["exit_code"],
        signal=row["signal"], alive=alive, orphan=orphan,
        status="running" if alive else "exited", tree=bool(row["tree"]),
    )


def _with_figures(infos: list[ProcessInfo], cpu_interval: float) -> list[ProcessInfo]:
    """Add RSS, CPU % (two samples ``cpu_interval`` apart, taken for all at once), memory %
    and uptime to the live ones; a process that ended meanwhile is reported exited."""
    import psutil

    procs: dict[int, Any] = {}
    for info in infos:
        if not info.alive:
            continue
        try:
            p = psutil.Process(info.pid)
            p.cpu_percent(None)
            procs[info.id] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    if procs and cpu_interval > 0:
        time.sleep(cpu_interval)
    up = _boot_uptime()
    tck = os.sysconf("SC_CLK_TCK")
    out = []
    for info in infos:
        p = procs.get(info.id)
        if p is None:
            out.append(info)
            continue
        try:
            with p.oneshot():
                cpu = p.cpu_percent(None)
                rss = p.memory_info().rss
                mem = p.memory_percent()
                status = p.status()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            out.append(_replace(info, alive=False, orphan=False, status="exited"))
            continue
        except psutil.AccessDenied:
            out.append(info)
            continue
        if not still_running(info.identity):  # ended (and maybe reused) while we looked
            out.append(_replace(info, alive=False, orphan=False, status="exited"))
            continue
        out.append(_replace(info, rss=rss, cpu_percent=round(cpu, 1), memory_percent=round(mem, 2),
                            status=str(status), uptime=max(0.0, up - info.start_token / tck)))
    return out


def _replace(info: ProcessInfo, **changes: Any) -> ProcessInfo:
    from dataclasses import replace

    return replace(info, **changes)


def _boot_uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def list_processes(
    store: Store,
    instance_id: str | None = None,
    *,
    all_: bool = False,
    running: bool = False,
    live: bool = True,
    cpu_interval: float = 0.1,
) -> list[ProcessInfo]:
    """The processes of instance ``instance_id`` (its own view), or with ``all_`` those of
    every instance (a read-only view). ``running``: only those still running. ``live``: add
    RSS, CPU % (sampled over ``cpu_interval`` seconds for all of them at once) and uptime."""
    if all_ == (instance_id is not None):
        raise InvalidArgument("name one instance, or ask for all of them (all_=True)")
    rows = store.backend.processes.list(None if all_ else instance_id)
    infos = [_info(r, _verdicts(store, {r["instance_id"] for r in rows})) for r in rows] if rows else []
    if running:
        infos = [i for i in infos if i.alive]
    return _with_figures(infos, cpu_interval) if live else infos


def get_process(store: Store, proc_id: int) -> ProcessInfo:
    row = store.backend.processes.get(proc_id)
    if row is None:
        raise NotFound("process", proc_id)
    return _info(row, _verdicts(store, {row["instance_id"]}))


def orphans(store: Store, *, live: bool = True, cpu_interval: float = 0.1) -> list[ProcessInfo]:
    """Every live process of a dead instance (tombstone, older incarnation, or dead and not
    yet reaped): its tracked processes and, for a wrapper's tree, every member of its
    recorded groups and every descendant, recorded yet or not (those not recorded have
    ``id`` 0)."""
    from .tree import dead_trees, left_of, snapshot

    rows = store.backend.processes.list(running=True)
    verdicts = _verdicts(store, {r["instance_id"] for r in rows})
    found = [i for i in (_info(r, verdicts) for r in rows) if i.orphan]
    seen = {i.pid for i in found}
    procs = snapshot()
    for t in dead_trees(store):
        for ident in left_of(t, procs):
            if ident.pid not in seen:
                seen.add(ident.pid)
                found.append(_unrecorded(t.owner, ident, procs[ident.pid].pgid))
    return _with_figures(found, cpu_interval) if live else found


def _unrecorded(owner: tuple[str, int], ident: ProcIdentity, pgid: int) -> ProcessInfo:
    """A live process of a dead instance's tree that has no row (found in /proc)."""
    from .tree import cmdline_of

    cmd = cmdline_of(ident.pid)
    started = _boot_time() + ident.start_token / os.sysconf("SC_CLK_TCK")
    return ProcessInfo(
        id=0, instance_id=owner[0], incarnation=owner[1], pid=ident.pid, pgid=pgid,
        start_token=ident.start_token, boot_id=ident.boot_id,
        name=(os.path.basename(cmd[0]) if cmd else _comm(ident.pid) or str(ident.pid)),
        cmdline=tuple(cmd), cwd="", user="", labels={}, log_path=None, started_at=started,
        ended_at=None, exit_code=None, signal=None, alive=True, orphan=True, status="running",
        tree=True)


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def top(n: int = 15) -> list[dict[str, Any]]:
    """The system's ``n`` largest processes by resident memory, largest first: dicts with
    pid, user, rss (bytes), memory_percent, name, cmdline."""
    import psutil

    if n < 1:
        raise InvalidArgument(f"-n must be at least 1, got {n}")
    rows = []
    for p in psutil.process_iter(["pid", "username", "memory_info", "memory_percent", "name", "cmdline"]):
        info = p.info
        mem = info["memory_info"]
        if mem is None:
            continue
        rows.append({"pid": info["pid"], "user": info["username"], "rss": int(mem.rss),
                     "memory_percent": round(float(info["memory_percent"] or 0.0), 2),
                     "name": info["name"], "cmdline": list(info["cmdline"] or [])})
    rows.sort(key=lambda r: (-r["rss"], r["pid"]))
    return rows[:n]


# -- ending: TERM, grace, KILL --------------------------------------------------------------


class _Handle:
    """One process (or the group it leads) being ended, pinned by a pidfd when possible."""

    def __init__(self, ident: ProcIdentity, group: bool, fd: int | None) -> None:
        self.ident, self.group, self.fd = ident, group, fd
        self.group_flag_ok = True

    @classmethod
    def open(cls, ident: ProcIdentity, group: bool) -> _Handle | None:
        """A handle on the very process ``ident`` names (a zombie too: it may still lead
        live group members), or None when it is gone or the pid was reused."""
        if ident.boot_id != boot_id():
            return None
        fd: int | None = None
        if _USE_PIDFD:
            try:
                fd = os.pidfd_open(ident.pid)
            except ProcessLookupError:
                return None
            except OSError:
                fd = None  # no pidfd support: fall back to re-checking before each signal
        # Checked after opening: the pidfd names whichever process had the pid at open time.
        if start_token(ident.pid) != ident.start_token:
            if fd is not None:
                os.close(fd)
            return None
        return cls(ident, group, fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def signal(self, sig: int) -> bool:
        """Send ``sig``; False when there was nobody left to receive it."""
        if self.fd is not None and (self.group_flag_ok or not self.group):
            try:
                signal.pidfd_send_signal(self.fd, sig, None,
                                         PIDFD_SIGNAL_PROCESS_GROUP if self.group else 0)
                return True
            except ProcessLookupError:
                return False
            except OSError as e:
                if e.errno != errno.EINVAL or not self.group:
                    raise
                self.group_flag_ok = False  # kernel before 6.9: fall back below
        if start_token(self.ident.pid) != self.ident.start_token:
            return False  # the leader is gone: its group can no longer be named safely
        try:
            if self.group:
                os.killpg(self.ident.pid, sig)
            else:
                os.kill(self.ident.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def ended(self, live_groups: set[int]) -> bool:
        """Nothing of it still runs (zombies do not count)."""
        if not self.group:
            return not still_running(self.ident)
        if self.fd is not None and self.group_flag_ok:
            try:
                signal.pidfd_send_signal(self.fd, 0, None, PIDFD_SIGNAL_PROCESS_GROUP)
            except ProcessLookupError:
                return True
            except OSError:
                pass
        return self.ident.pid not in live_groups


def _live_groups() -> set[int]:
    """Process group ids that have at least one member that is not a zombie."""
    groups: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rindex(b")") + 2 :].split()
        if rest[0] not in (b"Z", b"X", b"x"):
            groups.add(int(rest[2]))
    return groups


def _ended(h: _Handle | None, live: set[int]) -> bool:
    return h is None or h.ended(live)


def _is_self(ident: ProcIdentity, group: bool) -> bool:
    """Would this signal reach the calling process itself?"""
    return ident.pid == os.getpid() or (group and ident.pid == os.getpgrp())


def _end_many(targets: Sequence[tuple[ProcIdentity, bool]], grace: float) -> list[str]:
    """End each (identity, as_group) target: SIGTERM (+SIGCONT) to all at once, wait up to
    ``grace`` seconds, SIGKILL what is left. Returns how each one ended."""
    handles: list[_Handle | None] = []
    try:
        for ident, group in targets:
            handles.append(None if _is_self(ident, group) else _Handle.open(ident, group))
        how = [DENIED if _is_self(t[0], t[1]) else GONE if h is None else ""
               for t, h in zip(targets, handles, strict=True)]
        pending: set[int] = set()
        live = _live_groups()
        for i, h in enumerate(handles):
            if h is None:
                continue
            if h.ended(live):
                how[i] = GONE
                continue
            try:
                if h.signal(signal.SIGTERM):
                    h.signal(signal.SIGCONT)
                    pending.add(i)
                else:
                    how[i] = GONE
            except PermissionError:
                how[i] = DENIED
        deadline = time.monotonic() + max(0.0, grace)
        pause = 0.01
        while pending:
            live = _live_groups()
            for i in list(pending):
                h = handles[i]
                assert h is not None
                if h.ended(live):
                    how[i] = TERMINATED
                    pending.discard(i)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(pause, left))
            pause = min(pause * 1.5, 0.1)
        for i in pending:
            h = handles[i]
            assert h is not None
            try:
                h.signal(signal.SIGKILL)
            except PermissionError:
                how[i] = DENIED
                continue
            how[i] = KILLED
        # SIGKILL is not instant (exit work, a process in uninterruptible sleep): give it a
        # moment, bounded, so callers see it gone; what is still there has survived.
        killed = {i for i in pending if how[i] == KILLED}
        end = time.monotonic() + 2.0
        while killed:
            live = _live_groups()
            killed = {i for i in killed if not _ended(handles[i], live)}
            if not killed or time.monotonic() >= end:
                break
            time.sleep(0.01)
        for i in killed:
            how[i] = SURVIVED
        return how
    finally:
        for h in handles:
            if h is not None:
                h.close()


def end_group(pgid: int, leader: ProcIdentity, grace: float) -> str:
    """End the process group ``pgid`` that ``leader`` leads: SIGTERM to the group, up to
    ``grace`` seconds for it to empty, then SIGKILL.

    The leader's identity (boot id, pid, start token) is checked before the first signal;
    if it does not match (the leader is gone or its pid was reused), nothing is signalled.
    Later signals reach the same group even after the leader has exited (pidfd, Linux 6.9+;
    older kernels: only while the leader still exists). Returns 'gone' (nothing to do),
    'terminated' (ended within the grace period), 'killed' (needed SIGKILL), 'survived'
    (something of the group still runs after SIGKILL: the group is NOT empty) or 'denied'
    (the system refused the signal).
    """
    if pgid != leader.pid:
        raise InvalidArgument(f"process group {pgid} is not led by pid {leader.pid}")
    if _is_self(leader, True):
        raise InvalidArgument(f"refusing to signal coord's own process group ({pgid})")
    return _end_many([(leader, True)], grace)[0]


def end_process(ident: ProcIdentity, grace: float) -> str:
    """Like ``end_group``, for one process alone (not its group)."""
    if _is_self(ident, False):
        raise InvalidArgument(f"refusing to signal coord's own process ({ident.pid})")
    return _end_many([(ident, False)], grace)[0]


# -- stopping own processes and orphans ----------------------------------------------------

_ENDED_BY = {TERMINATED: int(signal.SIGTERM), KILLED: int(signal.SIGKILL)}


def _as_group(row: Row) -> bool:
    return row["pgid"] is not None and row["pgid"] == row["pid"] and row["pid"] != os.getpgrp()


def _record_ended(store: Store, ended: Sequence[tuple[Row, str, int | None]], kind: str) -> None:
    """Mark rows exited after coord ended them; ``code`` is the real returncode when known."""
    marks: list[tuple[Row, str, int | None, int | None]] = []
    for row, how, code in ended:
        if how in (DENIED, SURVIVED):
            continue  # still running: the reaper marks it when it has ended
        if code is not None:
            marks.append((row, how, *((None, -code) if code < 0 else (code, None))))
        else:
            marks.append((row, how, None, _ENDED_BY.get(how)))
    store.backend.processes.record_ended(marks, kind)


def _stop(store: Store, owner_id: str, proc_id: int, grace: float | None,
          popen: subprocess.Popen[Any] | None) -> str:
    row = store.backend.processes.get(proc_id)
    if row is None:
        raise NotFound("process", proc_id)
    if row["instance_id"] != owner_id:
        raise PermissionDenied(
            f"process {proc_id} (pid {row['pid']}) belongs to instance {row['instance_id']!r}; "
            f"instance {owner_id!r} may only signal its own processes")
    grace = store.config.kill_grace if grace is None else grace
    ident = ProcIdentity(row["boot_id"], row["pid"], row["start_token"])
    how = GONE if row["status"] == "exited" else _end_many([(ident, _as_group(row))], grace)[0]
    if how == DENIED:
        raise PermissionDenied(f"the system refused to signal process {proc_id} (pid {row['pid']})")
    code = None
    if popen is not None:
        # Our own child: its real status (it is ended, or about to be, once we signalled it).
        try:
            code = popen.poll() if how == GONE else popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
    if row["status"] == "running" or code is not None:
        _record_ended(store, [(row, how, code)], "process stopped")
    return how


def stop(inst: Instance, proc_id: int, *, grace: float | None = None) -> str:
    """End one of ``inst``'s own processes (TERM to its group, grace, KILL) and record how
    it ended. Another instance's process raises ``PermissionDenied`` and is not touched.
    Returns 'gone', 'terminated', 'killed' or 'survived' (still there after SIGKILL)."""
    if inst.closed:
        raise NotRegistered(inst.id, "closed")
    with _CHILDREN_LOCK:
        entry = _CHILDREN.get(proc_id)
    popen = entry[1] if entry is not None and entry[0].id == inst.id else None
    how = _stop(inst.store, inst.id, proc_id, grace, popen)
    if popen is not None:
        with _CHILDREN_LOCK:
            _CHILDREN.pop(proc_id, None)
    return how


def stop_as(store: Store, proc_id: int, *, instance_id: str | None = None,
            grace: float | None = None) -> str:
    """``stop`` on behalf of the live instance ``instance_id`` (default: COORD_INSTANCE_ID),
    as the CLI does; raises ``NotRegistered`` when that instance is not live."""
    me = require_live(store, instance_id)
    return _stop(store, me.id, proc_id, grace, None)


def kill_orphans(store: Store, *, grace: float | None = None) -> list[dict[str, Any]]:
    """End every orphan whose pid and start token still match (TERM, grace, KILL, all at
    once) and mark its row exited, so the next reap drops a tombstone left with nothing.
    A dead wrapper's tree is ended whole (its groups and descendants too). Returns one dict
    per orphan: id (0: not recorded), instance_id, pid, name, how."""
    from .tree import dead_trees, settle

    grace = store.config.kill_grace if grace is None else grace
    found = orphans(store, live=False)
    if not found:
        return []
    rows = store.backend.processes.by_ids(o.id for o in found if o.id)
    plain = [o for o in found if o.id in rows and not o.tree]
    trees = [t for t in dead_trees(store) if t.members or t.groups]
    how_tree = {"": GONE}
    done = threading.Thread(target=lambda: how_tree.update({"": settle(store, trees, grace)}))
    done.start()  # both endings share one grace period
    hows = _end_many([(o.identity, _as_group(rows[o.id])) for o in plain], grace)
    done.join()
    _record_ended(store, [(rows[o.id], h, None) for o, h in zip(plain, hows, strict=True)],
                  "orphan ended")
    how = dict(zip((o.pid for o in plain), hows, strict=True))
    return [{"id": o.id, "instance_id": o.instance_id, "pid": o.pid, "name": o.name,
             "how": how.get(o.pid, how_tree[""])} for o in found if o.id in rows or o.tree]


# -- invariants (coord.check) --------------------------------------------------------------


def problems(store: Store, instances: Mapping[str, Row]) -> list[tuple[str, bool]]:
    """What is wrong with the processes table: (detail, pending). ``pending`` marks a row
    awaiting the reaper (its process has ended but the row still says running)."""
    out: list[tuple[str, bool]] = []
    for r in store.backend.processes.list():
        what = f"process {r['id']} (pid {r['pid']}, instance {r['instance_id']!r})"
        if r["status"] == "running" and (r["ended_at"] is not None or r["exit_code"] is not None
                                         or r["signal"] is not None):
            out.append((f"{what} is running but has an end recorded", False))
        if r["status"] == "exited" and r["ended_at"] is None:
            out.append((f"{what} exited without an end time", False))
        if r["exit_code"] is not None and r["signal"] is not None:
            out.append((f"{what} has both an exit code and a signal", False))
        owner = instances.get(r["instance_id"])
        if owner is not None and r["incarnation"] > owner["incarnation"]:
            out.append((f"{what} belongs to incarnation {r['incarnation']}, newer than the "
                        f"instance's {owner['incarnation']}", False))
        if r["status"] == "running" and not still_running(
                ProcIdentity(r["boot_id"], r["pid"], r["start_token"])):
            out.append((f"{what} has ended, awaiting the reaper", True))
    return out
