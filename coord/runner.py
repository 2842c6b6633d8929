"""``coord run``: run any program as a registered instance.

The wrapper registers (its own pid holds the instance's lock, so if the wrapper is
SIGKILLed the instance is seen dead at once), exports ``COORD_DB`` and ``COORD_INSTANCE_ID``
to the program, tracks it as the instance's process, heartbeats for it, forwards SIGTERM,
SIGINT and SIGHUP to it, deregisters when it ends, and returns its exit status (128+N when
it was ended by signal N; 127 when it was not found and 126 when it could not be executed,
as shells do).

The program runs in its own process group (so the whole group can be ended). When the
wrapper owns the terminal's foreground, it hands the foreground to that group for the
program's life, so the program can read the terminal and Ctrl-C reaches it once, directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .db import Store
from .errors import CannotRun, InvalidArgument
from .instances import generate_id, register

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def exit_status(returncode: int) -> int:
    """A shell-style exit status: the code, or 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run(
    store: Store,
    argv: Sequence[str],
    *,
    app: str,
    instance_id: str | None = None,
    labels: Mapping[str, Any] | None = None,
    log: bool = False,
) -> int:
    """Run ``argv`` as a registered instance of ``app`` and return its exit status.

    The id is ``instance_id`` or a generated one — never inherited from the environment,
    so a ``coord run`` inside another one registers a new instance.
    """
    if not argv:
        raise InvalidArgument("no command given (use: coord run --app NAME -- CMD ...)")
    inst = register(store, instance_id or generate_id(app), app=app, labels=labels,
                    handle_signals=False)
    from .leases import serve_reaper

    # Live instances reap among themselves (one elected reaper), so cron is a safety net.
    serve_reaper(inst)
    child: list[int] = []  # the program's pid, once it exists
    pending: list[int] = []  # signals that came before it did

    def forward(signum: int, frame: object) -> None:
        if not child:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child[0], signum)

    # Handlers go in before the program starts: a TERM that arrives while it is being
    # started is delivered to it, never lost and never killing the wrapper alone.
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in FORWARDED} if main else {}
    try:
        env = dict(os.environ, COORD_DB=str(store.path), COORD_INSTANCE_ID=inst.id)
        from .processes import spawn

        try:
            proc = spawn(inst, list(argv), env=env, log=log, new_session=False)
        except FileNotFoundError as e:
            raise CannotRun(argv[0], "command not found") from e
        except PermissionError as e:
            raise CannotRun(argv[0], "permission denied", not_found=False) from e
        except OSError as e:
            raise CannotRun(argv[0], e.strerror or str(e), not_found=False) from e
        popen = proc.popen
        assert popen is not None
        child.append(popen.pid)
        for s in pending:
            forward(s, None)
        with _foreground(popen.pid):
            code = popen.wait()  # retried on EINTR after each forwarded signal (PEP 475)
        proc.record_exit(code)
        return exit_status(code)
    finally:
        inst.close()  # a signal now goes to the ended program (ignored), not to us
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _foreground(pgid: int) -> Iterator[None]:
    """Give the terminal's foreground to process group ``pgid`` while inside, when we hold
    it (an interactive ``coord run``); do nothing otherwise."""
    fd = _terminal_we_lead()
    if fd is None:
        yield
        return
    _set_foreground(fd, pgid)
    # It may have touched the terminal before it was allowed to (SIGTTIN/SIGTTOU): resume it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGCONT)
    try:
        yield
    finally:
        _set_foreground(fd, os.getpgrp())


def _terminal_we_lead() -> int | None:
    try:
        fd = sys.stdin.fileno()
        if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _set_foreground(fd: int, pgid: int) -> None:
    # A background process group changing the foreground gets SIGTTOU unless it ignores it.
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, pgid)
    finally:
        signal.signal(signal.SIGTTOU, old)
