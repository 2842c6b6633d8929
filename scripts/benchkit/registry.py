"""Section 5: register, list with liveness, reap; coord vs a file-per-PID registry."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import Context, Result, WorkerFailed, wait_line, worker_env

if TYPE_CHECKING:
    import apsw

    import coord


# Filling a registry with a thousand real Python processes would measure the machine, not
# the registry. Alive rows: HELPERS real processes each hold the record locks of their share
# of the lock files (one per row, as real instances have); the rows carry a helper's pid and
# start token. Judging a row thus does the real work: a /proc read for its pid (cached per
# listing: the file registry's pid checks are cached alike) and an F_GETLK on its own lock
# file. Dead rows: each its own pid that does not exist and its own unheld lock file.

HELPERS = 4

HOLDER = """
import sys
from coord.identity import hold_lock
paths = sys.stdin.readline().split()
fds = [hold_lock(p) for p in paths]
print("ready", flush=True)
sys.stdin.read()
"""


def _insert_instances(store: coord.Store, rows: list[tuple[Any, ...]]) -> None:
    from coord.backend.sqlite.connection import next_counter

    def txn(c: apsw.Connection) -> None:
        base = next_counter(c, "incarnation")
        c.execute("UPDATE counters SET value = value + ? WHERE name = 'incarnation'", (len(rows),))
        c.executemany(
            "INSERT INTO instances (id, incarnation, app, pid, start_token, boot_id, pidns, uid, "
            "user, host, cmdline, lock_path, ttl, started_at, heartbeat_at, heartbeat_mono) "
            "VALUES (?, ?, 'bench', ?, ?, ?, ?, ?, 'bench', 'localhost', '[\"bench\"]', ?, ?, ?, ?,"
            " ?)",
            [(r[0], base + i, *r[1:]) for i, r in enumerate(rows)],
        )

    store.write(txn)


def _start_helpers(paths: list[str]) -> list[subprocess.Popen[str]]:
    helpers = []
    for h in range(HELPERS):
        p = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=worker_env())
        assert p.stdin is not None
        p.stdin.write(" ".join(paths[h::HELPERS]) + "\n")
        p.stdin.flush()
        helpers.append(p)
    for p in helpers:
        wait_line(p, "ready")
    return helpers


def _end_helpers(helpers: list[subprocess.Popen[str]]) -> None:
    for p in helpers:
        with contextlib.suppress(Exception):
            assert p.stdin is not None
            p.stdin.close()
        with contextlib.suppress(Exception):
            p.wait(timeout=30)
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()


def _free_pids(n: int) -> list[int]:
    used = {int(x) for x in os.listdir("/proc") if x.isdigit()}
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    free = [p for p in range(pid_max - 1, 300, -1) if p not in used]
    if len(free) < n:
        raise WorkerFailed(f"only {len(free)} free pids below pid_max {pid_max}")
    return free[:n]


class FileRegistry:
    """The file-per-PID registry coord replaces: ``{pid}.json`` with pid, username, cmdline,
    create_time, status; alive = the pid exists with the same create time (psutil)."""

    def __init__(self, d: Path) -> None:
        import psutil
        self.psutil = psutil
        self.d = d
        d.mkdir(mode=0o700, exist_ok=True)

    def register(self, key: str, pid: int, create_time: float) -> None:
        entry = {"pid": pid, "username": "bench", "cmdline": "python -m bench",
                 "create_time": create_time, "status": "running"}
        tmp = self.d / f".{key}.tmp"
        tmp.write_text(json.dumps(entry))
        os.rename(tmp, self.d / f"{key}.json")

    def _alive(self, pid: int, created: float, cache: dict[tuple[int, float], bool]) -> bool:
        got = cache.get((pid, created))
        if got is None:
            try:
                got = abs(self.psutil.Process(pid).create_time() - created) < 1.0
            except self.psutil.Error:
                got = False
            cache[(pid, created)] = got
        return got

    def scan(self, reap: bool) -> tuple[int, int]:
        """(alive, removed): read every entry, judge it; with ``reap``, unlink the dead."""
        cache: dict[tuple[int, float], bool] = {}
        alive = removed = 0
        for name in os.listdir(self.d):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.d, name)
            try:
                with open(path) as f:
                    e = json.load(f)
                ok = self._alive(int(e["pid"]), float(e["create_time"]), cache)
            except (OSError, ValueError, KeyError, TypeError):
                ok = False  # cut off mid-write, or unreadable: stale
            if ok:
                alive += 1
            elif reap:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed += 1
        return alive, removed


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    r = fn()
    return (time.perf_counter() - t) * 1e6, r


def registry_size(n: int, rounds: int, workdir: Path) -> dict[str, dict[str, list[float]]]:
    """{work: {impl: latencies µs}} for one registry size."""
    import psutil

    import coord
    from coord.clock import boot_id
    from coord.identity import pid_namespace, start_token
    from coord.instances import list_instances, register
    from coord.reaper import reap

    d = workdir / f"n{n}"
    d.mkdir(mode=0o700)
    store = coord.Store(d / "coord.db")
    files = FileRegistry(d / "registry")
    lat: dict[str, dict[str, list[float]]] = {}

    def add(work: str, impl: str, us: float) -> None:
        lat.setdefault(work, {}).setdefault(impl, []).append(us)

    try:
        locks = store.side_dir("locks")
        paths = [str(locks / f"live-{i}.lock") for i in range(n)]
        helpers = _start_helpers(paths)
        try:
            mono_now, wall = store.mono(), store.wall()
            boot, ns, uid = boot_id(), pid_namespace(), os.geteuid()
            rows = []
            for h, p in enumerate(helpers):
                token, created = start_token(p.pid), psutil.Process(p.pid).create_time()
                for j, path in enumerate(paths[h::HELPERS]):
                    rows.append((f"live-{h}-{j}", p.pid, token, boot, ns, uid, path, 3600.0,
                                 wall, wall, mono_now))
                    files.register(f"{p.pid}-{j}", p.pid, created)
            _insert_instances(store, rows)
            me = psutil.Process().create_time()
            for i in range(100 if n >= 100 else 20):
                us, inst = _timed(lambda i=i: register(store, f"reg-{i}", app="bench",
                                                       heartbeat=False, handle_signals=False))
                add("register", "coord", us)
                inst.close()
                us, _ = _timed(lambda i=i: files.register(f"{os.getpid()}-r{i}", os.getpid(), me))
                add("register", "file-per-PID", us)
                os.unlink(files.d / f"{os.getpid()}-r{i}.json")
            for _ in range(rounds):
                us, alive = _timed(lambda: list_instances(store))
                assert len(alive) == n, (len(alive), n)
                add("list alive", "coord", us)
                us, (seen, _) = _timed(lambda: files.scan(reap=False))
                assert seen == n, (seen, n)
                add("list alive", "file-per-PID", us)
                us, report = _timed(lambda: reap(store, checkpoint=False))
                assert not report.dead
                add("reap, nothing dead", "coord", us)
                us, (_, gone) = _timed(lambda: files.scan(reap=True))
                assert gone == 0
                add("reap, nothing dead", "file-per-PID", us)
        finally:
            _end_helpers(helpers)
        store.write(lambda c: c.execute("DELETE FROM instances"))
        for f in files.d.iterdir():
            f.unlink()
        for r in range(max(1, min(rounds, 3))):
            mono_now, wall = store.mono(), store.wall()
            rows = []
            for i, pid in enumerate(_free_pids(n)):
                lock = locks / f"dead{r}-{i}.lock"
                lock.touch(mode=0o600)
                rows.append((f"dead{r}-{i}", pid, 12345, boot, ns, uid, str(lock), 15.0, wall,
                             wall, mono_now))
                files.register(str(pid), pid, 1.0e9)
            _insert_instances(store, rows)
            us, report = _timed(lambda: reap(store))
            assert len(report.dead) == n, (len(report.dead), n)
            add("reap, all dead", "coord", us)
            us, (_, gone) = _timed(lambda: files.scan(reap=True))
            assert gone == n, (gone, n)
            add("reap, all dead", "file-per-PID", us)
    finally:
        store.close()
    return lat


def section_registry(ctx: Context) -> list[Result]:
    s = ctx.sizes
    notes = {
        ("register", "coord"): "register(): lock file, socket, row (no heartbeat thread)",
        ("register", "file-per-PID"): "write {pid}.json (tmp + rename)",
        ("list alive", "coord"): "list_instances(): every verdict (pid, start token, F_GETLK)",
        ("list alive", "file-per-PID"): "read every file, pid + create time check (cached per "
                                        "pid)",
        ("reap, all dead", "coord"): "reap(): death rule, events, lock files, WAL checkpoint",
        ("reap, all dead", "file-per-PID"): "read every file, unlink the dead",
    }
    out = []
    work_dir = ctx.fresh_dir("registry")
    for n in s.reg_sizes:
        try:
            lat = registry_size(n, s.reg_rounds, work_dir)
        except (WorkerFailed, AssertionError, OSError) as e:
            for work in ("register", "list alive", "reap, nothing dead", "reap, all dead"):
                for impl in ("coord", "file-per-PID"):
                    out.append(Result("registry", f"{work} (N={n})", impl, 0, 0.0,
                                      coord=impl == "coord", error=f"{type(e).__name__}: {e}"))
            continue
        for work, by_impl in lat.items():
            for impl, xs in by_impl.items():
                out.append(Result("registry", f"{work} (N={n})", impl, len(xs), sum(xs) / 1e6,
                                  xs, coord=impl == "coord", note=notes.get((work, impl), "")))
    return out
