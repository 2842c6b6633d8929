"""Process trees: a wrapper's CMD and every descendant live and die with its instance.

`coord run`, `coord elect` and `coord lock` own their program's whole tree, as a systemd unit
owns its control group:

- **Started without Python in the fork.** CMD starts through the exec'd gate
  (``coord/_gate.py``): ``subprocess`` with ``process_group=0`` and no ``preexec_fn`` runs only
  C code between fork and exec, the gate is a fresh interpreter that sets the parent-death
  signal and waits on a pipe until the wrapper has recorded the group, then execs CMD.
- **Known.** The wrapper is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so a descendant
  that double-forks or calls ``setsid`` is reparented to it, not to init. Linux gives no notice
  of a fork, so a thread scans ``/proc`` every ``SCAN_EVERY`` seconds and records each
  descendant (pid, start token, process group) as a ``processes`` row of the instance with
  ``tree = 1``. The same thread reaps reparented zombies, each by its pid — never
  ``waitpid(-1)``, which could take CMD's status from the main thread.
- **Ended together.** ``end_tree`` ends a set of processes, the recorded process groups and
  every descendant of them found in ``/proc``: SIGTERM (and SIGCONT) to all, up to ``grace``
  seconds while newcomers get the same, then SIGKILL to what is left. Every process is pinned
  by a pidfd opened while its start token still matches, so a reused pid is never signalled.
- **After the wrapper's death.** ``end_dead_trees`` applies the tree part of the death rule:
  the running ``tree = 1`` rows of dead instances and the groups recorded in lease rows for a
  dead instance are ended, with every descendant of theirs and every process that carries
  one of the dead instance's terms as ``COORD_LEASE_TERM`` (``escaped``: one that daemonized
  just before the wrapper died, unrecorded); a lease row keeps its recorded group until it
  is proven empty.
  Whoever proves a death runs it: the next candidate (``leases``), the elected reaper
  (``coord.deathwatch``) and ``coord reap``.

Processes tracked with ``track()``/``spawn()`` (``tree = 0``) keep the old rule: listed as
orphans until they end or are killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .clock import boot_id
from .db import Store
from .errors import CannotRun
from .identity import DEAD_STATES, ProcIdentity, start_token, still_running

if TYPE_CHECKING:
    from .instances import Instance

#: How often the wrapper looks for new descendants (the rule: at least every 100 ms).
SCAN_EVERY = 0.08

_PR_SET_CHILD_SUBREAPER = 36
GATE = Path(__file__).with_name("_gate.py")

# How an ending went.
GONE, TERMINATED, KILLED, SURVIVED, DENIED = "gone", "terminated", "killed", "survived", "denied"


def become_subreaper() -> None:
    """Make this process a child subreaper: orphaned descendants are reparented to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- reading /proc -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    token: int
    state: str

    @property
    def live(self) -> bool:
        return self.state not in DEAD_STATES


def snapshot() -> dict[int, Proc]:
    """Every process in /proc now (one read of each stat file)."""
    out: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            raw = os.read(fd, 4096)
        except OSError:
            continue
        finally:
            os.close(fd)
        try:
            rest = raw[raw.rindex(b")") + 2 :].split()
            out[int(name)] = Proc(int(name), int(rest[1]), int(rest[2]), int(rest[19]),
                                  rest[0].decode())
        except (ValueError, IndexError):
            continue
    return out


def descendants(procs: Mapping[int, Proc], roots: Iterable[int]) -> dict[int, Proc]:
    """The processes below ``roots`` (by parent pid), zombies included, roots excluded."""
    children: dict[int, list[Proc]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p)
    out: dict[int, Proc] = {}
    todo = list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c.pid not in out:
                out[c.pid] = c
                todo.append(c.pid)
    return out


def _group_members(procs: Mapping[int, Proc], leader: ProcIdentity) -> list[Proc]:
    """Live members of the group ``leader`` made. Nothing when the leader's pid now names
    another process: the group it made was empty before that pid could be reused."""
    if leader.boot_id != boot_id():
        return []
    now = procs.get(leader.pid)
    if now is not None and now.token != leader.start_token:
        return []
    return [p for p in procs.values() if p.pgid == leader.pid and p.live
            and p.token >= leader.start_token]


