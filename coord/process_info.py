"""Listing tracked processes with their verdict (``list_processes``, ``get_process``), the
orphans of dead instances (``orphans``), and the system's largest processes (``top``).

A row's process is alive only while its pid still carries the recorded start token (and
boot); an orphan is alive while its instance is dead: a tombstone, an older incarnation
than the registered one, or a registered row judged dead and not yet buried. For a dead
wrapper's tree, every live member of its groups and every descendant counts too, recorded
or not (``coord.tree``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .db import Row, Store
from .errors import InvalidArgument, NotFound
from .identity import ProcIdentity, still_running

__all__ = ["ProcessInfo", "comm", "get_process", "list_processes", "orphans", "top"]


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
    name, cmdline = row["name"], tuple(json.loads(row["cmdline"]))
    if alive and cmdline and name == os.path.basename(cmdline[0]):
        from .tree import cmdline_of

        # A name taken from the command line is read again, as ps would: a wrapper records
        # a descendant when it first sees it, which may be between its fork and its exec.
        now = cmdline_of(row["pid"])
        if now:
            name, cmdline = os.path.basename(now[0]), tuple(now)
    return ProcessInfo(
        id=row["id"], instance_id=row["instance_id"], incarnation=row["incarnation"],
        pid=row["pid"], pgid=row["pgid"], start_token=row["start_token"], boot_id=row["boot_id"],
        name=name, cmdline=cmdline, cwd=row["cwd"],
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
        name=(os.path.basename(cmd[0]) if cmd else comm(ident.pid) or str(ident.pid)),
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


def comm(pid: int) -> str | None:
    """The kernel's short name of ``pid`` (``/proc/PID/comm``), or None when unreadable."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode("utf-8", "replace").strip() or None
    except OSError:
        return None
