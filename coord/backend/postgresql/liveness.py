"""The PostgreSQL engine's liveness: proof of death across hosts.

A coord process can prove an instance dead only from the instance's own host and boot, as
on SQLite (``coord.backend.sqlite.liveness``): its pid gone or reused, or its host-local
lock file unlocked — or, on its own host, that the host rebooted since (another boot id
under this machine's id). An instance of another host is dead only when its heartbeat,
stamped and compared with the server's clock, is older than its TTL ('hung'), or when a
coord process on its host proved the death and buried it (the row says 'dead').

Each live instance also holds, on a connection of its own (``LivenessConnection``), a
session advisory lock keyed by (deployment, registration token), and heartbeats on that
connection; every heartbeat checks in ``pg_locks`` that its own backend still holds the key,
and takes it again (with an event) when not. That lock is for people and for a server-side
view of who is connected — never a verdict: a free session lock is also what a reset
connection, a session timeout, ``pg_terminate_backend`` or the server's crash recovery
leave behind with the holder alive.

A host is named by its machine id (``machine_id()``: ``/etc/machine-id``, else the host
name), recorded in each instance row beside its boot id: a row of this machine with another
boot id is of a boot that is over.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ...clock import boot_id
from ...identity import DEAD_STATES, FREE, ProcIdentity, pid_namespace, still_running
from ..records import Member
from ..sqlite.liveness import LockProof, PidWatch, Probe, holds_own_lock, unlink_many
from .connection import Conn, translated
from .events import log_event

if TYPE_CHECKING:
    from ...db import Row, Store
    from ...instances import InstanceInfo
    from .clock import ServerClock
    from .connection import PgDb

#: The advisory-lock key of a registration: one 64-bit key (pg_locks objsubid 1, a key
#: space apart from coord's two-key locks) from the deployment's schema and the token.
LIVE_KEY = "hashtextextended(%s || '/' || %s, 0)"
#: "this backend holds the registration's key" (the key bound twice: high and low half).
_HOLDS = ("EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
          "AND pid = pg_backend_pid() AND objsubid = 1 "
          "AND classid::bigint = ((%(key)s >> 32) & 4294967295) "
          "AND objid::bigint = (%(key)s & 4294967295))")
#: One heartbeat: renew the row, and say whether this backend still holds its lock.
_BEAT = ("WITH hb AS (UPDATE instances SET heartbeat_mono = coord_now(), "  # noqa: S608
         "heartbeat_at = coord_now() WHERE id = %(id)s AND incarnation = %(inc)s "
         "AND status = 'alive' RETURNING 1) "
         "SELECT EXISTS (SELECT 1 FROM hb) AS ok, " + _HOLDS + " AS held")
_INT_MAX = 2**31 - 1


@functools.cache
def machine_id() -> str:
    """What names this host in the registry: the systemd machine id, else the host name."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                found = f.read().strip()
        except OSError:
            continue
        if found:
            return found
    return f"host:{socket.gethostname()}"


def application_name(member: Member) -> str:
    """How a registration's liveness session is named on the server (at most 63 bytes)."""
    return f"coord live {member[0]}#{member[1]} pid {os.getpid()}"[-63:]


def certificate(row: Row, probe: Probe) -> str | None:
    """The verdict of a death this host proves, whatever the time ('died': the pid gone or
    reused, or its lock file free; 'reboot': this machine, a boot that is over), or None:
    no such proof here (another host's row, or the process is alive)."""
    if row["boot_id"] == probe.boot_id:  # this host and boot: the kernel can prove a death
        same_ns = row["pidns"] == probe.pidns
        if same_ns:
            st = probe.proc(row["pid"])
            if st is None or st[0] != row["start_token"] or st[1] in DEAD_STATES:
                return "died"
        if same_ns and row["pid"] == probe.pid:
            if not holds_own_lock(row["lock_path"]):
                return "died"
        elif probe.lock(row["lock_path"])[0] == FREE:
            return "died"
    elif row.get("machine_id", machine_id()) == machine_id():
        return "reboot"  # this host, a boot that is over
    return None


def judge(row: Row, probe: Probe, now: float) -> tuple[bool, str]:
    """(alive, status word) of an instance row, ``now`` being the server's clock. After a
    step of that clock (``probe.held_since``, see ``.clock``) a heartbeat older than the
    step counts from the step: one TTL to heartbeat again before it is 'hung'."""
    if row["status"] == "dead":
        return False, row["end_reason"] or "dead"
    proven = certificate(row, probe)
    if proven is not None:
        return False, proven
    if now - row["heartbeat_mono"] > row["ttl"]:
        # After a step of the server's clock a heartbeat older than it counts from it.
        held = getattr(probe, "held_since", None)
        if held is None or row["heartbeat_mono"] >= held or now - held > row["ttl"]:
            return False, "hung"
    return True, "alive"