def collect(members: Iterable[ProcIdentity], groups: Iterable[ProcIdentity],
            adopted_since: int | None = None,
            procs: Mapping[int, Proc] | None = None) -> list[ProcIdentity]:
    """The live processes of a tree: ``members`` whose start token still matches, the live
    members of each recorded group (named by its leader's identity), and the descendants of
    all of these. With ``adopted_since`` (a wrapper's CMD's start token), also the calling
    process's own children that started no earlier — CMD and the orphans of its tree that
    were reparented to this subreaper — and their descendants; an older child of the caller
    is not CMD's."""
    procs = snapshot() if procs is None else procs
    boot, me = boot_id(), os.getpid()
    found: dict[int, Proc] = {}
    for m in members:
        p = procs.get(m.pid)
        if m.boot_id == boot and p is not None and p.token == m.start_token:
            found[p.pid] = p
    for g in groups:
        for p in _group_members(procs, g):
            found[p.pid] = p
    if adopted_since is not None:
        found.update((p.pid, p) for p in procs.values()
                     if p.ppid == me and p.token >= adopted_since)
    found.update(descendants(procs, list(found)))
    return [ProcIdentity(boot, p.pid, p.token) for p in found.values()
            if p.live and p.pid != me]


# -- ending ------------------------------------------------------------------------------------


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


def _send(fd: int, sig: int) -> bool:
    """Signal the pinned process; False when it has already ended (PermissionError passes)."""
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False


def end_tree(members: Iterable[ProcIdentity], groups: Iterable[ProcIdentity], grace: float,
             *, adopted_since: int | None = None,
             reap: Callable[[], object] | None = None) -> str:
    """End a process tree: ``members``, the groups their leaders' identities name, and every
    descendant of these (for a wrapper, also what ``collect``'s ``adopted_since`` adds).
    SIGTERM and SIGCONT to all at once; for up to ``grace`` seconds, whatever appears
    meanwhile gets the same; then SIGKILL to what is left, repeated until the tree is empty
    (bounded).

    Returns 'gone' (nothing ran), 'terminated', 'killed', 'survived' (something still runs)
    or 'denied' (the system refused a signal). ``reap`` runs between looks (the wrapper reaps
    its zombies there). Never signals the calling process.
    """
    members, groups = list(members), list(groups)
    pinned: dict[ProcIdentity, int] = {}
    denied = False

    def sweep(sigs: Sequence[int], *, all_: bool) -> int:
        """Signal every live process of the tree that has not had ``sigs`` yet (``all_``:
        every one); return how many are live."""
        nonlocal denied
        if reap is not None:
            reap()
        live = collect([*members, *pinned], groups, adopted_since)
        for ident in live:
            fd = pinned.get(ident)
            fresh = fd is None
            if fd is None:
                fd = _pin(ident)
                if fd is None:
                    continue
                pinned[ident] = fd
            if fresh or all_:
                for sig in sigs:
                    try:
                        _send(fd, sig)
                    except PermissionError:
                        denied = True
        return sum(1 for i in live if still_running(i))

    try:
        if not sweep((signal.SIGTERM, signal.SIGCONT), all_=True):
            return DENIED if denied else GONE
        deadline = time.monotonic() + max(0.0, grace)
        pause = 0.005
        while time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, 0.05)
            if not sweep((signal.SIGTERM, signal.SIGCONT), all_=False):
                return DENIED if denied else TERMINATED
        end = time.monotonic() + 2.0  # SIGKILL is not instant: bounded, then 'survived'
        while sweep((signal.SIGKILL,), all_=True):
            if time.monotonic() >= end:
                return DENIED if denied else SURVIVED
            time.sleep(0.01)
        return DENIED if denied else KILLED
    finally:
        for fd in pinned.values():
            os.close(fd)


# -- recording ---------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


_INSERT = ("INSERT INTO processes (instance_id, incarnation, pid, start_token, boot_id, pgid, "
           "name, cmdline, cwd, user, labels, started_at, tree, log_path) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id")


def record(store: Store, owner: tuple[str, int], new: Sequence[tuple[Proc, Sequence[str]]],
           gone: Sequence[int], *, tree: bool, user: str, cwd: str,
           labels: Mapping[str, Any] | None = None, log_path: str | None = None) -> list[int]:
    """One transaction: insert a row for each new descendant (with its command line), mark
    the rows ``gone`` exited; returns the new rows' ids. ``log_path``: where CMD's output
    goes (`coord run --log`)."""
    lab = json.dumps(dict(labels or {}), sort_keys=True)
    boot = boot_id()

    def txn(c: Any) -> list[int]:
        wall = store.wall()
        ids = []
        for p, cmd in new:
            name = os.path.basename(cmd[0]) if cmd else str(p.pid)
            ids.append(int(c.execute(_INSERT, (
                *owner, p.pid, p.token, boot, p.pgid, name, json.dumps(list(cmd)), cwd, user, lab,
                wall, int(tree), log_path)).fetchall()[0][0]))
        if gone:
            c.execute("UPDATE processes SET status = 'exited', ended_at = coalesce(ended_at, ?) "
                      "WHERE status = 'running' AND id IN (SELECT value FROM json_each(?))",
                      (wall, json.dumps(list(gone))))
        return ids

    return store.write(txn)


