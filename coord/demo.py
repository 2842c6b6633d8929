"""``coord demo``: a short, self-contained show of what coord does, on a real database.

Each capability adds a section. Worker instances are real processes (``python -c``) that
register through the library; everything the demo starts, it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

from .db import Store
from .instances import list_instances
from .reaper import reap

Say = Callable[[str], None]

# A worker: registers as an instance of the demo app and waits to be told to stop.
WORKER = textwrap.dedent(
    """
    import os, signal, sys, time, coord
    store = coord.Store(os.environ["COORD_DB"])
    inst = coord.register(store, sys.argv[1], app="demo")
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)


class Demo:
    """The running show: its store, the processes it started, and how it talks."""

    def __init__(self, store: Store, say: Say) -> None:
        self.store = store
        self.say = say
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, script: str, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, COORD_DB=str(self.store.path))
        env.pop("COORD_INSTANCE_ID", None)
        p = subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                             stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def wait_ready(self, p: subprocess.Popen[str]) -> str:
        assert p.stdout is not None
        return p.stdout.readline().strip()

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        reap(self.store)


def section_instances(d: Demo) -> None:
    d.say("== instances: three copies of one tool register ==")
    tag = os.urandom(2).hex()
    ids = [f"demo-{tag}-{n}" for n in ("a", "b", "c")]
    workers = [d.spawn(WORKER, i) for i in ids]
    for w in workers:
        d.wait_ready(w)
    for info in list_instances(d.store, app="demo"):
        if info.id in ids:
            d.say(f"  {info.id:<18} pid {info.pid:<7} incarnation {info.incarnation}  {info.status}")
    victim = workers[1]
    d.say(f"-- kill -9 {ids[1]} (pid {victim.pid})")
    t0 = time.monotonic()
    victim.kill()
    victim.wait()
    status = {i.id: i.status for i in list_instances(d.store, include_dead=True, app="demo")}
    d.say(f"  seen {status.get(ids[1])} after {1000 * (time.monotonic() - t0):.1f} ms (no TTL wait)")
    report = reap(d.store)
    d.say(f"  reaped: {[x['id'] for x in report.dead]}")
    alive = [i.id for i in list_instances(d.store, app="demo") if i.id in ids]
    d.say(f"  still alive: {alive}")


SECTIONS: list[Callable[[Demo], None]] = [section_instances]


def run_demo(store: Store, say: Say = print) -> None:
    """Run every section; always end what was started."""
    d = Demo(store, say)
    say(f"database: {store.path}")
    try:
        for section in SECTIONS:
            section(d)
            d.cleanup()
            d.procs.clear()
    finally:
        d.cleanup()
    say("demo done: nothing left running")
