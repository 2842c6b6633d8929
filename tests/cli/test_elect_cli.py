"""`coord leases`, `coord leader`, `coord elect` and `coord lock`, end to end: real wrapper
processes, real SIGKILL and SIGSTOP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import engine_sql
import pytest
from conftest import coord_env, stop_outside_a_write, wait_until

import coord
from coord.leases import acquire, get_lease

CLI = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.contract

# CMD for the chaos test: takes a record lock on a shared file first (the kernel drops it the
# instant the process dies, so a second worker alive at the same time sees it taken), then
# logs start and end with CLOCK_MONOTONIC and its term.
WORKER = """
import fcntl, os, signal, sys, time
log, lock = sys.argv[1], sys.argv[2]
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    state = "alone"
except OSError:
    state = "OVERLAP"
def note(what):
    t = time.clock_gettime(time.CLOCK_MONOTONIC)
    with open(log, "a") as f:
        f.write(f"{what} {os.environ['COORD_LEASE_TERM']} {os.getpid()} {t} {state}\\n")
def end(signum, frame):
    note("end")
    os._exit(0)
signal.signal(signal.SIGTERM, end)
note("start")
while True:
    time.sleep(0.05)
"""


# Short timings that pass the step-down rule: renew deadline 1 s + grace + 2 s (the KILL
# wait) stays below the TTL of 4.5 s.
SHORT = {"COORD_RENEW_DEADLINE": "1.0", "COORD_HEARTBEAT": "0.2"}
SHORT_TTL = "4.5"


def _wrapper(db: Path, *args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "coord", *args], env=coord_env(db, **(env or {})),
                            text=True, **kw)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# -- observing -------------------------------------------------------------------------------


def test_leases_and_leader_json(db_path: Path, invoke: Any) -> None:
    store = coord.Store(db_path)
    inst = coord.register(store, "obs", app="t", handle_signals=False)
    lease = acquire(inst, "app/obs")
    r = invoke("leader", "app/obs", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert {"name", "holder", "term", "expires_in"} <= obj.keys()
    assert (obj["name"], obj["holder"], obj["term"], obj["alive"]) == ("app/obs", "obs", lease.term, True)
    assert 0 < obj["expires_in"] <= store.config.lease_ttl
    rows = json.loads(invoke("leases", "--json").output)
    assert [(r["name"], r["instance_id"]) for r in rows] == [("app/obs", "obs")]
    text = invoke("leases").output
    assert "app/obs" in text and "obs" in text and str(lease.term) in text
    assert "holder" in invoke("leader", "app/obs").output
    lease.release()
    obj = json.loads(invoke("leader", "app/obs", "--json").output)
    assert obj["holder"] is None and obj["term"] == lease.term
    never = invoke("leader", "never/used", "--json")  # never taken: not found, like any name
    assert never.exit_code == 1 and json.loads(never.stderr)["kind"] == "NotFound"
    inst.close()
    store.close()


# -- elect / lock ----------------------------------------------------------------------------


def test_elect_runs_cmd_with_lease_env_and_its_status(cli: CLI) -> None:
    r = cli("elect", "app/e", "--", "sh", "-c", 'echo "$COORD_LEASE_NAME $COORD_LEASE_TERM"; exit 7')
    assert r.returncode == 7, r.stderr
    name, term = r.stdout.split()
    assert name == "app/e" and int(term) > 0
    r = cli("lock", "app/e", "--wait", "5", "--", "sh", "-c", "echo $COORD_LEASE_TERM")
    assert r.returncode == 0 and int(r.stdout) > int(term)
    r = cli("elect", "app/e", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM
    r = cli("elect", "app/e", "--", "no-such-command-xyz")
    assert r.returncode == 127 and "not found" in r.stderr
    assert cli("doctor", "--json").returncode == 0


def test_elect_wait_0_fails_fast_while_held(db_path: Path, cli: CLI) -> None:
    store = coord.Store(db_path)
    inst = coord.register(store, "holder", app="t", handle_signals=False)
    lease = acquire(inst, "busy")
    t0 = time.monotonic()
    r = cli("elect", "busy", "--wait", "0", "--", "true")
    assert r.returncode == 75, r.stderr
    assert "not obtained" in r.stderr and "holder" in r.stderr
    assert time.monotonic() - t0 < 30  # it did not wait for the lease (default: for ever)
    r = cli("lock", "busy", "--wait", "0.3", "--", "true")
    assert r.returncode == 75
    lease.release()
    inst.close()
    store.close()


def test_group_is_recorded_before_cmd_runs(cli: CLI) -> None:
    probe = (
        "import coord, os\n"
        "s = coord.Store(os.environ['COORD_DB'])\n"
        "rec = s.backend.leases.get(os.environ['COORD_LEASE_NAME'])\n"
        "row = (rec.pgid, rec.pg_start_token, rec.term)\n"
        "tok = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])\n"
        "print(row[0] == os.getpgrp() == os.getpid(), row[1] == tok,"
        " row[2] == int(os.environ['COORD_LEASE_TERM']))\n"
    )
    r = cli("elect", "app/g", "--", sys.executable, "-c", probe)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "True"]


def test_signals_are_forwarded_to_cmd(db_path: Path, children: list[subprocess.Popen[Any]]) -> None:
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
            "print('up', flush=True)\n"
            "while True: time.sleep(0.05)\n")
    p = _wrapper(db_path, "elect", "app/s", "--", sys.executable, "-c", code, stdout=subprocess.PIPE)
    children.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 42


def test_new_holder_ends_previous_group_first(db_path: Path, tmp_path: Path,
                                              children: list[subprocess.Popen[Any]]) -> None:
    """The wrapper is SIGKILLed: CMD dies with it (parent-death signal), but a grandchild it
    left in its group does not — the next holder ends that group before running its CMD."""
    pidfile = tmp_path / "bg.pid"
    p = _wrapper(db_path, "elect", "app/p", "--", "sh", "-c",
                 f"sleep 600 & echo $! > {pidfile}; wait")
    children.append(p)
    bg = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip()))
    store = coord.Store(db_path)
    cmd_pid = get_lease(store, "app/p").pgid
    assert cmd_pid is not None
    p.kill()
    p.wait()
    wait_until(lambda: _gone(cmd_pid))  # parent-death signal
    assert not _gone(bg)  # the grandchild is still there, in the recorded group
    check = f"test -d /proc/{bg} && grep -q '^State:.*Z' /proc/{bg}/status || ! test -d /proc/{bg}"
    r = subprocess.run([sys.executable, "-m", "coord", "elect", "app/p", "--wait", "30", "--",
                        "sh", "-c", check], env=coord_env(db_path), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr  # the grandchild was gone before CMD ran
    assert _gone(bg)
    store.close()


def test_elect_chaos_sigkill_and_sigstop(db_path: Path, tmp_path: Path,
                                         children: list[subprocess.Popen[Any]]) -> None:
    """3 `coord elect` wrappers; the holder's wrapper is SIGKILLed several times and
    SIGSTOPped once: no two workers ever run at the same time, and no worker outlives its
    wrapper by more than the grace period."""
    log, lock = tmp_path / "workers.log", tmp_path / "workers.lock"
    grace = 1.0
    args = ["elect", "chaos/E", "--ttl", SHORT_TTL, "--grace", str(grace), "--",
            sys.executable, "-c", WORKER, str(log), str(lock)]
    wrappers: dict[int, subprocess.Popen[str]] = {}

    def spawn() -> None:
        w = _wrapper(db_path, *args, env=SHORT, stderr=subprocess.DEVNULL)
        children.append(w)
        wrappers[w.pid] = w

    def starts() -> list[list[str]]:
        if not log.exists():
            return []
        return [ln.split() for ln in log.read_text().splitlines() if ln.startswith("start")]

    store = coord.Store(db_path)
    for _ in range(3):
        spawn()
    last = 0
    stopped: subprocess.Popen[str] | None = None
    for round_ in range(5):
        info = wait_until(lambda last=last: (i := get_lease(store, "chaos/E")).alive
                          and (i.term or 0) > last and i, timeout=60)
        worker = wait_until(lambda info=info: next((s for s in starts() if int(s[1]) == info.term), None),
                            timeout=30)
        worker_pid = int(worker[2])
        w = wrappers.pop(info.holder_pid)
        if round_ == 2:
            # Its worker keeps running until the next holder ends it. Stopped outside a write:
            # one stopped inside its heartbeat's transaction would hold every writer.
            stop_outside_a_write(store, w)
            stopped = w
        else:
            w.kill()
            killed_at = time.monotonic()
            w.wait()
            wait_until(lambda pid=worker_pid: _gone(pid), timeout=grace + 5)
            assert time.monotonic() - killed_at <= grace + 5
        last = info.term or 0
        spawn()
    final = wait_until(lambda: (i := get_lease(store, "chaos/E")).alive and (i.term or 0) > last and i,
                       timeout=60)
    wait_until(lambda: any(int(s[1]) == final.term for s in starts()), timeout=30)
    assert stopped is not None
    stopped.send_signal(signal.SIGCONT)
    assert stopped.wait(30) == 75  # it lost the lease while stopped, and says so
    # A clean end: TERM to every wrapper is forwarded; waiting ones just leave.
    for w in wrappers.values():
        w.send_signal(signal.SIGTERM)
    for w in wrappers.values():
        w.wait(30)
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert not [ln for ln in lines if ln[4] != "alone"], "two workers ran at the same time"
    terms = [int(ln[1]) for ln in lines if ln[0] == "start"]
    assert len(terms) == 6 and terms == sorted(terms) and len(set(terms)) == 6
    # Intervals from the log never overlap: each start comes after the previous worker's end.
    ends = {int(ln[1]): float(ln[3]) for ln in lines if ln[0] == "end"}
    start_at = {int(ln[1]): float(ln[3]) for ln in lines if ln[0] == "start"}
    for a, b in zip(terms, terms[1:], strict=False):
        if a in ends:
            assert ends[a] <= start_at[b]
    coord.reap(store)
    assert get_lease(store, "chaos/E").holder is None
    store.close()


def test_lost_lease_ends_cmd(db_path: Path, children: list[subprocess.Popen[Any]]) -> None:
    """When the lease is taken away (here: expired by hand), CMD's group is ended and the
    wrapper exits 75."""
    p = _wrapper(db_path, "elect", "app/l", "--ttl", SHORT_TTL, "--grace", "1", "--",
                 "sh", "-c", "echo up; exec sleep 600", env=SHORT, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    children.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    store = coord.Store(db_path)
    cmd = get_lease(store, "app/l").pgid
    assert cmd is not None
    engine_sql.execute(store, "UPDATE leases SET expires_mono = 0 WHERE name = 'app/l'")
    assert p.wait(30) == 75  # at its next renewal it finds the lease gone
    assert p.stderr is not None and "no longer held" in p.stderr.read()
    assert _gone(cmd)
    store.close()


# -- chaos with whole process trees ------------------------------------------------------------

# One process of a term: the shell script's child ("child"), or, after a double fork and
# setsid, its daemonized grandchild ("daemon"). Each holds a record lock on a file of its own
# named after its term, and at start tries every other term's file: one still locked means a
# process of another term is alive at the same time ("OVERLAP"). The kernel drops the lock the
# instant a process dies, SIGKILL included. Start and end are logged with CLOCK_MONOTONIC.
TREE_WORKER = """
import fcntl, os, signal, sys, time
log, locks, role = sys.argv[1], sys.argv[2], sys.argv[3]
term = os.environ["COORD_LEASE_TERM"]
if role == "daemon":
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
fd = os.open(os.path.join(locks, f"{term}.{os.getpid()}"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
state = "alone"
for name in os.listdir(locks):
    if name.split(".")[0] != term:
        other = os.open(os.path.join(locks, name), os.O_RDWR)
        try:
            fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            state = "OVERLAP"
        os.close(other)
def note(what):
    t = time.clock_gettime(time.CLOCK_MONOTONIC)
    with open(log, "a") as f:
        f.write(f"{what} {term} {os.getpid()} {t} {state} {role}\\n")
def end(signum, frame):
    note("end")
    os._exit(0)
signal.signal(signal.SIGTERM, end)
note("start")
while True:
    time.sleep(0.05)
"""

TREE_SCRIPT = """
"$0" -c "$1" "$2" "$3" child &
"$0" -c "$1" "$2" "$3" daemon
wait
"""


def run_tree_chaos(db: Path, tmp: Path, children: list[subprocess.Popen[Any]], rounds: int) -> None:
    """3 `coord elect` wrappers whose CMD is a shell script with a child and a daemonized
    grandchild; each round the holder's wrapper is SIGKILLed (every fourth: SIGSTOPped) as
    soon as both have started, whether the wrapper has recorded the grandchild yet or not.
    No two terms' processes ever run at the same time, and every process of a killed
    holder's term is gone within the grace period (plus a margin for a loaded machine)."""
    from coord.identity import ProcIdentity, identify, still_running

    log, locks = tmp / "tree.log", tmp / "locks"
    locks.mkdir()
    grace = 1.0
    args = ["elect", "chaos/T", "--ttl", SHORT_TTL, "--grace", str(grace), "--",
            "sh", "-c", TREE_SCRIPT, sys.executable, TREE_WORKER, str(log), str(locks)]
    wrappers: dict[int, subprocess.Popen[str]] = {}
    everyone: list[ProcIdentity] = []

    def spawn() -> None:
        w = _wrapper(db, *args, env=SHORT, stderr=subprocess.DEVNULL)
        children.append(w)
        wrappers[w.pid] = w

    def lines() -> list[list[str]]:
        return [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []

    def of_term(term: int) -> list[ProcIdentity]:
        found = [identify(int(ln[2])) for ln in lines() if ln[0] == "start" and int(ln[1]) == term]
        return [i for i in found if i is not None]

    store = coord.Store(db)
    try:
        for _ in range(3):
            spawn()
        last = 0
        stopped: list[subprocess.Popen[str]] = []
        for round_ in range(rounds):
            info = wait_until(lambda last=last: (i := get_lease(store, "chaos/T")).alive
                              and (i.term or 0) > last and i, timeout=60)
            term = info.term or 0
            # Both processes of the term are up (the daemon after its double fork).
            wait_until(lambda term=term: {ln[5] for ln in lines() if ln[0] == "start"
                                          and int(ln[1]) == term} == {"child", "daemon"},
                       timeout=30)
            procs_ = of_term(term)
            everyone.extend(procs_)
            w = wrappers.pop(info.holder_pid)
            if round_ % 4 == 2:
                # Its tree runs on until the next holder ends it. Stopped outside a write: one
                # stopped inside its heartbeat's transaction would hold every writer.
                stop_outside_a_write(store, w)
                stopped.append(w)
            else:
                w.kill()
                killed_at = time.monotonic()
                w.wait()
                wait_until(lambda p=procs_: not any(still_running(i) for i in p),
                           timeout=grace + 5)
                assert time.monotonic() - killed_at <= grace + 5
            last = term
            spawn()
        final = wait_until(lambda: (i := get_lease(store, "chaos/T")).alive
                           and (i.term or 0) > last and i, timeout=60)
        wait_until(lambda: len(of_term(final.term or 0)) == 2, timeout=30)
        everyone.extend(of_term(final.term or 0))
        for w in stopped:
            w.send_signal(signal.SIGCONT)
            assert w.wait(30) == 75  # it lost the lease while stopped, and says so
        for w in wrappers.values():
            w.send_signal(signal.SIGTERM)
        for w in wrappers.values():
            w.wait(30)
        assert not any(still_running(i) for i in everyone)
        logged = lines()
        assert not [ln for ln in logged if ln[4] != "alone"], "two terms' processes overlapped"
        starts = [ln for ln in logged if ln[0] == "start"]
        terms = sorted({int(ln[1]) for ln in starts})
        assert len(terms) == rounds + 1 and all(
            sorted(ln[5] for ln in starts if int(ln[1]) == t) == ["child", "daemon"] for t in terms)
        # From the log: every process of a term ended before any process of the next started.
        first_start = {t: min(float(ln[3]) for ln in starts if int(ln[1]) == t) for t in terms}
        for ln in logged:
            later = [t for t in terms if t > int(ln[1])]
            if ln[0] == "end" and later:
                assert float(ln[3]) <= first_start[later[0]]
        coord.reap(store)
        assert get_lease(store, "chaos/T").holder is None
        assert engine_sql.value(store, "SELECT count(*) FROM processes WHERE status = 'running'") == 0
    finally:
        for ident in everyone:
            if still_running(ident):
                os.kill(ident.pid, signal.SIGKILL)
        store.close()


def test_elect_chaos_with_process_trees(db_path: Path, tmp_path: Path,
                                        children: list[subprocess.Popen[Any]]) -> None:
    run_tree_chaos(db_path, tmp_path, children, rounds=6)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("COORD_SLOW"), reason="set COORD_SLOW=1 for the long run")
def test_elect_chaos_with_process_trees_long(db_path: Path, tmp_path: Path,
                                             children: list[subprocess.Popen[Any]]) -> None:
    run_tree_chaos(db_path, tmp_path, children, rounds=20)
