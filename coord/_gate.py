"""The exec'd gate between a wrapper (`coord run`, `coord elect`, `coord lock`) and CMD.

The wrapper is a threaded process (heartbeat, lease keeper), so no Python may run in its
forked copy between fork and exec. It therefore starts this file as a fresh interpreter
(``sys.executable -I -S coord/_gate.py``) through ``subprocess`` with ``process_group=0`` and
no ``preexec_fn``: the group is made by C code in the child, and the first Python to run is
this new interpreter, which shares nothing with the wrapper. The gate then:

1. sets the parent-death signal (SIGKILL): it, and CMD after exec, die with the wrapper;
2. exits at once if the wrapper already died (the parent is no longer the one named);
3. waits on a pipe until the wrapper has recorded the group in the database (one byte
   ``g``; EOF or anything else means "never run": it exits 127 without running CMD);
4. execs CMD with the environment it was given; when exec fails it writes the errno to the
   report pipe and exits 127 (not found) or 126 (not executable), as shells do.

Usage (by coord only): ``_gate.py PARENT_PID GATE_FD REPORT_FD CMD [ARG ...]``.

It imports nothing from coord (``-S`` leaves site-packages out of the path) and only the
standard library's ``ctypes``, ``errno`` and ``os``.
"""

import ctypes
import errno
import os
import sys

_PR_SET_PDEATHSIG = 1
_SIGKILL = 9


def main(argv: list[str]) -> int:
    parent, gate, report = int(argv[1]), int(argv[2]), int(argv[3])
    cmd = argv[4:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 127  # the wrapper died before the death signal was set
    try:
        go = os.read(gate, 1)
    except OSError:
        go = b""
    os.close(gate)
    if go != b"g":
        return 127  # the wrapper gave up, or died: never run
    os.set_inheritable(report, False)  # closed by a successful exec: the wrapper reads EOF
    try:
        os.execvpe(cmd[0], cmd, os.environ)
    except OSError as e:
        try:
            os.write(report, str(e.errno or errno.ENOEXEC).encode())
        except OSError:
            pass
        return 127 if e.errno == errno.ENOENT else 126
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv))
