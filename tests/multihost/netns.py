"""Hosts for tests: network namespaces joined to a PostgreSQL server's namespace.

    with Net(hosts=3) as net:
        p = net.run(net.hosts[0], [sys.executable, "worker.py", net.url(net.hosts[0])])
        net.cut(net.hosts[0])      # silently drop every packet, both directions
        net.heal(net.hosts[0])

Layout: one namespace holds the server (a private cluster from tests/pgcluster.py, started
inside it); each host is a namespace of its own with one veth pair to the server's namespace,
addressed in a private /30 (``10.231.<i>.1`` the server's side, ``10.231.<i>.2`` the host's).
The addresses exist only inside these namespaces: nothing is added to the machine's own
network namespace, so they cannot collide with or reach any outside address. Unix sockets
are not separated by network namespaces: the test process itself reaches the server on its
socket (``admin_url``) for observation and for killing backends.

A cut must be silent: a sender gets no error and no reply, exactly as when a cable or a switch
fails. A blackhole *route* is not silent (local senders get EINVAL at once); here every packet
leaving either end of the link is dropped by the link's queueing discipline (netem ``loss
100%`` where the kernel has sch_netem, else the ``blackhole`` qdisc, which drops everything and
reports success to the sender). ``throttle`` limits a link's rate (tbf); ``delay`` adds latency
where the kernel has sch_netem. ``freeze`` SIGSTOPs every process of a host (a hung
host), ``thaw`` resumes them.

``close`` always ends what it started, in order: the processes started by ``run`` (SIGKILL by
pid), any process still inside these namespaces (all started here), the server, the
namespaces (their veths go with them). Every wait is bounded and counted on CLOCK_MONOTONIC.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pgcluster import Cluster, process_alive, process_state  # noqa: E402

NET_PREFIX = "10.231"


class HarnessUnavailable(RuntimeError):
    """Namespaces cannot be made here (the message says why)."""


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p


def netns_names() -> set[str]:
    out = ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it ended meanwhile


@dataclass(frozen=True)
class Host:
    """One host: its namespace, its end of the link, and the server's address it uses."""

    index: int
    ns: str
    veth: str  # this host's end, inside ``ns``
    server_veth: str  # the server's end, inside the server's namespace
    addr: str
    server_addr: str


