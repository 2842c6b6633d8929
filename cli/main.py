"""The ``coord`` command: one typer app; each noun's commands live in their own module."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, NoReturn

import typer

from coord.errors import EXIT_ERROR

from . import (
    demo_cmd,
    instance_cmds,
    lease_cmds,
    message_cmds,
    metrics_cmd,
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
        typer.Option("--db", envvar="COORD_DB", show_default=False, metavar="PATH",
                     help="Database path. Default: $COORD_DB, else coord.db in the user's runtime directory."),
    ] = None,
) -> None:
    """coord: instances, processes, leases, queues and messages in one SQLite database."""
    ctx.obj = State(db)


for module in (store_cmds, instance_cmds, process_cmds, lease_cmds, queue_cmds, message_cmds,
               metrics_cmd, demo_cmd):
    module.register(app)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the CLI and exit with the brief's statuses; every error is one line on stderr."""
    try:
        code = app(args=None if argv is None else list(argv), prog_name="coord",
                   standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        print("coord: aborted", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        # Usage errors (bad option, missing argument, unknown command) from the click layer,
        # which typer vendors in recent releases: recognised by shape, not by import path.
        code = getattr(e, "exit_code", None)
        if not (hasattr(e, "format_message") and isinstance(code, int)):
            # Never a traceback (COORD_DEBUG=1 shows one): commands map their own errors with
            # @handle_errors; this catches what escaped one.
            if os.environ.get("COORD_DEBUG"):
                raise
            line = " ".join(f"{type(e).__name__}: {e}".split())
            print(f"coord: internal error: {line}", file=sys.stderr)
            sys.exit(EXIT_ERROR)
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.format_message(), file=sys.stderr)  # the help text of a bare group
        else:
            ctx = getattr(e, "ctx", None)
            where = getattr(ctx, "command_path", None) or "coord"
            die_line = " ".join(str(e.format_message()).split())
            print(f"coord: {die_line} (see '{where} --help')", file=sys.stderr)
    # A command that returned normally gives None; typer.Exit(n) comes back as n.
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
