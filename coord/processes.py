"""Processes tracked per instance, named by (boot id, pid, start token).

A row is only ever signalled while its pid still carries the recorded start token, so a
reused pid is never touched. An instance lists and signals its own processes; a read-only
view spans all instances.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .clock import boot_id
from .db import scalar
from .errors import InvalidArgument, NotFound
from .identity import start_token
from .instances import Instance, _username


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
    row_id = store.write(
        lambda c: scalar(c,
            "INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, pgid, "
            "name, cmdline, cwd, user, labels, log_path, started_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (inst.id, inst.incarnation, pid, token, boot_id(), pgid, pname,
             json.dumps(list(cmdline)), cwd, _username(), json.dumps(dict(labels or {})),
             log_path, store.wall()),
        )
    )
    return Tracked(inst, int(row_id), pid, token)


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
    path is recorded.
    """
    if not argv:
        raise InvalidArgument("empty command")
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
    return tracked


def _insert_gone(inst: Instance, pid: int, argv: Sequence[str], cwd: str,
                 labels: Mapping[str, Any] | None, log_path: str | None) -> int:
    store = inst.store
    return int(store.write(
        lambda c: scalar(c,
            "INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, pgid, "
            "name, cmdline, cwd, user, labels, log_path, started_at, status, ended_at) "
            "VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'exited', ?) RETURNING id",
            (inst.id, inst.incarnation, pid, boot_id(), pid, os.path.basename(argv[0]),
             json.dumps(list(argv)), cwd, _username(), json.dumps(dict(labels or {})),
             log_path, store.wall(), store.wall()),
        )
    ))


def track(
    inst: Instance,
    target: subprocess.Popen[Any] | int,
    *,
    labels: Mapping[str, Any] | None = None,
) -> Tracked:
    """Track an existing process (a Popen or a pid) as ``inst``'s."""
    pid = target.pid if isinstance(target, subprocess.Popen) else int(target)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        raise NotFound("process", pid) from None
    except PermissionError:
        cwd = ""
    try:
        pgid: int | None = os.getpgid(pid)
    except ProcessLookupError:
        raise NotFound("process", pid) from None
    t = _insert(inst, pid, pgid=pgid, cmdline=cmd, cwd=cwd, labels=labels, log_path=None)
    if isinstance(target, subprocess.Popen):
        t.popen = target
    return t


def record_exit(inst: Instance, proc_id: int, returncode: int) -> None:
    """Record the end of one of ``inst``'s processes: exit code, or signal when negative."""
    code, sig = (None, -returncode) if returncode < 0 else (returncode, None)
    inst.store.write(
        lambda c: c.execute(
            "UPDATE processes SET status = 'exited', ended_at = ?, exit_code = ?, signal = ? "
            "WHERE id = ? AND instance_id = ?",
            (inst.store.wall(), code, sig, proc_id, inst.id),
        )
    )
