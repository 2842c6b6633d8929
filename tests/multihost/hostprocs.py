"""Coord processes in the harness's hosts, and what the tests read of the server.

``Proc`` runs a Python snippet inside a host as a machine of its own (``Net.run(machine=
True)``) and collects the JSON lines it prints; ``Watch`` records, on CLOCK_MONOTONIC, when
processes of a host vanish; ``locks_of`` counts the locks granted to a host's sessions.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from typing import Any

from netns import Host, Net, mono

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
