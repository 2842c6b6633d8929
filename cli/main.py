"""The ``coord`` command: one typer app; each noun's commands live in their own module."""

from __future__ import annotations

from typing import Annotated

import typer

from . import (
    demo_cmd,
    instance_cmds,
    lease_cmds,
    message_cmds,
    process_cmds,
    queue_cmds,
    store_cmds,
)
from ._common import State

app = typer.Typer(
    name="coord",
    help="A coordination store for the many copies of one tool on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    db: Annotated[
        str | None,
        typer.Option("--db", envvar="COORD_DB", show_default=False,
                     help="Database path. Default: $COORD_DB, else coord.db in the user's runtime directory."),
    ] = None,
) -> None:
    """coord: instances, processes, leases, queues and messages in one SQLite database."""
    ctx.obj = State(db)


for module in (store_cmds, instance_cmds, process_cmds, lease_cmds, queue_cmds, message_cmds, demo_cmd):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
