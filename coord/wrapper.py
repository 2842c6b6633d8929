"""The wrapper's side of a process tree: `coord run`, `coord elect` and `coord lock` own
their program's whole tree, as a systemd unit owns its control group.

- **Started without Python in the fork.** CMD starts from the main thread through the exec'd
  gate (``coord/_gate.py``): ``subprocess`` with ``process_group=0`` and no ``preexec_fn``
  runs only C code between fork and exec; the gate is a fresh interpreter
  (``sys.executable -I -S``) that sets the parent-death signal and waits on a pipe until the
  wrapper has recorded the group, then execs CMD (``Gated``, ``launch``).
- **Known.** The wrapper is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so a descendant
  that double-forks or calls ``setsid`` is reparented to it, not to init. Linux gives no
  notice of a fork, so a thread (``TreeWatch``) scans ``/proc`` every ``SCAN_EVERY`` seconds
  and records each descendant (pid, start token, process group) as a ``processes`` row of
  the instance with ``tree = 1``. The same thread reaps reparented zombies, each by its pid
  — never ``waitpid(-1)``, which could take CMD's status from the main thread.
- **Ended with CMD.** ``supervise`` waits on CMD's pidfd and a wake pipe (a forwarded
  signal, a lost lease); then ``TreeWatch.end`` ends what is left (``tree.end_tree``) before
  the wrapper exits with CMD's status. This runs in the main thread, never the heartbeat's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .clock import boot_id
from .db import Store
from .errors import CannotRun
from .identity import ProcIdentity, start_token
from .tree import Proc, cmdline_of, collect, end_tree, mark_ended, record, snapshot

if TYPE_CHECKING:
    from .instances import Instance

#: How often the wrapper looks for new descendants (the rule: at least every 100 ms).
SCAN_EVERY = 0.08

_PR_SET_CHILD_SUBREAPER = 36
GATE = Path(__file__).with_name("_gate.py")


def become_subreaper() -> None:
    """Make this process a child subreaper: orphaned descendants are reparented to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- the wrapper's side ------------------------------------------------------------------------


