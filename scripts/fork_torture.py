"""Fork torture: threaded coord processes start multiprocessing ``fork`` children while they
write, the monitor SIGKILLs writers at random, and at the end nothing acknowledged is lost.

Run (a long run):

    .venv/bin/python scripts/fork_torture.py --duration 600 --writers 6

The bounded version CI runs (tests/test_torture.py):

    .venv/bin/python scripts/fork_torture.py --duration 8 --writers 3

Its last line is ``forks=N refused=N acked=N kills=N violations=N``; the exit status is 1
when violations > 0.

Each writer registers an instance (its heartbeat thread holds a connection), writes kv keys
from two threads and records every acknowledged write in its ledger, and every few
milliseconds starts a child with the ``fork`` start method — from a process whose other
threads are inside SQLite at that moment. Every child tries the inherited store, a new
``Store(path)``, the inherited instance and the CLI; some children outlive their writer and
try again at the end. What is checked:

- every coord call of every fork child is refused with ``UnsafeFork`` (nothing else: no
  success, no Busy, no hang);
- after all writers have exited, a third process opens and closes the database (it is the
  last user now: it checkpoints and removes the WAL), the lingering children try again and
  are refused again;
- then a fresh process finds every ledger entry with its value, ``PRAGMA integrity_check``
  is ok, and ``coord.check.check(strict=True)`` after a reap finds nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PHASE2 = "phase2"  # the file whose appearance tells lingering children to try again


def _log(path: Path, record: dict[str, Any]) -> None:
    # One write() per line with O_APPEND: lines from a killed process are whole or absent.
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# -- fork children ------------------------------------------------------------------------


def _attempts(store: Any, inst: Any, db: str, logdir: Path) -> tuple[int, list[str]]:
    """Every way a child can reach the database; (refused, [anything that was not])."""
    from coord.cli.main import main as cli_main

    import coord
    from coord import kv

    key = f"fork/child/{os.getpid()}"
    calls = {
        "inherited store": lambda: kv.set(store, key, 1),
        "new store": lambda: kv.set(coord.Store(db), key, 2),
        "inherited instance": inst.heartbeat,
    }
    refused, other = 0, []
    for name, call in calls.items():
        try:
            call()
            other.append(f"{name}: succeeded")
        except coord.UnsafeFork:
            refused += 1
        except BaseException as e:  # noqa: BLE001 - every outcome is reported
            other.append(f"{name}: {type(e).__name__}: {e}")
    err = logdir / f"cli-{os.getpid()}.err"
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    saved = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        cli_main(["--db", db, "kv", "set", key, "3"])
        status: object = 0
    except SystemExit as e:
        status = e.code
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    text = err.read_text()
    err.unlink()
    if status == 1 and "forked by pid" in text and len(text.splitlines()) == 1:
        refused += 1
    else:
        other.append(f"cli: exit {status}: {text.strip()[:200]}")
    return refused, other


def child(store: Any, inst: Any, db: str, logdir: Path, linger: bool) -> None:
    """A multiprocessing fork child of a writer (see the module docstring)."""
    signal.alarm(300)  # a hung child ends itself; the monitor counts it missing
    mine = logdir / "children.log"
    refused, other = _attempts(store, inst, db, logdir)
    _log(mine, {"pid": os.getpid(), "phase": 1, "refused": refused, "other": other})
    if not linger:
        return
    while not (logdir / PHASE2).exists():
        time.sleep(0.02)
    refused, other = _attempts(store, inst, db, logdir)
    _log(mine, {"pid": os.getpid(), "phase": 2, "refused": refused, "other": other})


# -- writers (run as `fork_torture.py --writer SLOT` in their own processes) --------------


def writer(db: str, slot: int, logdir: Path) -> None:
    from coord.cli.main import main  # noqa: F401 - imported before any fork, for the children

    import coord
    from coord import kv

    store = coord.Store(db)
    inst = coord.register(store, f"fork-writer-{slot}", app="fork-torture")
    ledger = logdir / f"ledger-{os.getpid()}.log"
    forks = logdir / f"forks-{os.getpid()}.log"
    ctx = multiprocessing.get_context("fork")  # on purpose: this run proves the fork rule
    stop = threading.Event()
    rng = random.Random(os.getpid())

    def write(thread: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            key = f"fork/{slot}/{os.getpid()}/{thread}/{n}"
            kv.set(store, key, n)
            _log(ledger, {"key": key, "value": n})  # only after the write returned

    t = threading.Thread(target=write, args=("b",), daemon=True)
    t.start()
    print("ready", flush=True)
    try:
        while True:
            for _ in range(rng.randint(1, 4)):
                n = rng.randrange(1 << 30)
                key = f"fork/{slot}/{os.getpid()}/a/{n}"
                kv.set(store, key, n)
                _log(ledger, {"key": key, "value": n})
            linger = rng.random() < 0.1
            p = ctx.Process(target=child, args=(store, inst, db, logdir, linger))
            p.start()
            _log(forks, {"pid": p.pid, "linger": linger})
            multiprocessing.active_children()  # joins the children that have ended
            time.sleep(rng.random() * 0.01)
    finally:
        stop.set()


# -- the monitor --------------------------------------------------------------------------


def _read(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut by SIGKILL mid-write
    return out


def _records(logdir: Path, prefix: str) -> list[dict[str, Any]]:
    return [r for f in sorted(logdir.glob(f"{prefix}-*.log")) for r in _read(f)]


def verify(db: str, logdir: Path) -> None:
    """In a fresh process: every ledger entry is there, the file is sound."""
    import coord
    from coord import kv
    from coord.check import check
    from coord.reaper import reap

    store = coord.Store(db)
    missing = []
    ledger = _records(logdir, "ledger")
    for r in ledger:
        e = kv.get(store, r["key"])
        if e is None or e.value != r["value"]:
            missing.append(r["key"])
    integrity = store.value("PRAGMA integrity_check")
    reap(store)
    problems = [f"{p.check}: {p.detail}" for p in check(store, strict=True)]
    children = store.value("SELECT count(*) FROM kv WHERE key LIKE 'fork/child/%'")
    store.close()
    print(json.dumps({"acked": len(ledger), "missing": missing[:20], "n_missing": len(missing),
                      "integrity": integrity, "problems": problems,
                      "child_keys": children}), flush=True)


class Run:
    def __init__(self, db: Path, logdir: Path, writers: int) -> None:
        self.db, self.logdir, self.n = db, logdir, writers
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.kills = 0
        self.violations: list[str] = []

    def violate(self, what: str) -> None:
        self.violations.append(what)
        print(f"VIOLATION: {what}", file=sys.stderr, flush=True)

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
        p = subprocess.Popen([sys.executable, __file__, "--db", str(self.db), "--logdir",
                              str(self.logdir), *args], env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("ready"):
            p.wait()
            p.stdout.close()
            raise RuntimeError(f"writer {args} did not start: {line!r} (exit {p.poll()})")
        return p

    def chaos(self, duration: float, rng: random.Random) -> None:
        for slot in range(self.n):
            self.procs[slot] = self.spawn("--writer", str(slot))
        end = time.monotonic() + duration
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.2, 1.0))
            slot = rng.randrange(self.n)
            p = self.procs[slot]
            p.kill()  # its fork children live on, orphaned: the case that lost writes
            p.wait()
            if p.stdout:
                p.stdout.close()
            self.kills += 1
            self.procs[slot] = self.spawn("--writer", str(slot))

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()

    def finish(self) -> tuple[int, int]:
        """The third process, the lingering children's second try, the fresh verifier;
        returns (forks, refused)."""
        third = "import apsw, sys; c = apsw.Connection(sys.argv[1]); c.execute('SELECT 1'); c.close()"
        subprocess.run([sys.executable, "-c", third, str(self.db)], check=True, timeout=60)
        (self.logdir / PHASE2).touch()
        forks = _records(self.logdir, "forks")
        lingering = {f["pid"] for f in forks if f["linger"]}
        deadline = time.monotonic() + 60
        while True:
            results = _read(self.logdir / "children.log")
            if {r["pid"] for r in results if r["phase"] == 2} >= lingering:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        _reap_orphans()
        refused = 0
        seen = {(r["pid"], r["phase"]) for r in results}
        for r in results:
            refused += r["refused"]
            for o in r["other"]:
                self.violate(f"fork child {r['pid']} phase {r['phase']}: {o}")
        for f in forks:
            for phase in (1, 2) if f["linger"] else (1,):
                if (f["pid"], phase) not in seen:
                    self.violate(f"fork child {f['pid']} never reported phase {phase}")
        out = subprocess.run([sys.executable, __file__, "--db", str(self.db), "--logdir",
                              str(self.logdir), "--verify"], capture_output=True, text=True,
                             timeout=300)
        if out.returncode != 0:
            self.violate(f"verifier failed: {out.stderr[-2000:]}")
            return len(forks), refused
        v = json.loads(out.stdout.strip().splitlines()[-1])
        self.acked = v["acked"]
        if v["n_missing"]:
            self.violate(f"{v['n_missing']} acknowledged writes lost, e.g. {v['missing']}")
        if v["integrity"] != "ok":
            self.violate(f"integrity_check: {v['integrity']}")
        for p in v["problems"]:
            self.violate(f"checker: {p}")
        if v["child_keys"]:
            self.violate(f"{v['child_keys']} keys written by fork children")
        return len(forks), refused

    acked = 0


def _reap_orphans() -> None:
    """Orphaned fork children were reparented to this process (a child subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _become_subreaper() -> None:
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of chaos")
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default=None, help="directory for the database (default: a temp dir)")
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--logdir", help=argparse.SUPPRESS)
    ap.add_argument("--writer", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.writer is not None:
        writer(a.db, a.writer, Path(a.logdir))
        return 0
    if a.verify:
        verify(a.db, Path(a.logdir))
        return 0

    _become_subreaper()
    seed = a.seed if a.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="coord-fork-torture-", dir=a.dir) as tmp:
        base = Path(tmp)
        os.chmod(base, 0o700)
        db, logdir = base / "coord.db", base / "logs"
        logdir.mkdir()
        run = Run(db, logdir, a.writers)
        try:
            run.chaos(a.duration, rng)
        finally:
            run.stop_all()
        forks, refused = run.finish()
    print(f"seed={seed}", file=sys.stderr)
    print(f"forks={forks} refused={refused} acked={run.acked} kills={run.kills} "
          f"violations={len(run.violations)}", flush=True)
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
