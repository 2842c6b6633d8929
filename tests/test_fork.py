"""fork: a child forked while its parent has a database open never runs SQLite on it.

SQLite keeps one lock table per process; a forked child inherits a copy claiming locks it
does not hold. These tests fork for real (os.fork and multiprocessing's ``fork`` start
method, on purpose: they prove the fork rule) and check that the child is refused with
``UnsafeFork`` before any SQLite code runs, that nothing the parent committed is lost, and
that a database the parent did not have open stays usable in the child.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest
from conftest import spawn_python, wait_line

import coord
import coord.backend.sqlite.forking
import coord.check
from coord.db import Store
from coord.errors import UnsafeFork

SLOW = bool(os.environ.get("COORD_SLOW"))
FORK = multiprocessing.get_context("fork")


def _put(key: str) -> Callable[[apsw.Connection], None]:
    def txn(c: apsw.Connection) -> None:
        c.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, str(os.getpid())))

    return txn


def _attempt(what: Callable[[], object]) -> str:
    """'refused: <message>' when coord refused the call with UnsafeFork, else what happened."""
    try:
        what()
    except UnsafeFork as e:
        return f"refused: {e}"
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        return f"{type(e).__name__}: {e}"
    return "succeeded"


def _every_call(store: Store, key: str) -> list[str]:
    """Each way a child can reach the database: the inherited store's write and read, and a
    new Store on the same file."""
    return [
        _attempt(lambda: store.write(_put(key))),
        _attempt(lambda: store.value("SELECT count(*) FROM meta")),
        _attempt(lambda: Store(store.path).write(_put(key + "-new"))),
    ]


def _fork_run(fn: Callable[[], int]) -> int:
    """Run fn() in an os.fork child bounded by an alarm; its exit status (-14: it hung)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        signal.alarm(20)
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _refused_everywhere(store: Store) -> Callable[[], int]:
    def child() -> int:
        results = _every_call(store, f"child-{os.getpid()}")
        return 0 if all(r.startswith("refused") for r in results) else 1

    return child


def _assert_intact(path: Path, parent_keys: int) -> None:
    """A fresh process finds every row the parent committed, none of the children's, and
    a sound file."""
    code = (
        "import sys, coord, coord.check\n"
        "s = coord.Store(sys.argv[1])\n"
        "print(s.value(\"SELECT count(*) FROM meta WHERE key LIKE 'parent-%'\"),"
        " s.value(\"SELECT count(*) FROM meta WHERE key LIKE 'child-%'\"),"
        " s.value('PRAGMA integrity_check'), len(coord.check.check(s)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out == [str(parent_keys), "0", "ok", "0"]


# -- the reproduction ---------------------------------------------------------------------

def _repro_child(store: Store, pipe: multiprocessing.connection.Connection) -> None:
    """A multiprocessing fork child: write, wait for the parent to close and a third
    process to open and close the database, write again."""
    pipe.send(_every_call(store, "child-1"))
    pipe.recv()
    pipe.send(_every_call(store, "child-2"))


def test_reproduction_child_of_a_registered_instance_is_refused(db_path: Path) -> None:
    """The signature of the malformed default database: a registered instance (its heartbeat
    thread holds a connection) starts a fork child that writes; the parent closes; a third
    process opens and closes the database (it believes it is the last user and deletes the
    WAL); the child writes again. Each of the child's calls must be refused — never a
    "successful" commit that a fresh process cannot see."""
    store = Store(db_path)
    inst = coord.register(store, "fork-parent", app="fork")
    store.write(_put("parent-1"))
    ours, theirs = FORK.Pipe()
    child = FORK.Process(target=_repro_child, args=(store, theirs))
    child.start()
    try:
        first = ours.recv()
        inst.close()
        store.close()
        third = "import apsw, sys; c = apsw.Connection(sys.argv[1]); c.execute('SELECT 1'); c.close()"
        subprocess.run([sys.executable, "-c", third, str(db_path)], check=True, timeout=60)
        assert not os.path.exists(f"{db_path}-wal")  # the third process was the last user
        ours.send("go")
        second = ours.recv()
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
    for result in first + second:
        assert result.startswith("refused"), result
        assert str(db_path) in result and "forked by pid" in result
        assert "'spawn'" in result and "'forkserver'" in result
    _assert_intact(db_path, 1)


def test_spawn_children_may_use_the_database(db_path: Path) -> None:
    """The way out the error names: a spawn child opens its own store and its commit is
    seen by a fresh process after everyone closed."""
    store = Store(db_path)
    inst = coord.register(store, "spawn-parent", app="fork")
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_spawned_writer, args=(str(db_path),))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0
    inst.close()
    store.close()
    with Store(db_path) as fresh:
        assert fresh.value("SELECT count(*) FROM meta WHERE key = 'spawned'") == 1


