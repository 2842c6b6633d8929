"""Commands about leases: leases, leader, elect, lock."""

from __future__ import annotations

from collections.abc import Callable
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


lease_app = typer.Typer(
    name="lease",
    help="Act on one lease (release)."
    "\n\nExamples:\n\n\b\n  coord lease release app/cron\n  coord lease release app/cron --force",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.command("leases")(leases)
    app.add_typer(lease_app, name="lease")
    lease_app.command("release")(release)
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

    raise typer.Exit(run_elected(store(ctx), name, cmd, wait=wait, ttl=ttl, app=app, grace=grace,
                                 on_wait=_say_waiting(name, wait)))


@example("coord lock app/migrate -- ./migrate.sh",
         "coord lock app/backup --wait 60 -- ./backup.sh")
@handle_errors
def lock(ctx: typer.Context, name: NameArgument, cmd: CmdArgument, wait: WaitOption = None) -> None:
    """Run CMD while holding lock NAME (like flock): one CMD at a time across the machine.

    Same rules as `coord elect`; exit 75 if the lock was not obtained within --wait."""
    from coord.elect import run_elected

    raise typer.Exit(run_elected(store(ctx), name, cmd, wait=wait, app="coord-lock",
                                 on_wait=_say_waiting(name, wait)))


@example("coord lease release app/cron",
         "coord lease release app/cron --force --json")
@handle_errors
def release(
    ctx: typer.Context,
    name: NameArgument,
    force: Annotated[bool, typer.Option("--force", help="Release it even when its holder is "
                                        "alive and renewing.")] = False,
    grace: Annotated[float | None, typer.Option("--grace", help="Seconds between TERM and KILL "
                                               "when the holder's processes must end (default: "
                                               "the configured kill grace).",
                                               show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Free lease NAME whose holder is dead or hung, as a new holder would take it over.

    First ends the holder's recorded process tree (a `coord elect`/`lock` CMD and its
    descendants: TERM, grace, KILL), then frees the lease and records who released it in
    the events; the next holder takes a higher term. Refused (exit 1) while the holder is
    alive and renewing, unless --force. Exit 1 when no lease of that name was ever taken."""
    from coord.leases import release_by_operator
    from coord.operator import operator_user

    done = release_by_operator(store(ctx), name, by=operator_user(), force=force, grace=grace)
    if as_json:
        emit_json(current(done.to_json()))
        return
    if not done.released:
        print(f"lease {name!r} was not held"
              + ("" if done.processes == "gone" else f"; its processes: {done.processes}"))
        return
    print(f"released lease {name!r} term {done.term} (holder {done.holder}: "
          f"{done.holder_state}; its processes: {done.processes})")


def _say_waiting(name: str, wait: float | None) -> Callable[[Any], None] | None:
    """On a terminal, what says that the command waits, and for whom: once when it starts
    waiting for a live holder, again each time the holder it waits for changes."""
    import sys

    if wait == 0 or not sys.stderr.isatty():
        return None
    limit = "" if wait is None else f" (for up to {wait:g}s)"
    said: list[bool] = []

    def say(info: Any) -> None:
        now = "now " if said else ""
        said.append(True)
        print(f"coord: waiting for {name!r}{limit}: {now}held by {info.holder} "
              f"(pid {info.holder_pid}, term {info.term})", file=sys.stderr, flush=True)

    return say
