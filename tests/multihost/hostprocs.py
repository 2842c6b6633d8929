"""Coord processes in the harness's hosts, and what the tests read of the server.

``Proc`` runs a Python snippet inside a host as a machine of its own (``Net.run(machine=
True)``) and collects the JSON lines it prints; ``Watch`` records, on CLOCK_MONOTONIC, when
processes of a host vanish; ``locks_of`` counts the locks granted to a host's sessions.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from netns import Host, Net, mono
from pg_fixtures import import_psycopg

import coord
from coord.errors import LeaseLost, StorageError

psycopg = import_psycopg()

#: Every coord process of these tests uses these timings: renew deadline 4.5 s + kill grace
#: 1.4 s + KILL wait 2 s = 7.9 s, below the lease TTL and the instance TTL (8 s); the
#: heartbeat (and the lease renewal) every 8/3 s.
TTL = 8.0
TIMINGS = {"COORD_LEASE_TTL": "8", "COORD_INSTANCE_TTL": "8", "COORD_RENEW_DEADLINE": "4.5",
           "COORD_KILL_GRACE": "1.4", "COORD_HEARTBEAT": "2.66"}
RENEW_DEADLINE = 4.5
GRACE = 1.4


def env(runtime: str, **extra: str) -> dict[str, str]:
    """A coord process's environment: the timings, a runtime dir of its host, no other
    COORD_ setting of the caller's."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    e.update(TIMINGS, XDG_RUNTIME_DIR=runtime, **extra)
    return e


class Proc:
    """A process in a host and the JSON lines it printed so far (others are kept as text)."""

    def __init__(self, net: Net, host: Host, argv: list[str], environ: dict[str, str]) -> None:
        self.host = host
        self.p = net.run(host, argv, machine=True, env=environ, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._sel = selectors.DefaultSelector()
        assert self.p.stdout is not None
        self._sel.register(self.p.stdout, selectors.EVENT_READ)

    @classmethod
    def python(cls, net: Net, host: Host, code: str, *args: str,
               environ: dict[str, str]) -> Proc:
        return cls(net, host, [sys.executable, "-c", code, *args], environ)

    def pump(self, timeout: float = 0.0) -> None:
        assert self.p.stdout is not None
        while self._sel.get_map() and self._sel.select(timeout):
            line = self.p.stdout.readline()
            if not line:
                self._sel.unregister(self.p.stdout)
                return
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"op": "text", "text": line.rstrip()})
            timeout = 0.0

    def found(self, op: str) -> list[dict[str, Any]]:
        return [x for x in self.lines if x.get("op") == op]

    def wait_for(self, op: str, timeout: float) -> dict[str, Any]:
        deadline = mono() + timeout
        while True:
            got = self.found(op)
            if got:
                return got[0]
            if mono() > deadline or self.p.poll() is not None:
                self.pump(0.05)
                got = self.found(op)
                if got:
                    return got[0]
                err = ""
                if self.p.poll() is not None and self.p.stderr is not None:
                    err = self.p.stderr.read()[-3000:]
                raise AssertionError(f"no {op!r} within {timeout} s from {self.host.ns}: "
                                     f"{self.lines[-4:]} {err}")
            self.pump(0.05)

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        try:
            self.p.stdin.write(line + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass  # it ended: what it printed says why

    def end(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(18)  # SIGCONT: a frozen process must see its SIGKILL now
            self.p.kill()
        self.p.wait(timeout=10)
        self._sel.close()
        for s in (self.p.stdin, self.p.stdout, self.p.stderr):
            if s is not None:
                s.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_left(pids: list[int]) -> None:
    """SIGKILL what a trial started (its CMD trees, by the pids they wrote) and left alive."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def run_trials(trial: Callable[[Net, str], dict[str, float]], net: Net, trials: int,
               how: str) -> None:
    """Run ``trials`` trials of one variant and print each timing's range (seconds from the
    fault) for the note; a "kept" figure counts the trials in which the holder kept its lease."""
    results = [trial(net, how) for _ in range(trials)]
    for key in results[0]:
        vals = sorted(r[key] for r in results if key in r)
        if key == "kept":
            print(f"{how}: the holder kept the lease in {sum(vals):.0f} of {trials} trials")
        else:
            print(f"{how} {key}: {vals[0]:.2f}-{vals[-1]:.2f} s ({len(vals)} of {trials} trials)")


def locks_of(sql: Any, addr: str) -> int:
    """Locks granted to the server's sessions of clients at ``addr`` (``sql(query, params)``
    returns rows)."""
    return int(sql("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                   "WHERE a.client_addr = %s AND l.granted", (addr,))[0][0])


def read_pids(path: str, timeout: float = 30) -> list[int]:
    """The pids a command wrote to ``path``, one a line, once there are two."""
    deadline = mono() + timeout
    while mono() < deadline:
        try:
            with open(path) as f:
                pids = [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pids = []
        if len(pids) >= 2:
            return pids
        time.sleep(0.02)
    raise AssertionError(f"the command did not write its pids to {path}")


NAME = "app/leader"
INTERVAL = TTL / 3

# CMD of the holder: it and its child ignore SIGTERM (an ignored signal stays ignored across
# exec), so only the KILL after the grace ends them; it writes both pids.
CMD = "trap '' TERM; echo $$ > \"$1\"; sleep 1000 & echo $! >> \"$1\"; wait; wait"

# A candidate through the Python lease API: tries every 50 ms and prints, for the attempt
# that took the lease, CLOCK_MONOTONIC before that attempt started; holds it (the keeper
# renews) until a line on stdin, then releases.
CANDIDATE = r"""
import json, sys, time
import coord
from coord.errors import CoordError
from coord.leases import try_acquire