def session_settings(ttl: float) -> dict[str, str]:
    """Server-side timeouts for a liveness connection, so that a dead or partitioned
    client's session ends within about its TTL: keepalive probes a third of the TTL apart,
    unacknowledged data given up after the TTL, and an idle session ended after twice the
    TTL (a heartbeat comes at least three times per TTL; a stuck instance may lose its
    session, which proves nothing and is taken again at its next heartbeat)."""
    ttl = max(ttl, 1.0)
    third = str(min(_INT_MAX, max(1, int(ttl / 3))))
    ms = str(min(_INT_MAX, int(ttl * 1000)))
    return {
        "tcp_keepalives_idle": third, "tcp_keepalives_interval": third,
        "tcp_keepalives_count": "3", "tcp_user_timeout": ms,
        "idle_session_timeout": str(min(_INT_MAX, int(ttl * 2000))),
    }


def client_settings(ttl: float) -> dict[str, Any]:
    """The same bounds on the client's side of a liveness connection (libpq parameters), so
    a heartbeat on a cut link fails within about the TTL instead of blocking in the driver
    for the kernel's retransmission timeout (many minutes)."""
    ttl = max(ttl, 1.0)
    third = min(_INT_MAX, max(1, int(ttl / 3)))
    return {"keepalives": 1, "keepalives_idle": third, "keepalives_interval": third,
            "keepalives_count": 3, "tcp_user_timeout": min(_INT_MAX, int(ttl * 1000))}


