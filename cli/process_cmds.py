"""Commands about processes: ps, stop, orphans, top."""

from __future__ import annotations

import signal
import time
from typing import Annotated, Any

import typer

from ._common import (
    INT64_MAX,
    JsonOption,
    NoHeadersOption,
    duration,
    emit_json,
    example,
    handle_errors,
    store,
    table,
)

PS_COLUMNS = [("id", "ID"), ("instance_id", "INSTANCE"), ("pid", "PID"), ("name", "NAME"),
              ("status_h", "STATUS"), ("rss_h", "RSS"), ("cpu_percent", "CPU%"),
              ("started_h", "STARTED"), ("uptime_h", "UPTIME"), ("cmdline", "COMMAND")]
TOP_COLUMNS = [("pid", "PID"), ("user", "USER"), ("rss_h", "RSS"), ("memory_percent", "MEM%"),
               ("name", "NAME"), ("cmdline", "COMMAND")]
GraceOption = Annotated[float | None, typer.Option(
    "--grace", help="Seconds between SIGTERM and SIGKILL (default: the kill_grace setting, 3).",
    show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("ps")(ps)
    app.command("stop")(stop)
    app.command("orphans")(orphans)
    app.command("top")(top)
    app.command("logs")(logs)


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


def _show(procs: list[Any], as_json: bool, no_headers: bool) -> None:
    rows = [p.to_json() for p in procs]
    if as_json:
        emit_json(rows)
    else:
        table(_human(rows), PS_COLUMNS, headers=not no_headers)


@example("coord ps --all --running",
         "coord ps --instance web-3f2a1c --json")
@handle_errors
def ps(
    ctx: typer.Context,
    instance: Annotated[str | None, typer.Option(
        "--instance", envvar="COORD_INSTANCE_ID", show_default=False,
        help="Show this instance's processes (default: $COORD_INSTANCE_ID; without it, all).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Show every instance's processes (read-only view).")] = False,
    running: Annotated[bool, typer.Option("--running", help="Only processes still running.")] = False,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
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
        from coord.instances import get_instance

        get_instance(s, instance)  # an unknown instance is "not found" (exit 1), not empty
        procs = list_processes(s, instance, running=running)
    _show(procs, as_json, no_headers)


@example("coord stop 3                      # under `coord run`",
         "coord stop 3 --instance web-3f2a1c --grace 10")
@handle_errors
def stop(
    ctx: typer.Context,
    proc_id: Annotated[int, typer.Argument(min=1, max=INT64_MAX, show_default=False,
                                           help="The process's id (the ID column of coord ps).")],
    instance: Annotated[str | None, typer.Option(
        "--instance", metavar="ID", show_default=False,
        help="The live instance that owns the process, for an operator acting from a plain "
        "shell (recorded in the event log).")] = None,
    grace: GraceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop one of your instance's processes: SIGTERM to its group, a grace period, SIGKILL.

    Acts as the instance this command runs under (COORD_INSTANCE_ID); another instance's
    process is refused. From a plain shell, name the owner with --instance ID: the stop is
    recorded in the event log with the operator instance that did it. Prints how it ended:
    gone (had already ended), terminated or killed."""
    from coord.events import record_event
    from coord.operator import acting, resolve
    from coord.processes import stop_as

    s = store(ctx)
    if instance is None:
        me = resolve(s, None, "coord stop (or name the process's owner with --instance ID)")
        how = stop_as(s, proc_id, instance_id=me.id, grace=grace)
    else:
        with acting(s, None, what="coord stop") as me:
            how = stop_as(s, proc_id, instance_id=instance, grace=grace)
            if me.id != instance:
                record_event(s, "operator stopped", me.id, instance, process=proc_id, how=how)
    if as_json:
        emit_json({"id": proc_id, "how": how})
    else:
        print(f"process {proc_id}: {'had already ended' if how == 'gone' else how}")


@example("coord orphans",
         "coord orphans --kill --grace 2")
@handle_errors
def orphans(
    ctx: typer.Context,
    kill: Annotated[bool, typer.Option("--kill", help="End them: SIGTERM, a grace period, SIGKILL "
                                       "(only while pid and start token still match).")] = False,
    grace: GraceOption = None,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """List every live process of a dead instance; --kill ends them.

    That is its tracked processes and, for a `coord run`/`elect`/`lock` wrapper, every member
    of its recorded process groups and every descendant (ID 0: not recorded). With --kill,
    JSON keys are id, instance_id, pid, name, how (terminated, killed, gone)."""
    from coord.processes import kill_orphans
    from coord.processes import orphans as find

    s = store(ctx)
    if not kill:
        _show(find(s), as_json, no_headers)
        return
    ended = kill_orphans(s, grace=grace)
    if as_json:
        emit_json(ended)
    elif ended:
        table(ended, [("id", "ID"), ("instance_id", "INSTANCE"), ("pid", "PID"), ("name", "NAME"),
                      ("how", "ENDED")], headers=not no_headers)
    else:
        print("no orphans")


@example("coord top -n 5")
@handle_errors
def top(
    n: Annotated[int, typer.Option("-n", "--number", min=1, max=INT64_MAX, help="How many processes.")] = 15,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
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
    table(rows, TOP_COLUMNS, headers=not no_headers)


@example("coord logs 3",
         "coord logs 3 -f")
@handle_errors
def logs(
    ctx: typer.Context,
    proc_id: Annotated[int, typer.Argument(min=1, max=INT64_MAX, show_default=False,
                                           help="The process's id (the ID column of coord ps).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing what it writes "
                                         "until it has ended.")] = False,
) -> None:
    """Print the log of a process started with --log (`coord run --log`): its stdout and
    stderr, as written. Exit 1 when it has no log."""
    import os
    import sys

    from coord.errors import NotFound
    from coord.processes import get_process

    s = store(ctx)
    info = get_process(s, proc_id)
    if not info.log_path:
        raise NotFound("log", f"process {proc_id} was not started with --log")
    try:
        fd = os.open(info.log_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("log file", info.log_path) from None
    out = sys.stdout.buffer
    try:
        while True:
            chunk = os.read(fd, 65536)
            if chunk:
                out.write(chunk)
                continue
            out.flush()
            # At the end of what is written: done, unless following a process that runs.
            if not follow or not _still_running(s, proc_id):
                if follow:  # it ended: print what it wrote last, then stop
                    while chunk := os.read(fd, 65536):
                        out.write(chunk)
                    out.flush()
                return
            time.sleep(0.2)
    finally:
        os.close(fd)


def _still_running(s: Any, proc_id: int) -> bool:
    """Whether the tracked process still runs (its row goes when its instance leaves)."""
    from coord.errors import NotFound
    from coord.processes import get_process

    try:
        return bool(get_process(s, proc_id).alive)
    except NotFound:
        return False