class Net:
    """A server namespace with a running PostgreSQL cluster, and ``hosts`` host namespaces."""

    def __init__(self, hosts: int = 2) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be between 1 and 200")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise HarnessUnavailable("the ip and tc programs (iproute2) are not installed")
        self.tag = secrets.token_hex(3)
        self.server_ns = f"coordt-{self.tag}-srv"
        self.hosts = [Host(i, f"coordt-{self.tag}-h{i}", f"c{self.tag}h{i}", f"c{self.tag}s{i}",
                           f"{NET_PREFIX}.{i}.2", f"{NET_PREFIX}.{i}.1") for i in range(hosts)]
        self.cluster: Cluster | None = None
        self.procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []
        self._netem: bool | None = None
        self._idents: list[Path] = []

    # -- setup and teardown ----------------------------------------------------------------

    def __enter__(self) -> Net:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        p = ip("netns", "add", name, check=False)
        if p.returncode != 0:
            raise HarnessUnavailable(f"cannot create a network namespace: {p.stderr.strip()}")
        self._made.append(name)
        ip("link", "set", "lo", "up", ns=name)

    def start(self) -> None:
        self._add_ns(self.server_ns)
        for h in self.hosts:
            self._add_ns(h.ns)
            # Created inside the server's namespace with its peer moved straight into the
            # host's: neither end ever exists in the machine's own namespace.
            ip("link", "add", h.server_veth, "type", "veth", "peer", "name", h.veth,
               "netns", h.ns, ns=self.server_ns)
            ip("addr", "add", f"{h.server_addr}/30", "dev", h.server_veth, ns=self.server_ns)
            ip("addr", "add", f"{h.addr}/30", "dev", h.veth, ns=h.ns)
            ip("link", "set", h.server_veth, "up", ns=self.server_ns)
            ip("link", "set", h.veth, "up", ns=h.ns)
        base = Path(tempfile.mkdtemp(prefix=f"coordt-{self.tag}-pg-", dir="/tmp"))
        self.cluster = Cluster(base=base, listen=["*"], port=5432,
                               hba_extra=[f"host all all {NET_PREFIX}.0.0/16 scram-sha-256"],
                               wrap=["ip", "netns", "exec", self.server_ns])
        self.cluster.start()

    def close(self) -> None:
        """End everything this harness started; safe to call twice."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a stopped process must see its SIGKILL now
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()
        for d in self._idents:
            shutil.rmtree(d, ignore_errors=True)
        self._idents.clear()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        for name in reversed(self._made):
            self._kill_inside(name)
            ip("netns", "del", name, check=False)
        self._made.clear()

    def _kill_inside(self, ns: str) -> None:
        # Every process in these namespaces was started here (by run() or by the server).
        deadline = mono() + 10
        while mono() < deadline:
            pids = [int(x) for x in ip("netns", "pids", ns, check=False).stdout.split()]
            live = [pid for pid in pids if process_alive(pid)]
            if not live:
                return
            for pid in live:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.05)

    # -- using it ------------------------------------------------------------------------

    def url(self, host: Host, **params: str | int) -> str:
        """A TCP URL to the server's ``postgres`` database as ``host`` sees it, with libpq
        ``params`` appended."""
        assert self.cluster is not None
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return self.cluster.tcp_url(host.server_addr) + (f"?{query}" if query else "")

    @property
    def admin_url(self) -> str:
        """The server's unix socket: reachable from the test process whatever the links do."""
        assert self.cluster is not None
        return self.cluster.url()

    def run(self, host: Host, argv: list[str], *, machine: bool = False,
            **popen: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace (``ip netns exec`` execs it: the returned
        pid is the program's own); it is killed by ``close`` if still running.

        ``machine``: the process also sees this host's own machine id and boot id (bind
        mounts over ``/etc/machine-id`` and ``/proc/sys/kernel/random/boot_id`` in a mount
        namespace of its own), so coord takes it for another machine than the other hosts'
        processes: it cannot prove their deaths by their pids, only by their heartbeats, as
        across real machines. Without it every host is this machine to coord."""
        prefix = ["ip", "netns", "exec", host.ns]
        if machine:
            ident = self._identity(host)
            prefix += ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount --bind "$1" /etc/machine-id && '
                       'mount --bind "$2" /proc/sys/kernel/random/boot_id && '
                       'shift 2 && exec "$@"', "sh", str(ident / "machine-id"),
                       str(ident / "boot_id")]
        p = subprocess.Popen([*prefix, *argv], **popen)
        self.procs.append(p)
        return p

    def _identity(self, host: Host) -> Path:
        """The directory holding ``host``'s machine id and boot id files (made once)."""
        assert self.cluster is not None
        d = self.cluster.base.parent / f"coordt-{self.tag}-ident-h{host.index}"
        if not d.exists():
            d.mkdir(mode=0o755)
            (d / "machine-id").write_text(secrets.token_hex(16) + "\n")
            raw = secrets.token_hex(16)
            (d / "boot_id").write_text(f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-"
                                       f"{raw[20:]}\n")
            self._idents.append(d)
        return d

    def pids(self, host: Host) -> list[int]:
        """The live processes inside ``host`` (all started here)."""
        out = ip("netns", "pids", host.ns, check=False).stdout.split()
        return [pid for pid in map(int, out) if process_alive(pid)]

    def freeze(self, host: Host) -> list[int]:
        """SIGSTOP every process of ``host``: a hung host (its sockets stay open, its kernel
        still answers TCP, nothing of its own runs). Returns the pids stopped."""
        stopped = self.pids(host)
        for pid in stopped:
            _signal(pid, signal.SIGSTOP)
        # A signal is delivered asynchronously: return once each one is really stopped.
        deadline = mono() + 10
        while any(process_state(pid) not in ("T", None) for pid in stopped):
            if mono() > deadline:
                raise RuntimeError(f"processes of {host.ns} did not stop")
            time.sleep(0.005)
        return stopped

    def thaw(self, host: Host) -> None:
        """SIGCONT every process of ``host``."""
        for pid in self.pids(host):
            _signal(pid, signal.SIGCONT)

    def _qdisc(self, host: Host, *spec: str) -> None:
        for ns, dev in ((self.server_ns, host.server_veth), (host.ns, host.veth)):
            in_ns(ns, "tc", "qdisc", "replace", "dev", dev, "root", *spec)

    def has_netem(self) -> bool:
        """Whether this kernel has sch_netem (probed once, on a throw-away veth pair)."""
        if self._netem is None:
            probe = f"c{self.tag}np"
            ip("link", "add", probe, "type", "veth", "peer", "name", f"c{self.tag}nq",
               ns=self.server_ns)
            try:
                self._netem = in_ns(self.server_ns, "tc", "qdisc", "add", "dev", probe, "root",
                                    "netem", "delay", "1ms", check=False).returncode == 0
            finally:
                ip("link", "del", probe, ns=self.server_ns, check=False)
        return bool(self._netem)

    def cut(self, host: Host) -> None:
        """Drop every packet between ``host`` and the server, both ways, silently."""
        if self.has_netem():
            self._qdisc(host, "netem", "loss", "100%")
        else:
            self._qdisc(host, "blackhole")

    def throttle(self, host: Host, kbit: int) -> None:
        """Limit the link to ``kbit`` kbit/s each way (packets wait; none is dropped)."""
        self._qdisc(host, "tbf", "rate", f"{kbit}kbit", "burst", "1540", "limit", "4mb")

    def delay(self, host: Host, ms: float) -> None:
        """Add ``ms`` of latency each way (needs sch_netem)."""
        if not self.has_netem():
            raise HarnessUnavailable("this kernel has no sch_netem (tc qdisc netem): links can "
                                     "be cut and throttled but not delayed")
        self._qdisc(host, "netem", "delay", f"{ms}ms", "limit", "100000")

    def heal(self, host: Host) -> None:
        """Back to the plain link (the default queueing discipline)."""
        for ns, dev in ((self.server_ns, host.server_veth), (host.ns, host.veth)):
            in_ns(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    def qdisc_stats(self, host: Host) -> str:
        """``tc -s qdisc show`` of both ends (what was sent, dropped, held back)."""
        return "\n".join(str(in_ns(ns, "tc", "-s", "qdisc", "show", "dev", dev).stdout)
                         for ns, dev in ((self.server_ns, host.server_veth), (host.ns, host.veth)))