def _spawned_writer(path: str) -> None:
    with Store(path) as s:
        s.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('spawned', '1')"))


# -- the rule for databases the parent did not have open ---------------------------------

def test_a_database_the_parent_had_no_connection_to_is_usable_in_the_child(tmp_path: Path) -> None:
    """The rule: only databases with a connection open at the fork are refused. One never
    opened and one whose store was closed before the fork both work in the child, and the
    child's commits are seen by a fresh process; the one still open is refused."""
    dirs = []
    for name in ("open", "closed", "never"):
        d = tmp_path / name
        d.mkdir(mode=0o700)
        dirs.append(d / "coord.db")
    still_open, closed, never = dirs
    held = Store(still_open)
    coord.register(held, "holder", app="fork")
    Store(closed).close()

    def child() -> int:
        refused = _attempt(lambda: Store(still_open))
        for path in (closed, never):
            with Store(path) as s:
                s.write(_put("from-child"))
        return 0 if refused.startswith("refused") else 1

    assert _fork_run(child) == 0
    coord.instances.close_all()
    held.close()
    for path in (closed, never):
        with Store(path) as s:
            assert s.value("SELECT count(*) FROM meta WHERE key = 'from-child'") == 1
            assert coord.check.check(s) == []


def test_a_grandchild_is_refused_what_its_parent_was_and_what_its_parent_opened(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir(mode=0o700)
    (tmp_path / "b").mkdir(mode=0o700)
    a, b = tmp_path / "a" / "coord.db", tmp_path / "b" / "coord.db"
    held = Store(a)
    held.write(_put("parent-1"))

    def child() -> int:
        own = Store(b)  # allowed: the parent never opened b
        own.write(_put("child-own"))

        def grandchild() -> int:
            refused = [_attempt(lambda: Store(a)), _attempt(lambda: own.write(_put("g")))]
            return 0 if all(r.startswith("refused") for r in refused) else 1

        code = _fork_run(grandchild)
        own.close()
        return code

    assert _fork_run(child) == 0
    held.close()
    with Store(b) as s:
        assert s.value("SELECT count(*) FROM meta WHERE key = 'child-own'") == 1
        assert s.value("SELECT count(*) FROM meta WHERE key = 'g'") == 0


def test_the_parent_is_untouched_and_knows_no_poison(store: Store) -> None:
    store.write(_put("parent-1"))
    conn = store.conn()
    assert _fork_run(_refused_everywhere(store)) == 0
    assert coord.backend.sqlite.forking.poisoned() == {}
    assert store.conn() is conn  # the parent keeps its connection and writes on
    store.write(_put("parent-2"))
    assert coord.check.check(store) == []


def test_the_cli_in_a_forked_child_is_refused_with_one_line(db_path: Path) -> None:
    from coord.cli.main import main

    store = Store(db_path)
    r, w = os.pipe()

    def child() -> int:
        os.dup2(w, 2)
        sys.stderr = open(2, "w", closefd=False)  # pytest has replaced sys.stderr
        try:
            main(["--db", str(db_path), "kv", "set", "k", '"v"'])
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        finally:
            sys.stderr.flush()
        return 0

    code = _fork_run(child)
    os.close(w)
    err = b""
    while chunk := os.read(r, 65536):
        err += chunk
    os.close(r)
    line = err.decode()
    assert code == 1, line
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "forked by pid" in line and "'spawn'" in line
    assert store.value("SELECT count(*) FROM kv") == 0
    store.close()


# -- fork while another thread is inside a write ------------------------------------------

@pytest.fixture
def busy_writer(db_path: Path) -> Iterator[tuple[Store, list[int]]]:
    """A store whose second thread writes without pause: most of the time it is inside a
    BEGIN IMMEDIATE transaction, or inside SQLite. Yields (store, [commits])."""
    store = Store(db_path)
    stop = threading.Event()
    commits = [0]

    def write() -> None:
        while not stop.is_set():
            store.write(_put(f"parent-{commits[0]}"))
            commits[0] += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        yield store, commits
    finally:
        stop.set()
        t.join()
        store.close()


def test_fork_inside_a_held_write_transaction_fails_fast(store: Store) -> None:
    """A thread holds the write lock at the moment of the fork: the child is refused at once
    (never Busy, never hung), and the parent's transaction commits intact."""
    inside, release = threading.Event(), threading.Event()

    def txn(c: apsw.Connection) -> None:
        c.execute("INSERT INTO meta (key, value) VALUES ('parent-held', '1')")
        inside.set()
        release.wait(30)

    t = threading.Thread(target=lambda: store.write(txn))
    t.start()
    assert inside.wait(30)
    try:
        assert _fork_run(_refused_everywhere(store)) == 0
    finally:
        release.set()
        t.join()
    assert store.value("SELECT value FROM meta WHERE key = 'parent-held'") == "1"


def _fork_storm(store: Store, forks: int) -> None:
    """Fork ``forks`` children of a process whose other thread writes; each must be refused
    every call within its alarm (a hang or a deadlock is status -14)."""
    statuses: dict[int, int] = {}
    child = _refused_everywhere(store)
    for _ in range(forks):
        code = _fork_run(child)
        statuses[code] = statuses.get(code, 0) + 1
    assert statuses == {0: forks}


def test_fork_while_another_thread_writes(busy_writer: tuple[Store, list[int]]) -> None:
    store, commits = busy_writer
    _fork_storm(store, 500)
    assert commits[0] > 0


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="set COORD_SLOW=1 for the 10 000-fork stress")
def test_ten_thousand_forks_while_another_thread_writes(
    busy_writer: tuple[Store, list[int]],
) -> None:
    store, commits = busy_writer
    _fork_storm(store, 10_000)
    assert commits[0] > 0