def mono():
    return time.clock_gettime(time.CLOCK_MONOTONIC)

def say(**kw):
    kw["t"] = mono()
    print(json.dumps(kw), flush=True)

url, name = sys.argv[1], sys.argv[2]
store = coord.Store(url)
inst = coord.register(store, "cand", app="cand", handle_signals=False)
say(op="ready")
while True:
    t0 = mono()
    try:
        lease = try_acquire(inst, name)
    except CoordError as e:
        say(op="error", error=str(e))
        time.sleep(0.05)
        continue
    if lease is not None:
        say(op="took", t0=t0, term=lease.term)
        break
    time.sleep(0.05)
sys.stdin.readline()
lease.release()
inst.close()
say(op="released")
"""


class Admin:
    """The test's own view of the server, over its socket (reconnects after a crash)."""

    def __init__(self, net: Net, schema: str) -> None:
        self.url = net.admin_url
        self.schema = schema
        self.store = coord.Store(f"{self.url}&schema={schema}" if "?" in self.url
                                 else f"{self.url}?schema={schema}")
        self.c: Any = None

    def sql(self, q: str, params: tuple[Any, ...] = ()) -> list[Any]:
        for _ in range(50):
            try:
                if self.c is None or self.c.closed or self.c.broken:
                    self.c = psycopg.connect(self.url, autocommit=True,
                                             options=f"-c search_path={self.schema}")
                return list(self.c.execute(q, params).fetchall())
            except psycopg.OperationalError:
                self.c = None  # the server is restarting after a backend's crash
                time.sleep(0.1)
        raise AssertionError("the server did not come back")

    def fenced_refused(self, term: int) -> bool:
        """Whether a fenced write in ``term`` is refused (``LeaseLost``) now; a connection
        that a server crash ended is opened again."""
        for _ in range(50):
            try:
                self.store.backend.leases.fenced_kv_set(NAME, term, "stale", '"x"', None)
                return False
            except LeaseLost:
                return True
            except StorageError:
                time.sleep(0.1)
        raise AssertionError("the server did not come back")

    def term(self) -> tuple[str | None, int]:
        rows = self.sql("SELECT holder_id, term FROM leases WHERE name = %s", (NAME,))
        return (rows[0][0], int(rows[0][1])) if rows else (None, 0)

    def close(self) -> None:
        if self.c is not None:
            self.c.close()
        self.store.close()


def start_holder(net: Net, host: Host, url: str, runtime: str, tag: str) -> Proc:
    """``coord elect`` of CMD on ``host``; CMD writes its pids to ``cmd-TAG.pids``."""
    pidfile = os.path.join(runtime, f"cmd-{tag}.pids")
    return Proc(net, host, [sys.executable, "-m", "coord", "elect", NAME, "--wait", "60", "--",
                            "sh", "-c", CMD, "sh", pidfile], env(runtime, COORD_DB=url))
