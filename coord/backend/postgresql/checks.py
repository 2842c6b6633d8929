"""The PostgreSQL engine's invariant checks for ``coord.check`` and its facts for ``coord
doctor``/``coord metrics``: the schema's version, the sequences never below a used value,
the holdings to judge, the liveness-free invariants, and the server's side — its version,
this connection's settings, and sessions that sit idle while holding coord's advisory locks
(a client gone without its connection closing keeps them until the server's timeouts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..records import Problem
from .clock import LEASE_EXPIRY
from .opening import latest_version, schema_version

if TYPE_CHECKING:
    from .connection import PgDb

_TABLES = ("instances", "processes", "leases", "jobs", "messages", "kv", "events")
#: Settings ``coord doctor`` shows: what bounds a dead client's session, and the commit mode.
SETTINGS = ("synchronous_commit", "idle_session_timeout",
            "idle_in_transaction_session_timeout", "statement_timeout", "tcp_keepalives_idle",
            "tcp_user_timeout", "max_connections", "default_transaction_isolation")
#: A session idle this long while holding one of coord's advisory locks is reported.
LONG_IDLE = 60.0

# Every held lease, claimed job and ephemeral key with its holder.
_HOLDINGS = """
SELECT 'lease ' || quote_literal(name) AS what, holder_id AS id, holder_incarnation AS inc
  FROM leases WHERE holder_id IS NOT NULL
UNION ALL SELECT 'job ' || id, claimed_by, claimed_incarnation FROM jobs WHERE state = 'claimed'
UNION ALL SELECT 'ephemeral key ' || quote_literal(key), owner_id, owner_incarnation FROM kv
  WHERE owner_id IS NOT NULL
"""

# (check, detail, pending) of every liveness-free invariant broken, in one statement.
_PROBLEMS = """
SELECT 'terms' AS chk, format('lease %L term %s is not its newest (%s)', l.name, l.term,
       (SELECT max(term) FROM lease_terms t WHERE t.name = l.name)) AS detail, false AS pending
  FROM leases l WHERE l.holder_id IS NOT NULL
   AND l.term IS DISTINCT FROM (SELECT max(term) FROM lease_terms t WHERE t.name = l.name)
UNION ALL SELECT 'terms', format('lease %L has %s open terms', name, count(*)), false
  FROM lease_terms WHERE released_at IS NULL GROUP BY name HAVING count(*) > 1
UNION ALL SELECT 'terms', format('lease %L term %s is open but not held', t.name, t.term), false
  FROM lease_terms t LEFT JOIN leases l ON l.name = t.name
 WHERE t.released_at IS NULL AND (l.term IS DISTINCT FROM t.term
   OR l.holder_id IS DISTINCT FROM t.holder_id
   OR l.holder_incarnation IS DISTINCT FROM t.holder_incarnation)
UNION ALL SELECT 'terms', format('lease %L term %s is held but its history row is not open',
       l.name, l.term), false
  FROM leases l WHERE l.holder_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM lease_terms t
       WHERE t.name = l.name AND t.term = l.term AND t.released_at IS NULL
         AND t.holder_id = l.holder_id AND t.holder_incarnation = l.holder_incarnation)
UNION ALL SELECT 'terms', format('term %s was handed out %s times', term, count(*)), false
  FROM lease_terms GROUP BY term HAVING count(*) > 1
UNION ALL SELECT 'leases', format('lease %L of %s is past its TTL, awaiting takeover or the '
       'reaper', name, holder_id), true
  FROM leases WHERE holder_id IS NOT NULL AND LEASE_EXPIRY < coord_now()
UNION ALL SELECT 'terms', format('lease %L term %s was granted after a later term',
       a.name, a.term), false
  FROM lease_terms a JOIN lease_terms b ON a.name = b.name AND b.term > a.term
   AND b.acquired_at < a.acquired_at
UNION ALL SELECT 'jobs', format('job %s is finished without a finish time', id), false
  FROM jobs WHERE state IN ('done', 'dead', 'cancelled') AND finished_at IS NULL
