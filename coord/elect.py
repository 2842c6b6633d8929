"""``coord elect`` and ``coord lock``: run a command only while holding a lease.

Like ``consul lock``, ``etcdctl lock`` or ``flock``, with mutual exclusion that holds even
when the wrapper is SIGKILLed or SIGSTOPped:

1. The wrapper registers its own instance (its pid holds the instance's lock, so the lease
   dies with it) and acquires the lease, waiting up to ``--wait`` seconds (75 if not).
2. A new holder first ends the previous holder's recorded process group (identity checked:
   TERM, grace, KILL) and starts its own command only when that group is empty.
3. The command is forked from the main thread into its own process group with a parent-death
   signal (SIGKILL: it dies with a SIGKILLed wrapper). The child waits on a pipe until the
   group is recorded in the lease row (``leases.pgid``/``pg_start_token``) and only then
   execs, so no command ever runs unrecorded. It sees ``COORD_LEASE_NAME`` and
   ``COORD_LEASE_TERM`` (plus ``COORD_DB`` and ``COORD_INSTANCE_ID``).
4. SIGTERM, SIGINT and SIGHUP to the wrapper are forwarded to the command. When the lease is
   lost, or the renew deadline passes (a stopped or starved wrapper), the command's group
   gets SIGTERM, then SIGKILL after the grace period, and the wrapper exits 75.
5. When the command ends, what is left of its group is ended, the lease is released (the
   next waiter is woken at once) and the wrapper exits with the command's status, or 128+N
   when it was ended by signal N.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import nudge
from .clock import boot_id
from .db import Store
from .errors import CannotRun, CoordError, InvalidArgument, LeaseLost, LeaseNotAcquired
from .identity import ProcIdentity, _stat_fields, start_token
from .instances import Instance, generate_id, register
from .leases import Lease, acquire, record_group, serve_reaper

if TYPE_CHECKING:
    from .processes import Tracked

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def exit_status(returncode: int) -> int:
    """A shell-style exit status: the code, or 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


# -- ending a recorded process group ---------------------------------------------------------


