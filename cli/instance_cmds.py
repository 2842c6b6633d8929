"""Commands about instances: instances, instance, run, reap, events."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from ._common import (
    INT64_MAX,
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

COLUMNS = [("id", "ID"), ("app", "APP"), ("pid", "PID"), ("user", "USER"), ("status_h", "STATUS"),
           ("rss_h", "RSS"), ("cpu_percent", "CPU%"), ("uptime_h", "UPTIME"), ("cmdline", "COMMAND")]


def register(app: typer.Typer) -> None:
    app.command("instances")(instances)
    app.command("instance")(instance)
    app.command("run", context_settings={"allow_interspersed_args": False})(run)
    app.command("reap")(reap)
    app.command("events")(events)


def _row(info: Any, figures: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """An instance as JSON, with live figures (RSS, CPU, uptime) of its process when alive;
    ``figures`` caches them per pid within one listing."""
    from coord.discovery import live_figures, uptime_of

    row: dict[str, Any] = info.to_json()
    row["rss"] = row["cpu_percent"] = row["uptime"] = None
    if info.alive:
        cache = {} if figures is None else figures
        if info.pid not in cache:
            cache[info.pid] = {**live_figures(info.pid), "uptime": uptime_of(info.pid)}
        row.update(cache[info.pid])
    return row


def _human(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        r["status_h"] = f"tombstone ({r['status']})" if r.get("tombstone") else r["status"]
        r["rss_h"] = f"{r['rss'] / 1048576:.1f}M" if r.get("rss") else "-"
        r["uptime_h"] = duration(r.get("uptime"))
    return rows


@example("coord instances --app web",
         "coord instances --all --json",
         "coord instances --scan 'node .*server.js'")
@handle_errors
def instances(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Include dead instances and tombstones.")] = False,
    app: Annotated[str | None, typer.Option("--app", help="Only instances of this app.")] = None,
    scan: Annotated[str | None, typer.Option("--scan", help="Also list unregistered processes of "
                                             "yours whose command line matches this regex.")] = None,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """List instances: alive ones by default."""
    from coord.instances import list_instances

    s = store(ctx)
    infos = list_instances(s, include_dead=True, app=app)
    figures: dict[int, dict[str, Any]] = {}
    rows = [_row(i, figures) for i in infos if all_ or i.alive]
    if scan is not None:
        from coord.discovery import scan as do_scan
        from coord.processes import list_processes

        # Registered instances and the processes they track are not "unregistered".
        tracked = {p.pid for p in list_processes(s, all_=True, running=True, live=False)
                   if p.alive}
        rows += do_scan(scan, exclude_pids={i.pid for i in infos if i.alive} | tracked)
    if as_json:
        emit_json([{k: v for k, v in r.items() if not k.endswith("_h")} for r in rows])
    else:
        table(_human(rows), COLUMNS, headers=not no_headers)


@example("coord instance web-3f2a1c",
         "coord instance --json")
@handle_errors
def instance(
    ctx: typer.Context,
    id: Annotated[str | None, typer.Argument(help="Instance id (default: $COORD_INSTANCE_ID).",
                                             envvar="COORD_INSTANCE_ID", show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Show one instance in detail and the others in short."""
    from coord.errors import InvalidArgument
    from coord.instances import get_instance, list_instances

    if not id:
        raise InvalidArgument("name an instance id (or set COORD_INSTANCE_ID)")
    s = store(ctx)
    row = _row(get_instance(s, id))
    others = [{"id": i.id, "app": i.app, "pid": i.pid, "user": i.user, "alive": i.alive,
               "status": i.status} for i in list_instances(s) if i.id != id]
    if as_json:
        row["others"] = others
        emit_json(row)
        return
    _human([row])
    detail(row, ("id", "app", "status_h", "incarnation", "pid", "user", "host", "cwd", "cmdline",
                 "labels", "rss_h", "cpu_percent", "uptime_h", "ttl", "watchdog", "heartbeat_age",
                 "lock_path"))
    if others:
        print()
        table(_human(others), COLUMNS[:5], title="other live instances")


@example("coord run --app web -- python -m http.server 8000",
         "coord run --app worker --log -- ./work.sh")