class LivenessConnection:
    """``coord.backend.Proof`` on PostgreSQL: the host-local lock file (``where``) and a
    dedicated server connection holding the registration's session advisory lock, on which
    the instance heartbeats."""

    def __init__(self, db: PgDb, token: str, where: str,
                 on_release: Callable[[LivenessConnection], None], ttl: float) -> None:
        self._db = db
        self._on_release = on_release
        self._token = token
        self._local = LockProof(where)
        self.where = where
        self.ttl = ttl
        self.member: Member | None = None
        self._conn: Conn | None = None
        self._lock = threading.Lock()
        self.retaken = 0  # times the lock had to be taken again
        self.pid = os.getpid()  # a forked child must never use this session
        try:
            self._connect()
        except BaseException:
            self._local.release()
            raise

    def _key(self, c: Conn) -> int:
        row = c.execute(f"SELECT {LIVE_KEY} AS k", (self._db.location.schema, self._token)).fetchone()
        assert row is not None
        return int(row["k"])

    def _settings(self) -> dict[str, str]:
        settings = session_settings(self.ttl)
        if int(self._db.value("SHOW server_version_num")) < 140000:
            settings.pop("idle_session_timeout")  # PostgreSQL 14 has it
        return settings

    def _connect(self) -> bool:
        """(Re)open the connection and take the lock; whether it was got."""
        c = self._db.connect(client=client_settings(self.ttl), **self._settings())
        self._conn = c
        if self.member is not None:
            self._name(c)
        with translated(self._db.where):
            self.key = self._key(c)
            got = c.execute("SELECT pg_try_advisory_lock(%s) AS got", (self.key,)).fetchone()
        return bool(got and got["got"])

    def bind(self, member: Member, ttl: float) -> None:
        """The registration this proof is for, once committed; its timeouts follow its
        TTL from now on, and the session names it (``pg_stat_activity``, ``coord doctor``)."""
        with self._lock:
            self.member, self.ttl = member, ttl
            c = self._conn
            if c is not None and not c.closed:
                self._name(c)

    def _name(self, c: Conn) -> None:
        settings = self._settings()
        if self.member is not None:
            settings["application_name"] = application_name(self.member)
        with translated(self._db.where):
            for name, value in settings.items():
                c.execute("SELECT set_config(%s, %s, false)", (name, value))

    def heartbeat(self) -> bool:
        """Renew the registration on this connection, checking the lock is still this
        backend's; False when the registration is gone. A connection found lost is opened
        again and the beat repeated once (renewing twice is harmless); a lock found free is
        taken again. Either is recorded ('liveness lock retaken'): nothing is lost while the
        heartbeat is current."""
        assert self.member is not None
        with self._lock:
            for attempt in (1, 2):
                c = self._conn
                if c is None or c.closed or c.broken:
                    if c is not None:
                        self._db.discard(c)
                    self._conn = None
                    got = self._connect()
                    self._record("reconnected", got)
                    c = self._conn
                assert c is not None
                try:
                    with translated(self._db.where):
                        row = c.execute(_BEAT, {"id": self.member[0], "inc": self.member[1],
                                                "key": self.key}).fetchone()
                except Exception:
                    if not (c.closed or c.broken) or attempt == 2:
                        raise
                    continue  # the session was lost: open another and beat again
                assert row is not None
                if row["ok"] and not row["held"]:
                    with translated(self._db.where):
                        again = c.execute("SELECT pg_try_advisory_lock(%s) AS got",
                                          (self.key,)).fetchone()
                    self._record("lock free", bool(again and again["got"]))
                return bool(row["ok"])
        return False  # not reached: the second attempt returns or raises

    def _record(self, why: str, got: bool) -> None:
        self.retaken += 1
        assert self.member is not None
        member = self.member
        self._db.write(lambda w: log_event(
            w, "liveness lock retaken", member[0], None, incarnation=member[1], why=why,
            got=got))

    def holds(self) -> bool:
        """Whether this connection's backend holds the lock now (for tests and doctor)."""
        with self._lock:
            c = self._conn
            if c is None or c.closed or c.broken:
                return False
            row = c.execute(f"SELECT {_HOLDS} AS held", {"key": self.key}).fetchone()
            return bool(row and row["held"])

    def backend_pid(self) -> int | None:
        """The server process of this connection (tests end it to see the lock retaken)."""
        c = self._conn
        return None if c is None or c.closed else int(c.info.backend_pid)

    def settings(self) -> dict[str, str]:
        """The session's timeouts as the server has them (for tests and doctor)."""
        with self._lock:
            c = self._conn
            assert c is not None
            names = list(self._settings())
            rows = c.execute("SELECT name, current_setting(name) AS v FROM unnest(%s::text[]) "
                             "AS name", (names,)).fetchall()
            return {r["name"]: str(r["v"]) for r in rows}

    def release(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._db.discard(self._conn)  # ends the session: its lock goes with it
                self._conn = None
        self._on_release(self)
        self._local.release()


class PgLiveness:
    """``coord.backend.Liveness``."""

    def __init__(self, store: Store, clock: ServerClock, db: PgDb) -> None:
        self._store = store
        self._clock = clock
        self._db = db
        self._proofs: dict[str, LivenessConnection] = {}
        self._proofs_lock = threading.Lock()

    def look(self) -> Probe:
        now = self._clock.now()  # first: the reading may be the one that records a step
        return self.look_at(now, self._clock.held_since)

    @staticmethod
    def look_at(now: float, held_since: float | None) -> Probe:
        """A probe that judges heartbeats at a reading of the server's clock the caller
        already took, with the step's hold (``held_since``) it read beside it."""
        probe = Probe()
        probe.now = now
        probe.held_since = held_since  # type: ignore[attr-defined]
        return probe

    def judge(self, row: Row, look: object | None = None) -> tuple[bool, str]:
        probe = look if isinstance(look, Probe) else self.look()
        assert probe.now is not None
        return judge(row, probe, probe.now)

    def certificate(self, row: Row) -> str | None:
        """A death of that registration proven on this host now (see ``certificate``)."""
        return certificate(row, Probe())

    def heartbeat_age(self, row: Row, look: object) -> float | None:
        """Seconds since the row's last heartbeat by the server's clock (any host's)."""
        assert isinstance(look, Probe) and look.now is not None
        return float(look.now - row["heartbeat_mono"])

    def prove(self, token: str, ttl: float = 15.0) -> LivenessConnection:
        proof = LivenessConnection(
            self._db, token, str(self._store.side_dir("locks") / f"{token}.lock"), self._drop,
            ttl)
        with self._proofs_lock:
            self._proofs[proof.where] = proof
        return proof

    def proof_at(self, where: str) -> LivenessConnection | None:
        """This process's unreleased proof recorded as ``where`` (a row's lock_path)."""
        with self._proofs_lock:
            return self._proofs.get(where)

    def by_member(self, member: Member) -> LivenessConnection | None:
        """This process's proof for that registration, if it is one of ours (not one
        inherited across fork: its session is the parent's)."""
        pid = os.getpid()
        with self._proofs_lock:
            return next((p for p in self._proofs.values()
                         if p.member == member and p.pid == pid), None)

    def _drop(self, proof: LivenessConnection) -> None:
        with self._proofs_lock:
            self._proofs.pop(proof.where, None)

    def forget(self, rows: Iterable[Row]) -> None:
        # Only this host's files: another host's paths name files of that host.
        mine = boot_id()
        unlink_many(p for r in rows if r.get("boot_id", mine) == mine
                    for p in (r.get("lock_path"), r.get("nudge_path")))

    def watchable_pid(self, row: Row) -> int | None:
        if row.get("boot_id") != boot_id() or row["pidns"] != pid_namespace():
            return None
        return int(row["pid"])

    def watch(self, row: Row | InstanceInfo) -> PidWatch:
        watch = PgPidWatch(self._clock, row)  # type: ignore[arg-type]
        theirs = row.get("boot_id") if isinstance(row, dict) else row.boot_id
        if theirs != boot_id():
            # Another host's (or boot's) pid names nothing here, even in a pid namespace
            # of the same inode number (every host's first one has the same).
            watch.close()
            watch._pid = 0
        return watch


class PgPidWatch(PidWatch):
    """``PidWatch`` whose heartbeat is judged by the server's clock (its epoch is not a
    boot id)."""

    def pinned_alive(self) -> bool:
        row = self._row
        if self._fd is None or row is None or row["status"] != "alive":
            return False
        # A row read with the server's clock (a request's) needs no reading of its own.
        now = row.get("read_now")
        if now is None:
            now = self._clock.now()
        if row["boot_id"] != boot_id() or now - row["heartbeat_mono"] > row["ttl"]:
            return False
        return still_running(ProcIdentity(row["boot_id"], row["pid"], row["start_token"]))
