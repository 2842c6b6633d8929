"""``coord elect`` and ``coord lock``: run a command only while holding a lease.

Like ``consul lock``, ``etcdctl lock`` or ``flock``, with mutual exclusion that holds even
when the wrapper is SIGKILLed or SIGSTOPped:

1. The wrapper registers its own instance (its pid holds the instance's lock, so the lease
   dies with it) and acquires the lease, waiting up to ``--wait`` seconds (75 if not).
2. A new holder first ends the previous term's whole tree — its recorded process group and
   every recorded descendant, identity checked: TERM, grace, KILL — and starts its own
   command only when nothing of the previous term runs.
3. The command starts from the main thread through the exec'd gate (``coord.wrapper``): no
   Python runs in the forked copy of this threaded process. The gate sets the parent-death
   signal (SIGKILL: it dies with a SIGKILLed wrapper) and waits on a pipe until the group is
   recorded in the lease row (``leases.pgid``/``pg_start_token``/``pg_holder_*``), so no
   command ever runs unrecorded. It sees ``COORD_LEASE_NAME`` and ``COORD_LEASE_TERM`` (plus
   ``COORD_DB`` and ``COORD_INSTANCE_ID``). The wrapper is a child subreaper and records
   every descendant of the command as the instance's process (``processes.tree = 1``).
4. SIGINT and SIGHUP to the wrapper are forwarded to the command; SIGTERM ends the whole
   tree (TERM, grace, KILL). When the lease is lost, or the renew deadline passes (a stopped
   or starved wrapper), the whole tree gets SIGTERM, then SIGKILL after the grace period, and
   the wrapper exits 75.
5. When the command ends, what is left of its tree is ended, the lease is released (the
   next waiter is woken at once) and the wrapper exits with the command's status, or 128+N
   when it was ended by signal N.
6. When the wrapper is SIGKILLed, the command dies with it and the death rule ends the rest
   of the tree: the next candidate does it before running its own command, the elected
   reaper within 100 ms (it watches every instance of the host by pidfd), ``coord reap``
   from cron.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Sequence

from . import nudge
from .clock import boot_id
from .db import Store
from .errors import CannotRun, InvalidArgument, LeaseLost, LeaseNotAcquired
from .identity import ProcIdentity, stat_fields
from .instances import Instance, generate_id, register, username
from .leases import Lease, LeaseInfo, acquire, record_group, serve_reaper
from .wrapper import Forward, Gated, Interrupted, launch, release_and_wait


def exit_status(returncode: int) -> int:
    """A shell-style exit status: the code, or 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


# -- a recorded process group ---------------------------------------------------------------


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
        fields = stat_fields(int(name))
        if fields is None or int(fields[2]) != pgid or fields[0] in ("Z", "X", "x"):
            continue
        out.append(ProcIdentity(boot, int(name), int(fields[19])))
    return out


def check_runnable(argv: Sequence[str], env: dict[str, str]) -> None:
    """Refuse, before anything starts, a command that cannot be found or executed."""
    cmd = argv[0]
    if "/" in cmd:
        if not os.path.exists(cmd):
            raise CannotRun(cmd, "command not found")
        if os.path.isdir(cmd) or not os.access(cmd, os.X_OK):
            raise CannotRun(cmd, "permission denied", not_found=False)
    elif shutil.which(cmd, path=env.get("PATH", os.defpath)) is None:
        raise CannotRun(cmd, "command not found")


