"""Processes tracked per instance, named by (boot id, pid, start token).

A row is only ever signalled while its pid still carries the recorded start token, so a
reused pid is never touched; a row whose process no longer matches has exited. An instance
lists and signals its own processes (``list_processes(store, inst.id)``, ``stop``); the
view across instances (``all_=True``) is read-only.

Ending a process (``stop``, ``kill_orphans``) is ``coord.process_ending``'s one sequence:
SIGTERM, a grace period, SIGKILL, every signal pinned to the very process by a pidfd.
Listing, with each row's verdict and live figures, is ``coord.process_info``; both are
re-exported here.

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

import json
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .clock import boot_id
from .db import Row, Store
from .errors import InvalidArgument, NotFound, NotRegistered, PermissionDenied
from .identity import ProcIdentity, start_token, still_running
from .instances import Instance, require_live, username
from .locations import redact_words
from .process_ending import (
    DENIED,
    GONE,
    KILLED,
    SURVIVED,
    TERMINATED,
    end_group,
    end_many,
    end_process,
)
from .process_info import ProcessInfo, comm, get_process, list_processes, orphans, top

__all__ = [
    "DENIED", "GONE", "KILLED", "SURVIVED", "TERMINATED", "ProcessInfo", "Tracked",
    "end_group", "end_process", "get_process", "kill_orphans", "list_processes", "orphans",
    "poll_children", "problems", "record_exit", "spawn", "stop", "stop_as", "top", "track",
]


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
        cmd = [comm(pid) or str(pid)]
    t = _insert(inst, pid, pgid=pgid, cmdline=cmd, cwd=cwd, labels=labels, log_path=None,
                name=name or os.path.basename(cmd[0]))
    if isinstance(target, subprocess.Popen):
        t.popen = target
        _adopt_popen(inst, t.id, target)
    return t


def record_exit(inst: Instance, proc_id: int, returncode: int) -> None:
    """Record the end of one of ``inst``'s processes: exit code, or signal when negative."""
    code, sig = (None, -returncode) if returncode < 0 else (returncode, None)
    inst.store.backend.processes.record_exit(proc_id, inst.id, code, sig)
    with _CHILDREN_LOCK:
        entry = _CHILDREN.get(proc_id)
        if entry is not None and entry[0] is inst:
            del _CHILDREN[proc_id]


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
    if row["status"] == "running" and row["boot_id"] != boot_id():
        raise PermissionDenied(
            f"process {proc_id} (pid {row['pid']}) runs on another host or boot; "
            "only a coord process there can signal it")
    grace = store.config.kill_grace if grace is None else grace
    ident = ProcIdentity(row["boot_id"], row["pid"], row["start_token"])
    how = GONE if row["status"] == "exited" else end_many([(ident, _as_group(row))], grace)[0]
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
    hows = end_many([(o.identity, _as_group(rows[o.id])) for o in plain], grace)
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
        # Only this boot's processes can be probed (another host's are that host's).
        if r["status"] == "running" and r["boot_id"] == boot_id() and not still_running(
                ProcIdentity(r["boot_id"], r["pid"], r["start_token"])):
            out.append((f"{what} has ended, awaiting the reaper", True))
    return out
