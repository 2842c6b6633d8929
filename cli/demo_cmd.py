"""``coord demo``."""

from __future__ import annotations

import typer

from ._common import example, handle_errors, store


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@example("COORD_DB=/tmp/demo.db coord demo")
@handle_errors
def demo(ctx: typer.Context) -> None:
    """A short show on the (default) database: instances register, one is killed, seen dead
    at once and reaped; then processes, leases, queues and messages."""
    from coord.demo import run_demo

    run_demo(store(ctx), lambda line: print(line, flush=True))
