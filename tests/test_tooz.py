"""The tooz driver (``coord://``): our own cross-process tests, then tooz's own driver suite.

Members, locks and leaders live in real processes that are SIGKILLed; every URL here sets
``timeout=600`` (instance and lease TTL), so whatever frees their holdings within the test
is proof of death, never a TTL.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

tooz = pytest.importorskip(
    "tooz", reason="tooz is not installed: pip install -e '.[tooz-test]' to test the driver"
)

from conftest import spawn_python, wait_line  # noqa: E402
from tooz import coordination  # noqa: E402

import coord  # noqa: E402
from coord import tooz_driver  # noqa: E402
from coord.check import check  # noqa: E402

SLOW = bool(os.environ.get("COORD_SLOW"))

pytestmark = pytest.mark.contract

# A tooz member in its own process, driven line by line on stdin; it answers each command.
MEMBER = r"""
import sys
from tooz import coordination

url, member = sys.argv[1], sys.argv[2].encode()
c = coordination.get_coordinator(url, member)
c.start()
print("ready", c.instance_id, flush=True)
locks, elected = {}, []
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "join":
        c.join_group_create(arg.encode(), {"role": "worker"})
        print("joined", flush=True)
    elif cmd == "leave":
        c.leave_group(arg.encode()).get()
        print("left", flush=True)
    elif cmd in ("lock", "shared"):
        lock = locks.setdefault(arg, c.get_lock(arg.encode()))
        ok = lock.acquire(blocking=False, shared=cmd == "shared")
        print("locked" if ok else "busy", flush=True)
    elif cmd == "elect":
        c.watch_elected_as_leader(arg.encode(), elected.append)
        c.run_watchers()
        print("leader" if elected else "follower", flush=True)
"""


def base_url(db: Path) -> str:
    """The driver's URL of this store: ``coord:///path``, or on PostgreSQL the server's URL
    under the ``coord+postgresql`` scheme."""
    where = str(db)
    return f"coord+{where}" if where.startswith("postgresql://") else f"coord://{where}"


def url_for(db: Path, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"timeout": "600", **options}.items())
    url = base_url(db)
    return f"{url}{'&' if '?' in url else '?'}{query}"


@pytest.fixture
def make(db_path: Path) -> Iterator[Callable[..., Any]]:
    """Start tooz coordinators on this test's database; all are stopped at teardown."""
    made: list[Any] = []

    def start(member: bytes | str, url: str | None = None) -> Any:
        c = coordination.get_coordinator(url or url_for(db_path), member)
        c.start()
        made.append(c)
        return c

    yield start
    for c in made:
        if c.is_started:
            c.stop()


class Member:
    """A tooz member in a child process."""

    def __init__(self, db: Path, name: str, children: list[subprocess.Popen[Any]]) -> None:
        self.proc = spawn_python(MEMBER, url_for(db), name, db=db, stdin=subprocess.PIPE)
        children.append(self.proc)
        self.instance_id = wait_line(self.proc, "ready").split()[1]

    def do(self, cmd: str, arg: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd} {arg}\n")
        self.proc.stdin.flush()
        return wait_line(self.proc, "").strip()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def healthy(db: Path) -> None:
    with coord.Store(db) as store:
        assert [p for p in check(store) if not p.pending] == []


# -- loading and URLs ---------------------------------------------------------------------


def test_entry_point_loads_the_driver(make: Callable[..., Any], db_path: Path) -> None:
    c = make(b"alpha", url_for(db_path, app="web"))
    assert type(c) is tooz_driver.CoordDriver
    assert coordination.Characteristics.NON_TIMEOUT_BASED in c.CHARACTERISTICS
    assert c.requires_beating is False  # coord's instance heartbeats by itself
    assert c.heartbeat() > 0  # but a caller that beats anyway is served
    with coord.Store(db_path) as store:
        info = coord.get_instance(store, "alpha")
    assert (info.alive, info.app, info.ttl) == (True, "web", 600)
    assert info.labels == {"tooz_member": "alpha"}


