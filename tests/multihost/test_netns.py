"""The multi-host harness itself, with raw psycopg: hosts reach the server only over their own
link; a cut link is silent (a query neither answers nor fails: it hangs until the client gives
up), TCP keepalives and a user timeout end such a query in bounded time, a healed link carries
new connections, a throttled link holds packets back without losing any, and closing the
harness leaves no namespace, link, process or cluster behind."""

from __future__ import annotations

import errno
import json
import os
import random
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import HarnessUnavailable, Host, Net, ip, mono, netns_names
from pg_fixtures import import_psycopg, missing
from pgcluster import process_alive, process_state

import_psycopg()

# A client in a host: connects, prints {"ready": ...}, then runs one query per line read from
# stdin ("select ..."), printing {"ok": rows} or {"error": ...} with the seconds it took.
CLIENT = r"""
import json, sys, time
import psycopg
def mono():
    return time.clock_gettime(time.CLOCK_MONOTONIC)
conn = psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=10)
row = conn.execute("select inet_client_addr()::text, inet_server_addr()::text").fetchone()
print(json.dumps({"ready": list(row)}), flush=True)
for line in sys.stdin:
    t = mono()
    try:
        cur = conn.execute(line)
        out = {"ok": [list(r) for r in cur.fetchall()] if cur.description else []}
    except psycopg.Error as e:
        out = {"error": type(e).__name__ + ": " + str(e).strip().splitlines()[0]}
    out["seconds"] = mono() - t
    print(json.dumps(out), flush=True)
"""

# libpq settings that end a query on a dead link: unacknowledged data for 1.5 s, or an idle
# connection whose keepalive probes go unanswered (1 s idle, 2 probes 1 s apart).
TIMEOUTS = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1,
            "keepalives_count": 2, "tcp_user_timeout": 1500}




@pytest.fixture
def healed(net: Net) -> Iterator[Net]:
    yield net
    for h in net.hosts:
        net.heal(h)


