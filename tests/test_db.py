"""The store's connections and transactions: pragmas, one connection per thread and per
process, BEGIN IMMEDIATE writes, busy retry and the clear Busy error. (fork: a forked child
may not use a database its parent had open — see test_fork.py. The children forked here
drop to nobody and open databases their parent never had open, which the rule allows.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw
import pytest
from conftest import NOBODY, reap_children, wait_line, wait_until

import coord
import coord.backend.sqlite.connection
import coord.backend.sqlite.migrations
import coord.backend.sqlite.retry
import coord.check
from coord.backend.sqlite.connection import CONNECTION_PRAGMAS
from coord.config import Config
from coord.db import Store
from coord.errors import Busy, StorageError

# What PRAGMA x returns for each value CONNECTION_PRAGMAS sets.
_READ_BACK = {"NORMAL": 1, "ON": 1, "OFF": 0, "MEMORY": 2, "FULL": 2, "DEFAULT": 0}


def _expected(value: str) -> Any:
    return _READ_BACK.get(value.upper(), int(value) if value.lstrip("-").isdigit() else value)


def _pragmas(conn: apsw.Connection) -> dict[str, Any]:
    return {name: conn.execute(f"PRAGMA {name}").fetchall()[0][0] for name, _ in CONNECTION_PRAGMAS}


def test_pragmas_read_back(store: Store) -> None:
    conn = store.conn()
    assert _pragmas(conn) == {name: _expected(v) for name, v in CONNECTION_PRAGMAS}
    assert conn.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchall()[0][0] == store.config.busy_timeout_ms


def test_pragmas_on_every_threads_connection(db_path: Path) -> None:
    with Store(db_path, config=Config(busy_timeout_ms=1234)) as s:
        seen: list[Any] = []

        def worker() -> None:
            c = s.conn()
            seen.append((_pragmas(c), c.execute("PRAGMA busy_timeout").fetchall()[0][0]))

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen == [({n: _expected(v) for n, v in CONNECTION_PRAGMAS}, 1234)]


def test_new_database_is_private_and_wal(store: Store) -> None:
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert os.stat(store.path.parent).st_mode & 0o777 == 0o700
    assert store.value("PRAGMA journal_mode") == "wal"
    assert store.value("PRAGMA application_id") == coord.backend.sqlite.connection.APPLICATION_ID


def test_one_connection_per_thread(store: Store) -> None:
    main = store.conn()
    assert store.conn() is main  # same thread: same connection
    others: list[apsw.Connection] = []

    def worker() -> None:
        others.append(store.conn())
        assert store.conn() is others[-1]

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in others}) == 3
    assert all(c is not main for c in others)


def _db_fds(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
                n += 1
        except OSError:
            pass
    return n


def test_connections_of_ended_threads_are_closed(store: Store) -> None:
    store.conn()
    before = _db_fds(store.path)
    for _ in range(20):
        t = threading.Thread(target=lambda: store.value("SELECT count(*) FROM meta"))
        t.start()
        t.join()
    store.conn()  # the next new connection closes those of ended threads
    t = threading.Thread(target=store.conn)
    t.start()
    t.join()
    # 20 threads would hold 20 connections (several descriptors each) if nothing closed them.
    assert _db_fds(store.path) <= before + 6


def _fork(fn: Any) -> tuple[int, str]:
    """Run fn() in a forked child; return (exit status, what it wrote to the pipe)."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        code = 0
        try:
            out = str(fn())
        except BaseException as e:
            out, code = f"{type(e).__name__}: {e}", 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


def test_write_is_one_transaction(store: Store) -> None:
    def txn(c: apsw.Connection) -> int:
        assert not c.get_autocommit()  # inside BEGIN
        c.execute("INSERT INTO meta (key, value) VALUES ('a', '1')")
        return 7

    assert store.write(txn) == 7

    def failing(c: apsw.Connection) -> None:
        c.execute("INSERT INTO meta (key, value) VALUES ('b', '1')")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        store.write(failing)
    assert store.value("SELECT count(*) FROM meta WHERE key IN ('a', 'b')") == 1
    assert store.conn().get_autocommit()  # rolled back, not left open


