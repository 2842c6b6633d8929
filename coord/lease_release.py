"""An operator's release of a lease (``coord lease release``), and the ending of a term's
process tree that it shares with a new holder's takeover (``coord.leases``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from .backend import Member
from .clock import boot_id
from .db import Store
from .errors import CoordError, NotFound
from .identity import ProcIdentity
from .lease_rules import release, validate_name
from .reaper import bury_dead


def end_tree(store: Store, group: tuple[int, int] | None, tree: Member | None,
             grace: float | None) -> tuple[str, bool]:
    """End a term's whole tree: the recorded process group and every recorded descendant
    of the instance that ran it (identity checked: TERM, grace, KILL). Returns how it went
    and whether anything of it still runs."""
    from dataclasses import replace

    from .tree import DeadTree, left_of, settle, tree_of

    found = tree_of(store, tree) if tree is not None else DeadTree(("", 0), (), (), (), ())
    groups = list(found.groups)
    if group is not None:
        groups.append(ProcIdentity(boot_id(), *group))
    todo = replace(found, groups=tuple(dict.fromkeys(groups)))
    g = store.config.kill_grace if grace is None else grace
    outcome = settle(store, [todo], g)
    return outcome, bool(left_of(todo))


@dataclass(frozen=True)
class Released:
    """What ``release_by_operator`` did. ``holder_state``: 'free' (nobody held it), the
    holder's death verdict ('died', 'hung', 'gone', ...), 'stopped' (its process is
    stopped), 'expired' (alive but past its TTL), or 'alive' (released with ``force``)."""

    name: str
    term: int | None  # the term released (None when it was free)
    holder: str | None
    holder_incarnation: int | None
    holder_state: str
    released: bool
    processes: str  # how the holder's recorded tree was ended ('gone': nothing ran)
    by: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.name, "name": self.name, "term": self.term, "holder": self.holder,
                "instance_id": self.holder, "holder_incarnation": self.holder_incarnation,
                "holder_state": self.holder_state, "released": self.released,
                "processes": self.processes, "by": self.by}


def release_by_operator(store: Store, name: str, *, by: str, force: bool = False,
                        grace: float | None = None) -> Released:
    """Free lease ``name`` for an operator whose holder is dead or hung, as a new holder
    would take it over: end the holder's recorded process tree first (TERM, ``grace``,
    KILL; a live holder released with ``force`` loses its term first), then free the lease (its 'lease released' event names ``by``), apply the death
    rule to a holder proven dead, and wake the waiting candidates; the next holder takes a
    higher term. ``NotFound`` when no lease of that name was ever taken; ``CoordError``
    when the holder is alive and renewing (unless ``force``), or its tree could not be
    ended (the lease is then kept)."""
    from .identity import proc_state

    validate_name(name)
    backend = store.backend
    rec = backend.leases.get(name)
    if rec is None:
        raise NotFound("lease", name)
    state, row = "free", None
    if rec.holder is not None:
        row = backend.instances.get(rec.holder)
        alive, verdict = backend.liveness.judge(row) if row is not None else (False, "gone")
        pid = backend.liveness.watchable_pid(row) if row is not None and alive else None
        if not alive:
            state = verdict
        elif pid is not None and proc_state(pid) in ("T", "t"):
            state = "stopped"
        elif rec.expires_in is None or rec.expires_in < 0:
            state = "expired"
        elif not force:
            raise CoordError(
                f"lease {name!r} is held by {rec.holder[0]} (pid {row['pid'] if row else '?'}, "
                f"term {rec.term}), which is alive and renewing it: use --force to release "
                "it anyway")
        else:
            state = "alive"
    group = (rec.pgid, rec.pg_start_token) if rec.pgid is not None and \
        rec.pg_start_token is not None else None
    freed = False

    def free() -> bool:
        if rec.holder is None or rec.term is None:
            return False
        return release(store, name, rec.term, rec.holder, "released by operator", by=by)

    if state == "alive":
        # A live holder would release the lease itself once its CMD ends: end its term
        # first (it can renew no more), then its tree — before anyone else runs under the
        # lease, as a waiting candidate that takes it ends that tree first too.
        freed = free()
    how = "gone"
    if group is not None or rec.pg_holder is not None:
        how, left = end_tree(store, group, rec.pg_holder, grace)
        if left and state != "alive":
            raise CoordError(f"processes of the holder of lease {name!r} could not be ended "
                             f"({how}); the lease is kept")
    if state != "alive":
        freed = free()
        if freed and row is not None and state not in ("stopped", "expired"):
            with contextlib.suppress(CoordError):  # the reaper will do it otherwise
                bury_dead(store, [row], state)
    holder = rec.holder or (None, None)
    return Released(name, rec.term if rec.holder else None, holder[0], holder[1], state,
                    freed, how, by)