@handle_errors
def run(
    ctx: typer.Context,
    cmd: Annotated[list[str], typer.Argument(help="The command to run, after --.", show_default=False)],
    app: Annotated[str, typer.Option("--app", help="App name of the instance.")] = "",
    instance_id: Annotated[str | None, typer.Option("--instance-id", help="Instance id (default: "
                                                    "generated; never inherited).")] = None,
    log: Annotated[bool, typer.Option("--log", help="Send CMD's output to a log file beside the database.")] = False,
    keep_children: Annotated[bool, typer.Option(
        "--keep-children", help="Leave what CMD started running when CMD ends (listed as "
        "orphans once the wrapper has gone); SIGTERM then goes to CMD alone.")] = False,
    grace: Annotated[float | None, typer.Option(
        "--grace", help="Seconds between TERM and KILL when the tree ends (default: the "
        "kill_grace setting, 3).", show_default=False)] = None,
) -> None:
    """Run CMD as a registered instance; exits with CMD's status (128+N if killed by signal N).

    CMD gets COORD_DB and COORD_INSTANCE_ID. CMD's whole process tree is the instance's:
    every descendant is recorded (also one that daemonized); when CMD ends, the rest of the
    tree is ended (TERM, grace, KILL) before coord run exits. SIGTERM to coord run ends the
    whole tree; SIGINT and SIGHUP are forwarded to CMD."""
    import os

    from coord.runner import run as do_run

    code = do_run(store(ctx), cmd, app=app or os.path.basename(cmd[0]), instance_id=instance_id,
                  log=log, keep_children=keep_children, grace=grace)
    raise typer.Exit(code)


@example("coord reap --dry-run",
         "*/5 * * * * coord reap   # crontab")
@handle_errors
def reap(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be reaped; change nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Apply the death rule to dead instances, expire what has expired, checkpoint the WAL.

    Quiet unless it did something; safe to run from cron while instances run."""
    from coord.reaper import reap as do_reap

    report = do_reap(store(ctx), dry_run=dry_run)
    if as_json:
        emit_json(report.to_json())
    elif report.did_something:
        verb = "would reap" if dry_run else "reaped"
        for d in report.dead:
            print(f"{verb} {d['id']} (incarnation {d['incarnation']}, {d['reason']})")
        counts = {k: v for k, v in report.to_json().items() if k not in ("dry_run", "dead") and v}
        if counts:
            print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()))


@example("coord events -n 20",
         "coord events -f --kind died --kind 'took over'",
         "coord events --since 10m --instance web-3f2a1c --json")
@handle_errors
def events(
    ctx: typer.Context,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=INT64_MAX,
                                       help="How many recent events.")] = 50,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="WHEN", show_default=False,
        help="Only events since WHEN: an age (90s, 10m, 2h, 1d), a date and time "
        "(2026-12-01T09:30, local time) or Unix seconds.")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", show_default=False,
        help="Only events of this kind (repeat for several), e.g. died, joined.")] = None,
    instance: Annotated[str | None, typer.Option(
        "--instance", metavar="ID", show_default=False,
        help="Only events of this instance.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the event log: joined, left, died, reaped, took over, lease and job events."""
    from coord.events import list_events

    from .tables import literal

    s = store(ctx)
    filters: dict[str, Any] = {"kinds": kind or None, "instance_id": instance,
                               "since": None if since is None else since_time(since)}
    rows = [current(e) for e in list_events(s, limit=limit, **filters)]

    def show(batch: list[dict[str, Any]]) -> None:
        for e in batch:
            if as_json:
                emit_json(e)
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(e["at"]))
                detail = " ".join(f"{k}={v}" for k, v in e["detail"].items())
                line = f"{stamp} {e['kind']:<16} {e['instance_id'] or '-'} {e['subject'] or ''} {detail}"
                print(literal(line.rstrip()), flush=True)

    if as_json and not follow:
        emit_json(rows)
        return
    show(rows)
    last = rows[-1]["id"] if rows else 0
    if follow and not rows:
        newest = list_events(s, limit=1)
        last = newest[-1]["id"] if newest else 0
    while follow:
        # The newest id before the filtered read: events up to it that the filters skip
        # need not be read again (one read later could skip one that matched).
        newest = list_events(s, after=last, limit=1)
        batch = [current(e) for e in
                 list_events(s, after=last, limit=1000, oldest_first=True, **filters)]
        if batch:
            show(batch)
            last = batch[-1]["id"]
            continue
        if newest:
            last = max(last, newest[-1]["id"])
        # Until an event newer than the last seen is committed (the engine's wake-up).
        s.backend.wakeup.wait_for(
            lambda seen=last: list_events(s, after=seen, limit=1) or None, None)


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_time(text: str) -> float:
    """Wall-clock seconds from an age (``90s``, ``10m``, ``2h``, ``1d``), a local date and
    time in ISO form, or Unix seconds; anything else is a usage error."""
    import datetime

    from coord.errors import InvalidArgument

    t = text.strip()
    if t[-1:] in _AGE_UNITS and t[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(t[:-1]) * _AGE_UNITS[t[-1]]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(t).timestamp()
    except ValueError:
        raise InvalidArgument(f"--since {text!r}: give an age (90s, 10m, 2h, 1d), a date and "
                              "time (2026-12-01T09:30) or Unix seconds") from None
