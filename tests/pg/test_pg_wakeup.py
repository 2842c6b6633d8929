"""The PostgreSQL engine's wake-up on a real server: NOTIFY wakes a waiter that has no nudge
socket (as one on another host has none), a killed LISTEN connection loses no wake-up
(every waiter re-checks after the reconnect: issue 16, "Lost wake-ups"), and a commit that
notifies nobody is still seen within the polling bound.

To tell a wake-up by NOTIFY from one by polling, most tests stretch the polling interval of
a waiter whose channels are LISTENed (``POLL_MIN``/``POLL_LISTENING``) far beyond their own
timeouts: once LISTENed, only a hint can wake the waiter in time.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from conftest import wait_until
from engine_sql import write_many as sql_write
from pg_fixtures import import_psycopg

import coord
from coord import messages
from coord.backend import inbox_channel, queue_channel
from coord.backend.postgresql import queue_rows, wakeup
from coord.backend.postgresql.listen import channel_name

psycopg = import_psycopg()

#: What "at once" means here: long before the stretched polling bound.
SOON = 10.0


@pytest.fixture
def stretched(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before its LISTEN (and while the connection is down) a waiter still polls at POLL_MAX.
    monkeypatch.setattr(wakeup, "POLL_MIN", 600.0)
    monkeypatch.setattr(wakeup, "POLL_LISTENING", 600.0)


class Waiter:
    """``receive`` as instance ``id`` in a thread, through a mailbox without a nudge socket."""

    def __init__(self, store: coord.Store, inst: coord.Instance) -> None:
        self.box = messages.Mailbox(store, inst.id, inst.incarnation, inst.app)
        self.got: list[Any] = []
        self.at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.got.append(self.box.receive(60))
        self.at = time.monotonic()

    def result(self) -> tuple[Any, float]:
        self.thread.join(70)
        assert self.at is not None
        return self.got[0], self.at


def wait_listening(store: coord.Store, channel: str) -> None:
    listener = store.backend.wakeup.listener  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while not listener.listening(channel):
        assert time.monotonic() < deadline, "the LISTEN connection never started"
        time.sleep(0.01)


def test_notify_wakes_a_waiter_that_has_no_socket(pg_store: coord.Store, stretched: None) -> None:
    a = coord.register(pg_store, "a", app="t")
    b = coord.register(pg_store, "b", app="t")
    w = Waiter(pg_store, b)
    wait_listening(pg_store, inbox_channel("b"))
    time.sleep(0.3)  # its look after the LISTEN is done: now only a hint wakes it
    t0 = time.monotonic()
    mid = messages.send(a, "b", "hello")
    m, at = w.result()
    assert m is not None and m.id == mid and m.payload == "hello"
    assert at - t0 < SOON


@pytest.mark.parametrize("notified", [True, False])
def test_a_nudge_a_notify_repeats_costs_no_check(pg_store: coord.Store, stretched: None,
                                                 tmp_path: Any, notified: bool) -> None:
    # While its channel is LISTENed, a ``notified`` waiter leaves its socket to the NOTIFY
    # that comes with every nudge that matters to it.
    from coord import nudge

    sock = nudge.bind(str(tmp_path / "n.sock"))
    checks: list[float] = []
    engine_wakeup = pg_store.backend.wakeup
    waiting = threading.Thread(target=lambda: engine_wakeup.wait_for(
        lambda: checks.append(time.monotonic()), 3.0, sock=sock,
        channels=[queue_channel("n")], notified=notified), daemon=True)
    try:
        waiting.start()
        wait_listening(pg_store, queue_channel("n"))
        time.sleep(0.3)  # its looks after the LISTEN are done
        before = len(checks)
        nudge.nudge([str(tmp_path / "n.sock")])
        time.sleep(0.3)
        assert len(checks) == before + (0 if notified else 1)
        waiting.join(SOON)
    finally:
        sock.close()


def test_killing_the_listen_connection_loses_no_wake_up(pg_store: coord.Store, pg_url: str,
                                                        stretched: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    listener = pg_store.backend.wakeup.listener  # type: ignore[attr-defined]
    a = coord.register(pg_store, "a", app="t")
    b = coord.register(pg_store, "b", app="t")
    # The listener reconnects only once let: so the send below surely commits while it is
    # down, and its NOTIFY goes to nobody.
    gate = threading.Event()
    connect = listener._connect

    def held_connect() -> Any:
        gate.wait(30)
        return connect()

    with psycopg.connect(pg_url, autocommit=True) as admin:
        for round_ in range(3):
            w = Waiter(pg_store, b)
            wait_listening(pg_store, inbox_channel("b"))
            time.sleep(0.2)
            before, victim = listener.connects, listener.backend_pid
            gate.clear()
            monkeypatch.setattr(listener, "_connect", held_connect)
            assert admin.execute("SELECT pg_terminate_backend(%s, 10000)",
                                 (victim,)).fetchone() == (True,)
            t0 = time.monotonic()
            mid = messages.send(a, "b", round_)
            gate.set()
            m, at = w.result()
            assert m is not None and m.id == mid, round_
            assert at - t0 < SOON, round_
            # The waiter may have been woken by the dropped connection itself, before the
            # listener made its new one: the reconnect follows.
            wait_until(lambda before=before, victim=victim: listener.connects > before
                       and listener.backend_pid != victim, timeout=10)


def test_a_commit_that_notifies_nobody_is_seen_within_the_polling_bound(
    pg_store: coord.Store,
) -> None:
    a = coord.register(pg_store, "a", app="t")
    b = coord.register(pg_store, "b", app="t")
    w = Waiter(pg_store, b)
    wait_listening(pg_store, inbox_channel("b"))
    time.sleep(wakeup.POLL_LISTENING * 2)  # settled at the long interval
    mid = str(uuid.uuid4())
    t0 = time.monotonic()
    # Written around coord: no NOTIFY, no nudge.
    sql_write(pg_store, "INSERT INTO messages (id, sender_id, sender_incarnation, "
              "recipient_id, payload, created_at, expires_at, expires_mono) "
              "VALUES (?, 'a', ?, 'b', '1', 0, 0, coord_now() + 60)",
              [(mid, a.incarnation)])
    m, at = w.result()
    assert m is not None and m.id == mid
    assert at - t0 < wakeup.POLL_LISTENING + 2.0  # the bound, and slack for a busy machine


def test_a_queue_channel_wakes_its_waiter(pg_store: coord.Store, stretched: None) -> None:
    # The API queues use: notify in the writing transaction, wait_for(channels=...).
    engine_wakeup = pg_store.backend.wakeup
    db = pg_store.backend.db  # type: ignore[attr-defined]
    flag: list[int] = []
    got: list[Any] = []

    def waiter() -> None:
        got.append(engine_wakeup.wait_for(lambda: flag[0] if flag else None, 60,
                                          channels=[queue_channel("jobs")]))

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    wait_listening(pg_store, queue_channel("jobs"))
    time.sleep(0.3)

    def rolled_back(c: Any) -> None:
        engine_wakeup.notify(c, [queue_channel("jobs")])  # type: ignore[attr-defined]
        raise RuntimeError("roll back")

    flag.append(7)  # a check would see it now; only a wake-up makes the waiter look
    with pytest.raises(RuntimeError):
        db.write(rolled_back)
    time.sleep(1.0)
    assert got == []  # a rolled-back transaction notified nobody
    t0 = time.monotonic()
    db.write(lambda c: engine_wakeup.notify(  # type: ignore[attr-defined]
        c, [queue_channel("other"), queue_channel("jobs")]))
    t.join(SOON)
    assert got == [7] and time.monotonic() - t0 < SOON


def test_channel_names_fit_the_server_and_stay_apart() -> None:
    short = channel_name("coord", inbox_channel("a"))
    assert short == "coord.coord.inbox:a"
    # A queue's channel is the one its NOTIFYs name in SQL (coord.backend.postgresql.queue_rows).
    assert channel_name("coord", queue_channel("q")) == queue_rows.channel("coord", "q")
    assert channel_name("one", queue_channel("q")) != channel_name("two", queue_channel("q"))
    long_a = channel_name("s" * 63, inbox_channel("x" * 200))
    long_b = channel_name("s" * 63, inbox_channel("x" * 199 + "y"))
    assert len(long_a.encode()) <= 63 and len(long_b.encode()) <= 63 and long_a != long_b
    assert channel_name("one", "inbox:a") != channel_name("two", "inbox:a")


def test_a_forked_child_listens_on_its_own(pg_store: coord.Store, stretched: None) -> None:
    # The parent's LISTEN thread (and its lock, its connection) stay the parent's: a child
    # forked while it runs starts its own on its first wait.
    import os

    engine_wakeup = pg_store.backend.wakeup
    db = pg_store.backend.db  # type: ignore[attr-defined]
    flag = threading.Event()
    parent_waiter = threading.Thread(target=lambda: engine_wakeup.wait_for(
        lambda: True if flag.is_set() else None, 60, channels=[queue_channel("p")]),
        daemon=True)
    parent_waiter.start()
    wait_listening(pg_store, queue_channel("p"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the parent's NOTIFY on "c", report how it went
        code = 1
        try:
            os.close(r)
            seen = threading.Event()
            t = threading.Thread(target=lambda: engine_wakeup.wait_for(
                lambda: True if seen.is_set() else None, 30, channels=[queue_channel("c")]),
                daemon=True)
            t.start()
            wait_listening(pg_store, queue_channel("c"))
            time.sleep(0.3)
            seen.set()  # seen only if a hint makes it look (its polling is stretched)
            os.write(w, b"L")
            t.join(SOON)
            code = 0 if not t.is_alive() else 2
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 1) == b"L"
        db.write(lambda c: engine_wakeup.notify(c, [queue_channel("c")]))  # type: ignore[attr-defined]
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(r)
    flag.set()
    db.write(lambda c: engine_wakeup.notify(c, [queue_channel("p")]))  # type: ignore[attr-defined]
    parent_waiter.join(SOON)
    assert not parent_waiter.is_alive()  # the parent's listener still works


def test_a_channel_stays_listened_a_while_after_its_last_waiter(
    pg_store: coord.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coord.backend.postgresql import listen

    monkeypatch.setattr(listen, "LINGER", 1.0)
    engine_wakeup = pg_store.backend.wakeup
    listener = engine_wakeup.listener  # type: ignore[attr-defined]
    engine_wakeup.wait_for(lambda: None, 2.0, channels=[queue_channel("brief")])
    assert listener.listening(queue_channel("brief"))  # kept for the next wait
    deadline = time.monotonic() + listen.PING_INTERVAL + 10
    while listener.listening(queue_channel("brief")):
        assert time.monotonic() < deadline, "never UNLISTENed"
        time.sleep(0.05)


@pytest.mark.parametrize("id", ["a", "x" * 200, "é" * 30])
def test_the_servers_inbox_channel_is_the_one_waiters_listen_on(pg_store: coord.Store,
                                                                 id: str) -> None:
    # A reply learns its requester (so the channel to NOTIFY) inside its statement.
    from coord.backend.postgresql.listen import INBOX_CHANNEL_SQL

    db = pg_store.backend.wakeup._db  # type: ignore[attr-defined]
    on_server = db.value("SELECT " + INBOX_CHANNEL_SQL.format(id="%(id)s::text"), {"id": id})
    assert on_server == channel_name(db.location.schema, inbox_channel(id))


# A reply too long for its NOTIFY's payload: the woken requester reads it from the table.
@pytest.mark.parametrize("answer", ["pong", "y" * 9000])
def test_notify_wakes_a_requester_that_has_no_socket(pg_store: coord.Store,
                                                     stretched: None, answer: str) -> None:
    a = coord.register(pg_store, "a", app="t")
    b = coord.register(pg_store, "b", app="t")
    box = messages.Mailbox(pg_store, "a", a.incarnation, "t")  # no nudge socket
    got: list[Any] = []
    asking = threading.Thread(target=lambda: got.append(box.request("b", "ping", timeout=60)),
                              daemon=True)
    asking.start()
    req = messages.receive(b, SOON)
    assert req is not None and req.kind == "request"
    wait_listening(pg_store, inbox_channel("a"))
    time.sleep(0.3)  # its look after the LISTEN is done: now only a hint wakes it
    t0 = time.monotonic()
    assert req.reply(answer)
    asking.join(SOON)
    assert not asking.is_alive() and got[0].payload == answer
    assert time.monotonic() - t0 < SOON


def test_a_waiter_on_a_listened_channel_is_not_poked_for_nothing(pg_store: coord.Store) -> None:
    # The waiter looks after registering: a poke for what committed before would only
    # cost it one more look.
    listener = pg_store.backend.wakeup.listener  # type: ignore[attr-defined]
    first = listener.interest([queue_channel("calm")])
    try:
        wait_listening(pg_store, queue_channel("calm"))
        time.sleep(0.2)
        second = listener.interest([queue_channel("calm")])
        try:
            assert second.listening
            assert not wakeup.nudge.readable([second.fd], 0.5)
        finally:
            second.close()
    finally:
        first.close()


def test_a_channel_waited_on_again_and_again_stays_listened(
    pg_store: coord.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A waiter that finds its channel LISTENed does not wake the thread; the channel's
    # linger still counts from its last waiter, however the thread's passes fall.
    from coord.backend.postgresql import listen

    monkeypatch.setattr(listen, "LINGER", 1.0)
    engine_wakeup = pg_store.backend.wakeup
    listener = engine_wakeup.listener  # type: ignore[attr-defined]
    db = pg_store.backend.db  # type: ignore[attr-defined]
    busy = queue_channel("busy")
    engine_wakeup.wait_for(lambda: None, 0.2, channels=[busy])
    wait_listening(pg_store, busy)
    end = time.monotonic() + 3 * listen.LINGER
    while time.monotonic() < end:
        engine_wakeup.wait_for(lambda: None, 0.05, channels=[busy])
        # A hint between two waits: the thread passes while nobody waits.
        db.write(lambda c: engine_wakeup.notify(c, [busy]))  # type: ignore[attr-defined]
        time.sleep(0.02)
        assert listener.listening(busy)


def _asked(store: coord.Store, payload: Any) -> tuple[Any, tuple[str, int], str, Any,
                                                      coord.Instance]:
    """a requests b (through the engine); b receives the request and answers ``payload``."""
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    ops = store.backend.messages
    me = ("a", a.incarnation)
    messages.Mailbox(store, "a", a.incarnation, "t").receive(0.05)  # LISTEN on a's inbox
    wait_listening(store, inbox_channel("a"))
    mid = str(uuid.uuid4())
    ops.request(me, mid, "b", "", '"ping"', 30.0)
    req = messages.receive(b, SOON)
    assert req is not None and req.id == mid and req.reply(payload)
    time.sleep(0.3)  # the LISTEN thread has passed the reply's NOTIFY on
    return ops, me, mid, store.backend.db, b  # type: ignore[attr-defined]


def test_a_reply_committed_before_the_requesters_first_look_is_found(
        pg_store: coord.Store) -> None:
    # The requester's inbox is listened on from before its request is sent: a reply that
    # comes before its first look has poked that interest, so the look finds it.
    ops, me, mid, _, b = _asked(pg_store, "pong")
    got, _ = ops.replies(me, [mid], [], defer=False)
    assert [r.payload for r in got] == ['"pong"']
    # With no reply yet, the first look finds none (and a later one the reply).
    mid = str(uuid.uuid4())
    ops.request(me, mid, "b", "", '"ping"', 30.0)
    assert ops.replies(me, [mid], [], defer=False) == ([], set())
    req = messages.receive(b, SOON)
    assert req is not None and req.reply("pong")
    assert [r.payload for r in ops.replies(me, [mid], [], defer=False)[0]] == ['"pong"']


# -- a reply travels in its NOTIFY's payload too: the waiting requester takes it from there,
# not from the table, and deletes the stored row as it deletes a reply it read.

def test_the_requester_takes_the_reply_from_its_notify(pg_store: coord.Store) -> None:
    ops, me, mid, db, _ = _asked(pg_store, {"pong": [1, 2.5, "é\n"]})
    row = db.row("SELECT * FROM messages WHERE kind = 'reply' AND correlation_id = %s", (mid,))
    assert row is not None
    # Gone from the table behind the requester's back: only the NOTIFY can bring it now.
    db.write(lambda c: c.execute("DELETE FROM messages WHERE id = %s", (row["id"],)))
    got, _ = ops.replies(me, [mid], [], defer=False)
    assert len(got) == 1
    r = got[0]
    assert (r.id, r.kind, r.sender_id, r.sender_incarnation, r.recipient_id, r.topic,
            r.payload, r.correlation_id, r.reply_to, r.created_at, r.expires_at) == (
        row["id"], "reply", row["sender_id"], row["sender_incarnation"], "a", row["topic"],
        row["payload"], mid, row["reply_to"], row["created_at"], row["expires_at"])


def test_a_reply_taken_from_its_notify_is_deleted_by_the_next_write(
        pg_store: coord.Store) -> None:
    ops, me, mid, db, _ = _asked(pg_store, "pong")
    got, _ = ops.replies(me, [mid], [], defer=True)
    assert [r.payload for r in got] == ['"pong"']
    count = "SELECT count(*) FROM messages WHERE kind = 'reply' AND correlation_id = %s"
    assert db.value(count, (mid,)) == 1  # written durably, as any reply
    ops.send(me, str(uuid.uuid4()), "b", "", '"next"', 30.0)
    assert db.value(count, (mid,)) == 0


def test_a_reply_too_long_for_a_notify_is_read_from_the_table(pg_store: coord.Store) -> None:
    big = "x" * 20000
    ops, me, mid, db, _ = _asked(pg_store, big)
    got, _ = ops.replies(me, [mid], [], defer=False)
    assert [r.payload for r in got] == [f'"{big}"']
