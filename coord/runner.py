"""``coord run``: run any program as a registered instance, its whole process tree with it.

The wrapper registers (its own pid holds the instance's lock, so if the wrapper is
SIGKILLed the instance is seen dead at once), exports ``COORD_DB`` and ``COORD_INSTANCE_ID``
to the program, records it as the instance's process, heartbeats for it, and returns its exit
status (128+N when it was ended by signal N; 127 when it was not found and 126 when it could
not be executed, as shells do).

The program's tree is the instance's (``coord.wrapper``, ``coord.tree``): it starts through
the exec'd gate in its own process group, with a parent-death signal; the wrapper is a child
subreaper and records every descendant. The tree's rule:

==========================  ==================================================================
when                        what happens to the tree
==========================  ==================================================================
CMD exits                   the rest of the tree is ended (TERM, grace, KILL), then the
                            wrapper exits with CMD's status
SIGTERM to the wrapper      the whole tree, CMD included, gets TERM, then KILL after the grace
SIGINT / SIGHUP             forwarded to CMD; when CMD ends, the rest is ended as above
wrapper SIGKILLed           CMD dies with it (parent-death signal); the death rule ends the
                            recorded rest (elected reaper, ``coord reap``)
==========================  ==================================================================

With ``keep_children`` (``--keep-children``) nothing but CMD is ended: SIGTERM is forwarded
to CMD alone, what CMD leaves behind keeps running, recorded and listed as orphans once the
wrapper has gone (the old rule of ``track``/``spawn``).

When the wrapper owns the terminal's foreground, it hands the foreground to CMD's group for
the program's life, so the program can read the terminal and Ctrl-C reaches it once, directly.
Call ``run`` from a process of its own (the CLI): it adopts every child the process starts
after CMD (orphans of the tree are reparented to it, and cannot be told apart).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import IO, Any

from .db import Store
from .errors import InvalidArgument
from .instances import generate_id, register, username
from .wrapper import Forward, Interrupted, launch, release_and_wait


def exit_status(returncode: int) -> int:
    """A shell-style exit status: the code, or 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


#: The instance label that records ``keep_children``: its orphans are expected.
KEEP_CHILDREN_LABEL = "coord/keep_children"


def run(
    store: Store,
    argv: Sequence[str],
    *,
    app: str,
    instance_id: str | None = None,
    labels: Mapping[str, Any] | None = None,
    log: bool = False,
    keep_children: bool = False,
    grace: float | None = None,
) -> int:
    """Run ``argv`` as a registered instance of ``app`` and return its exit status.

    The id is ``instance_id`` or a generated one — never inherited from the environment,
    so a ``coord run`` inside another one registers a new instance. ``grace``: seconds
    between TERM and KILL when the tree ends (default ``config.kill_grace``).
    """
    if not argv:
        raise InvalidArgument("no command given (use: coord run --app NAME -- CMD ...)")
    from .elect import check_runnable

    grace = store.config.kill_grace if grace is None else grace
    env = dict(os.environ, COORD_DB=store.address)
    check_runnable(argv, env)
    # Handlers go in before the program starts: a signal that arrives while it is being
    # started means it never runs, and never kills the wrapper alone.
    fwd = Forward(whole_tree=not keep_children)
    fwd.install()
    inst = None
    try:
        if keep_children:  # recorded, so that doctor expects its orphans
            labels = {**(labels or {}), KEEP_CHILDREN_LABEL: True}
        inst = register(store, instance_id or generate_id(app), app=app, labels=labels,
                        handle_signals=False)
        from .leases import serve_reaper

        # Live instances reap among themselves (one elected reaper), so cron is a safety net.
        serve_reaper(inst)
        env["COORD_INSTANCE_ID"] = inst.id
        out: IO[bytes] | None = None
        log_path = None
        if log:
            log_path = str(store.side_dir("logs") / f"{inst.id}-{os.urandom(3).hex()}.log")
            out = open(log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child
            os.chmod(log_path, 0o600)
        try:
            owner = (inst.id, inst.incarnation)
            cmd, watch, row = launch(store, owner, argv, env, tree=not keep_children,
                                     user=username(), labels=labels, stdout=out,
                                     log_path=log_path, log=inst.log.warning)
        finally:
            if out is not None:
                out.close()
        from .processes import record_exit

        try:
            code = release_and_wait(inst, cmd, watch, row, fwd)
        except Interrupted as e:
            return 128 + e.signum
        if keep_children:
            watch.stop()
            watch.scan()  # what it left behind is recorded before the wrapper goes
        else:
            how = watch.end(grace)
            if how not in ("gone", "terminated", "killed"):
                inst.log.warning("the process tree could not be ended (%s)", how)
        code = cmd.popen.wait() if code is None else code
        fwd.pid = None
        record_exit(inst, row, code)
        return exit_status(code)
    finally:
        if inst is not None:
            inst.close()  # a signal now goes to the ended program (ignored), not to us
        fwd.restore()
