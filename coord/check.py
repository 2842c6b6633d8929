"""The invariant checker: what must be true of a coord database at any moment.

``check(store)`` returns a list of ``Problem``; empty means healthy. ``strict`` also counts
things that are legitimately pending (a holder that died a moment ago and is not yet buried),
which stress tests use after a final ``reap()``. ``coord doctor`` runs it.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any

from .db import Store


@dataclass(frozen=True)
class Problem:
    check: str
    detail: str
    pending: bool = False  # awaiting the reaper, not a broken invariant

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check(store: Store, *, strict: bool = False, integrity: bool = True) -> list[Problem]:
    """Run every invariant check; see the module docstring."""
    out: list[Problem] = []
    add = out.append
    checks = store.backend.checks
    out += [Problem(name, p.detail, p.pending) for name, p in checks.storage(integrity=integrity)]

    liveness = store.backend.liveness
    instances = {r["id"]: r for r in store.backend.instances.list()}
    look = liveness.look()
    verdicts = {i: liveness.judge(r, look) for i, r in instances.items()}

    for what, id, inc in checks.holdings():
        row = instances.get(id)
        if row is None or row["incarnation"] != inc or row["status"] == "dead":
            add(Problem("dead holders", f"{what} held by {id}#{inc}, which is not registered"))
        elif not verdicts[id][0]:
            add(Problem("dead holders", f"{what} held by {id}#{inc}, {verdicts[id][1]}", pending=True))
    out += [Problem(name, p.detail, p.pending) for name, p in checks.problems()]
    # A `coord elect` group whose holder is gone keeps running until the next holder ends it.
    from .elect import group_members

    for name, pgid in checks.free_groups():
        if group_members(pgid):
            add(Problem("leases", f"lease {name!r} is free but process group {pgid} of "
                                  "its last holder still runs", pending=True))
    from .processes import problems as process_problems

    for detail, pending in process_problems(store, instances):
        add(Problem("processes", detail, pending=pending))
    from .kv import problems as kv_problems
    from .message_checks import problems as message_problems

    for detail, pending in message_problems(store, instances, verdicts):
        add(Problem("messages", detail, pending=pending))
    for detail, pending in kv_problems(store):
        add(Problem("kv", detail, pending=pending))
    from .queues import problems as queue_problems

    for detail, pending in queue_problems(store):
        add(Problem("queues", detail, pending=pending))
    from .instances import problems as instance_problems

    for detail, pending in instance_problems(store, instances, verdicts):
        add(Problem("instances", detail, pending=pending))
    return [p for p in out if strict or not p.pending]


def doctor(store: Store) -> dict[str, Any]:
    """Health report: integrity, invariants, permissions, journal mode, sizes, versions, and
    processes that use the database without SQLite's locks (``coord.lockless``). On
    PostgreSQL: invariants, the server's and the schema's versions, the connection settings
    that bound a dead client's session, and sessions long idle holding coord's locks."""
    if store.engine != "sqlite":
        return _server_doctor(store)
    from .lockless import lockless_users

    found = check(store, strict=True)  # once: pending items are split off below
    found += [Problem("locks", user.describe()) for user in lockless_users(store.path)]
    problems = [p for p in found if not p.pending]
    pending = [p for p in found if p.pending]
    perms: list[str] = []
    for p in (store.path.parent, store.path, *(store.path.with_name(store.path.name + s)
                                               for s in ("-wal", "-shm"))):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if st.st_uid != os.geteuid():
            perms.append(f"{p} is owned by uid {st.st_uid}")
        if stat.S_IMODE(st.st_mode) & 0o022:
            perms.append(f"{p} is writable by group or others")
    wal = store.path.with_name(store.path.name + "-wal")
    facts = store.backend.checks.facts()
    report: dict[str, Any] = {
        "path": str(store.path),
        "ok": not problems and not perms,
        "journal_mode": facts["journal_mode"],
        "schema_version": facts["schema_version"],
        "supported_schema_version": facts["supported_schema_version"],
        "application_id": facts["application_id"],
        "size_bytes": os.path.getsize(store.path),
        "wal_bytes": os.path.getsize(wal) if wal.exists() else 0,
        "busy_timeout_ms": store.config.busy_timeout_ms,
        # Writes that waited past the busy timeout and were retried, since the db was made.
        "busy_retries": facts["busy_retries"],
        "problems": [p.to_json() for p in problems],
        "pending": [p.to_json() for p in pending],
        "permissions": perms,
        "counts": facts["counts"],
    }
    orphaned = orphan_problems(store)
    report["problems"] += [p.to_json() for p in orphaned]
    if report["journal_mode"] != "wal" or orphaned:
        report["ok"] = False
    return report


def _server_doctor(store: Store) -> dict[str, Any]:
    found = check(store, strict=True)
    facts = store.backend.checks.facts()
    # Idle while holding a lock: a client gone without closing (held until the server's
    # timeouts end it) or a stuck one; a free lock proves nothing, a held one neither.
    found += [Problem("sessions", f"backend {s['pid']} ({s['application']}, {s['client']}) "
                      f"holds {s['locks']} advisory lock(s) and has been idle "
                      f"{s['idle_s']} s", pending=True) for s in facts["idle_lock_holders"]]
    found += orphan_problems(store)
    problems = [p for p in found if not p.pending]
    return {
        "engine": store.engine,
        "location": store.address_shown,
        "ok": not problems and facts["schema_version"] == facts["supported_schema_version"],
        "schema": facts["schema"],
        "schema_version": facts["schema_version"],
        "supported_schema_version": facts["supported_schema_version"],
        "server_version": facts["server_version"],
        "settings": facts["settings"],
        "idle_lock_holders": facts["idle_lock_holders"],
        # Writes rolled back by a serialization failure or deadlock and retried (this process).
        "busy_retries": facts["busy_retries"],
        "problems": [p.to_json() for p in problems],
        "pending": [p.to_json() for p in found if p.pending],
        "permissions": [],
        "counts": facts["counts"],
    }


def orphan_problems(store: Store) -> list[Problem]:
    """Tracked processes still running whose instance is dead: a problem for ``doctor``
    (not a broken invariant, so ``check()`` stays silent), except those whose instance
    chose to keep its children (`coord run --keep-children`, recorded in its labels)."""
    from .processes import orphans
    from .runner import KEEP_CHILDREN_LABEL

    found = orphans(store, live=False)
    rows = store.backend.instances.by_ids({o.instance_id for o in found})
    kept = {i for i, r in rows.items()
            if json.loads(r["labels"] or "{}").get(KEEP_CHILDREN_LABEL) is True}
    return [Problem("orphans", f"process {o.id} (pid {o.pid}, {o.name}) of dead instance "
                    f"{o.instance_id} still runs; end it with `coord orphans --kill`")
            for o in found if o.instance_id not in kept]