# -- the hook itself runs no SQLite -------------------------------------------------------

# Registers an instance (heartbeat thread), puts SQLite's trace hooks on every connection
# coord has open (statements, rows, profile and close), then forks children that run the
# fork hook, try coord calls, drop every reference and leave through sys.exit (interpreter
# shutdown, atexit). Any SQLite activity in a child writes "sqlite" to stdout. With argv[2]
# == "control" the child closes the inherited connections itself: the trace must see it.
TRACED = """
import gc, os, sys, time, apsw, coord, coord.backend.sqlite.forking
store = coord.Store(sys.argv[1])
inst = coord.register(store, "traced", app="fork")
store.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('parent-1', '1')"))
parent = os.getpid()

def seen(event):
    if os.getpid() != parent:
        os.write(1, b"sqlite %d\\n" % event["code"])

mask = apsw.SQLITE_TRACE_STMT | apsw.SQLITE_TRACE_PROFILE | apsw.SQLITE_TRACE_ROW | apsw.SQLITE_TRACE_CLOSE
while len(coord.backend.sqlite.forking._OPEN) < 2:  # the main thread's and the heartbeat's (COORD_HEARTBEAT)
    time.sleep(0.01)
conns = list(coord.backend.sqlite.forking._OPEN)
for c in conns:
    while True:
        try:
            c.trace_v2(mask, seen)
            break
        except apsw.ThreadingViolationError:  # the heartbeat is using it right now
            time.sleep(0.001)
print("traced", len(conns), flush=True)
for _ in range(int(sys.argv[3])):
    pid = os.fork()
    if pid == 0:
        if sys.argv[2] == "control":
            for c in conns:
                try:
                    c.close()
                except apsw.ThreadingViolationError:  # forked while the heartbeat used it
                    pass
        else:
            for call in (lambda: store.write(lambda c: None), lambda: coord.Store(sys.argv[1]),
                         inst.heartbeat, store.close):
                try:
                    call()
                except coord.UnsafeFork:
                    pass
            del conns[:]
            del store, inst
            gc.collect()
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
for c in conns:
    c.trace_v2(0, None)  # the parent's own shutdown closes them: not the children's doing
print("done", flush=True)
"""


@pytest.mark.parametrize("mode", ["hook", "control"])
def test_the_fork_hook_runs_no_sqlite_call(db_path: Path, mode: str,
                                          procs: list[subprocess.Popen[str]]) -> None:
    """SQLite's own trace hooks see nothing in the children — the fork hook, the refused
    calls and interpreter shutdown run no statement and close no inherited connection; the
    control (a child that closes them itself) shows the trace would see it."""
    p = spawn_python(TRACED, str(db_path), mode, "20", db=db_path,
                     env={"COORD_HEARTBEAT": "0.05"})
    procs.append(p)
    wait_line(p, "traced", timeout=60)
    assert p.stdout is not None
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and out.rstrip().endswith("done")
    closes = [line for line in out.splitlines() if line.startswith("sqlite")]
    if mode == "hook":
        assert closes == []
    else:
        assert closes and all(line == f"sqlite {apsw.SQLITE_TRACE_CLOSE}" for line in closes)