class Gated:
    """CMD started through the exec'd gate in its own process group, held at the gate until
    ``release()``: the caller records the group first."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str],
                 stdout: IO[bytes] | None = None) -> None:
        gate_r, gate_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-I", "-S", str(GATE), str(os.getpid()), str(gate_r), str(rep_w),
                 *argv],
                env=dict(env), process_group=0, pass_fds=(gate_r, rep_w), stdout=stdout,
                stderr=subprocess.STDOUT if stdout is not None else None,
            )
        except BaseException:
            for fd in (gate_r, gate_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(gate_r)
        os.close(rep_w)
        self.argv = list(argv)
        self.pid = self.popen.pid
        self.token = start_token(self.pid)
        self._gate: int | None = gate_w
        self._report: int | None = rep_r

    @property
    def identity(self) -> ProcIdentity:
        return ProcIdentity(boot_id(), self.pid, self.token or 0)

    def release(self) -> None:
        """Let CMD run; raise ``CannotRun`` when its exec failed."""
        assert self._gate is not None and self._report is not None
        try:
            os.write(self._gate, b"g")
        except BrokenPipeError:
            pass  # the gate already died (a signal): its status tells
        finally:
            os.close(self._gate)
            self._gate = None
        data = b""
        try:
            while chunk := os.read(self._report, 64):
                data += chunk
        finally:
            os.close(self._report)
            self._report = None
        if data:
            self.popen.wait()
            err = int(data)
            if err == errno.ENOENT:
                raise CannotRun(self.argv[0], "command not found")
            raise CannotRun(self.argv[0], os.strerror(err), not_found=False)

    def abandon(self) -> None:
        """Never let CMD run: the gate exits at the closed pipe."""
        for fd in (self._gate, self._report):
            if fd is not None:
                os.close(fd)
        self._gate = self._report = None
        self.popen.wait()


class TreeWatch:
    """While CMD runs: record every descendant of this wrapper, at least every
    ``SCAN_EVERY`` seconds, and reap reparented zombies (never CMD itself, which the caller
    waits for). ``end()`` stops watching and ends what is left of the tree."""

    def __init__(self, store: Store, owner: tuple[str, int], cmd: Gated, *, tree: bool,
                 user: str, labels: Mapping[str, Any] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.store, self.owner, self.cmd, self.tree = store, owner, cmd, tree
        self.user, self.labels, self.log = user, dict(labels or {}), log
        self.known: dict[int, tuple[int, int]] = {}  # pid -> (start token, row id)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"coord-tree-{owner[0]}")
        try:
            self.cwd = os.getcwd()
        except OSError:
            self.cwd = ""

    def start(self, cmd_row: int | None) -> None:
        if cmd_row is not None and self.cmd.token is not None:
            self.known[self.cmd.pid] = (self.cmd.token, cmd_row)
        self._thread.start()

    def reap_zombies(self, procs: Mapping[int, Proc] | None = None) -> None:
        """waitpid each zombie child of ours by pid, except CMD (its status is the caller's)."""
        procs = snapshot() if procs is None else procs
        me = os.getpid()
        for p in procs.values():
            if (p.ppid == me and p.state == "Z" and p.pid != self.cmd.pid
                    and p.token >= (self.cmd.token or 0)):  # an older child is not the tree's
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, os.WNOHANG)

    def scan(self) -> None:
        """One look: record newcomers, mark the departed, reap zombies."""
        with self._lock:
            procs = snapshot()
            self.reap_zombies(procs)
            tree = collect([self.cmd.identity], [self.cmd.identity], self.cmd.token, procs)
            live = {i.pid: procs[i.pid] for i in tree}
            new = [p for pid, p in live.items()
                   if pid not in self.known or self.known[pid][0] != p.token]
            gone = [(pid, row) for pid, (tok, row) in self.known.items()
                    if pid not in live or live[pid].token != tok]
            if not new and not gone:
                return
            ids = record(self.store, self.owner, [(p, cmdline_of(p.pid)) for p in new],
                         [row for _, row in gone], tree=self.tree, user=self.user, cwd=self.cwd,
                         labels=self.labels)
            for pid, _ in gone:
                self.known.pop(pid, None)
            for p, row in zip(new, ids, strict=True):
                self.known[p.pid] = (p.token, row)

    def _run(self) -> None:
        while not self._stop.wait(SCAN_EVERY):
            try:
                self.scan()
            except Exception as e:  # keep watching; the next look records what this missed
                if self.log is not None:
                    self.log(f"process tree scan failed: {e}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def end(self, grace: float) -> str:
        """Stop watching, end every remaining process of the tree (TERM, grace, KILL), reap
        the zombies and mark the rows exited. CMD itself is included while it runs."""
        self.stop()
        how = end_tree([self.cmd.identity], [self.cmd.identity], grace,
                       adopted_since=self.cmd.token, reap=self.reap_zombies)
        self.reap_zombies()
        with contextlib.suppress(Exception):
            mark_ended(self.store, self.owner)
        return how


# -- running CMD as the wrapper: start, supervise, end -----------------------------------------

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Forward:
    """Signals to the wrapper. Before CMD runs, the first one is remembered (CMD is then never
    started; ``on_early`` runs, e.g. to stop waiting for a lease). While CMD runs, SIGTERM
    asks for the end of the whole tree when ``whole_tree`` (the main loop does it: TERM to
    all, grace, KILL); otherwise, and for SIGINT and SIGHUP, the signal goes to CMD alone."""

    def __init__(self, *, whole_tree: bool, on_early: Callable[[], None] | None = None) -> None:
        self.whole_tree, self.on_early = whole_tree, on_early
        self.pid: int | None = None
        self.first: int | None = None
        self.end_requested = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: object) -> None:
        if self.pid is None:
            if self.first is None:
                self.first = signum
            if self.on_early is not None:
                self.on_early()
        elif signum == signal.SIGTERM and self.whole_tree:
            self.end_requested = True
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
        self.wake()

    def wake(self) -> None:
        w = self.wake_w
        if w >= 0:  # never after restore(): the number may name another file by then
            with contextlib.suppress(OSError):
                os.write(w, b"!")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.wake_r, 64):
                pass

    def install(self) -> None:
        """Take over the forwarded signals (main thread only; elsewhere: nothing)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self) for s in FORWARDED}

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        fds, self.wake_r, self.wake_w = (self.wake_r, self.wake_w), -1, -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def launch(store: Store, owner: tuple[str, int], argv: Sequence[str], env: Mapping[str, str],
           *, tree: bool, user: str, labels: Mapping[str, Any] | None = None,
           stdout: IO[bytes] | None = None, log_path: str | None = None,
           before_release: Callable[[Gated], None] | None = None,
           log: Callable[[str], None] | None = None) -> tuple[Gated, TreeWatch, int]:
    """Start CMD held at the gate, run ``before_release`` (record its group), record CMD as
    the instance's process, and return it with its (not yet started) ``TreeWatch`` and row
    id. The caller then calls ``cmd.release()`` and ``watch.start(row)``."""
    become_subreaper()
    cmd = Gated(argv, env, stdout)
    try:
        if cmd.token is None:
            from .errors import CoordError

            raise CoordError("the command's process vanished before it could start")
        if before_release is not None:
            before_release(cmd)
        me = Proc(cmd.pid, os.getpid(), cmd.pid, cmd.token, "S")
        watch = TreeWatch(store, owner, cmd, tree=tree, user=user, labels=labels, log=log)
        row = record(store, owner, [(me, list(argv))], [], tree=tree, user=user, cwd=watch.cwd,
                     labels=labels, log_path=log_path)[0]
    except BaseException:
        cmd.abandon()
        raise
    return cmd, watch, row


class Interrupted(Exception):
    """A forwarded signal came before CMD could run: it never ran (exit 128+N)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def release_and_wait(inst: Instance, cmd: Gated, watch: TreeWatch, row: int, fwd: Forward,
                     *, stop: Callable[[], bool] = lambda: False,
                     timeout: Callable[[], float] = lambda: 5.0) -> int | None:
    """Let CMD run (with the terminal's foreground, when we hold it) and watch its tree
    until ``supervise`` returns. Raises ``Interrupted`` when a signal came first (CMD never
    ran) and ``CannotRun`` when its exec failed; both are recorded as its end."""
    from .processes import record_exit

    with _foreground(cmd.pid):
        if fwd.first is not None:
            cmd.abandon()
            record_exit(inst, row, -fwd.first)
            raise Interrupted(fwd.first)
        fwd.pid = cmd.pid
        try:
            cmd.release()
        except CannotRun as e:
            record_exit(inst, row, 127 if e.not_found else 126)
            raise
        watch.start(row)
        return supervise(cmd, fwd, stop=stop, timeout=timeout)


def supervise(cmd: Gated, fwd: Forward, *, stop: Callable[[], bool] = lambda: False,
              timeout: Callable[[], float] = lambda: 5.0) -> int | None:
    """Wait until CMD exits (returns its returncode), or until the tree must end: SIGTERM
    to the wrapper, or ``stop()`` (lease lost) — then None. Waits on CMD's pidfd and the
    wake pipe with poll; ``timeout()`` bounds each wait (a renew deadline)."""
    import select

    pidfd = os.pidfd_open(cmd.pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(fwd.wake_r, select.POLLIN)
    try:
        while True:
            code = cmd.popen.poll()
            if code is not None:
                return code
            if fwd.end_requested or stop():
                return None
            poller.poll(max(1, int(timeout() * 1000) + 1))
            fwd.drain()
    finally:
        os.close(pidfd)


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
