"""A private, throw-away PostgreSQL cluster for tests and benchmarks (standard library only,
so CI can use it before any virtual environment exists).

    python3 tests/pgcluster.py start DIR   # prints `export COORD_TEST_PG=...` lines for eval
    python3 tests/pgcluster.py stop DIR    # stops the cluster and removes DIR

The cluster lives entirely in DIR: its data directory, its log, its unix socket and a
generated password. It listens on the unix socket (trust: DIR is 0700, owned by the server's
user) and on a loopback TCP port (scram-sha-256 with the generated password), plus any extra
addresses given (the multi-host harness listens on its private namespace addresses). `initdb`
refuses to run as root, so as root every server program runs as the `postgres` user.

The URLs exported: ``COORD_TEST_PG`` (the unix socket, no secret) and ``COORD_TEST_PG_TCP``
(loopback TCP, password inline: this is a private test cluster that ends with the run).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SERVER_USER = "postgres"
STATE = "cluster.json"


class ClusterUnavailable(RuntimeError):
    """What a private cluster needs is missing on this machine (the message names it)."""


def find_bindir() -> Path:
    """The directory holding initdb/pg_ctl: $COORD_PG_BINDIR, else Debian's newest
    /usr/lib/postgresql/N/bin, else `pg_config --bindir`."""
    env = os.environ.get("COORD_PG_BINDIR")
    candidates = [Path(env)] if env else []
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                    key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(debian)]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    raise ClusterUnavailable("PostgreSQL server programs (initdb, pg_ctl) not found: install "
                             "Debian's `postgresql` package or set COORD_PG_BINDIR")


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """One private cluster in ``base``; ``wrap`` prefixes every server command (the
    multi-host harness passes ``ip netns exec NS`` to run the server in a namespace)."""

    base: Path
    port: int = 0
    password: str = ""
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    hba_extra: list[str] = field(default_factory=list)
    wrap: list[str] = field(default_factory=list)
    bindir: str = ""

    @property
    def data(self) -> Path:
        return self.base / "data"

    def url(self, dbname: str = "postgres") -> str:
        """The unix-socket URL (no password in it)."""
        return f"postgresql://{SERVER_USER}@/{dbname}?host={self.base}&port={self.port}"

    def tcp_url(self, host: str = "127.0.0.1", dbname: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}:{self.password}@{host}:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [*self.wrap]
        if os.geteuid() == 0:
            # initdb refuses root; runuser works inside `ip netns exec` too.
            cmd += ["runuser", "-u", SERVER_USER, "--"]
        cmd += [str(Path(self.bindir) / args[0]), *args[1:]]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): "
                               f"{(p.stderr or p.stdout).strip()[-2000:]}")
        return p

    def start(self) -> Cluster:
        """initdb, configure, start; on any failure everything started is stopped again."""
        if self.data.exists():
            raise RuntimeError(f"{self.base} already holds a cluster")
        self.bindir = self.bindir or str(find_bindir())
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise ClusterUnavailable(f"running as root, and no {SERVER_USER!r} user to run "
                                         "the server as (initdb refuses root)") from None
            os.chown(self.base, user.pw_uid, user.pw_gid)
        self.base.chmod(0o700)
        self.port = self.port or free_port()
        self.password = self.password or secrets.token_hex(16)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        self._save()
        try:
            # --no-sync: a throw-away cluster need not survive a power cut of its creation.
            self._run("initdb", "-D", str(self.data), "-U", SERVER_USER, "-E", "UTF8",
                      "--auth-local=trust", "--auth-host=scram-sha-256",
                      f"--pwfile={pwfile}", "--no-sync", "--no-instructions")
            pwfile.unlink()
            settings = {
                "port": str(self.port),
                "listen_addresses": ",".join(self.listen),
                "unix_socket_directories": str(self.base),
                "max_connections": "200",
                "shared_buffers": "64MB",
                "logging_collector": "off",
            }
            with open(self.data / "postgresql.conf", "a") as f:
                f.write("\n# private test cluster (tests/pgcluster.py)\n")
                f.writelines(f"{k} = '{v}'\n" for k, v in settings.items())
            if self.hba_extra:
                with open(self.data / "pg_hba.conf", "a") as f:
                    f.writelines(line + "\n" for line in self.hba_extra)
            self.run_server()
        except BaseException:
            self.stop(remove=False)
            raise
        return self

    def run_server(self) -> None:
        """Start the server on the existing data directory (after ``crash``: with crash
        recovery) and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"),
                  "-w", "-t", "60", "start", timeout=90)

    def crash(self) -> None:
        """Stop the server as a crash would (``pg_ctl stop -m immediate``: no shutdown
        checkpoint; the next start runs crash recovery)."""
        pid = self.postmaster_pid()
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop",
                  timeout=40)
        deadline = time.monotonic() + 10
        while pid is not None and process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self, remove: bool = True) -> None:
        """Stop the server (fast, then immediate, then SIGKILL of its own postmaster by pid)
        and, with ``remove``, delete the cluster's directory."""
        pid = self.postmaster_pid()
        if pid is not None:
            for mode in ("fast", "immediate"):
                try:
                    self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "20",
                              "stop", timeout=40)
                    break
                except (RuntimeError, subprocess.TimeoutExpired):
                    continue
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # pg_ctl returns once the pid file is gone, a moment before the postmaster exits.
            deadline = time.monotonic() + 10
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

    def _save(self) -> None:
        state = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        (self.base / STATE).write_text(json.dumps(state))

    @classmethod
    def load(cls, base: Path) -> Cluster:
        state = json.loads((base / STATE).read_text())
        state["base"] = Path(state["base"])
        return cls(**state)


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, T, Z, ...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: it only waits for its parent to reap it)."""
    return process_state(pid) not in (None, "Z", "X")


def new_cluster(prefix: str = "coord-pg-", **kw: object) -> Cluster:
    """Start a cluster in a fresh directory under /tmp (a short path: the unix socket's name
    must fit in 107 bytes)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        return Cluster(base=base, **kw).start()  # type: ignore[arg-type]
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: pgcluster.py start|stop DIR", file=sys.stderr)
        return 2
    base = Path(argv[1]).resolve()
    if argv[0] == "start":
        try:
            c = Cluster(base=base).start()
        except ClusterUnavailable as e:
            print(f"pgcluster: {e}", file=sys.stderr)
            return 1
        print(f"export COORD_TEST_PG='{c.url()}'")
        print(f"export COORD_TEST_PG_TCP='{c.tcp_url()}'")
        return 0
    if (base / STATE).exists():
        Cluster.load(base).stop()
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
