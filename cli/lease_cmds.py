"""Commands about leases: leases, leader, elect, lock."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ._common import (
    JsonOption,
    NoHeadersOption,
    detail,
    duration,
    emit_json,
    example,
    handle_errors,
    store,
    table,
)
from .vocabulary import current

COLUMNS = [("name", "NAME"), ("holder", "HOLDER"), ("term", "TERM"), ("alive", "ALIVE"),
           ("held_for_h", "HELD FOR"), ("expires_h", "EXPIRES IN"), ("pgid", "PGID")]

WaitOption = Annotated[
    float | None,
    typer.Option("--wait", help="Seconds to wait for the lease (0: fail at once with 75). "
                 "Default: wait for ever.", show_default=False),
]
CmdArgument = Annotated[list[str], typer.Argument(help="The command to run, after --.",
                                                  show_default=False)]
NameArgument = Annotated[str, typer.Argument(help="Lease name (e.g. app/job).", show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("leases")(leases)
    app.command("leader")(leader)
    # Options may follow NAME; everything after `--` is CMD, taken literally.
    app.command("elect")(elect)
    app.command("lock")(lock)


def _human(row: dict[str, Any]) -> dict[str, Any]:
    import time

    held = row["holder"] is not None and row["since"] is not None
    row["held_for_h"] = duration(max(0.0, time.time() - row["since"])) if held else None
    exp = row["expires_in"]
    row["expires_h"] = None if exp is None else ("expired" if exp < 0 else duration(exp))
    return row


@example("coord leases --held")
@handle_errors
def leases(
    ctx: typer.Context,
    held: Annotated[bool, typer.Option("--held", help="Only leases that have a holder.")] = False,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """List leases: name, holder, term (fencing token), holder liveness, time to expiry."""
    from coord.leases import list_leases

    rows = [current(i.to_json()) for i in list_leases(store(ctx), held_only=held)]
    if as_json:
        emit_json(rows)
    else:
        table([_human(r) for r in rows], COLUMNS, headers=not no_headers)


@example("coord leader app/cron",
         "coord leader app/cron --json | jq .term")
@handle_errors
def leader(ctx: typer.Context, name: NameArgument, as_json: JsonOption = False) -> None:
    """Show who holds lease NAME: holder, term, since, expires in (one object with --json).

    A holder proven dead holds nothing: the lease shows free at once. Exit 1 when no lease
    of that name was ever taken."""
    from coord.errors import NotFound
    from coord.leases import get_lease

    info = get_lease(store(ctx), name)
    if info.term is None and info.holder is None:
        raise NotFound("lease", name)  # never taken: the same "not found" as everywhere
    row = current(info.to_json())
    if as_json:
        emit_json(row)
        return
    _human(row)
    detail(row, ("name", "holder", "holder_incarnation", "holder_pid", "alive", "term", "ttl",
                 "held_for_h", "expires_h", "pgid"), pad=20)


@example("coord elect app/cron -- ./nightly.sh",
         "coord elect app/sync --wait 0 --ttl 30 -- rsync -a src/ dst/")
@handle_errors
def elect(
    ctx: typer.Context,
    name: NameArgument,
    cmd: CmdArgument,
    wait: WaitOption = None,
    ttl: Annotated[float | None, typer.Option("--ttl", help="Lease TTL in seconds (default: "
                                             "the configured lease TTL).", show_default=False)] = None,
    app: Annotated[str, typer.Option("--app", help="App name of the wrapper's instance.")] = "coord-elect",
    grace: Annotated[float | None, typer.Option("--grace", help="Seconds between TERM and KILL "
                                               "when CMD must end (default: the configured kill "
                                               "grace).", show_default=False)] = None,
) -> None:
    """Run CMD only while holding lease NAME, as a registered instance (the lease dies with it).

    CMD sees COORD_LEASE_NAME and COORD_LEASE_TERM. Its whole process tree is the
    instance's: every descendant is recorded, and none outlives the term. When CMD ends,
    the rest of its tree is ended (TERM, grace, KILL); SIGTERM ends the whole tree; SIGINT
    and SIGHUP are forwarded to CMD; if the lease is lost the tree is ended (exit 75). Exit:
    CMD's status, 128+N if it was killed by signal N, 75 if the lease was not obtained
    within --wait."""
    from coord.elect import run_elected

    _say_waiting(store(ctx), name, wait)
    raise typer.Exit(run_elected(store(ctx), name, cmd, wait=wait, ttl=ttl, app=app, grace=grace))


@example("coord lock app/migrate -- ./migrate.sh",
         "coord lock app/backup --wait 60 -- ./backup.sh")
@handle_errors
def lock(ctx: typer.Context, name: NameArgument, cmd: CmdArgument, wait: WaitOption = None) -> None:
    """Run CMD while holding lock NAME (like flock): one CMD at a time across the machine.

    Same rules as `coord elect`; exit 75 if the lock was not obtained within --wait."""
    from coord.elect import run_elected

    _say_waiting(store(ctx), name, wait)
    raise typer.Exit(run_elected(store(ctx), name, cmd, wait=wait, app="coord-lock"))


def _say_waiting(s: Any, name: str, wait: float | None) -> None:
    """On a terminal, say that the command will wait, and for whom (a held lease)."""
    import sys

    if wait == 0 or not sys.stderr.isatty():
        return
    from coord.leases import get_lease

    info = get_lease(s, name)
    if info.holder is None or not info.alive:
        return
    limit = "" if wait is None else f" (for up to {wait:g}s)"
    print(f"coord: waiting for {name!r}{limit}: held by {info.holder} (pid {info.holder_pid}, "
          f"term {info.term})", file=sys.stderr, flush=True)
