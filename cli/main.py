"""The ``coord`` command: one typer app; each noun's commands live in their own module."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, NoReturn

import typer

from coord.errors import EXIT_ERROR

from ._common import State, close_stores, error_line, json_errors

# Which module defines each top-level command. Building every command costs tens of ms at
# each start, so main() builds only the invoked one's module (all of them for help or an
# unknown word); tests/cli/test_help.py keeps this table true.
COMMANDS: dict[str, str] = {
    **dict.fromkeys(("path", "sql", "doctor"), "store_cmds"),
    **dict.fromkeys(("instances", "instance", "run", "reap", "events"), "instance_cmds"),
    **dict.fromkeys(("ps", "stop", "orphans", "top", "logs"), "process_cmds"),
    **dict.fromkeys(("leases", "lease", "leader", "elect", "lock"), "lease_cmds"),
    "queue": "queue_cmds",
    **dict.fromkeys(("send", "broadcast", "recv", "request", "reply", "gather", "kv"),
                    "message_cmds"),
    "metrics": "metrics_cmd",
    "demo": "demo_cmd",
    "watch": "watch_cmd",
}
MODULES = ("store_cmds", "instance_cmds", "process_cmds", "lease_cmds", "queue_cmds",
           "message_cmds", "metrics_cmd", "demo_cmd", "watch_cmd")


def build(modules: Sequence[str] = MODULES, words: Sequence[str] = ()) -> typer.Typer:
    """The typer app with the commands of ``modules`` (default: all); with ``words`` (the
    command words invoked, e.g. ``["queue", "put"]``) only the command they name."""
    import importlib

    app = typer.Typer(
        name="coord",
        help="A coordination store for the many copies of one tool on one machine.\n\n"
        "Examples:\n\n\b\n  coord run --app web -- python -m http.server 8000\n"
        "  coord instances\n  coord queue put jobs '{\"n\": 1}'\n"
        "  coord --db /srv/state/coord.db doctor",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for name in modules:
        importlib.import_module(f"{__package__}.{name}").register(app)
    return _narrow(app, words)


def _narrow(app: typer.Typer, words: Sequence[str]) -> typer.Typer:
    """A copy of ``app`` holding only the command ``words`` name (a group: only its
    subcommand the next word names). typer turns every command it holds into a click
    command before running one, reading each signature: a command run alone need not pay
    for its siblings. A word that names nothing, or a group without a subcommand word,
    keeps everything: help, and click's own message for an unknown word, stay whole."""
    import copy

    if not words:
        return app
    commands = [c for c in app.registered_commands if c.name == words[0]]
    groups = [g for g in app.registered_groups if g.name == words[0]]
    if len(commands) + len(groups) != 1:
        return app
    narrow = copy.copy(app)
    narrow.registered_commands = commands
    narrow.registered_groups = []
    for g in groups:
        inner = copy.copy(g)
        if g.typer_instance is not None:
            inner.typer_instance = _narrow(g.typer_instance, words[1:])
        narrow.registered_groups.append(inner)
    return narrow


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the full app, for tests and tools that import it
        full = build()
        globals()["app"] = full
        return full
    raise AttributeError(name)


def _invoked(args: Sequence[str]) -> list[str]:
    """The command words in ``args``: the top-level command (skipping the global --db
    option) and the word after it that is not an option (a subcommand, if it is a group)."""
    words: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--":
            break
        if a == "--db" and not words:
            next(it, None)
        elif not a.startswith("-"):
            words.append(a)
            if len(words) == 2:
                break
    return words


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"coord {version('coord')}")
        raise typer.Exit(0)


def _root(
    ctx: typer.Context,
    db: Annotated[
        str | None,
        typer.Option("--db", envvar="COORD_DB", show_default=False, metavar="PATH",
                     help="Database path. Default: $COORD_DB, else coord.db in the user's "
                     "runtime directory. Accepted after the command too."),
    ] = None,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="Print coord's version and exit.")] = False,
) -> None:
    """coord: instances, processes, leases, queues and messages in one SQLite database."""
    ctx.obj = State(db)


# Commands whose CMD starts at their first argument (no `--` needed), with their options
# that take a value: options after CMD's first word are CMD's own, so --db is hoisted only
# from before it.
_CMD_AT_FIRST_ARGUMENT = {"run": {"--app", "--instance-id"}}


def hoist_db(args: Sequence[str]) -> list[str]:
    """``args`` with a ``--db PATH`` (or ``--db=PATH``) given after the command moved to the
    front, where the root option reads it: ``coord queue ls --db x.db`` works like
    ``coord --db x.db queue ls``. Nothing after ``--`` (a CMD) is touched."""
    out: list[str] = []
    hoisted: list[str] = []
    command: str | None = None
    i = at = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out += args[i:]
            break
        if command in _CMD_AT_FIRST_ARGUMENT:
            if a in _CMD_AT_FIRST_ARGUMENT[command]:
                out += args[i:i + 2]  # the option and its value
                i += 2
                continue
            if not a.startswith("-"):
                out += args[i:]  # CMD itself
                break
        if command is not None and a == "--db" and i + 1 < len(args):
            hoisted += [a, args[i + 1]]
            i += 2
            continue
        if command is not None and a.startswith("--db="):
            hoisted.append(a)
            i += 1
            continue
        if command is None and a == "--db":
            out += args[i:i + 2]
            i += 2
            continue
        if command is None and not a.startswith("-"):
            command, at = a, len(out)
        out.append(a)
        i += 1
    # Just before the command word: after a --db given before it, so the later one wins.
    return out[:at] + hoisted + out[at:] if hoisted else out


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the CLI and exit with the brief's statuses; every error is one line on stderr."""
    args = hoist_db(sys.argv[1:] if argv is None else list(argv))
    # --json (before any `--` that starts a CMD) makes usage errors JSON objects too.
    json_errors("--json" in (args[:args.index("--")] if "--" in args else args))
    words = _invoked(args)
    module = COMMANDS.get(words[0]) if words else None
    app = build((module,), words) if module else build(MODULES)
    try:
        code = app(args=args, prog_name="coord", standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        error_line("aborted", 130, "Aborted")
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
            error_line(f"internal error: {type(e).__name__}: {e}", EXIT_ERROR, "InternalError")
            sys.exit(EXIT_ERROR)
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.format_message(), file=sys.stderr)  # the help text of a bare group
        else:
            ctx = getattr(e, "ctx", None)
            where = getattr(ctx, "command_path", None) or "coord"
            error_line(f"{e.format_message()} (see '{where} --help')", code, "UsageError")
    # A command that returned normally gives None; typer.Exit(n) comes back as n.
    code = code if isinstance(code, int) else 0
    if argv is None:
        _exit(code)
    sys.exit(code)


def _exit(code: int) -> NoReturn:
    """End the process with ``code`` as the interpreter would — other threads awaited,
    every atexit handler run (instances deregistered), the stores closed, the output
    flushed — but without its teardown of every module and object, which costs ~10-15 ms
    once typer and coord are loaded: most of what a command run in a loop pays above its
    work. Anything out of the ordinary (a thread still running, output that cannot be
    flushed) takes the interpreter's own exit."""
    import atexit
    import threading

    me = threading.current_thread()
    if any(t is not me and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    close_stores()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    main()