def group_members(pgid: int) -> list[ProcIdentity]:
    """The processes in group ``pgid`` that still run (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # the common case, in microseconds
    except PermissionError:
        pass
    out = []
    boot = boot_id()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None or int(fields[2]) != pgid or fields[0] in ("Z", "X", "x"):
            continue
        out.append(ProcIdentity(boot, int(name), int(fields[19])))
    return out


def _pin(ident: ProcIdentity) -> int | None:
    """A pidfd on exactly this process, or None when it is gone or its pid was reused."""
    try:
        fd = os.pidfd_open(ident.pid)
    except OSError:
        return None
    if start_token(ident.pid) != ident.start_token:
        os.close(fd)
        return None
    return fd


def _end_members(members: Sequence[ProcIdentity], grace: float) -> str:
    """TERM (and CONT) each pinned process, wait up to ``grace``, KILL what is left."""
    fds = [fd for fd in (_pin(m) for m in members) if fd is not None]
    if not fds:
        return "gone"
    try:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            for fd in fds:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    signal.pidfd_send_signal(fd, sig)
        deadline = time.monotonic() + max(0.0, grace)
        left = list(fds)
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            ready, _, _ = select.select(left, [], [], wait)
            left = [fd for fd in left if fd not in ready]
        if not left:
            return "terminated"
        for fd in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        select.select(left, [], [], 2.0)  # bounded: let SIGKILL finish
        return "killed"
    finally:
        for fd in fds:
            os.close(fd)


def end_group(pgid: int, leader: ProcIdentity, grace: float) -> str:
    """End the process group ``pgid`` whose leader was ``leader``: TERM, up to ``grace``
    seconds, KILL. Identity checked: while the leader exists it must carry the recorded
    start token (else the number was reused: 'foreign', nothing is signalled). Members left
    after the leader itself ended (the number stays taken while they exist) are ended one by
    one, each pinned by a pidfd. Returns 'gone', 'terminated', 'killed', 'denied' or
    'foreign'. Never signals our own group."""
    if leader.boot_id != boot_id():
        return "gone"
    if pgid in (os.getpid(), os.getpgrp()):
        return "denied"
    token = start_token(pgid)
    if token is not None and token != leader.start_token:
        return "foreign"
    from .processes import end_group as end_led_group

    outcome = end_led_group(pgid, leader, grace) if token is not None else "gone"
    if start_token(pgid) not in (None, leader.start_token):
        return outcome
    stragglers = [m for m in group_members(pgid) if m.start_token >= leader.start_token]
    if stragglers:
        how = _end_members(stragglers, grace)
        if how != "gone" and outcome in ("gone", "terminated"):
            outcome = how
    return outcome


# -- starting the command, gated until its group is recorded ---------------------------------


def _prctl() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def _check_runnable(argv: Sequence[str], env: dict[str, str]) -> None:
    cmd = argv[0]
    if "/" in cmd:
        if not os.path.exists(cmd):
            raise CannotRun(cmd, "command not found")
        if os.path.isdir(cmd) or not os.access(cmd, os.X_OK):
            raise CannotRun(cmd, "permission denied", not_found=False)
    elif shutil.which(cmd, path=env.get("PATH", os.defpath)) is None:
        raise CannotRun(cmd, "command not found")


class _Child:
    """A forked child in its own process group, held at a gate until ``release()``."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        prctl = _prctl()
        parent = os.getpid()
        gate_r, gate_w = os.pipe()  # both close on exec
        err_r, err_w = os.pipe()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: see below
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child; only fork-safe steps until exec
                code = 127
                try:
                    os.close(gate_w)
                    os.close(err_r)
                    for s in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
                        signal.signal(s, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                    os.setpgid(0, 0)
                    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                    if os.getppid() != parent:
                        os._exit(code)  # the wrapper died before the death signal was set
                    if os.read(gate_r, 1) != b"g":
                        os._exit(code)  # the wrapper gave up (or died): never run
                    os.execvpe(argv[0], list(argv), env)
                except OSError as e:
                    code = 127 if e.errno == errno.ENOENT else 126
                    with contextlib.suppress(OSError):
                        os.write(err_w, str(e.errno).encode())
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        # The child runs Python only until exec: no thread, lock or connection of ours is
        # touched there, and every descriptor we opened is close-on-exec.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # both sides set it, so it holds whichever runs first
        os.close(gate_r)
        os.close(err_w)
        self.pid = pid
        self.argv = list(argv)
        self.token = start_token(pid)
        self._gate: int | None = gate_w
        self._err = err_r
        self.status: int | None = None

    def release(self) -> None:
        """Let it exec; raise ``CannotRun`` if the exec failed."""
        assert self._gate is not None
        try:
            os.write(self._gate, b"g")
        except BrokenPipeError:
            pass  # it already died (a forwarded signal): its status tells
        finally:
            os.close(self._gate)
            self._gate = None
        try:
            data = b""
            while True:
                chunk = os.read(self._err, 64)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(self._err)
        if data:
            self.wait()
            err = int(data)
            if err == errno.ENOENT:
                raise CannotRun(self.argv[0], "command not found")
            raise CannotRun(self.argv[0], os.strerror(err), not_found=False)

    def abandon(self) -> None:
        """Never let it run: it exits at the closed gate."""
        if self._gate is not None:
            os.close(self._gate)
            self._gate = None
            os.close(self._err)
        self.wait()

    def poll(self) -> int | None:
        if self.status is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
        return self.status

    def wait(self) -> int:
        if self.status is None:
            _, st = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(st)
        return self.status


# -- the wrapper -----------------------------------------------------------------------------


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_elected(
    store: Store,
    name: str,
    argv: Sequence[str],
    *,
    wait: float | None = None,
    ttl: float | None = None,
    app: str = "coord-elect",
    grace: float | None = None,
    instance_id: str | None = None,
    reaper: bool = True,
) -> int:
    """Run ``argv`` only while holding lease ``name``; return its exit status.

    ``wait``: seconds to wait for the lease (None: for ever; 0: fail at once) — raises
    ``LeaseNotAcquired`` (exit 75) when not obtained. ``ttl``: the lease's TTL. ``grace``:
    seconds between TERM and KILL (default ``config.kill_grace``). Raises ``LeaseLost``
    (exit 75) after ending the command when the lease was lost while it ran. Call from the
    main thread.
    """
    if not argv:
        raise InvalidArgument("no command given (use: coord elect NAME -- CMD ...)")
    if wait is not None and wait < 0:
        raise InvalidArgument(f"--wait must not be negative, got {wait}")
    grace = store.config.kill_grace if grace is None else grace
    env = dict(os.environ, COORD_DB=str(store.path), COORD_LEASE_NAME=name)
    _check_runnable(argv, env)

    state: dict[str, int | None] = {"pid": None, "signal": None}
    cancel = threading.Event()
    inst_box: list[Instance] = []

    def on_signal(signum: int, frame: object) -> None:
        pid = state["pid"]
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            return
        state["signal"] = signum  # not running yet: stop contending
        cancel.set()
        if inst_box:
            nudge.nudge([inst_box[0].nudge_path])

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in FORWARDED} if main else {}
    inst: Instance | None = None
    try:
        inst = register(store, instance_id or generate_id(app), app=app,
                        labels={"lease": name}, handle_signals=False)
        inst_box.append(inst)
        if reaper:
            serve_reaper(inst)
        try:
            lease = acquire(inst, name, ttl=ttl, timeout=wait, cancel=cancel, grace=grace)
        except LeaseNotAcquired:
            if state["signal"] is not None:
                raise _Interrupted(state["signal"]) from None
            raise
        try:
            return _run_holding(inst, lease, argv, env, grace, state)
        finally:
            lease.release()
    except _Interrupted as e:
        return 128 + e.signum
    finally:
        if inst is not None:
            inst.close()
        for s, h in previous.items():
            signal.signal(s, h)