def test_default_database_url(make: Callable[..., Any], db_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORD_DB", str(db_path))
    c = make("beta", "coord://")
    c.create_group(b"g").get()
    with coord.Store(db_path) as store:
        assert coord.kv.get(store, "tooz/groups/g") is not None
        assert coord.get_instance(store, c.instance_id).alive


@pytest.mark.parametrize("url", [
    "coord://somehost/tmp/x.db",  # no hosts: one machine, one database file
    "coord:relative.db",
    "coord:///tmp/x.db?timeout=soon",
    "coord:///tmp/x.db?timeout=0",
    "coord+postgresql://somehost/db?timeout=0",
])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(tooz.ToozError):
        coordination.get_coordinator(url, b"m")


def test_an_unusable_path_is_a_connection_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    c = coordination.get_coordinator(f"coord://{tmp_path}/file/coord.db", b"m")
    with pytest.raises(coordination.ToozConnectionError):
        c.start()
    assert not c.is_started


# -- groups -------------------------------------------------------------------------------


def test_groups_across_processes_and_a_killed_member_vanishes_at_once(
    make: Callable[..., Any], db_path: Path, children: list[subprocess.Popen[Any]]
) -> None:
    a = make(b"a")
    a.create_group(b"g/1").get()  # a slash in an id is no separator
    a.join_group(b"g/1", {"role": "boss"}).get()
    events: list[Any] = []
    a.watch_join_group(b"g/1", events.append)
    a.watch_leave_group(b"g/1", events.append)

    b = Member(db_path, "b", children)
    assert b.do("join", "g/1") == "joined"
    assert a.get_members(b"g/1").get() == {b"a", b"b"}
    assert a.get_member_capabilities(b"g/1", b"b").get() == {"role": "worker"}
    a.run_watchers()
    assert [(type(e), e.member_id) for e in events] == [(coordination.MemberJoinedGroup, b"b")]

    # The member is an ephemeral kv key bound to the child's coord instance.
    with coord.Store(db_path) as store:
        entry = coord.kv.get(store, "tooz/groups/g%2F1/members/b")
        assert entry is not None and entry.owner_id == b.instance_id

    assert b.do("leave", "g/1") == "left"
    assert a.get_members(b"g/1").get() == {b"a"}
    assert b.do("join", "g/1") == "joined"
    a.run_watchers()  # left and joined again between two looks: no change to report
    events.clear()

    b.kill()
    assert a.get_members(b"g/1").get() == {b"a"}  # at once: no TTL, no reaper
    a.run_watchers()
    assert [(type(e), e.member_id) for e in events] == [(coordination.MemberLeftGroup, b"b")]
    with pytest.raises(coordination.MemberNotJoined):
        a.get_member_info(b"g/1", b"b").get()
    healthy(db_path)


def test_same_member_id_twice(make: Callable[..., Any]) -> None:
    first = make(b"same")
    second = make(b"same")  # a second live coordinator of one member gets its own instance
    assert first.instance_id == "same" and second.instance_id != "same"
    first.create_group(b"g").get()
    first.join_group(b"g").get()
    with pytest.raises(coordination.MemberAlreadyExist):
        second.join_group(b"g").get()
    second.leave_group(b"g").get()  # membership belongs to the member, as in tooz
    assert first.get_members(b"g").get() == set()


def test_ids_that_are_not_instance_ids(make: Callable[..., Any]) -> None:
    c = make("mémbre with spaces/and slashes")
    c.create_group("grüppe").get()  # (join_group_create would wait a second: tooz's retry)
    c.join_group("grüppe").get()
    assert c.get_members(b"gr\xc3\xbcppe").get() == {"mémbre with spaces/and slashes".encode()}
    assert "gr\xfcppe".encode() in c.get_groups().get()


def test_capabilities(make: Callable[..., Any], db_path: Path) -> None:
    c = make(b"m")
    c.create_group(b"g").get()
    c.join_group(b"g", {"weights": [1, 2], "name": "x", "on": True}).get()
    with coord.Store(db_path) as store:  # JSON data is stored as it is, for people to read
        entry = coord.kv.get(store, "tooz/groups/g/members/m")
        assert entry is not None and entry.value == {"weights": [1, 2], "name": "x", "on": True}
    c.update_capabilities(b"g", {"weights": [3]}).get()
    info = c.get_member_info(b"g", b"m").get()
    assert info["capabilities"] == {"weights": [3]}
    assert info["updated_at"] >= info["created_at"]
    assert c.get_members_with_capabilities(b"g").get() == {b"m": {"weights": [3]}}
    # Anything else tooz can serialise (bytes: tooz before 9 joins with b"" by default) goes
    # through tooz's own msgpack, and comes back as it was; so does a dict that looks packed.
    for caps in (b"", b"\x00raw", {"raw": b"\xff"}, {"tooz.msgpack": "not packed"}):
        c.update_capabilities(b"g", caps).get()
        assert c.get_member_capabilities(b"g", b"m").get() == caps
    with pytest.raises(tooz.utils.SerializationError):
        c.update_capabilities(b"g", {"what": object()}).get()


def test_stop_leaves_nothing_behind(make: Callable[..., Any], db_path: Path) -> None:
    c = make(b"m")
    c.create_group(b"g").get()
    c.join_group(b"g").get()
    lock = c.get_lock(b"L")
    assert lock.acquire()
    c.watch_elected_as_leader(b"g", lambda e: None)
    c.run_watchers()
    c.stop()
    with coord.Store(db_path) as store:
        assert coord.list_leases(store, held_only=True) == []
        assert [e.key for e in coord.kv.list_keys(store, "tooz/")] == ["tooz/groups/g"]
        assert coord.list_instances(store) == []
    with pytest.raises(tooz.ToozError):
        lock.acquire(blocking=False)


# -- leader election ----------------------------------------------------------------------


def test_leader_failover_after_sigkill(
    make: Callable[..., Any], db_path: Path, children: list[subprocess.Popen[Any]]
) -> None:
    b = Member(db_path, "b", children)
    assert b.do("elect", "g") == "leader"
    a = make(b"a")
    assert a.get_leader(b"g").get() == b"b"
    elected: list[Any] = []
    a.watch_elected_as_leader(b"g", elected.append)
    a.run_watchers()
    assert elected == []
    with coord.Store(db_path) as store:
        before = coord.get_lease(store, "tooz/leaders/g").term
        assert before is not None

    b.kill()
    a.run_watchers()  # one look suffices: the holder is proven dead
    assert [(e.group_id, e.member_id) for e in elected] == [(b"g", b"a")]
    assert a.get_leader(b"g").get() == b"a"
    with coord.Store(db_path) as store:
        after = coord.get_lease(store, "tooz/leaders/g")
        assert after.holder == "a" and after.term is not None and after.term > before

    assert a.stand_down_group_leader(b"g") is True
    assert a.get_leader(b"g").get() is None
    assert a.stand_down_group_leader(b"g") is False


# -- locks --------------------------------------------------------------------------------


def test_a_lock_held_by_a_killed_process_is_free_at_once(
    make: Callable[..., Any], db_path: Path, children: list[subprocess.Popen[Any]]
) -> None:
    b = Member(db_path, "b", children)
    assert b.do("lock", "job") == "locked"
    a = make(b"a")
    lock = a.get_lock(b"job")
    assert lock.acquire(blocking=False) is False

    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire(blocking=60)))
    waiter.start()
    b.kill()
    waiter.join(90)
    # The lease TTL is 600 s and the waiter gave up after 60: only proof of death frees it.
    assert got == [True]
    assert lock.is_still_owner()
    assert lock.release() is True
    assert lock.release() is False
    healthy(db_path)


