"""The SQLite engine's invariant checks for ``coord.check`` and its facts for ``coord
doctor``: the ones that need only the database (liveness-dependent checks stay in
``coord.check``, which judges holders itself)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..records import Problem
from .connection import APPLICATION_ID
from .migrations import latest_version

if TYPE_CHECKING:
    from ...db import Store

_TABLES = ("instances", "processes", "leases", "jobs", "messages", "kv", "events")


class SqliteChecks:
    """``coord.backend.CheckOps``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def storage(self, *, integrity: bool) -> list[tuple[str, Problem]]:
        store, out = self._store, []
        if integrity:
            res = [r[0] for r in store.conn().execute("PRAGMA integrity_check")]
            if res != ["ok"]:
                out.append(("integrity", Problem("; ".join(str(r) for r in res[:5]))))
            for fk in store.rows("PRAGMA foreign_key_check"):
                out.append(("foreign keys", Problem(
                    f"{fk['table']} row {fk['rowid']} has no {fk['parent']}")))
        if store.value("PRAGMA application_id") != APPLICATION_ID:
            out.append(("application_id", Problem("not coord's")))
        if store.value("PRAGMA user_version") != latest_version():
            out.append(("schema", Problem("schema version differs from this coord's")))
        counters = {r["name"]: r["value"] for r in store.rows("SELECT name, value FROM counters")}
        for name, sql in (
            ("incarnation", "SELECT max(incarnation) FROM instances"),
            ("term", "SELECT max(m) FROM (SELECT max(term) AS m FROM leases UNION ALL "
                     "SELECT max(term) FROM lease_terms)"),
            ("revision", "SELECT max(version) FROM kv"),
        ):
            top = store.value(sql)
            if top is not None and top > counters.get(name, -1):
                out.append(("counters", Problem(
                    f"{name} counter {counters.get(name)} is below a used value {top}")))
        return out

    def holdings(self) -> list[tuple[str, str, int]]:
        """(what, holder id, holder incarnation) of every held lease, claimed job and
        ephemeral key."""
        store = self._store
        return [
            *((f"lease {r['name']!r}", r["holder_id"], r["holder_incarnation"])
              for r in store.rows("SELECT name, holder_id, holder_incarnation FROM leases "
                                  "WHERE holder_id IS NOT NULL")),
            *((f"job {r['id']}", r["claimed_by"], r["claimed_incarnation"])
              for r in store.rows("SELECT id, claimed_by, claimed_incarnation FROM jobs "
                                  "WHERE state = 'claimed'")),
            *((f"ephemeral key {r['key']!r}", r["owner_id"], r["owner_incarnation"])
              for r in store.rows("SELECT key, owner_id, owner_incarnation FROM kv "
                                  "WHERE owner_id IS NOT NULL")),
        ]

    def free_groups(self) -> list[tuple[str, int]]:
        """(lease, pgid) of free leases that still record their last holder's group."""
        return [(r["name"], r["pgid"]) for r in self._store.rows(
            "SELECT name, pgid FROM leases WHERE holder_id IS NULL AND pgid IS NOT NULL")]

    def problems(self) -> list[tuple[str, Problem]]:
        """Liveness-free invariants of leases, terms, jobs and processes."""
        store, out = self._store, []

        def add(check: str, detail: str, pending: bool = False) -> None:
            out.append((check, Problem(detail, pending)))

        for r in store.rows(
            "SELECT l.name, l.term, (SELECT max(term) FROM lease_terms t WHERE t.name = l.name) "
            "AS top FROM leases l WHERE l.holder_id IS NOT NULL"
        ):
            if r["top"] != r["term"]:
                add("terms", f"lease {r['name']!r} term {r['term']} is not its newest ({r['top']})")
        for r in store.rows(
            "SELECT name, count(*) AS n FROM lease_terms WHERE released_at IS NULL "
            "GROUP BY name HAVING n > 1"
        ):
            add("terms", f"lease {r['name']!r} has {r['n']} open terms")
        # One holder per term, recorded: an open history row is the held lease's current term
        # with the same holder, every held lease has one, and no term number is handed out
        # twice.
        for r in store.rows(
            "SELECT t.name, t.term FROM lease_terms t LEFT JOIN leases l ON l.name = t.name "
            "WHERE t.released_at IS NULL AND (l.term IS NOT t.term OR l.holder_id IS NOT "
            "t.holder_id OR l.holder_incarnation IS NOT t.holder_incarnation)"
        ):
            add("terms", f"lease {r['name']!r} term {r['term']} is open but not held")
        for r in store.rows(
            "SELECT l.name, l.term FROM leases l WHERE l.holder_id IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM lease_terms t WHERE t.name = l.name AND t.term = l.term "
            "AND t.released_at IS NULL AND t.holder_id = l.holder_id "
            "AND t.holder_incarnation = l.holder_incarnation)"
        ):
            add("terms", f"lease {r['name']!r} term {r['term']} is held but its history row "
                         "is not open")
        for r in store.rows("SELECT term, count(*) AS n FROM lease_terms GROUP BY term "
                            "HAVING n > 1"):
            add("terms", f"term {r['term']} was handed out {r['n']} times")
        for r in store.rows("SELECT name, holder_id FROM leases WHERE holder_id IS NOT NULL "
                            "AND expires_mono < ?", (store.mono(),)):
            add("leases", f"lease {r['name']!r} of {r['holder_id']} is past its TTL, "
                          "awaiting takeover or the reaper", True)
        for r in store.rows(
            "SELECT a.name, a.term FROM lease_terms a JOIN lease_terms b ON a.name = b.name "
            "AND b.term > a.term AND b.acquired_at < a.acquired_at"
        ):
            add("terms", f"lease {r['name']!r} term {r['term']} was granted after a later term")
        for r in store.rows("SELECT id FROM jobs WHERE state IN ('done', 'dead', 'cancelled') "
                            "AND finished_at IS NULL"):
            add("jobs", f"job {r['id']} is finished without a finish time")
        for r in store.rows(
            "SELECT id, instance_id FROM processes p WHERE NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.id = p.instance_id)"
        ):
            add("processes", f"process {r['id']} has no instance {r['instance_id']!r}")
        return out

    def facts(self) -> dict[str, Any]:
        """What ``coord doctor`` reports of the storage itself."""
        store = self._store
        return {
            "journal_mode": store.value("PRAGMA journal_mode"),
            "schema_version": store.value("PRAGMA user_version"),
            "supported_schema_version": latest_version(),
            "application_id": store.value("PRAGMA application_id"),
            # Writes that waited past the busy timeout and were retried, since the db was made.
            "busy_retries": store.value(
                "SELECT value FROM counters WHERE name = 'busy_retries'") or 0,
            "counts": {t: store.value(f"SELECT count(*) FROM {t}")  # noqa: S608 - fixed names
                       for t in _TABLES},
        }

    def figures(self) -> dict[str, int | float]:
        wal = f"{self._store.path}-wal"
        return {
            "messages_pending": int(self._store.value(
                "SELECT count(*) FROM messages WHERE acked = 0")),
            "wal_bytes": os.path.getsize(wal) if os.path.exists(wal) else 0,
        }