def mark_ended(store: Store, owner: tuple[str, int]) -> int:
    """Mark exited every running tree row of ``owner`` whose process no longer runs."""
    rows = store.rows("SELECT id, pid, start_token, boot_id FROM processes WHERE instance_id = ? "
                      "AND incarnation = ? AND tree = 1 AND status = 'running'", owner)
    gone = [r["id"] for r in rows
            if not still_running(ProcIdentity(r["boot_id"], r["pid"], r["start_token"]))]
    if gone:
        store.write(lambda c: c.execute(
            "UPDATE processes SET status = 'exited', ended_at = coalesce(ended_at, ?) "
            "WHERE status = 'running' AND id IN (SELECT value FROM json_each(?))",
            (store.wall(), json.dumps(gone))))
    return len(gone)


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
            ids = record(self.store, self.owner, [(p, _cmdline(p.pid)) for p in new],
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


# -- the death rule's part -------------------------------------------------------------------


@dataclass(frozen=True)
class DeadTree:
    """What is left of a dead instance's tree: its running tree rows and recorded groups."""

    owner: tuple[str, int]
    rows: tuple[int, ...]  # processes.id
    members: tuple[ProcIdentity, ...]
    groups: tuple[ProcIdentity, ...]
    leases: tuple[tuple[str, int, int], ...]  # (lease name, pgid, pg_start_token)
    terms: tuple[int, ...] = ()  # lease terms the owner held: its CMD saw COORD_LEASE_TERM


def escaped(t: DeadTree, procs: Mapping[int, Proc]) -> list[ProcIdentity]:
    """Live processes of ``t`` that left no trace but their environment: they carry one of
    its terms as ``COORD_LEASE_TERM`` (terms are never reused; a nested `coord elect`
    exports its own) and started no earlier than its first recorded member. This finds a
    descendant that daemonized in the moment before the wrapper was SIGKILLed, before the
    wrapper could record it."""
    if not t.terms:
        return []
    since = min((m.start_token for m in t.members), default=0)
    needles = [f"\0COORD_LEASE_TERM={term}\0".encode() for term in t.terms]
    me, boot, out = os.getpid(), boot_id(), []
    for p in procs.values():
        if not p.live or p.token < since or p.pid == me:
            continue
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                env = b"\0" + f.read() + b"\0"
        except OSError:
            continue
        if any(n in env for n in needles):
            out.append(ProcIdentity(boot, p.pid, p.token))
    return out


def tree_of(store: Store, owner: tuple[str, int]) -> DeadTree:
    """The recorded tree of ``owner`` (id, incarnation), whatever its liveness."""
    rows = store.rows("SELECT id, pid, pgid, start_token, boot_id FROM processes WHERE "
                      "instance_id = ? AND incarnation = ? AND tree = 1 AND status = 'running'",
                      owner)
    leases = store.rows("SELECT name, pgid, pg_start_token FROM leases WHERE pg_holder_id = ? "
                        "AND pg_holder_incarnation = ? AND pgid IS NOT NULL", owner)
    return _tree(owner, rows, leases, _terms(store, owner))


def left_of(t: DeadTree, procs: Mapping[int, Proc] | None = None) -> list[ProcIdentity]:
    """What of ``t`` still runs: its members, its groups, what escaped, their descendants."""
    procs = snapshot() if procs is None else procs
    return collect([*t.members, *escaped(t, procs)], t.groups, procs=procs)


def _terms(store: Store, owner: tuple[str, int]) -> tuple[int, ...]:
    return tuple(int(r["term"]) for r in store.rows(
        "SELECT term FROM lease_terms WHERE holder_id = ? AND holder_incarnation = ?", owner))


def _tree(owner: tuple[str, int], rows: Sequence[Mapping[str, Any]],
          leases: Sequence[Mapping[str, Any]], terms: tuple[int, ...] = ()) -> DeadTree:
    boot = boot_id()
    members = tuple(ProcIdentity(r["boot_id"], r["pid"], r["start_token"]) for r in rows)
    groups = [m for m, r in zip(members, rows, strict=True) if r["pgid"] == r["pid"]]
    groups += [ProcIdentity(boot, int(r["pgid"]), int(r["pg_start_token"])) for r in leases
               if r["pg_start_token"] is not None]
    return DeadTree(owner, tuple(r["id"] for r in rows), members, tuple(dict.fromkeys(groups)),
                    tuple((r["name"], int(r["pgid"]), int(r["pg_start_token"] or 0))
                          for r in leases), terms)


def dead_trees(store: Store, only: Iterable[tuple[str, int]] | None = None, *,
               lapsed: bool = False) -> list[DeadTree]:
    """The recorded trees whose instance is dead: a tombstone, gone, an older incarnation,
    or judged dead (proof of death or an expired heartbeat) and not yet buried. ``lapsed``:
    also the trees of `coord elect`/`lock` wrappers that still live but whose term is over
    (the lease expired or moved on: a wrapper SIGSTOPped past its TTL cannot end its tree
    itself, and its CMD must not run without the lease)."""
    from .instances import Probe, judge

    rows = store.rows("SELECT id, instance_id, incarnation, pid, pgid, start_token, boot_id "
                      "FROM processes WHERE tree = 1 AND status = 'running'")
    leases = store.rows("SELECT name, pgid, pg_start_token, pg_holder_id, pg_holder_incarnation, "
                        "holder_id, holder_incarnation, expires_mono FROM leases "
                        "WHERE pgid IS NOT NULL AND pg_holder_id IS NOT NULL")
    owners = {(r["instance_id"], r["incarnation"]) for r in rows}
    owners |= {(r["pg_holder_id"], r["pg_holder_incarnation"]) for r in leases}
    if only is not None:
        owners &= set(only)
    now, probe = store.mono(), Probe()
    over = {(r["pg_holder_id"], r["pg_holder_incarnation"]) for r in leases
            if (r["holder_id"], r["holder_incarnation"]) != (r["pg_holder_id"],
                                                             r["pg_holder_incarnation"])
            or r["expires_mono"] is None or r["expires_mono"] < now} if lapsed else set()
    out = []
    for owner in sorted(owners):
        inst = store.row("SELECT * FROM instances WHERE id = ?", (owner[0],))
        if (owner not in over and inst is not None and inst["incarnation"] == owner[1]
                and judge(store, inst, now, probe=probe)[0]):
            continue
        out.append(_tree(owner,
                         [r for r in rows if (r["instance_id"], r["incarnation"]) == owner],
                         [r for r in leases
                          if (r["pg_holder_id"], r["pg_holder_incarnation"]) == owner],
                         _terms(store, owner)))
    return out


def settle(store: Store, trees: Sequence[DeadTree], grace: float) -> str:
    """End these recorded trees together, then mark their rows exited and clear each lease's
    recorded group once it is proven empty. Returns how the ending went ('survived' or
    'denied' when something is left: the rows and groups stay recorded)."""
    if not trees:
        return GONE
    procs = snapshot()
    extra = [i for t in trees for i in escaped(t, procs)]
    how = end_tree([*extra, *(m for t in trees for m in t.members)],
                   [g for t in trees for g in t.groups], grace)
    for t in trees:
        mark_ended(store, t.owner)
        if t.leases and not left_of(t):
            store.write(functools.partial(_clear_groups, t=t))
    return how


def _clear_groups(c: Any, t: DeadTree) -> None:
    """Clear each lease's recorded group of ``t`` (proven empty), unless recorded anew."""
    for name, pgid, token in t.leases:
        c.execute("UPDATE leases SET pgid = NULL, pg_start_token = NULL, pg_holder_id = NULL, "
                  "pg_holder_incarnation = NULL WHERE name = ? AND pgid = ? AND pg_start_token = ?",
                  (name, pgid, token))


def end_dead_trees(store: Store, *, grace: float | None = None,
                   only: Iterable[tuple[str, int]] | None = None) -> list[dict[str, Any]]:
    """The tree part of the death rule: end every recorded tree of a dead instance, and of
    a wrapper whose term is over (or of those in ``only``). Returns one dict per tree:
    instance_id, incarnation, processes, how."""
    trees = [t for t in dead_trees(store, only, lapsed=True) if t.members or t.groups]
    if not trees:
        return []
    grace = store.config.kill_grace if grace is None else grace
    how = settle(store, trees, grace)
    return [{"instance_id": t.owner[0], "incarnation": t.owner[1],
             "processes": len(t.members), "how": how} for t in trees]


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