""".replace("%", "%%").replace("LEASE_EXPIRY", LEASE_EXPIRY)
# (bound as a query with parameters: format()'s own % stay literal)

_COUNTERS = (
    ("incarnation", "incarnation_seq", "SELECT max(incarnation) FROM instances"),
    ("term", "term_seq", "SELECT greatest((SELECT max(term) FROM leases), "
                         "(SELECT max(term) FROM lease_terms))"),
    ("revision", "revision_seq", "SELECT max(version) FROM kv"),
)


class PgChecks:
    """``coord.backend.CheckOps``."""

    def __init__(self, db: PgDb) -> None:
        self._db = db

    def storage(self, *, integrity: bool) -> list[tuple[str, Problem]]:
        # integrity: the server checks its own pages (data checksums, when enabled); there
        # is nothing for a client to read through.
        db, out = self._db, []
        if schema_version(db.conn()) != latest_version():
            out.append(("schema", Problem("schema version differs from this coord's")))
        for name, seq, used in _COUNTERS:
            row = db.row(f"SELECT (SELECT last_value FROM {seq}) AS last, "  # noqa: S608
                         f"(SELECT is_called FROM {seq}) AS called, ({used}) AS top")
            assert row is not None
            last = row["last"] if row["called"] else row["last"] - 1
            if row["top"] is not None and row["top"] > last:
                out.append(("counters", Problem(
                    f"{name} counter {last} is below a used value {row['top']}")))
        return out

    def holdings(self) -> list[tuple[str, str, int]]:
        return [(r["what"], r["id"], int(r["inc"])) for r in self._db.rows(_HOLDINGS)]

    def free_groups(self) -> list[tuple[str, int]]:
        return [(r["name"], int(r["pgid"])) for r in self._db.rows(
            "SELECT name, pgid FROM leases WHERE holder_id IS NULL AND pgid IS NOT NULL "
            "ORDER BY name")]

    def problems(self) -> list[tuple[str, Problem]]:
        out = [(r["chk"], Problem(r["detail"], bool(r["pending"])))
               for r in self._db.rows(_PROBLEMS)]
        out += [("processes", Problem(f"process {r['id']} has no instance {r['instance_id']!r}"))
                for r in self._db.rows(
                    "SELECT id, instance_id FROM processes p WHERE NOT EXISTS "
                    "(SELECT 1 FROM instances i WHERE i.id = p.instance_id)")]
        return out

    def idle_lock_holders(self, idle: float = LONG_IDLE) -> list[dict[str, Any]]:
        """Sessions idle for over ``idle`` seconds that hold advisory locks of coord (of any
        deployment on this database): pid, application, client, idle seconds, locks."""
        return self._db.rows(
            "SELECT a.pid, a.application_name AS application, "
            "coalesce(host(a.client_addr), 'local') AS client, a.state, "
            "round(extract(epoch FROM clock_timestamp() - a.state_change)::numeric, 1)::float "
            "AS idle_s, count(*) AS locks "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND a.pid <> pg_backend_pid() AND a.state LIKE 'idle%%' "
            "AND clock_timestamp() - a.state_change > make_interval(secs => %s) "
            "GROUP BY a.pid, a.application_name, a.client_addr, a.state, a.state_change "
            "ORDER BY a.pid", (idle,))

    def facts(self) -> dict[str, Any]:
        db = self._db
        settings = {r["name"]: r["setting"] + (r["unit"] or "") for r in db.rows(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
            (list(SETTINGS),))}
        counts = db.row("SELECT " + ", ".join(  # noqa: S608
            f"(SELECT count(*) FROM {t}) AS {t}" for t in _TABLES))  # noqa: S608 - fixed names
        return {
            "engine": "postgresql",
            "journal_mode": None,
            "schema_version": schema_version(db.conn()),
            "supported_schema_version": latest_version(),
            "application_id": None,
            "server_version": db.value("SHOW server_version"),
            "server_version_num": int(db.value("SHOW server_version_num")),
            "schema": db.location.schema,
            "settings": settings,
            "idle_lock_holders": self.idle_lock_holders(),
            "busy_retries": db.retries,
            "counts": {k: int(v) for k, v in (counts or {}).items()},
        }

    def figures(self) -> dict[str, int | float]:
        row = self._db.row(
            "SELECT (SELECT count(*) FROM messages WHERE acked = 0) AS messages_pending, "
            "current_setting('server_version_num')::int AS server_version_num")
        assert row is not None
        return {"messages_pending": int(row["messages_pending"]),
                "schema_version": schema_version(self._db.conn()),
                "server_version_num": int(row["server_version_num"]),
                "idle_lock_holders": len(self.idle_lock_holders())}