# -- the wrapper -----------------------------------------------------------------------------


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
    on_wait: Callable[[LeaseInfo], None] | None = None,
) -> int:
    """Run ``argv`` only while holding lease ``name``; return its exit status.

    ``wait``: seconds to wait for the lease (None: for ever; 0: fail at once) — raises
    ``LeaseNotAcquired`` (exit 75) when not obtained. ``ttl``: the lease's TTL. ``grace``:
    seconds between TERM and KILL (default ``config.kill_grace``). Raises ``LeaseLost``
    (exit 75) after ending the command's tree when the lease was lost while it ran. Call
    from the main thread of a process of its own (the CLI): it adopts every child that
    process starts after CMD. ``on_wait(info)``: called when it starts waiting for a live
    holder and again whenever the holder it waits for changes (``leases.acquire``).
    """
    if not argv:
        raise InvalidArgument("no command given (use: coord elect NAME -- CMD ...)")
    if wait is not None and wait < 0:
        raise InvalidArgument(f"--wait must not be negative, got {wait}")
    grace = store.config.kill_grace if grace is None else grace
    env = dict(os.environ, COORD_DB=store.address, COORD_LEASE_NAME=name)
    check_runnable(argv, env)
    # CMD's tree must be ended on the holder's own deadline before anyone may take over, and
    # on PostgreSQL before the server ends a silent session (its timeouts follow the
    # instance TTL).
    server = store.config.instance_ttl if store.engine == "postgresql" else None
    store.config.check_step_down(store.config.lease_ttl if ttl is None else ttl, grace,
                                 server_timeout=server, instance_ttl=server)

    cancel = threading.Event()
    inst_box: list[Instance] = []

    def stop_contending() -> None:
        cancel.set()
        if inst_box:
            nudge.nudge([inst_box[0].nudge_path])

    fwd = Forward(whole_tree=True, on_early=stop_contending)
    fwd.install()
    inst: Instance | None = None
    try:
        inst = register(store, instance_id or generate_id(app), app=app,
                        labels={"lease": name}, handle_signals=False)
        inst_box.append(inst)
        if reaper:
            serve_reaper(inst)
        try:
            lease = acquire(inst, name, ttl=ttl, timeout=wait, cancel=cancel, grace=grace,
                            on_wait=on_wait)
        except LeaseNotAcquired:
            if fwd.first is not None:
                raise Interrupted(fwd.first) from None
            raise
        try:
            return _run_holding(inst, lease, argv, env, grace, fwd)
        finally:
            lease.release()
    except Interrupted as e:
        return 128 + e.signum
    finally:
        if inst is not None:
            inst.close()
        fwd.restore()


def _grace_left(lease: Lease, grace: float) -> float:
    """The kill grace CMD still gets: all of it, unless the step-down starts so late (the
    wrapper was stopped or starved past its deadline) that the lease may already be
    another's — then KILL at once: every moment CMD runs on is a moment beside a new
    holder."""
    from .config import KILL_WAIT

    if lease.held:
        return grace
    slack = lease.ttl - lease.deadline_span - grace - KILL_WAIT
    return 0.0 if -lease.deadline_in > max(slack, 0.0) else grace


def _run_holding(inst: Instance, lease: Lease, argv: Sequence[str], env: dict[str, str],
                 grace: float, fwd: Forward) -> int:
    from .processes import record_exit

    store = inst.store
    if fwd.first is not None:
        raise Interrupted(fwd.first)
    env = dict(env, COORD_INSTANCE_ID=inst.id, COORD_LEASE_TERM=str(lease.term))
    owner = (inst.id, inst.incarnation)

    def record(cmd: Gated) -> None:
        record_group(store, lease.name, lease.term, cmd.pid, cmd.token, holder=owner)

    # A step-down frees the term only after CMD's tree has ended (``lease.release()``
    # below): freed at the deadline, another host could take the lease while CMD still runs
    # out its kill grace.
    lease.free_at_step_down = False
    cmd, watch, row = launch(store, owner, argv, env, tree=True, user=username(),
                             labels={"lease": lease.name}, before_release=record,
                             log=inst.log.warning)
    lease.add_callback(lambda _: fwd.wake())
    code = release_and_wait(inst, cmd, watch, row, fwd, stop=lambda: not lease.held,
                            timeout=lambda: min(max(0.0, lease.deadline_in), 5.0))
    how = watch.end(_grace_left(lease, grace))
    code = cmd.popen.wait() if code is None else code
    fwd.pid = None
    record_exit(inst, row, code)
    if not lease.held:
        # Lost while CMD ran (or by the time it ended): its tree is ended; give up with 75.
        with contextlib.suppress(LeaseLost):
            lease.check()  # steps down (releases) when the renew deadline passed
        inst.log.info("lease %r term %d lost (%s); command ended (%s, status %d)",
                      lease.name, lease.term, lease.lost_reason, how, exit_status(code))
        raise LeaseLost(lease.name, lease.term)
    if how not in ("gone", "terminated", "killed"):
        inst.log.warning("the process tree of lease %r could not be ended (%s)", lease.name, how)
    return exit_status(code)
