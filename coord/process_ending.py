"""Ending a process or a process group: SIGTERM, a grace period, SIGKILL.

Ending (``coord.processes.stop``, ``kill_orphans``, and the leases' ``end_group``) is one
sequence: SIGTERM (and SIGCONT, so a stopped process sees it) to the process group, a grace
period, then SIGKILL to what is left. The identity is checked once, when a pidfd is opened
on the group leader; every later signal goes through that pidfd (with
``PIDFD_SIGNAL_PROCESS_GROUP`` for the group), so it reaches the very same process, or the
group that leader created, even after the leader itself has exited — never a newcomer that
inherited the number. Without pidfd support, each signal re-checks the leader's start token
first and a group is signalled only while its leader exists. coord never signals its own
process or its own process group.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Sequence

from .clock import boot_id
from .errors import InvalidArgument
from .identity import ProcIdentity, start_token, still_running

__all__ = ["DENIED", "GONE", "KILLED", "SURVIVED", "TERMINATED", "end_group", "end_many",
           "end_process"]

PIDFD_SIGNAL_PROCESS_GROUP = 4  # linux/pidfd.h, Linux 6.9+

# How an ending went (returned by end_group / end_process / stop):
GONE = "gone"  # it had already ended: nothing was signalled
TERMINATED = "terminated"  # it ended within the grace period after SIGTERM
KILLED = "killed"  # it was still there after the grace period and got SIGKILL
DENIED = "denied"  # the OS refused the signal (another user's process)
SURVIVED = "survived"  # something of it still runs after SIGKILL (stuck in the kernel, or
#                        left behind by a leader that exited, without pidfd to reach them)

# pidfd_open (Linux 5.3+): signals pinned to the very process; tests switch it off to cover
# the fallback.
_USE_PIDFD = hasattr(os, "pidfd_open")


class _Handle:
    """One process (or the group it leads) being ended, pinned by a pidfd when possible."""

    def __init__(self, ident: ProcIdentity, group: bool, fd: int | None) -> None:
        self.ident, self.group, self.fd = ident, group, fd
        self.group_flag_ok = True

    @classmethod
    def open(cls, ident: ProcIdentity, group: bool) -> _Handle | None:
        """A handle on the very process ``ident`` names (a zombie too: it may still lead
        live group members), or None when it is gone or the pid was reused."""
        if ident.boot_id != boot_id():
            return None
        fd: int | None = None
        if _USE_PIDFD:
            try:
                fd = os.pidfd_open(ident.pid)
            except ProcessLookupError:
                return None
            except OSError:
                fd = None  # no pidfd support: fall back to re-checking before each signal
        # Checked after opening: the pidfd names whichever process had the pid at open time.
        if start_token(ident.pid) != ident.start_token:
            if fd is not None:
                os.close(fd)
            return None
        return cls(ident, group, fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def signal(self, sig: int) -> bool:
        """Send ``sig``; False when there was nobody left to receive it."""
        if self.fd is not None and (self.group_flag_ok or not self.group):
            try:
                signal.pidfd_send_signal(self.fd, sig, None,
                                         PIDFD_SIGNAL_PROCESS_GROUP if self.group else 0)
                return True
            except ProcessLookupError:
                return False
            except OSError as e:
                if e.errno != errno.EINVAL or not self.group:
                    raise
                self.group_flag_ok = False  # kernel before 6.9: fall back below
        if start_token(self.ident.pid) != self.ident.start_token:
            return False  # the leader is gone: its group can no longer be named safely
        try:
            if self.group:
                os.killpg(self.ident.pid, sig)
            else:
                os.kill(self.ident.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def ended(self, live_groups: set[int]) -> bool:
        """Nothing of it still runs (zombies do not count)."""
        if not self.group:
            return not still_running(self.ident)
        if self.fd is not None and self.group_flag_ok:
            try:
                signal.pidfd_send_signal(self.fd, 0, None, PIDFD_SIGNAL_PROCESS_GROUP)
            except ProcessLookupError:
                return True
            except OSError:
                pass
        return self.ident.pid not in live_groups


def _live_groups() -> set[int]:
    """Process group ids that have at least one member that is not a zombie."""
    groups: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rindex(b")") + 2 :].split()
        if rest[0] not in (b"Z", b"X", b"x"):
            groups.add(int(rest[2]))
    return groups


def _ended(h: _Handle | None, live: set[int]) -> bool:
    return h is None or h.ended(live)


def _is_self(ident: ProcIdentity, group: bool) -> bool:
    """Would this signal reach the calling process itself?"""
    return ident.pid == os.getpid() or (group and ident.pid == os.getpgrp())


def end_many(targets: Sequence[tuple[ProcIdentity, bool]], grace: float) -> list[str]:
    """End each (identity, as_group) target: SIGTERM (+SIGCONT) to all at once, wait up to
    ``grace`` seconds, SIGKILL what is left. Returns how each one ended."""
    handles: list[_Handle | None] = []
    try:
        for ident, group in targets:
            handles.append(None if _is_self(ident, group) else _Handle.open(ident, group))
        how = [DENIED if _is_self(t[0], t[1]) else GONE if h is None else ""
               for t, h in zip(targets, handles, strict=True)]
        pending: set[int] = set()
        live = _live_groups()
        for i, h in enumerate(handles):
            if h is None:
                continue
            if h.ended(live):
                how[i] = GONE
                continue
            try:
                if h.signal(signal.SIGTERM):
                    h.signal(signal.SIGCONT)
                    pending.add(i)
                else:
                    how[i] = GONE
            except PermissionError:
                how[i] = DENIED
        deadline = time.monotonic() + max(0.0, grace)
        pause = 0.01
        while pending:
            live = _live_groups()
            for i in list(pending):
                h = handles[i]
                assert h is not None
                if h.ended(live):
                    how[i] = TERMINATED
                    pending.discard(i)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(pause, left))
            pause = min(pause * 1.5, 0.1)
        for i in pending:
            h = handles[i]
            assert h is not None
            try:
                h.signal(signal.SIGKILL)
            except PermissionError:
                how[i] = DENIED
                continue
            how[i] = KILLED
        # SIGKILL is not instant (exit work, a process in uninterruptible sleep): give it a
        # moment, bounded, so callers see it gone; what is still there has survived.
        killed = {i for i in pending if how[i] == KILLED}
        end = time.monotonic() + 2.0
        while killed:
            live = _live_groups()
            killed = {i for i in killed if not _ended(handles[i], live)}
            if not killed or time.monotonic() >= end:
                break
            time.sleep(0.01)
        for i in killed:
            how[i] = SURVIVED
        return how
    finally:
        for h in handles:
            if h is not None:
                h.close()


def end_group(pgid: int, leader: ProcIdentity, grace: float) -> str:
    """End the process group ``pgid`` that ``leader`` leads: SIGTERM to the group, up to
    ``grace`` seconds for it to empty, then SIGKILL.

    The leader's identity (boot id, pid, start token) is checked before the first signal;
    if it does not match (the leader is gone or its pid was reused), nothing is signalled.
    Later signals reach the same group even after the leader has exited (pidfd, Linux 6.9+;
    older kernels: only while the leader still exists). Returns 'gone' (nothing to do),
    'terminated' (ended within the grace period), 'killed' (needed SIGKILL), 'survived'
    (something of the group still runs after SIGKILL: the group is NOT empty) or 'denied'
    (the system refused the signal).
    """
    if pgid != leader.pid:
        raise InvalidArgument(f"process group {pgid} is not led by pid {leader.pid}")
    if _is_self(leader, True):
        raise InvalidArgument(f"refusing to signal coord's own process group ({pgid})")
    return end_many([(leader, True)], grace)[0]


def end_process(ident: ProcIdentity, grace: float) -> str:
    """Like ``end_group``, for one process alone (not its group)."""
    if _is_self(ident, False):
        raise InvalidArgument(f"refusing to signal coord's own process ({ident.pid})")
    return end_many([(ident, False)], grace)[0]
