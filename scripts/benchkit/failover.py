"""Section 4: SIGKILL of a lease holder -> the next waiter holds it; coord vs a kernel
record lock handover between processes of coord's size (the limit: the dying holder pays
the same exit as coord's), the same between bare interpreters (context), filelock and a
TTL-only lease row."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import selectors
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from .harness import (
    Context,
    Result,
    WorkerFailed,
    mono,
    raw_connection,
    rotate,
    slug,
    start_worker,
    stderr_tail,
    stop_worker,
    wait_line,
    worker,
)

LEASE = "bench/leader"
TTL, TTL_RENEW, TTL_POLL = 2.0, 0.5, 0.05


@worker
def w_fo_candidate(spec: dict[str, Any]) -> None:
    """Wait for the lock/lease; print "acquired <CLOCK_MONOTONIC>" the moment it is held;
    hold it until killed."""
    impl, d = spec["impl"], Path(spec["dir"])
    if impl == "coord":
        import coord
        from coord.leases import acquire
        store = coord.Store(d / "coord.db")
        inst = coord.register(store, app="bench")
        print("waiting", flush=True)
        acquire(inst, LEASE)
        print("acquired", mono(), flush=True)
        while True:
            time.sleep(1)
    elif impl in ("kernel lock (F_SETLKW)", SIZED_KERNEL):
        if impl == SIZED_KERNEL:
            # As big as a coord holder: coord loaded, registered (heartbeat), holding a lease
            # of its own (keeper); its death is what a coord waiter waits out.
            import coord
            from coord.leases import acquire
            store = coord.Store(d / "coord.db")
            inst = coord.register(store, app="bench")
            acquire(inst, f"bench/own-{os.getpid()}")
        fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        print("waiting", flush=True)
        fcntl.lockf(fd, fcntl.LOCK_EX)  # F_SETLKW: the kernel wakes us when it is free
        print("acquired", mono(), flush=True)
        while True:
            time.sleep(1)
    elif impl == "filelock":
        from filelock import FileLock
        lock = FileLock(str(d / "filelock.lock"))
        print("waiting", flush=True)
        lock.acquire()  # default: no timeout, polls every 0.05 s
        print("acquired", mono(), flush=True)
        while True:
            time.sleep(1)
    elif impl == "TTL lease row":
        c = raw_connection(d / "ttl.db")
        me = str(os.getpid())
        print("waiting", flush=True)
        while True:
            now = mono()
            c.execute("BEGIN IMMEDIATE")
            c.execute("UPDATE lease SET holder = ?, expires = ? WHERE name = ? AND expires < ?",
                      (me, now + TTL, LEASE, now))
            took = c.changes() > 0
            c.execute("COMMIT")
            if took:
                break
            time.sleep(TTL_POLL)
        print("acquired", mono(), flush=True)
        while True:
            time.sleep(TTL_RENEW)
            c.execute("UPDATE lease SET expires = ? WHERE name = ? AND holder = ?",
                      (mono() + TTL, LEASE, me))
    else:
        raise SystemExit(f"unknown impl {impl}")


#: The kernel lock again, every candidate as big as a coord one: what the kernel's own
#: handover costs when the process that dies is the size of coord's. This is the limit:
#: most of a handover is the dying holder's own exit (its memory and threads torn down
#: before the kernel drops its locks), and coord's holder pays that exit too; the bare
#: row (an interpreter that imported nothing) is kept as context.
SIZED_KERNEL = "kernel lock (F_SETLKW), coord-sized processes"
FAILOVER_IMPLS = ["coord", "kernel lock (F_SETLKW)", SIZED_KERNEL, "filelock", "TTL lease row"]
#: Measured in rotated rounds (the TTL row's seconds-long trials run once, after).
ROUNDED_IMPLS = FAILOVER_IMPLS[:-1]
ROUNDS = 3
CANDIDATES = 3


class Pool:
    """CANDIDATES candidate processes; reads "waiting"/"acquired" lines from all of them."""

    def __init__(self, impl: str, d: Path) -> None:
        self.impl, self.d = impl, d
        self.sel = selectors.DefaultSelector()
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.waiting: set[int] = set()
        self.bufs: dict[int, bytes] = {}

    def spawn(self) -> None:
        p = start_worker("fo_candidate", impl=self.impl, dir=str(self.d))
        assert p.stdout is not None
        os.set_blocking(p.stdout.fileno(), False)
        self.procs[p.pid] = p
        self.bufs[p.pid] = b""
        self.sel.register(p.stdout.fileno(), selectors.EVENT_READ, p.pid)

    def forget(self, pid: int) -> subprocess.Popen[str]:
        """Stop listening to a candidate (before it is killed: its pipe then ends)."""
        p = self.procs.pop(pid)
        assert p.stdout is not None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(p.stdout.fileno())
        self.waiting.discard(pid)
        self.bufs.pop(pid, None)
        return p

    def kill(self, pid: int) -> None:
        stop_worker(self.forget(pid))

    def next_event(self, timeout: float) -> tuple[int, str]:
        """The next line any candidate printed: (pid, line)."""
        end = time.monotonic() + timeout
        while True:
            for pid, buf in self.bufs.items():
                if b"\n" in buf:
                    line, rest = buf.split(b"\n", 1)
                    self.bufs[pid] = rest
                    text = line.decode()
                    if text.startswith("waiting"):
                        self.waiting.add(pid)
                    elif text.startswith("acquired"):
                        self.waiting.discard(pid)
                    return pid, text
            left = end - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"{self.impl}: no candidate progressed within {timeout:.0f} s")
            for key, _ in self.sel.select(left):
                pid = key.data
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    self.sel.unregister(key.fd)
                    raise WorkerFailed(f"{self.impl}: candidate {pid} exited: "
                                       f"{stderr_tail(self.procs[pid])}")
                self.bufs[pid] += chunk

    def acquired(self, timeout: float) -> tuple[int, float]:
        while True:
            pid, text = self.next_event(timeout)
            if text.startswith("acquired"):
                return pid, float(text.split()[1])

    def close(self) -> None:
        for pid in list(self.procs):
            self.kill(pid)
        self.sel.close()


def failover_trials(impl: str, d: Path, trials: int) -> list[float]:
    """SIGKILL the holder ``trials`` times; each takeover latency in µs (CLOCK_MONOTONIC from
    just before the kill to the moment the next holder's wait returned)."""
    if impl == "TTL lease row":
        c = raw_connection(d / "ttl.db")
        c.execute("CREATE TABLE lease (name TEXT PRIMARY KEY, holder TEXT, expires REAL)")
        c.execute("INSERT INTO lease VALUES (?, '', 0)", (LEASE,))
        c.close()
    waiters: Path | None = None
    if impl == "coord":
        import coord
        store = coord.Store(d / "coord.db")
        waiters = store.side_dir("waiters")  # where acquire() records that it waits
        store.close()
    pool = Pool(impl, d)
    out = []
    try:
        for _ in range(CANDIDATES):
            pool.spawn()
        holder, _ = pool.acquired(60)
        for _ in range(trials):
            end = time.monotonic() + 60
            while len(pool.waiting) < CANDIDATES - 1 or (
                    waiters is not None and _coord_waiters(waiters) < CANDIDATES - 1):
                if time.monotonic() > end:
                    raise WorkerFailed(f"{impl}: candidates did not all wait")
                with contextlib.suppress(WorkerFailed):
                    pool.next_event(0.005)
            time.sleep(0.2)  # let every waiter enter its wait, and the newcomer settle
            if impl == "TTL lease row":
                time.sleep(random.uniform(0, TTL_RENEW))  # kill at any point of the renew cycle
            victim = pool.forget(holder)
            t0 = mono()
            os.kill(holder, signal.SIGKILL)
            nxt, t1 = pool.acquired(60)
            out.append((t1 - t0) * 1e6)
            stop_worker(victim)
            holder = nxt
            pool.spawn()
    finally:
        pool.close()
    return out


def takeover_alone(d: Path, trials: int) -> tuple[list[float], list[float]]:
    """The takeover transaction on its own, without the wait before it: µs of coord's
    ``try_acquire()`` of a lease whose holder was SIGKILLed and has exited (the takeover,
    proof of death included, until the Lease is returned), and of the minimal lease row's
    takeover transaction (BEGIN IMMEDIATE, one UPDATE, COMMIT)."""
    import coord
    from coord.leases import try_acquire
    store = coord.Store(d / "coord.db")
    me = coord.register(store, "bench-takeover", app="bench", heartbeat=False,
                        handle_signals=False)
    c = raw_connection(d / "alone.db")
    c.execute("CREATE TABLE lease (name TEXT PRIMARY KEY, holder TEXT, expires REAL)")
    c.execute("INSERT INTO lease VALUES (?, '', 0)", (LEASE,))
    ours, raw = [], []
    try:
        for _ in range(trials):
            p = start_worker("fo_candidate", impl="coord", dir=str(d))
            try:
                wait_line(p, "acquired")
            finally:
                stop_worker(p)  # SIGKILL, then reaped: its pid is gone
            t = time.perf_counter()
            lease = try_acquire(me, LEASE)
            ours.append((time.perf_counter() - t) * 1e6)
            if lease is None:
                raise WorkerFailed("coord: the dead holder's lease was not taken")
            lease.release()
            now = mono()
            t = time.perf_counter()
            c.execute("BEGIN IMMEDIATE")
            c.execute("UPDATE lease SET holder = ?, expires = ? WHERE name = ? AND expires < ?",
                      ("bench", now + TTL, LEASE, now))
            c.execute("COMMIT")
            raw.append((time.perf_counter() - t) * 1e6)
            c.execute("UPDATE lease SET expires = 0")
    finally:
        c.close()
        me.close()
        store.close()
    return ours, raw


def _coord_waiters(d: Path) -> int:
    """How many coord candidates have set up their wait on LEASE."""
    from coord.leases import _waiter_prefix
    prefix = _waiter_prefix(LEASE)
    with contextlib.suppress(OSError):
        return sum(1 for x in os.listdir(d) if x.startswith(prefix))
    return 0


def section_failover(ctx: Context) -> list[Result]:
    s = ctx.sizes
    notes = {
        "coord": "acquire() waits on the holder's pidfd and a nudge; proof of death by its "
                 "record lock",
        "kernel lock (F_SETLKW)": "lockf(LOCK_EX) blocked in the kernel; bare "
                                  "interpreters (context: a smaller exit than coord's)",
        SIZED_KERNEL: "the same, each candidate as big as coord's (coord loaded, registered, "
                      "holding a lease of its own)",
        "filelock": "FileLock.acquire() at its default 0.05 s poll",
        "TTL lease row": f"{TTL:.0f} s TTL renewed every {TTL_RENEW} s, polled every "
                         f"{TTL_POLL * 1000:.0f} ms",
    }
    # The handovers that take milliseconds run in rounds, each round every one of them in
    # turn (rotated, fresh processes each round), so that a busy spell of the shared machine
    # falls on coord and on its limit alike; the TTL row (seconds a trial) runs once after.
    rounds = min(ROUNDS, s.kills)
    lats: dict[str, list[float]] = {impl: [] for impl in FAILOVER_IMPLS}
    errs: dict[str, str] = {}
    for r in range(rounds):
        for impl in rotate(ROUNDED_IMPLS, r):
            if impl in errs:
                continue
            per_round = -(-s.kills // rounds)  # ceil: every impl at least s.kills in all
            try:
                lats[impl] += failover_trials(impl, ctx.fresh_dir(f"fo-{slug(impl)}-{r}"),
                                              per_round)
            except (WorkerFailed, OSError) as e:
                errs[impl] = str(e)
    try:
        lats["TTL lease row"] = failover_trials("TTL lease row", ctx.fresh_dir("fo-ttl"),
                                                s.ttl_kills)
    except (WorkerFailed, OSError) as e:
        errs["TTL lease row"] = str(e)
    out = []
    for impl in FAILOVER_IMPLS:
        err = errs.get(impl)
        lat = [] if err else lats[impl]
        where = "" if impl == "TTL lease row" else f"; {rounds} rounds, rotated"
        out.append(Result("failover", "SIGKILL holder → next holder", impl, len(lat),
                          sum(lat) / 1e6, lat, limit=impl == SIZED_KERNEL,
                          coord=impl == "coord", note=f"{CANDIDATES} candidates{where}; "
                          + notes[impl], error=err))
    work = "takeover transaction alone (holder already dead)"
    ours: list[float] = []
    raw: list[float] = []
    err = None
    try:
        ours, raw = takeover_alone(ctx.fresh_dir("fo-alone"), s.kills)
    except (WorkerFailed, OSError) as e:
        err = str(e)
    out.append(Result("failover", work, "coord", len(ours), sum(ours) / 1e6, ours, coord=True,
                      note="try_acquire() of a SIGKILLed holder's lease, after its exit",
                      error=err))
    out.append(Result("failover", work, "TTL lease row", len(raw), sum(raw) / 1e6, raw,
                      limit=True, note="BEGIN IMMEDIATE; UPDATE the row; COMMIT",
                      error=err))
    return out
