"""``coord watch``: a live dashboard of instances, leases, queues and recent events."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated, Any

import typer

from ._common import INT64_MAX, duration, example, handle_errors, store

INSTANCE_COLUMNS = [("id", "ID"), ("app", "APP"), ("pid", "PID"), ("status", "STATUS"),
                    ("rss_h", "RSS"), ("cpu_percent", "CPU%"), ("heartbeat_h", "HEARTBEAT")]
LEASE_COLUMNS = [("id", "NAME"), ("holder_h", "HOLDER"), ("term", "TERM"),
                 ("expires_h", "EXPIRES IN")]
QUEUE_COLUMNS = [("id", "QUEUE"), ("ready", "READY"), ("delayed", "DELAYED"),
                 ("claimed", "CLAIMED"), ("dead", "DEAD"), ("done", "DONE"), ("rate_h", "RATE/S")]
EVENT_COLUMNS = [("time_h", "TIME"), ("kind", "EVENT"), ("instance_id", "INSTANCE"),
                 ("subject", "SUBJECT")]
MIN_GAP = 0.1  # at most ten frames a second, however often the database commits


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)


@example("coord watch", "coord watch --events 20", "coord watch | cat      # one snapshot")
@handle_errors
def watch(
    ctx: typer.Context,
    events: Annotated[int, typer.Option("--events", "-n", min=1, max=INT64_MAX,
                                        help="How many recent events to show.")] = 10,
    interval: Annotated[float, typer.Option("--interval", min=0.1, max=60.0,
                                            help="Seconds between refreshes when nothing "
                                            "commits.")] = 1.0,
) -> None:
    """A live dashboard: instances (alive, pid, RSS, CPU, heartbeat age), leases (holder,
    term, expires in), queues (ready, claimed, dead, done per second) and recent events.

    Redrawn on every commit to the database and at least every --interval seconds; q quits.
    Not on a terminal, it prints one snapshot and exits."""
    from coord.dashboard import snapshot

    s = store(ctx)
    title = f"coord watch  {s.path}"
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        from ._common import terminal_width

        for line in frame(snapshot(s, events=events), title, width=terminal_width(), height=None):
            print(line)
        return
    _live(s, events, interval)


def frame(snap: Any, title: str, *, width: int | None, height: int | None) -> list[str]:
    """The dashboard's lines: each pane a titled table; events fill what height is left."""
    from .tables import render, shorten

    for i in snap.instances:
        i["rss_h"] = f"{i['rss'] / 1048576:.1f}M" if i.get("rss") else "-"
        age = i.get("heartbeat_age")
        i["heartbeat_h"] = "-" if age is None else f"{duration(age)} ago"
    for lease in snap.leases:
        who = lease["instance_id"]
        lease["holder_h"] = None if who is None else who + ("" if lease["alive"] else " (dead)")
        exp = lease["expires_in"]
        lease["expires_h"] = None if exp is None else ("expired" if exp < 0 else duration(exp))
    for q in snap.queues:
        q["rate_h"] = "-" if q["rate"] is None else f"{q['rate']:.1f}"
    for e in snap.events:
        e["time_h"] = time.strftime("%H:%M:%S", time.localtime(e["at"]))
    alive = sum(1 for i in snap.instances if i["alive"])
    lines = [title, ""]
    for name, rows, columns in (
        (f"INSTANCES ({alive} alive)", snap.instances, INSTANCE_COLUMNS),
        (f"LEASES ({sum(1 for x in snap.leases if x['instance_id'])} held)", snap.leases,
         LEASE_COLUMNS),
        (f"QUEUES ({len(snap.queues)})", snap.queues, QUEUE_COLUMNS),
    ):
        lines.append(name)
        lines += list(render(rows, columns, width=width)) if rows else ["  (none)"]
        lines.append("")
    lines.append("RECENT EVENTS")
    shown = list(reversed(snap.events))  # newest first, so a short screen keeps the newest
    if height is not None:
        shown = shown[:max(0, height - len(lines) - 2)]
    lines += list(render(shown, EVENT_COLUMNS, width=width)) if shown else ["  (none)"]
    if width is not None:
        lines = [shorten(line, width) for line in lines]
    return lines[:height] if height is not None else lines


def _live(s: Any, events: int, interval: float) -> None:
    """Full-screen refresh until q (or Ctrl-C); the terminal is restored however it ends."""
    import select
    import termios
    import tty

    from coord.dashboard import snapshot

    fd, out = sys.stdin.fileno(), sys.stdout
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    out.write("\x1b[?1049h\x1b[?25l")  # the alternate screen, no cursor
    try:
        version: int | None = None
        drawn = 0.0
        base = None  # the snapshot rates are measured against (one at least a second old)
        while True:
            now = time.monotonic()
            v = s.data_version()
            if (v != version and now - drawn >= MIN_GAP) or now - drawn >= interval:
                snap = snapshot(s, events=events)
                snap.rates_since(base)
                if base is None or snap.taken - base.taken >= 1.0:
                    base = snap
                size = os.get_terminal_size(out.fileno())
                # The path goes last: on a narrow screen it is what gets shortened.
                head = f"coord watch  {time.strftime('%H:%M:%S')}  (q quits)  {s.path}"
                lines = frame(snap, head, width=size.columns, height=size.lines)
                out.write("\x1b[H" + "".join(f"{line}\x1b[K\r\n" for line in lines[:-1])
                          + (lines[-1] + "\x1b[K" if lines else "") + "\x1b[J")
                out.flush()
                version, drawn = v, now
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                keys = os.read(fd, 64)
                if not keys or b"q" in keys.lower():  # q, or the terminal has gone
                    return
    finally:
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
