"""The PostgreSQL engine's event log: the ``events`` table. ``log_event`` writes inside the
caller's transaction, stamped with the server's clock."""

from __future__ import annotations

import json
from typing import Any

from .connection import Conn

_INSERT = ("INSERT INTO events (at, kind, instance_id, subject, detail) "
           "VALUES (coord_now(), %s, %s, %s, %s)")


def log_event(c: Conn, kind: str, instance_id: str | None = None, subject: str | None = None,
              **detail: Any) -> None:
    """Record an event inside the caller's transaction."""
    c.execute(_INSERT, (kind, instance_id, subject, json.dumps(detail, sort_keys=True)))
