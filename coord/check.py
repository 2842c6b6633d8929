"""The invariant checker: what must be true of a coord database at any moment.

``check(store)`` returns a list of ``Problem``; empty means healthy. ``strict`` also counts
things that are legitimately pending (a holder that died a moment ago and is not yet buried),
which stress tests use after a final ``reap()``. ``coord doctor`` runs it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from typing import Any

from .db import APPLICATION_ID, Store
from .migrate import latest_version


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
    if integrity:
        res = [r[0] for r in store.conn().execute("PRAGMA integrity_check")]
        if res != ["ok"]:
            add(Problem("integrity", "; ".join(str(r) for r in res[:5])))
        for fk in store.rows("PRAGMA foreign_key_check"):
            add(Problem("foreign keys", f"{fk['table']} row {fk['rowid']} has no {fk['parent']}"))
    if store.value("PRAGMA application_id") != APPLICATION_ID:
        add(Problem("application_id", "not coord's"))
    if store.value("PRAGMA user_version") != latest_version():
        add(Problem("schema", "schema version differs from this coord's"))

    counters = {r["name"]: r["value"] for r in store.rows("SELECT name, value FROM counters")}
    for name, sql in (
        ("incarnation", "SELECT max(incarnation) FROM instances"),
        ("term", "SELECT max(m) FROM (SELECT max(term) AS m FROM leases UNION ALL "
                 "SELECT max(term) FROM lease_terms)"),
        ("revision", "SELECT max(version) FROM kv"),
    ):
        top = store.value(sql)
        if top is not None and top > counters.get(name, -1):
            add(Problem("counters", f"{name} counter {counters.get(name)} is below a used value {top}"))

    now = store.mono()
    liveness = store.backend.liveness
    instances = {r["id"]: r for r in store.backend.instances.list()}
    look = liveness.look()
    verdicts = {i: liveness.judge(r, look) for i, r in instances.items()}

    def holder_problem(what: str, id: str, inc: int) -> None:
        row = instances.get(id)
        if row is None or row["incarnation"] != inc or row["status"] == "dead":
            add(Problem("dead holders", f"{what} held by {id}#{inc}, which is not registered"))
        elif not verdicts[id][0]:
            add(Problem("dead holders", f"{what} held by {id}#{inc}, {verdicts[id][1]}", pending=True))

    for lease in store.rows("SELECT * FROM leases WHERE holder_id IS NOT NULL"):
        holder_problem(f"lease {lease['name']!r}", lease["holder_id"], lease["holder_incarnation"])
        top = store.value("SELECT max(term) FROM lease_terms WHERE name = ?", (lease["name"],))
        if top != lease["term"]:
            add(Problem("terms", f"lease {lease['name']!r} term {lease['term']} is not its newest ({top})"))
    for r in store.rows(
        "SELECT name, count(*) AS n FROM lease_terms WHERE released_at IS NULL GROUP BY name HAVING n > 1"
    ):
        add(Problem("terms", f"lease {r['name']!r} has {r['n']} open terms"))
    # One holder per term, recorded: an open history row is the held lease's current term with
    # the same holder, every held lease has one, and no term number is ever handed out twice.
    for r in store.rows(
        "SELECT t.name, t.term FROM lease_terms t LEFT JOIN leases l ON l.name = t.name "
        "WHERE t.released_at IS NULL AND (l.term IS NOT t.term OR l.holder_id IS NOT t.holder_id "
        "OR l.holder_incarnation IS NOT t.holder_incarnation)"
    ):
        add(Problem("terms", f"lease {r['name']!r} term {r['term']} is open but not held"))
    for r in store.rows(
        "SELECT l.name, l.term FROM leases l WHERE l.holder_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM lease_terms t WHERE t.name = l.name AND t.term = l.term "
        "AND t.released_at IS NULL AND t.holder_id = l.holder_id "
        "AND t.holder_incarnation = l.holder_incarnation)"
    ):
        add(Problem("terms", f"lease {r['name']!r} term {r['term']} is held but its history row is not open"))
    for r in store.rows("SELECT term, count(*) AS n FROM lease_terms GROUP BY term HAVING n > 1"):
        add(Problem("terms", f"term {r['term']} was handed out {r['n']} times"))
    for r in store.rows("SELECT name, holder_id FROM leases WHERE holder_id IS NOT NULL "
                        "AND expires_mono < ?", (now,)):
        add(Problem("leases", f"lease {r['name']!r} of {r['holder_id']} is past its TTL, "
                              "awaiting takeover or the reaper", pending=True))
    # A `coord elect` group whose holder is gone keeps running until the next holder ends it.
    from .elect import group_members

    for r in store.rows("SELECT name, pgid FROM leases WHERE holder_id IS NULL AND pgid IS NOT NULL"):
        if group_members(r["pgid"]):
            add(Problem("leases", f"lease {r['name']!r} is free but process group {r['pgid']} of "
                                  "its last holder still runs", pending=True))
    for r in store.rows(
        "SELECT a.name, a.term FROM lease_terms a JOIN lease_terms b ON a.name = b.name "
        "AND b.term > a.term AND b.acquired_at < a.acquired_at"
    ):
        add(Problem("terms", f"lease {r['name']!r} term {r['term']} was granted after a later term"))
    for job in store.rows(
        "SELECT id, claimed_by, claimed_incarnation FROM jobs WHERE state = 'claimed'"
    ):
        holder_problem(f"job {job['id']}", job["claimed_by"], job["claimed_incarnation"])
    for key in store.rows("SELECT key, owner_id, owner_incarnation FROM kv WHERE owner_id IS NOT NULL"):
        holder_problem(f"ephemeral key {key['key']!r}", key["owner_id"], key["owner_incarnation"])
    for job in store.rows(
        "SELECT id FROM jobs WHERE state IN ('done', 'dead', 'cancelled') AND finished_at IS NULL"
    ):
        add(Problem("jobs", f"job {job['id']} is finished without a finish time"))
    for row in store.rows(
        "SELECT id, instance_id FROM processes p WHERE NOT EXISTS "
        "(SELECT 1 FROM instances i WHERE i.id = p.instance_id)"
    ):
        add(Problem("processes", f"process {row['id']} has no instance {row['instance_id']!r}"))
    from .processes import problems as process_problems

    for detail, pending in process_problems(store, instances):
        add(Problem("processes", detail, pending=pending))
    from .kv import problems as kv_problems
    from .messages import problems as message_problems

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
    processes that use the database without SQLite's locks (``coord.lockless``)."""
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
    report: dict[str, Any] = {
        "path": str(store.path),
        "ok": not problems and not perms,
        "journal_mode": store.value("PRAGMA journal_mode"),
        "schema_version": store.value("PRAGMA user_version"),
        "supported_schema_version": latest_version(),
        "application_id": store.value("PRAGMA application_id"),
        "size_bytes": os.path.getsize(store.path),
        "wal_bytes": os.path.getsize(wal) if wal.exists() else 0,
        "busy_timeout_ms": store.config.busy_timeout_ms,
        # Writes that waited past the busy timeout and were retried, since the db was made.
        "busy_retries": store.value("SELECT value FROM counters WHERE name = 'busy_retries'") or 0,
        "problems": [p.to_json() for p in problems],
        "pending": [p.to_json() for p in pending],
        "permissions": perms,
        "counts": {t: store.value(f"SELECT count(*) FROM {t}")  # noqa: S608 - fixed names
                   for t in ("instances", "processes", "leases", "jobs", "messages", "kv", "events")},
    }
    orphaned = orphan_problems(store)
    report["problems"] += [p.to_json() for p in orphaned]
    if report["journal_mode"] != "wal" or orphaned:
        report["ok"] = False
    return report


def orphan_problems(store: Store) -> list[Problem]:
    """Tracked processes still running whose instance is dead: a problem for ``doctor``
    (not a broken invariant, so ``check()`` stays silent), except those whose instance
    chose to keep its children (``kept_on_purpose``)."""
    from .processes import orphans

    return [Problem("orphans", f"process {o.id} (pid {o.pid}, {o.name}) of dead instance "
                    f"{o.instance_id} still runs; end it with `coord orphans --kill`")
            for o in orphans(store, live=False) if not kept_on_purpose(o)]


def kept_on_purpose(orphan: Any) -> bool:
    """Hook: whether the orphan's instance chose to keep its children (`coord run
    --keep-children`), so its orphans are expected, not a problem. No such choice is
    recorded yet, so every orphan counts; once the process rows record it, answer from
    there."""
    return False