LOCK_HOLDER = """
import sys, apsw
c = apsw.Connection(sys.argv[1])
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("ROLLBACK")
"""

READ_HOLDER = """
import sys, apsw
c = apsw.Connection(sys.argv[1])
c.execute("BEGIN")
print("reading", c.execute("SELECT count(*) FROM meta").fetchall()[0][0], flush=True)
sys.stdin.readline()
c.execute("COMMIT")
"""


@contextmanager
def _holder(code: str, db: Path, expect: str) -> Iterator[subprocess.Popen[str]]:
    """A child process holding a lock (or a read snapshot) until _release() or the end."""
    p = subprocess.Popen([sys.executable, "-c", code, str(db)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        wait_line(p, expect)
        yield p
    finally:
        reap_children([p])
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


def _release(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(timeout=30) == 0


def _put(key: str) -> Callable[[apsw.Connection], None]:
    def txn(c: apsw.Connection) -> None:
        c.execute("INSERT INTO meta (key, value) VALUES (?, '1')", (key,))

    return txn


def test_busy_is_a_clear_error_after_the_retry_budget(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(db_path, config=Config(busy_timeout_ms=50))
    monkeypatch.setattr(coord.backend.sqlite.retry, "RETRY_SECONDS", 0.3)
    with _holder(LOCK_HOLDER, db_path, "locked") as p:
        with pytest.raises(Busy) as err:
            s.write(_put("x"))
        msg = str(err.value)
        assert str(db_path) in msg and "busy" in msg and "0.3s" in msg
        assert isinstance(err.value.__cause__, apsw.BusyError)
        assert err.value.exit_code == 1
        _release(p)
    s.write(_put("x"))
    s.close()


class _Spy:
    """Stands in for tenacity's Retrying and records that the retry path was entered."""

    def __init__(self, real: Any) -> None:
        self.real, self.entered = real, 0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        self.entered += 1
        return self.real(*a, **kw)


def test_busy_is_retried_until_the_lock_is_free(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(db_path, config=Config(busy_timeout_ms=50))
    spy = _Spy(coord.backend.sqlite.retry.Retrying)
    monkeypatch.setattr(coord.backend.sqlite.retry, "Retrying", spy)
    monkeypatch.setattr(coord.backend.sqlite.retry, "RETRY_SECONDS", 60.0)
    result: list[Any] = []
    with _holder(LOCK_HOLDER, db_path, "locked") as p:
        t = threading.Thread(target=lambda: result.append(s.write(_put("late"))))
        t.start()
        wait_until(lambda: spy.entered, timeout=30)  # a busy error sent it into the retry loop
        _release(p)
        t.join(timeout=60)
    assert not t.is_alive() and result == [None]
    assert s.value("SELECT value FROM meta WHERE key = 'late'") == "1"
    # The wait is counted, in the same transaction, for `coord doctor`.
    assert coord.check.doctor(s)["busy_retries"] == 1
    s.close()


def test_fast_path_never_enters_the_retry_loop(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_retry(*a: Any, **kw: Any) -> Any:
        raise AssertionError("retry entered without a busy error")

    monkeypatch.setattr(coord.backend.sqlite.retry, "Retrying", no_retry)
    for i in range(50):
        store.write(_put(f"k{i}"))
    assert store.value("SELECT count(*) FROM meta WHERE key LIKE 'k%'") == 50
    assert coord.check.doctor(store)["busy_retries"] == 0


def test_open_reader_does_not_block_writers(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(db_path, config=Config(busy_timeout_ms=50))
    monkeypatch.setattr(coord.backend.sqlite.retry, "Retrying", lambda *a, **kw: pytest.fail("writer waited"))
    with _holder(READ_HOLDER, db_path, "reading") as p:
        for i in range(100):
            s.write(_put(f"w{i}"))
        assert s.value("SELECT count(*) FROM meta WHERE key LIKE 'w%'") == 100
        assert p.poll() is None  # the reader still holds its snapshot
        _release(p)
    s.close()


def test_closed_store_refuses_new_connections(db_path: Path) -> None:
    s = Store(db_path)
    s.value("SELECT 1")
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.conn()


def test_read_only_directory_is_a_clear_error(reachable_dir: Path) -> None:
    """A directory the user may not write: a clear StorageError naming the file, run as
    nobody (root ignores file modes)."""
    d = reachable_dir / "ro"
    d.mkdir(mode=0o500)
    os.chown(d, NOBODY, NOBODY)
    _warm_imports()

    def as_nobody() -> str:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        try:
            Store(d / "coord.db")
        except StorageError as e:
            return str(e)
        return "opened"

    code, out = _fork(as_nobody)
    assert code == 0, out
    assert str(d / "coord.db") in out and "permission denied" in out
    assert os.listdir(d) == []


def _warm_imports() -> None:
    """Import now what a child that drops to nobody would import lazily: the interpreter's
    own files may not be readable by nobody."""
    import importlib.readers  # noqa: F401
    import importlib.resources.readers  # noqa: F401

    coord.backend.sqlite.migrations.migrations()


def test_existing_database_in_read_only_directory(reachable_dir: Path) -> None:
    """The database exists but its directory is read-only (no -wal/-shm can be made):
    a clear StorageError, and the file is left as it was."""
    d = reachable_dir / "ro"
    d.mkdir(mode=0o700)
    Store(d / "coord.db").close()
    for p in (d, *d.iterdir()):
        os.chown(p, NOBODY, NOBODY)
    d.chmod(0o500)
    before = hashlib.sha256((d / "coord.db").read_bytes()).hexdigest()
    _warm_imports()

    def as_nobody() -> str:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        try:
            s = Store(d / "coord.db")
            s.write(_put("x"))
        except StorageError as e:
            return str(e)
        return "wrote"

    code, out = _fork(as_nobody)
    assert code == 0, out
    assert str(d / "coord.db") in out and "read-only" in out
    assert hashlib.sha256((d / "coord.db").read_bytes()).hexdigest() == before


def test_nested_write_is_a_clear_error(store: Store) -> None:
    with pytest.raises(RuntimeError, match="inside a transaction"):
        store.write(lambda c: store.write(_put("inner")))
    assert store.conn().get_autocommit()  # the outer transaction was rolled back
    store.write(_put("after"))


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 1 MiB tmpfs: a full disk without filling the real one. Skipped where mounting is
    not allowed."""
    d = Path(tempfile.mkdtemp(prefix="coord-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def test_full_disk_is_a_clear_error_and_loses_nothing(tiny_fs: Path) -> None:
    s = Store(tiny_fs / "coord.db")
    filler = tiny_fs / "filler"
    filler.write_bytes(b"\0" * 300_000)  # someone else's file, removed later to free space
    blob = "x" * 50_000
    committed = 0
    with pytest.raises(StorageError) as e:
        for i in range(1000):
            s.write(lambda c, i=i: c.execute("INSERT INTO meta (key, value) VALUES (?, ?)",
                                             (f"blob{i}", blob)))
            committed += 1
    assert committed > 0
    assert str(tiny_fs / "coord.db") in str(e.value) and "disk full" in str(e.value)
    assert s.conn().get_autocommit()  # nothing left half-done
    assert s.value("SELECT count(*) FROM meta WHERE key LIKE 'blob%'") == committed
    # Space comes back: writes work again, and nothing committed was lost.
    filler.unlink()
    s.write(_put("after"))
    assert s.value("SELECT count(*) FROM meta WHERE key LIKE 'blob%'") == committed
    assert coord.check.check(s) == []
    s.close()
