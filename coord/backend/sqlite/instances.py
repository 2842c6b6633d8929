"""The SQLite engine's registry: the ``instances`` table (see ``coord.instances`` for the
rules). A takeover and a deregistration apply the death rule (``.death``) in the same
transaction."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import apsw

from ...errors import InstanceIdInUse
from ..records import Member
from .connection import fetch, next_counter
from .death import bury, release_holdings_many
from .events import log_event

if TYPE_CHECKING:
    from ...db import Row, Store
    from .liveness import SqliteLiveness

_INSERT = (
    "INSERT INTO instances (id, incarnation, app, status, pid, start_token, boot_id, "
    "pidns, uid, user, host, cmdline, cwd, labels, lock_path, nudge_path, ttl, "
    "watchdog, started_at, heartbeat_at, heartbeat_mono) "
    "VALUES (?, ?, ?, 'alive', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET incarnation = excluded.incarnation, "
    "app = excluded.app, status = 'alive', pid = excluded.pid, "
    "start_token = excluded.start_token, boot_id = excluded.boot_id, "
    "pidns = excluded.pidns, uid = excluded.uid, user = excluded.user, "
    "host = excluded.host, cmdline = excluded.cmdline, cwd = excluded.cwd, "
    "labels = excluded.labels, lock_path = excluded.lock_path, "
    "nudge_path = excluded.nudge_path, ttl = excluded.ttl, "
    "watchdog = excluded.watchdog, started_at = excluded.started_at, "
    "heartbeat_at = excluded.heartbeat_at, heartbeat_mono = excluded.heartbeat_mono, "
    "ended_at = NULL, end_reason = NULL"
)

#: The columns ``register`` takes in ``fields``, in the table's order.
FIELDS = ("app", "pid", "start_token", "boot_id", "pidns", "uid", "user", "host", "cmdline",
          "cwd", "labels", "lock_path", "nudge_path", "ttl", "watchdog")


class SqliteInstances:
    """``coord.backend.InstanceOps``."""

    def __init__(self, store: Store, liveness: SqliteLiveness) -> None:
        self._store = store
        self._liveness = liveness

    # -- reads --------------------------------------------------------------------------------

    def get(self, member: Member) -> Row | None:
        return self._store.row(
            "SELECT * FROM instances WHERE id = ? AND incarnation = ?", member)

    def by_id(self, id: str) -> Row | None:
        return self._store.row("SELECT * FROM instances WHERE id = ?", (id,))

    def by_ids(self, ids: Iterable[str]) -> dict[str, Row]:
        return {
            r["id"]: r
            for r in self._store.rows(
                "SELECT * FROM instances WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(ids)),),
            )
        }

    def registration(self, id: str) -> tuple[int, str] | None:
        row = self._store.row("SELECT incarnation, status FROM instances WHERE id = ?", (id,))
        return None if row is None else (int(row["incarnation"]), str(row["status"]))

    def list(self, app: str | None = None) -> list[Row]:
        if app is None:
            return self._store.rows("SELECT * FROM instances ORDER BY started_at, id")
        return self._store.rows(
            "SELECT * FROM instances WHERE app = ? ORDER BY started_at, id", (app,))

    # -- writes -------------------------------------------------------------------------------

    def register(self, id: str, fields: Mapping[str, Any]) -> tuple[int, Row | None]:
        store = self._store
        previous: list[Row] = []

        def txn(c: apsw.Connection) -> int:
            now_mono, now_wall = store.mono(), store.wall()
            old = fetch(c, "SELECT * FROM instances WHERE id = ?", (id,))
            previous[:] = old
            if old:
                alive, verdict = self._liveness.judge(old[0])
                if alive:
                    raise InstanceIdInUse(id, old[0]["pid"])
                # Its death was never recorded (no reaper came by): record it now, once.
                if old[0]["status"] == "alive":
                    log_event(c, now_wall, "died", id, None, incarnation=old[0]["incarnation"],
                              reason=verdict)
                release_holdings_many(c, store, [(id, old[0]["incarnation"])],
                                      reason="taken over")
            inc = next_counter(c, "incarnation")
            values = [fields[k] for k in FIELDS]
            c.execute(_INSERT, (id, inc, *values, now_wall, now_wall, now_mono))
            if old:
                log_event(c, now_wall, "took over", id, None, previous=old[0]["incarnation"],
                          incarnation=inc)
            log_event(c, now_wall, "joined", id, fields["app"], incarnation=inc,
                      pid=fields["pid"])
            return inc

        inc = store.write(txn)
        if previous:
            # The dead predecessor's lock file and socket are nobody's now.
            self._liveness.forget(previous)
        return inc, (previous[0] if previous else None)

    def heartbeat(self, member: Member) -> bool:
        store = self._store
        now_mono, now_wall = store.mono(), store.wall()
        return bool(store.write(lambda c: c.execute(
            "UPDATE instances SET heartbeat_mono = ?, heartbeat_at = ? "
            "WHERE id = ? AND incarnation = ? AND status = 'alive' RETURNING 1",
            (now_mono, now_wall, *member),
        ).fetchall()))

    def changes(self) -> object:
        return self._store.data_version()

    def deregister(self, member: Member) -> bool:
        store = self._store
        return store.write(lambda c: bury(c, store, *member, reason="left"))
