"""A Prometheus text export of instance, queue, lease and message figures, for monitoring
(`coord metrics`, e.g. behind node_exporter's textfile collector)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .db import Store


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}" if kv else ""


def _family(name: str, kind: str, help_: str, samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(**labels)} {value:g}" for labels, value in samples]
    return lines


def prometheus_text(store: Store) -> str:
    """Current figures in the Prometheus text exposition format (version 0.0.4)."""
    from .instances import list_instances
    from .leases import list_leases
    from .queues import stats

    infos = list_instances(store, include_dead=True)
    per_app: dict[tuple[str, str], int] = {}
    for i in infos:
        key = (i.app, "alive" if i.alive else ("tombstone" if i.tombstone else "dead"))
        per_app[key] = per_app.get(key, 0) + 1
    out = _family("coord_instances", "gauge", "Registered instances by app and liveness.",
                  (({"app": a, "state": s}, n) for (a, s), n in sorted(per_app.items())))
    qs = stats(store)
    for field in ("ready", "delayed", "claimed", "dead", "done"):
        out += _family(f"coord_queue_jobs_{field}", "gauge", f"Jobs {field} per queue.",
                       (({"queue": q.id}, getattr(q, field)) for q in qs))
    out += _family("coord_queue_oldest_ready_seconds", "gauge",
                   "Age of the oldest due job per queue.",
                   (({"queue": q.id}, q.oldest_age) for q in qs if q.oldest_age is not None))
    leases = list_leases(store)
    out += _family("coord_lease_held", "gauge", "1 when the lease has a holder.",
                   (({"lease": x.name, "holder": x.holder or ""}, 1 if x.holder else 0) for x in leases))
    out += _family("coord_lease_term", "gauge", "Current fencing term of the lease.",
                   (({"lease": x.name}, x.term) for x in leases if x.term is not None))
    waiting = store.value("SELECT count(*) FROM messages WHERE acked = 0")
    out += _family("coord_messages_pending", "gauge", "Messages not yet acknowledged.", [({}, waiting)])
    wal = f"{store.path}-wal"
    out += _family("coord_wal_bytes", "gauge", "Size of the write-ahead log.",
                   [({}, os.path.getsize(wal) if os.path.exists(wal) else 0)])
    return "\n".join(out) + "\n"
