"""Commands about leases: leases, leader, elect, lock."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ._common import JsonOption, duration, emit_json, fmt, handle_errors, store, table

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


@handle_errors
def leases(
    ctx: typer.Context,
    held: Annotated[bool, typer.Option("--held", help="Only leases that have a holder.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List leases: name, holder, term (fencing token), holder liveness, time to expiry."""
    from coord.leases import list_leases

    rows = [i.to_json() for i in list_leases(store(ctx), held_only=held)]
    if as_json:
        emit_json(rows)
    else:
        table([_human(r) for r in rows], COLUMNS)


@handle_errors
def leader(ctx: typer.Context, name: NameArgument, as_json: JsonOption = False) -> None:
    """Show who holds lease NAME: holder, term, since, expires in (one object with --json).

    A holder proven dead holds nothing: the lease shows free at once."""
    from coord.leases import get_lease

    row = get_lease(store(ctx), name).to_json()
    if as_json:
        emit_json(row)
        return
    _human(row)
    for key in ("name", "holder", "holder_incarnation", "holder_pid", "alive", "term", "ttl",
                "held_for_h", "expires_h", "pgid"):
        print(f"{key.removesuffix('_h'):<20}{fmt(row.get(key))}")


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

    raise typer.Exit(run_elected(store(ctx), name, cmd, wait=wait, ttl=ttl, app=app, grace=grace))


@handle_errors
def lock(ctx: typer.Context, name: NameArgument, cmd: CmdArgument, wait: WaitOption = None) -> None:
    """Run CMD while holding lock NAME (like flock): one CMD at a time across the machine.

    Same rules as `coord elect`; exit 75 if the lock was not obtained within --wait."""
    from coord.elect import run_elected

    raise typer.Exit(run_elected(store(ctx), name, cmd, wait=wait, app="coord-lock"))
