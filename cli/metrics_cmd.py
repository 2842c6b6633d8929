"""``coord metrics``: figures for monitoring."""

from __future__ import annotations

import sys

import typer

from ._common import handle_errors, store


def register(app: typer.Typer) -> None:
    app.command("metrics")(metrics)


@handle_errors
def metrics(ctx: typer.Context) -> None:
    """Print instance, queue, lease and message figures in the Prometheus text format."""
    from coord.metrics import prometheus_text

    sys.stdout.write(prometheus_text(store(ctx)))