def client(net: Net, host: Host, **params: str | int) -> tuple[subprocess.Popen[str], Any]:
    p = net.run(host, [sys.executable, "-c", CLIENT, net.url(host, **params)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = read_json(p, timeout=30)
    assert ready is not None, f"client in {host.ns} did not connect: {stderr_of(p)}"
    return p, ready["ready"]


def stderr_of(p: subprocess.Popen[str]) -> str:
    if p.poll() is None or p.stderr is None:
        return "(still running)"
    return p.stderr.read()[-2000:]


def read_json(p: subprocess.Popen[str], timeout: float) -> Any:
    """The child's next JSON line, or None if none came within ``timeout`` (or it exited)."""
    assert p.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    line = p.stdout.readline()
    return json.loads(line) if line else None


def ask(p: subprocess.Popen[str], query: str) -> None:
    assert p.stdin is not None
    p.stdin.write(query + "\n")
    p.stdin.flush()


def end(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.wait(timeout=10)


def test_each_host_reaches_the_server_over_its_own_link(healed: Net) -> None:
    for h in healed.hosts:
        p, (client_addr, server_addr) = client(healed, h)
        assert client_addr.split("/")[0] == h.addr
        assert server_addr.split("/")[0] == h.server_addr
        end(p)
    # The server's addresses exist only inside the namespaces: not from this machine's own.
    route = ip("route", "get", healed.hosts[0].server_addr, check=False)
    assert f"dev {healed.hosts[0].server_veth}" not in route.stdout
    assert healed.hosts[0].server_veth not in ip("link").stdout


def test_a_cut_is_silent_until_a_client_timeout_ends_it(healed: Net) -> None:
    h0, h1 = healed.hosts
    plain, _ = client(healed, h0)
    guarded, _ = client(healed, h0, **TIMEOUTS)
    other, _ = client(healed, h1)
    healed.cut(h0)
    cut_at = mono()
    ask(plain, "select 1")
    ask(guarded, "select 1")
    # The guarded client's user timeout ends its query with an error, in bounded time.
    answer = read_json(guarded, timeout=60)
    assert answer is not None and "error" in answer, answer
    # Meanwhile the plain client neither got its answer nor an error: it still waits (a
    # blackhole route or a reset would have failed it at once).
    assert read_json(plain, timeout=max(0.0, cut_at + 3.0 - mono())) is None
    assert plain.poll() is None
    # The other host's link is untouched.
    ask(other, "select 2")
    assert read_json(other, timeout=30)["ok"] == [[2]]
    # The server-side backends of the cut clients are still there: it saw nothing either.
    import psycopg

    with psycopg.connect(healed.admin_url) as admin:
        n = admin.execute("select count(*) from pg_stat_activity where client_addr = %s",
                          (h0.addr,)).fetchone()
    assert n is not None and n[0] >= 1
    for p in (plain, guarded, other):
        end(p)


def held_advisory_keys(admin_url: str) -> set[int]:
    import psycopg

    with psycopg.connect(admin_url) as admin:
        rows = admin.execute("select (classid::bigint << 32) | objid::bigint from pg_locks "
                             "where locktype = 'advisory' and granted").fetchall()
    return {r[0] for r in rows}


def test_server_side_keepalives_end_a_cut_session_and_free_its_lock(healed: Net) -> None:
    """With the server's defaults a cut client's session and its session lock outlive the cut
    (for hours: two-hour keepalive idle); with keepalives and a user timeout set on that session
    the server ends it, and its advisory lock is free again, in bounded time."""
    h0 = healed.hosts[0]
    guarded, _ = client(healed, h0)
    plain, _ = client(healed, h0)
    k_guarded, k_plain = (random.randrange(1, 2**31) for _ in range(2))
    for q in ("set tcp_keepalives_idle = 1", "set tcp_keepalives_interval = 1",
              "set tcp_keepalives_count = 2", "set tcp_user_timeout = 1500",
              f"select pg_advisory_lock({k_guarded})"):
        ask(guarded, q)
        assert "ok" in read_json(guarded, timeout=30)
    ask(plain, f"select pg_advisory_lock({k_plain})")
    assert "ok" in read_json(plain, timeout=30)
    assert {k_guarded, k_plain} <= held_advisory_keys(healed.admin_url)
    healed.cut(h0)
    deadline = mono() + 60
    while k_guarded in held_advisory_keys(healed.admin_url) and mono() < deadline:
        time.sleep(0.2)
    held = held_advisory_keys(healed.admin_url)
    assert k_guarded not in held, "the server kept the cut session and its lock"
    assert k_plain in held
    for p in (guarded, plain):
        end(p)
    import psycopg

    with psycopg.connect(healed.admin_url, autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(pid) from pg_locks where locktype = "
                      "'advisory' and objid = %s", (k_plain,))


def test_a_blackhole_route_would_not_be_silent(healed: Net) -> None:
    """Why cuts drop packets in the queueing discipline: with a blackhole route instead, the
    host's own kernel refuses the send at once, which no real partition does."""
    h0 = healed.hosts[0]
    code = ("import socket, sys\n"
            "s = socket.socket(); s.settimeout(10)\n"
            "try:\n    s.connect((sys.argv[1], 5432)); print('connected')\n"
            "except OSError as e:\n    print('error', e.errno)\n")
    ip("route", "add", "blackhole", f"{h0.server_addr}/32", ns=h0.ns)
    try:
        p = healed.run(h0, [sys.executable, "-c", code, h0.server_addr],
                       stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate(timeout=30)
    finally:
        ip("route", "del", "blackhole", f"{h0.server_addr}/32", ns=h0.ns)
    assert out.split() == ["error", str(errno.EINVAL)]


def test_after_heal_a_new_connection_works(healed: Net) -> None:
    h0 = healed.hosts[0]
    healed.cut(h0)
    healed.heal(h0)
    p, _ = client(healed, h0)
    ask(p, "select 40 + 2")
    assert read_json(p, timeout=30)["ok"] == [[42]]
    end(p)


def test_a_connection_during_a_cut_does_not_get_through(healed: Net) -> None:
    h0 = healed.hosts[0]
    healed.cut(h0)
    code = ("import psycopg, sys\n"
            "try:\n    psycopg.connect(sys.argv[1], connect_timeout=2)\n"
            "except psycopg.OperationalError as e:\n    print('refused', e)\n")
    p = healed.run(h0, [sys.executable, "-c", code, healed.url(h0)], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert out.startswith("refused") and "timeout" in out.lower(), (out, err)


def test_a_throttled_link_holds_packets_back_and_loses_none(healed: Net) -> None:
    h0 = healed.hosts[0]
    p, _ = client(healed, h0)
    healed.throttle(h0, kbit=2000)
    ask(p, "select length(string_agg(md5(i::text), '')) from generate_series(1, 4000) i")
    ask(p, "select repeat('x', 100000)")
    assert read_json(p, timeout=60)["ok"] == [[128000]]
    big = read_json(p, timeout=60)
    assert big is not None and len(big["ok"][0][0]) == 100000
    stats = healed.qdisc_stats(h0)
    assert stats.count("qdisc tbf") == 2, stats

    def counts(word: str) -> list[int]:
        return [int(w.split()[0].rstrip(",)")) for w in stats.split(f"{word} ")[1:]]

    assert counts("dropped") == [0, 0], stats
    assert any(x > 0 for x in counts("overlimits")), stats  # packets were held back
    end(p)


def test_a_frozen_host_runs_nothing_until_thawed(healed: Net) -> None:
    """freeze stops every process of that host and no other; its server session stays."""
    h0, h1 = healed.hosts
    frozen, _ = client(healed, h0)
    other, _ = client(healed, h1)
    stopped = healed.freeze(h0)
    try:
        assert frozen.pid in stopped and other.pid not in stopped
        assert process_state(frozen.pid) == "T" and process_state(other.pid) != "T"
        ask(frozen, "select 1")
        assert read_json(frozen, timeout=1.0) is None  # stopped: it cannot even read the line
        ask(other, "select 2")
        assert read_json(other, timeout=30)["ok"] == [[2]]
    finally:
        healed.thaw(h0)
    assert read_json(frozen, timeout=30)["ok"] == [[1]]
    for p in (frozen, other):
        end(p)


def test_delay_needs_netem(healed: Net) -> None:
    if not healed.has_netem():
        # A kernel module, not a permission: this kernel cannot delay, only cut and throttle.
        pytest.skip("this kernel has no sch_netem: Net.delay cannot add latency here")
    h0 = healed.hosts[0]
    p, _ = client(healed, h0)
    healed.delay(h0, 200)
    ask(p, "select 1")
    answer = read_json(p, timeout=30)
    assert answer["ok"] == [[1]] and answer["seconds"] >= 0.4  # two one-way delays
    end(p)


def test_close_leaves_nothing_behind() -> None:
    before = netns_names()
    try:
        harness = Net(hosts=2).__enter__()
    except HarnessUnavailable as e:
        missing(str(e))
    try:
        assert harness.cluster is not None
        base, pid = harness.cluster.base, harness.cluster.postmaster_pid()
        names = {harness.server_ns, *(h.ns for h in harness.hosts)}
        assert names <= netns_names()
        sleeper = harness.run(harness.hosts[1], ["sleep", "300"])
        harness.cut(harness.hosts[0])
    finally:
        harness.close()
    assert netns_names() & names == set()
    assert netns_names() == before
    assert pid is not None and not process_alive(pid)
    assert sleeper.poll() is not None
    assert not base.exists()
    assert all(f"c{harness.tag}" not in line for line in ip("link").stdout.splitlines())
    harness.close()  # twice is harmless


def test_skip_under_ci_is_a_failure(tmp_path: Path) -> None:
    """Where namespaces cannot be made the harness raises HarnessUnavailable, and under
    CI=true the tests fail instead of skipping: tried with a PATH that has no `ip`."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import pytest, netns, pg_fixtures\n"
            "try:\n    netns.Net(1)\n"
            "except netns.HarnessUnavailable as e:\n"
            "    try:\n        pg_fixtures.missing(str(e))\n"
            "    except BaseException as x:\n        print(type(x).__name__, x)\n")
    here = Path(__file__).resolve().parent
    for ci, expect in (("true", "Failed"), ("", "Skipped")):
        env = {**os.environ, "PATH": str(tmp_path), "CI": ci}
        out = subprocess.run([sys.executable, "-c", code, str(here), str(here.parent)],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.startswith(expect) and "iproute2" in out.stdout, out