def _run_holding(inst: Instance, lease: Lease, argv: Sequence[str], env: dict[str, str],
                 grace: float, state: dict[str, int | None]) -> int:
    from .runner import _foreground

    store = inst.store
    if state["signal"] is not None:
        raise _Interrupted(state["signal"])
    env = dict(env, COORD_INSTANCE_ID=inst.id, COORD_LEASE_TERM=str(lease.term))
    child = _Child(argv, env)
    try:
        if child.token is None:
            raise CoordError("the command's process vanished before it could start")
        record_group(store, lease.name, lease.term, child.pid, child.token)
    except BaseException:
        child.abandon()
        raise
    leader = ProcIdentity(boot_id(), child.pid, child.token)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)

    def wake(_: Lease) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"!")

    lease.add_callback(wake)
    pidfd: int | None = None
    try:
        with _foreground(child.pid):
            state["pid"] = child.pid
            child.release()
            pidfd = os.pidfd_open(child.pid)
            tracked = _track(inst, child.pid, argv, lease.name)
            code = child.poll()
            while code is None and lease.held:
                left = max(0.0, lease.deadline_in) + 0.001
                select.select([pidfd, wake_r], [], [], min(left, 5.0))
                code = child.poll()
        state["pid"] = None
        if not lease.held:
            # Lost while CMD ran (or by the time it ended): end its group, give up with 75.
            with contextlib.suppress(LeaseLost):
                lease.check()  # steps down (releases) when the renew deadline passed
            how = end_group(child.pid, leader, grace)
            code = child.wait()
            _record_exit(tracked, code)
            inst.log.info("lease %r term %d lost (%s); command ended (%s, status %d)",
                             lease.name, lease.term, lease.lost_reason, how, exit_status(code))
            raise LeaseLost(lease.name, lease.term)
        assert code is not None
        _record_exit(tracked, code)
        # What CMD left running in its group must not outlive the lease.
        if group_members(child.pid):
            end_group(child.pid, leader, grace)
        return exit_status(code)
    finally:
        for fd in (pidfd, wake_r, wake_w):
            if fd is not None:
                os.close(fd)


def _record_exit(tracked: Tracked | None, code: int) -> None:
    if tracked is not None:
        with contextlib.suppress(CoordError):
            tracked.record_exit(code)


def _track(inst: Instance, pid: int, argv: Sequence[str], name: str) -> Tracked | None:
    from .processes import track

    try:
        return track(inst, pid, name=os.path.basename(argv[0]), labels={"lease": name})
    except (CoordError, OSError):
        return None
