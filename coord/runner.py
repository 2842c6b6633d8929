"""``coord run``: run any program as a registered instance.

The wrapper registers (its own pid holds the instance's lock, so if the wrapper is
SIGKILLed the instance is seen dead at once), exports ``COORD_DB`` and ``COORD_INSTANCE_ID``
to the program, tracks it as the instance's process, heartbeats for it, forwards SIGTERM,
SIGINT and SIGHUP to it, deregisters when it ends, and returns its exit status (128+N when
it was ended by signal N).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from .db import Store
from .errors import InvalidArgument
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
    try:
        env = dict(os.environ, COORD_DB=str(store.path), COORD_INSTANCE_ID=inst.id)
        from .processes import spawn

        proc = spawn(inst, list(argv), env=env, log=log, new_session=False)
        popen = proc.popen
        assert popen is not None
        previous = {}

        def forward(signum: int, frame: object) -> None:
            try:
                os.kill(popen.pid, signum)
            except ProcessLookupError:
                pass

        for s in FORWARDED:
            previous[s] = signal.signal(s, forward)
        try:
            while True:
                try:
                    code = popen.wait()
                    break
                except InterruptedError:
                    continue
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        proc.record_exit(code)
        return exit_status(code)
    except FileNotFoundError as e:
        raise InvalidArgument(f"command not found: {e.filename or argv[0]}") from None
    finally:
        inst.close()