def test_shared_locks_across_processes(
    make: Callable[..., Any], db_path: Path, children: list[subprocess.Popen[Any]]
) -> None:
    b = Member(db_path, "b", children)
    assert b.do("shared", "doc") == "locked"
    a = make(b"a")
    lock = a.get_lock(b"doc")
    assert lock.acquire(shared=True)
    assert a.get_lock(b"doc").acquire(blocking=False) is False  # exclusive: readers hold it
    assert lock.release()

    exclusive = a.get_lock(b"doc")
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(exclusive.acquire(blocking=60)))
    waiter.start()
    b.kill()  # the last reader dies: its shared key goes with it
    waiter.join(90)
    assert got == [True]
    c = make(b"c")
    assert c.get_lock(b"doc").acquire(shared=True, blocking=False) is False
    assert exclusive.release()
    assert c.get_lock(b"doc").acquire(shared=True, blocking=False) is True


# Takes the lock shared (mostly) or exclusive at random; a holder marks itself with a file
# and checks the others' files: an exclusive holder must be alone, a shared one beside no
# exclusive one.
RW_WORKER = r"""
import os, random, sys, time
from tooz import coordination

url, holders, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = coordination.get_coordinator(url, f"rw-{os.getpid()}".encode())
c.start()
lock = c.get_lock(b"rw")
held = {"S": 0, "X": 0}
for i in range(rounds):
    shared = random.random() < 0.7
    if not lock.acquire(blocking=random.choice([False, 5.0]), shared=shared):
        continue
    mode = "S" if shared else "X"
    mine = f"{os.getpid()}-{i}-{mode}"
    open(os.path.join(holders, mine), "w").close()
    others = [f for f in os.listdir(holders) if f != mine]
    if others if mode == "X" else [f for f in others if f.endswith("-X")]:
        print("overlap", mode, others, flush=True)
    time.sleep(random.random() * 0.003)
    os.unlink(os.path.join(holders, mine))
    assert lock.release()
    held[mode] += 1
print("done", held["S"], held["X"], flush=True)
c.stop()
"""


