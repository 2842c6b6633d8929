"""Process trees: what a wrapper's CMD left running, found, ended, and after the wrapper's
death ended by the death rule.

A `coord run`/`elect`/`lock` wrapper (``coord.wrapper``) records every descendant of its CMD
as a ``processes`` row of its instance with ``tree = 1``. This module holds what works on
such a tree, from any process:

- **Found.** ``snapshot`` reads ``/proc`` once; ``collect`` gives the live processes of a
  tree: recorded members whose start token still matches, the live members of each recorded
  process group (named by its leader's identity: a group whose leader's pid now names
  another process was empty before that pid could be reused), and every descendant of them.
- **Ended together.** ``end_tree``: SIGTERM (and SIGCONT) to all, up to ``grace`` seconds
  while newcomers get the same, then SIGKILL to what is left. Every process is pinned by a
  pidfd opened while its start token still matches, so a reused pid is never signalled.
- **After the wrapper's death.** ``end_dead_trees`` applies the tree part of the death rule:
  the running ``tree = 1`` rows of dead instances and the groups recorded in lease rows for a
  dead instance (or one whose term is over) are ended, with every descendant of theirs and
  every process that carries one of its terms as ``COORD_LEASE_TERM`` (``escaped``: one
  that daemonized just before the wrapper died, unrecorded); a lease row keeps its recorded
  group until it is proven empty. Whoever proves a death runs it: the next candidate
  (``leases``), the elected reaper (``coord.deathwatch``) and ``coord reap``.

Processes tracked with ``track()``/``spawn()`` (``tree = 0``) keep the old rule: listed as
orphans until they end or are killed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .backend import LeaseRecord
from .clock import boot_id
from .config import KILL_WAIT
from .db import Store
from .identity import DEAD_STATES, ProcIdentity, start_token, still_running

# How an ending went.
GONE, TERMINATED, KILLED, SURVIVED, DENIED = "gone", "terminated", "killed", "survived", "denied"


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
    signalled = False  # something ran and was signalled (it may die before the next look)

    def sweep(sigs: Sequence[int], *, all_: bool) -> int:
        """Signal every live process of the tree that has not had ``sigs`` yet (``all_``:
        every one); return how many are live."""
        nonlocal denied, signalled
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
                        if _send(fd, sig) and sig != signal.SIGCONT:
                            signalled = True
                    except PermissionError:
                        denied = True
        return sum(1 for i in live if still_running(i))

    try:
        if not sweep((signal.SIGTERM, signal.SIGCONT), all_=True):
            # Nothing left: either nothing ran, or the TERM ended it before the count.
            return DENIED if denied else TERMINATED if signalled else GONE
        deadline = time.monotonic() + max(0.0, grace)
        pause = 0.005
        while time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, 0.05)
            if not sweep((signal.SIGTERM, signal.SIGCONT), all_=False):
                return DENIED if denied else TERMINATED
        end = time.monotonic() + KILL_WAIT  # SIGKILL is not instant: bounded, then 'survived'
        while sweep((signal.SIGKILL,), all_=True):
            if time.monotonic() >= end:
                return DENIED if denied else SURVIVED
            time.sleep(0.01)
        return DENIED if denied else KILLED
    finally:
        for fd in pinned.values():
            os.close(fd)


# -- recording ---------------------------------------------------------------------------------


def cmdline_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def record(store: Store, owner: tuple[str, int], new: Sequence[tuple[Proc, Sequence[str]]],
           gone: Sequence[int], *, tree: bool, user: str, cwd: str,
           labels: Mapping[str, Any] | None = None, log_path: str | None = None) -> list[int]:
    """One transaction: insert a row for each new descendant (with its command line), mark
    the rows ``gone`` exited; returns the new rows' ids. ``log_path``: where CMD's output
    goes (`coord run --log`)."""
    lab = json.dumps(dict(labels or {}), sort_keys=True)
    boot = boot_id()

    rows = [(*owner, p.pid, p.token, boot, p.pgid,
             os.path.basename(cmd[0]) if cmd else str(p.pid), json.dumps(list(cmd)), cwd, user,
             lab, int(tree), log_path) for p, cmd in new]
    return store.backend.trees.record(rows, gone)


def mark_ended(store: Store, owner: tuple[str, int]) -> int:
    """Mark exited every running tree row of ``owner`` whose process no longer runs."""
    gone = [r["id"] for r in store.backend.trees.members(owner)
            if not still_running(ProcIdentity(r["boot_id"], r["pid"], r["start_token"]))]
    if gone:
        store.backend.trees.mark_exited(gone)
    return len(gone)


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
    trees, leases = store.backend.trees, store.backend.leases
    return _tree(owner, trees.members(owner), leases.recorded_groups(owner),
                 leases.terms_of(owner))


def left_of(t: DeadTree, procs: Mapping[int, Proc] | None = None) -> list[ProcIdentity]:
    """What of ``t`` still runs: its members, its groups, what escaped, their descendants."""
    procs = snapshot() if procs is None else procs
    return collect([*t.members, *escaped(t, procs)], t.groups, procs=procs)


def _tree(owner: tuple[str, int], rows: Sequence[Mapping[str, Any]],
          leases: Sequence[LeaseRecord], terms: tuple[int, ...] = ()) -> DeadTree:
    boot = boot_id()
    members = tuple(ProcIdentity(r["boot_id"], r["pid"], r["start_token"]) for r in rows)
    groups = [m for m, r in zip(members, rows, strict=True) if r["pgid"] == r["pid"]]
    groups += [ProcIdentity(boot, int(r.pgid), int(r.pg_start_token)) for r in leases
               if r.pgid is not None and r.pg_start_token is not None]
    return DeadTree(owner, tuple(r["id"] for r in rows), members, tuple(dict.fromkeys(groups)),
                    tuple((r.name, int(r.pgid), int(r.pg_start_token or 0))
                          for r in leases if r.pgid is not None), terms)


def dead_trees(store: Store, only: Iterable[tuple[str, int]] | None = None, *,
               lapsed: bool = False) -> list[DeadTree]:
    """The recorded trees whose instance is dead: a tombstone, gone, an older incarnation,
    or judged dead (proof of death or an expired heartbeat) and not yet buried. ``lapsed``:
    also the trees of `coord elect`/`lock` wrappers that still live but whose term is over
    (the lease expired or moved on: a wrapper SIGSTOPped past its TTL cannot end its tree
    itself, and its CMD must not run without the lease)."""
    rows = store.backend.trees.members()
    leases = store.backend.leases.recorded_groups()
    owners = {(r["instance_id"], r["incarnation"]) for r in rows}
    owners |= {r.pg_holder for r in leases if r.pg_holder is not None}
    if only is not None:
        owners &= set(only)
    liveness = store.backend.liveness
    look = liveness.look()
    over = {r.pg_holder for r in leases
            if r.holder != r.pg_holder or r.expires_in is None or r.expires_in < 0
            } if lapsed else set()
    out = []
    for owner in sorted(owners):
        inst = store.backend.instances.by_id(owner[0])
        if (owner not in over and inst is not None and inst["incarnation"] == owner[1]
                and liveness.judge(inst, look)[0]):
            continue
        out.append(_tree(owner,
                         [r for r in rows if (r["instance_id"], r["incarnation"]) == owner],
                         [r for r in leases if r.pg_holder == owner],
                         store.backend.leases.terms_of(owner)))
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
            store.backend.leases.clear_groups(t.leases)
    return how


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
