"""What every command shares: the store, error handling, JSON and table output.

Exit statuses, the same in every command: 0 ok; 1 error; 2 usage; 3 nothing arrived within
``--wait``/``--timeout``; 75 lease or lock not obtained; for run/elect/lock, CMD's own status
or 128+N when CMD was ended by signal N. Errors are one line on stderr, never a traceback
(set COORD_DEBUG=1 to see one).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from coord.errors import EXIT_ERROR, EXIT_USAGE, CoordError

F = TypeVar("F", bound=Callable[..., Any])

# SQLite's integers: every integer option is bounded by them, so a huge number is a usage
# error at parse time rather than an overflow deep inside.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

DbOption = Annotated[
    str | None,
    typer.Option("--db", envvar="COORD_DB", help="Database path (default: the runtime directory).",
                 show_default=False),
]
AsOption = Annotated[
    str | None,
    typer.Option("--as", metavar="ID", show_default=False,
                 help="Act as this live instance (default: the instance in COORD_INSTANCE_ID, "
                 "when this command runs under it)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class State:
    """Per-invocation state: the database path from the global --db option."""

    def __init__(self, db: str | None) -> None:
        self.db = db
        self._store: Any = None

    def store(self) -> Any:
        if self._store is None:
            from coord.db import Store

            self._store = Store(self.db)
            _OPENED.append(self._store)
        return self._store


#: Every store the command opened, closed by ``close_stores`` before a quick exit.
_OPENED: list[Any] = []


def close_stores() -> None:
    """Close the stores this invocation opened (the last connection to a database
    checkpoints it, as when the interpreter's teardown closes them)."""
    while _OPENED:
        _OPENED.pop().close()


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):
        obj = State(os.environ.get("COORD_DB"))
        ctx.find_root().obj = obj
    return obj


def store(ctx: typer.Context, db: str | None = None) -> Any:
    """The Store for this invocation (a command's own --db wins over the global one)."""
    st = state(ctx)
    if db is not None and db != st.db:
        st.db, st._store = db, None
    return st.store()


# Whether errors are written as one JSON object (set from --json by main() and by
# handle_errors): {"error": message, "kind": error class, "exit": status}.
_json_errors = False


def json_errors(on: bool) -> None:
    """Write errors as JSON objects (``--json``) or as ``coord: ...`` lines."""
    global _json_errors
    _json_errors = on


def error_line(message: str, code: int = EXIT_ERROR, kind: str = "Error") -> None:
    """Print one error on stderr: one line of text, or one JSON object with --json."""
    line = " ".join(str(message).split())
    if _json_errors:
        text = json.dumps({"error": line, "kind": kind, "exit": code}, ensure_ascii=False)
        print(text, file=sys.stderr)
    else:
        print(f"coord: {line}", file=sys.stderr)


def die(message: str, code: int = EXIT_ERROR, kind: str = "Error") -> NoReturn:
    """Print one error on stderr (see ``error_line``) and exit with ``code``."""
    error_line(message, code, kind)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Map CoordError (and anything unexpected) to one stderr line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        json_errors(bool(kwargs.get("as_json")))
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except CoordError as e:
            die(str(e), e.exit_code, type(e).__name__)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_ERROR) from None
        except Exception as e:
            if os.environ.get("COORD_DEBUG"):
                raise
            die(f"internal error: {type(e).__name__}: {e}", EXIT_ERROR, "InternalError")

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def emit_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, header: bool = True) -> None:
    w = csv.writer(sys.stdout)
    if header:
        w.writerow(columns)
    w.writerows(rows)


NoHeadersOption = Annotated[bool, typer.Option("--no-headers", help="Print the rows only, "
                                               "without the header line.")]
Columns = Sequence[tuple[str, str]]


def table(rows: Sequence[dict[str, Any]], columns: Columns, *, title: str | None = None,
          headers: bool = True) -> None:
    """Print rows as a table, one line per row, always.

    Cells are literal text (control characters escaped, never markup). On a terminal, or
    when COLUMNS is set, the widest cells are shortened with an ellipsis until the table
    fits; piped without COLUMNS, every value is printed whole (``--json`` has them all)."""
    from .tables import render

    if title and headers:
        print(title)
    for line in render(rows, columns, width=terminal_width(), headers=headers):
        print(line)
    sys.stdout.flush()


def terminal_width() -> int | None:
    """The width to fit: COLUMNS if set, else the terminal's; None (no limit) when piped."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def read_payload(ctx: typer.Context, text: str, *, hint: str = "") -> Any:
    """JSON from the argument, or from stdin for '-', checked against the store's limits.
    A payload that is not JSON is a usage error (exit 2); ``hint`` is added to its message."""
    from coord.errors import PayloadError
    from coord.payload import decode

    cfg = store(ctx).config
    raw: str | bytes = sys.stdin.buffer.read() if text == "-" else text
    try:
        return decode(raw, limit=cfg.payload_limit, max_depth=cfg.payload_max_depth)
    except PayloadError as e:
        err = PayloadError(f"{e.reason}{hint}") if hint and "not JSON" in e.reason else e
        err.exit_code = EXIT_USAGE  # the caller's argument is invalid: a usage error
        raise err from None


def read_string(ctx: typer.Context, text: str) -> Any:
    """The argument (or stdin for '-', less one final newline) as a JSON string value,
    checked against the store's limits like any payload."""
    if text == "-":
        text = sys.stdin.read().removesuffix("\n")
    return read_payload(ctx, json.dumps(text, ensure_ascii=False))


def usage(message: str) -> NoReturn:
    die(message, EXIT_USAGE, "UsageError")


def detail(row: dict[str, Any], keys: Sequence[str], pad: int = 14) -> None:
    """Print one object as ``key value`` lines (a ``_h`` or ``_text`` key, the human form
    of a value, shows under its plain name)."""
    from .tables import fmt, literal

    for key in keys:
        name = key.removesuffix("_h").removesuffix("_text")
        print(f"{name:<{pad}}{literal(fmt(row.get(key), key))}")


def example(*lines: str) -> Callable[[F], F]:
    """Add an example section to a command's help: ``lines`` are shown as they are (not
    rewrapped), indented, after the command's own text."""

    def add(fn: F) -> F:
        import inspect

        title = "Example" if len(lines) == 1 else "Examples"
        block = "\n".join(f"  {line}" for line in lines)
        # \b at the head of a paragraph keeps click from rewrapping its lines.
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\n{title}:\n\n\b\n{block}"
        return fn

    return add
