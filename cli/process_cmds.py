"""Commands about processes: ps, stop, orphans, top."""

from __future__ import annotations

import signal
import time
from typing import Annotated, Any

import typer

from ._common import JsonOption, duration, emit_json, handle_errors, store, table

PS_COLUMNS = [("id", "ID"), ("instance_id", "INSTANCE"), ("pid", "PID"), ("name", "NAME"),
              ("status_h", "STATUS"), ("rss_h", "RSS"), ("cpu_percent", "CPU%"),
              ("started_h", "STARTED"), ("uptime_h", "UPTIME"), ("cmdline", "COMMAND")]
TOP_COLUMNS = [("pid", "PID"), ("user", "USER"), ("rss_h", "RSS"), ("memory_percent", "MEM%"),
               ("name", "NAME"), ("cmdline", "COMMAND")]
GraceOption = Annotated[float | None, typer.Option(
    "--grace", help="Seconds between SIGTERM and SIGKILL (default: the kill_grace setting, 5).",
    show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("ps")(ps)
    app.command("stop")(stop)
    app.command("orphans")(orphans)
    app.command("top")(top)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n}B"
    v = n / 1024
    for unit in ("K", "M"):
        if v < 1024:
            return f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}G"


def _status(p: dict[str, Any]) -> str:
    if p["alive"]:
        return f"{p['status']} (orphan)" if p["orphan"] else p["status"]
    if p["signal"] is not None:
        try:
            return f"exited ({signal.Signals(p['signal']).name})"
        except ValueError:
            return f"exited (signal {p['signal']})"
    if p["exit_code"] is not None:
        return f"exited ({p['exit_code']})"
    return "exited"


def _human(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        r["status_h"] = _status(r)
        r["rss_h"] = _size(r.get("rss"))
        r["uptime_h"] = duration(r.get("uptime"))
        r["started_h"] = time.strftime("%H:%M:%S", time.localtime(r["started_at"]))
    return rows


def _show(procs: list[Any], as_json: bool) -> None:
    rows = [p.to_json() for p in procs]
    if as_json:
        emit_json(rows)
    else:
        table(_human(rows), PS_COLUMNS)


@handle_errors
def ps(
    ctx: typer.Context,
    instance: Annotated[str | None, typer.Option(
        "--instance", envvar="COORD_INSTANCE_ID", show_default=False,
        help="Show this instance's processes (default: $COORD_INSTANCE_ID; without it, all).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Show every instance's processes (read-only view).")] = False,
    running: Annotated[bool, typer.Option("--running", help="Only processes still running.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List tracked processes with live figures: pid, name, status, RSS, CPU %, uptime.

    JSON keys: id, instance_id, incarnation, pid, pgid, name, status, alive, orphan, rss,
    cpu_percent, memory_percent, started_at, uptime, ended_at, exit_code, signal, cmdline,
    cwd, user, labels, log_path, tree (a member of a coord run/elect/lock process tree)."""
    from coord.processes import list_processes

    s = store(ctx)
    if all_ or not instance:
        procs = list_processes(s, all_=True, running=running)
    else:
        procs = list_processes(s, instance, running=running)
    _show(procs, as_json)


@handle_errors
def stop(
    ctx: typer.Context,
    proc_id: Annotated[int, typer.Argument(help="The process's id (the ID column of coord ps).",
                                           show_default=False)],
    grace: GraceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop one of your instance's processes: SIGTERM to its group, a grace period, SIGKILL.

    Acts as the live instance named by COORD_INSTANCE_ID; another instance's process is
    refused. Prints how it ended: gone (had already ended), terminated or killed."""
    from coord.processes import stop_as

    how = stop_as(store(ctx), proc_id, grace=grace)
    if as_json:
        emit_json({"id": proc_id, "how": how})
    else:
        print(f"process {proc_id}: {'had already ended' if how == 'gone' else how}")


@handle_errors
def orphans(
    ctx: typer.Context,
    kill: Annotated[bool, typer.Option("--kill", help="End them: SIGTERM, a grace period, SIGKILL "
                                       "(only while pid and start token still match).")] = False,
    grace: GraceOption = None,
    as_json: JsonOption = False,
) -> None:
    """List every live process of a dead instance; --kill ends them.

    That is its tracked processes and, for a `coord run`/`elect`/`lock` wrapper, every member
    of its recorded process groups and every descendant (ID 0: not recorded). With --kill,
    JSON keys are id, instance_id, pid, name, how (terminated, killed, gone)."""
    from coord.processes import kill_orphans
    from coord.processes import orphans as find

    s = store(ctx)
    if not kill:
        _show(find(s), as_json)
        return
    ended = kill_orphans(s, grace=grace)
    if as_json:
        emit_json(ended)
    elif ended:
        table(ended, [("id", "ID"), ("instance_id", "INSTANCE"), ("pid", "PID"), ("name", "NAME"),
                      ("how", "ENDED")])
    else:
        print("no orphans")


@handle_errors
def top(
    n: Annotated[int, typer.Option("-n", "--number", help="How many processes.")] = 15,
    as_json: JsonOption = False,
) -> None:
    """The system's top processes by memory (resident set size), largest first.

    JSON keys: pid, user, rss (bytes), memory_percent, name, cmdline."""
    from coord.processes import top as do_top

    rows = do_top(n)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["rss_h"] = _size(r["rss"])
    table(rows, TOP_COLUMNS)