def test_shared_and_exclusive_holders_never_overlap(
    db_path: Path, tmp_path: Path, children: list[subprocess.Popen[Any]]
) -> None:
    holders = tmp_path / "holders"
    holders.mkdir()
    rounds = "400" if SLOW else "100"
    procs = [spawn_python(RW_WORKER, url_for(db_path), str(holders), rounds, db=db_path)
             for _ in range(4)]
    children.extend(procs)
    totals = [0, 0]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        assert "overlap" not in out, out
        _, shared, exclusive = out.split()
        totals[0] += int(shared)
        totals[1] += int(exclusive)
    assert totals[0] > 0 and totals[1] > 0, totals  # both kinds were taken
    healthy(db_path)


def test_break_is_seen_by_the_former_holder(make: Callable[..., Any]) -> None:
    a, b = make(b"a"), make(b"b")
    mine, theirs = a.get_lock(b"L"), b.get_lock(b"L")
    assert mine.acquire(blocking=False)
    assert mine.heartbeat() is True
    assert theirs.heartbeat() is False
    assert theirs.break_() is True
    assert mine.is_still_owner() is False
    assert theirs.acquire(blocking=False)
    assert mine.release() is False  # and it did not release theirs
    assert theirs.is_still_owner()
    assert make(b"c").get_lock(b"L").acquire(blocking=False) is False


# -- tooz's own driver suite ----------------------------------------------------------------

#: Tests of tooz's suite that do not apply to coord, and why.
NOT_APPLICABLE = {
    "test_connection_error_bad_host": "one host, no server to connect to",
    "test_heartbeat": "requires_beating is False: coord's instance heartbeats by itself",
    "test_heartbeat_loop": "requires_beating is False: coord's instance heartbeats by itself",
    "test_timeout": "NON_TIMEOUT_BASED: live members never time out (proof of death)",
    "test_watch_join_group_disappear": "tooz runs it only for the etcd3, memcached and redis "
                                       "drivers",
}
SUITE_MODULES = ("etcd3gw", "redis", "pymemcache", "sysv_ipc", "testtools", "fixtures")


@pytest.mark.timeout(600)
def test_tooz_driver_suite(db_path: Path, tmp_path: Path) -> None:
    """tooz.tests.test_coordination against coord:// (about 5 s); with COORD_SLOW=1 also
    tooz's partitioner tests (5 more, a second each: tooz's own retry waits)."""
    missing = [m for m in SUITE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"tooz's suite needs {', '.join(missing)}: pip install -e '.[tooz-test]'")
    spec = importlib.util.find_spec("tooz.tests")
    assert spec is not None and spec.submodule_search_locations
    suite = Path(list(spec.submodule_search_locations)[0])
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\ntimeout = 120\n")
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COORD_", "TOOZ_"))}
    env["TOOZ_TEST_URL"] = base_url(db_path)
    targets = [str(suite / "test_coordination.py")]
    if SLOW:
        targets.append(f"{suite / 'test_partitioner.py'}::TestPartitioner")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ini),
         f"--junitxml={report}", *targets],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"
        outcomes[name] = kinds.pop() if kinds else "passed"
    bad = {n: o for n, o in outcomes.items() if o in ("failure", "error")}
    assert proc.returncode == 0 and not bad, (bad, proc.stdout[-4000:], proc.stderr[-2000:])
    skipped = {n.split(".")[-1] for n, o in outcomes.items() if o == "skipped"}
    assert skipped <= NOT_APPLICABLE.keys(), skipped - NOT_APPLICABLE.keys()
    passed = [n for n, o in outcomes.items() if o == "passed"]
    # tooz 9.1.0: 78 of test_coordination's 83, and the 5 partitioner tests.
    assert len(passed) >= (80 if SLOW else 75), len(passed)
    healthy(db_path)


def test_readme_example_runs(db_path: Path) -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## tooz driver", 1)[1].split("\n## ", 1)[0]
    example = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    env["COORD_DB"] = str(db_path)  # coord:// follows it
    r = subprocess.run([sys.executable, "-c", example], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["{b'worker-1'}", "leader: b'worker-1'"]
