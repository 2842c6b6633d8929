"""Instance, queue, lease and message figures for monitoring: the Prometheus text export
(`coord metrics`, e.g. behind node_exporter's textfile collector) and the same figures as
JSON (`coord metrics --json`).

Integers are printed exactly: a lease term is a fencing token seeded from the wall clock in
milliseconds (about 1.8e12), and ``%g`` would print ``1.79611e+12``, losing the digits that
make it one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .db import Store

Sample = tuple[dict[str, str], "int | float"]


@dataclass(frozen=True)
class Family:
    """One metric: its name, type (gauge), help text and samples (labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[Sample] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.kind, "help": self.help,
                "samples": [{"labels": labels, "value": value} for labels, value in self.samples]}


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _number(value: int | float) -> str:
    """Exact for integers (never an exponent); the shortest round-trip text for floats."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))


def _gauge(name: str, help_: str, samples: Iterable[Sample]) -> Family:
    return Family(name, "gauge", help_, list(samples))


def collect(store: Store) -> list[Family]:
    """Every metric family, with its current samples."""
    from .instances import list_instances
    from .leases import list_leases
    from .queues import stats

    infos = list_instances(store, include_dead=True)
    per_app: dict[tuple[str, str], int] = {}
    for i in infos:
        key = (i.app, "alive" if i.alive else ("tombstone" if i.tombstone else "dead"))
        per_app[key] = per_app.get(key, 0) + 1
    out = [_gauge("coord_instances", "Registered instances by app and liveness.",
                  (({"app": a, "state": s}, n) for (a, s), n in sorted(per_app.items())))]
    qs = stats(store)
    for name in ("ready", "delayed", "claimed", "dead", "done"):
        out.append(_gauge(f"coord_queue_jobs_{name}", f"Jobs {name} per queue.",
                          (({"queue": q.id}, getattr(q, name)) for q in qs)))
    out.append(_gauge("coord_queue_oldest_ready_seconds", "Age of the oldest due job per queue.",
                      (({"queue": q.id}, q.oldest_age) for q in qs if q.oldest_age is not None)))
    leases = list_leases(store)
    out.append(_gauge("coord_lease_held", "1 when the lease has a holder.",
                      (({"lease": x.name, "holder": x.holder or ""}, 1 if x.holder else 0)
                       for x in leases)))
    out.append(_gauge("coord_lease_term", "Current fencing term of the lease.",
                      (({"lease": x.name}, x.term) for x in leases if x.term is not None)))
    figures = store.backend.checks.figures()
    out.append(_gauge("coord_messages_pending", "Messages not yet acknowledged.",
                      [({}, int(figures["messages_pending"]))]))
    for fig, name, help_ in _ENGINE_FIGURES:
        if fig in figures:
            out.append(_gauge(name, help_, [({}, figures[fig])]))
    return out


#: The engines' own figures (``CheckOps.figures``), each where its engine has it.
_ENGINE_FIGURES: tuple[tuple[str, str, str], ...] = (
    ("wal_bytes", "coord_wal_bytes", "Size of the write-ahead log."),
    ("schema_version", "coord_schema_version", "Version of the deployment's schema."),
    ("server_version_num", "coord_server_version", "The PostgreSQL server's version number."),
    ("idle_lock_holders", "coord_idle_lock_sessions",
     "Server sessions idle for over a minute while holding coord's advisory locks."),
)


def prometheus_text(store: Store) -> str:
    """Current figures in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for f in collect(store):
        lines += [f"# HELP {f.name} {f.help}", f"# TYPE {f.name} {f.kind}"]
        lines += [f"{f.name}{_labels(labels)} {_number(v)}" for labels, v in f.samples]
    return "\n".join(lines) + "\n"
