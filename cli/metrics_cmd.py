"""``coord metrics``: figures for monitoring."""

from __future__ import annotations

import sys

import typer

from ._common import JsonOption, emit_json, example, handle_errors, store


def register(app: typer.Typer) -> None:
    app.command("metrics")(metrics)


@example("coord metrics > /var/lib/node_exporter/coord.prom",
         "coord metrics --json")
@handle_errors
def metrics(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Print instance, queue, lease and message figures in the Prometheus text format.

    For node_exporter's textfile collector: `coord metrics > /var/lib/node_exporter/coord.prom`.
    Families: coord_instances{app,state}, coord_queue_jobs_{ready,delayed,claimed,dead,done}{queue},
    coord_queue_oldest_ready_seconds{queue}, coord_lease_held{lease,holder},
    coord_lease_term{lease}, coord_messages_pending, coord_wal_bytes. Integers (terms are
    fencing tokens) are printed exactly. --json prints the same figures: an array of
    families with name, type, help and samples (labels, value)."""
    from coord.metrics import collect, prometheus_text

    s = store(ctx)
    if as_json:
        emit_json([f.to_json() for f in collect(s)])
    else:
        sys.stdout.write(prometheus_text(s))
