"""coord.messages: send, broadcast, receive, request → reply, gather — across real processes.

Responders are real processes (``python -c``) that register and answer; deaths are real
SIGKILLs. Nothing asserts on speed: "at once" means long before the timeout that was given.
A contract module: every test runs on each engine.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import spawn_python, wait_line, wait_until
from rawsql import sql_rows, sql_value, sql_write

import coord
from coord import messages
from coord.check import check
from coord.config import Config
from coord.errors import (
    InvalidArgument,
    NotFound,
    NotRegistered,
    PayloadError,
    PayloadTooLarge,
    RecipientDead,
    TimeoutExpired,
)

pytestmark = pytest.mark.contract

# A responder: registers as argv[1] in app $APP and answers every request with
# {"echo": payload, "from": id}. Mode "silent" never receives; "hang" receives, says
# "got <id>" and never answers; "once" receives one message, says "got <id> <payload>" and
# stops receiving.
RESPONDER = """
import json, os, sys, time, coord
from coord import messages
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, sys.argv[1], app=os.environ.get("APP", "test"))
mode = sys.argv[2] if len(sys.argv) > 2 else "echo"
print("ready", inst.id, inst.incarnation, flush=True)
if mode == "silent":
    while True:
        time.sleep(1)
while True:
    m = messages.receive(inst, timeout=None)
    if mode in ("hang", "once"):
        print("got", m.id, json.dumps(m.payload), flush=True)
        while True:
            time.sleep(1)
    if m.kind == "request":
        m.reply({"echo": m.payload, "from": inst.id})
"""


def responder(children: list[Any], db: Path, id: str, mode: str = "echo", app: str = "test") -> Any:
    p = spawn_python(RESPONDER, id, mode, db=db, env={"APP": app})
    children.append(p)
    return p


def count(store: coord.Store, where: str = "1 = 1") -> int:
    return int(sql_value(store, f"SELECT count(*) FROM messages WHERE {where}"))


def problems(store: coord.Store, *, strict: bool = False) -> list[str]:
    """What the checker finds."""
    return [p.detail for p in check(store, strict=strict)]


def healthy(store: coord.Store) -> None:
    found = problems(store, strict=True)
    assert found == [], found


# -- send and receive ---------------------------------------------------------------------


def test_send_and_receive_carry_the_envelope(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    before = store.wall()
    mid = messages.send(a, "b", {"hello": [1, 2.5, None, True, "ü"]}, topic="t/greet", ttl=60)
    assert uuid.UUID(mid).version == 4
    m = messages.receive(b, 0)
    assert m is not None
    assert (m.id, m.kind, m.sender, m.recipient, m.topic) == (mid, "message", "a", "b", "t/greet")
    assert m.payload == {"hello": [1, 2.5, None, True, "ü"]}
    assert m.sender_incarnation == a.incarnation
    assert m.correlation_id is None and m.reply_to is None
    assert before <= m.created_at <= store.wall()
    assert m.expires_at == pytest.approx(m.created_at + 60)
    assert set(m.to_json()) >= {"id", "sender", "recipient", "topic", "payload", "correlation_id"}
    assert messages.receive(b, 0) is None
    assert messages.receive(a, 0) is None
    healthy(store)


def test_receive_is_fifo_and_filters_by_topic(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    for i in range(5):
        messages.send(a, "b", i, topic="odd" if i % 2 else "even")
    assert messages.receive(b, 0, topic="odd").payload == 1  # type: ignore[union-attr]
    assert messages.receive(b, 0, topic="odd").payload == 3  # type: ignore[union-attr]
    assert messages.receive(b, 0, topic="odd") is None
    got = [messages.receive(b, 0) for _ in range(4)]
    assert [m.payload for m in got if m] == [0, 2, 4]
    assert count(store) == 0  # every received message was acknowledged by the next receive


def test_sending_to_an_unknown_id_fails_at_once_and_stores_nothing(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    with pytest.raises(NotFound, match="no such instance: 'ghost'"):
        messages.send(a, "ghost", 1)
    with pytest.raises(NotFound):
        messages.request(a, "ghost", 1, timeout=30)
    with pytest.raises(InvalidArgument):
        messages.send(a, "bad id with spaces", 1)
    assert count(store) == 0


def test_a_closed_instance_can_neither_send_nor_receive(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    box = messages.Mailbox.of(a)
    a.close()
    with pytest.raises(NotRegistered):
        box.send("b", 1)
    messages.send(b, "b", 1)
    b_box = messages.Mailbox.of(b)
    b.close()
    with pytest.raises(NotRegistered):
        b_box.receive(0)


def test_receive_waits_for_a_message_from_another_process(store: coord.Store, db_path: Path,
                                                          children: list[Any]) -> None:
    me = coord.register(store, "me", app="t")
    code = """
import os, sys, coord
from coord import messages
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, "sender", app="t")
print("ready", flush=True)
sys.stdin.readline()
messages.send(inst, "me", {"from": "child"}, topic="news")
print("sent", flush=True)
sys.stdin.readline()
"""
    p = spawn_python(code, db=db_path, stdin=subprocess.PIPE)
    children.append(p)
    wait_line(p)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(messages.receive(me, 30, topic="news")))
    t.start()
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    t.join(40)
    assert got and got[0] is not None and got[0].payload == {"from": "child"}
    assert got[0].sender == "sender"
    p.stdin.close()


def test_waiting_is_not_a_busy_loop(store: coord.Store) -> None:
    me = coord.register(store, "me", app="t")
    cpu = time.process_time()
    t0 = time.monotonic()
    assert messages.receive(me, 0.6) is None
    assert time.monotonic() - t0 >= 0.6
    assert time.process_time() - cpu < 0.3  # mostly asleep in select(), not spinning


def test_broadcast_reaches_each_live_instance_of_the_app_once(store: coord.Store) -> None:
    a = coord.register(store, "a", app="x")
    b = coord.register(store, "b", app="x")
    c = coord.register(store, "c", app="x")
    d = coord.register(store, "d", app="y")
    sent = messages.broadcast(a, {"v": 1}, topic="cfg")
    assert set(sent) == {"b", "c"}
    assert count(store) == 2
    for inst in (b, c):
        m = messages.receive(inst, 0)
        assert m is not None and m.payload == {"v": 1} and m.id == sent[inst.id]
    assert messages.receive(a, 0) is None and messages.receive(d, 0) is None
    assert set(messages.broadcast(d, 2, app="x")) == {"a", "b", "c"}


# -- delivery across crashes and restarts -------------------------------------------------


def test_unacked_messages_come_back_to_a_restarted_instance(store: coord.Store, db_path: Path,
                                                            children: list[Any]) -> None:
    me = coord.register(store, "me", app="t")
    p = responder(children, db_path, "worker", "once")
    wait_line(p)
    first = messages.send(me, "worker", "first")
    messages.send(me, "worker", "second")
    line = wait_line(p, "got")
    assert line == f'got {first} "first"'
    assert sql_value(store, "SELECT delivered_incarnation FROM messages WHERE id = ?",
                     (first,)) is not None
    p.kill()
    p.wait()
    # A restart with the same id gets the delivered-but-unacked message again, then the rest.
    again = coord.register(store, "worker", app="t")
    m1 = messages.receive(again, 0)
    m2 = messages.receive(again, 0)
    assert (m1 and m1.payload, m2 and m2.payload) == ("first", "second")
    assert messages.receive(again, 0) is None
    assert count(store) == 0
    healthy(store)


def test_acked_messages_do_not_come_back(store: coord.Store) -> None:
    me = coord.register(store, "me", app="t")
    w = coord.register(store, "w", app="t")
    messages.send(me, "w", 1)
    messages.send(me, "w", 2)
    m = messages.receive(w, 0)
    assert m is not None and m.ack() is True
    assert m.ack() is False
    m2 = messages.receive(w, 0)
    assert m2 is not None and m2.payload == 2
    w.close()  # left without acking 2: the next incarnation gets it again, but not 1
    w2 = coord.register(store, "w", app="t")
    again = messages.receive(w2, 0)
    assert again is not None and again.payload == 2 and again.id == m2.id
    assert messages.receive(w2, 0) is None


def test_messages_to_a_dead_instance_are_kept_until_their_ttl(store: coord.Store, db_path: Path,
                                                              children: list[Any]) -> None:
    me = coord.register(store, "me", app="t")
    p = responder(children, db_path, "gone", "silent")
    wait_line(p)
    messages.send(me, "gone", "kept", ttl=3600)
    short = messages.send(me, "gone", "short", ttl=0.2)
    p.kill()
    p.wait()
    messages.send(me, "gone", "after death")  # its row is still there: kept for a restart
    deadline = store.mono() + 0.25
    wait_until(lambda: store.mono() > deadline)
    report = coord.reap(store)
    assert report.messages_expired == 1
    assert sql_value(store, "SELECT count(*) FROM messages WHERE id = ?", (short,)) == 0
    assert count(store) == 2
    back = coord.register(store, "gone", app="t")
    got = [messages.receive(back, 0) for _ in range(3)]
    assert [m.payload for m in got if m] == ["kept", "after death"]


def test_an_expired_message_is_never_delivered(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    messages.send(a, "b", "late", ttl=0.05)
    deadline = store.mono() + 0.06
    wait_until(lambda: store.mono() > deadline)
    assert messages.receive(b, 0) is None


# -- request and reply --------------------------------------------------------------------


def test_a_thousand_round_trips_between_two_processes(store: coord.Store, db_path: Path,
                                                      children: list[Any]) -> None:
    me = coord.register(store, "asker", app="rt")
    p = responder(children, db_path, "echo-1", app="rt")
    wait_line(p)
    seen: set[str] = set()
    for i in range(1000):
        payload = {"n": i, "tag": uuid.uuid4().hex}
        answer = messages.request(me, "echo-1", payload, timeout=30)
        assert answer.payload == {"echo": payload, "from": "echo-1"}, i
        assert answer.kind == "reply" and answer.sender == "echo-1" and answer.recipient == "asker"
        assert answer.correlation_id is not None and answer.correlation_id not in seen
        seen.add(answer.correlation_id)
    assert len(seen) == 1000
    assert count(store, "kind <> 'reply'") == 0  # nothing left pending
    healthy(store)


def test_request_reply_in_one_process_with_threads(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            m = messages.receive(b, 0.1)
            if m is not None and m.kind == "request":
                m.reply(m.payload * 2)

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert [messages.request(a, "b", i, timeout=10).payload for i in range(20)] == \
            [i * 2 for i in range(20)]
    finally:
        stop.set()
        t.join(10)


def test_recipient_killed_during_a_request_fails_the_requester_at_once(
    store: coord.Store, db_path: Path, children: list[Any]
) -> None:
    me = coord.register(store, "asker", app="t")
    p = responder(children, db_path, "victim", "hang")
    wait_line(p)
    outcome: list[Any] = []

    def ask() -> None:
        t0 = time.monotonic()
        try:
            outcome.append(messages.request(me, "victim", {"q": 1}, timeout=120))
        except Exception as e:
            outcome.append(e)
        outcome.append(time.monotonic() - t0)

    t = threading.Thread(target=ask)
    t.start()
    wait_line(p, "got")
    p.kill()
    t.join(60)
    assert not t.is_alive()
    err, elapsed = outcome
    assert isinstance(err, RecipientDead)
    assert str(err) == "instance 'victim' died before replying"
    assert elapsed < 60  # at once, not at the 120 s timeout
    assert count(store, "kind = 'request'") == 0  # the request was withdrawn


def test_request_to_an_already_dead_instance_fails_at_once(store: coord.Store, db_path: Path,
                                                           children: list[Any]) -> None:
    me = coord.register(store, "asker", app="t")
    p = responder(children, db_path, "dead-one", "silent")
    wait_line(p)
    p.kill()
    p.wait()
    t0 = time.monotonic()
    with pytest.raises(RecipientDead):
        messages.request(me, "dead-one", 1, timeout=120)
    assert time.monotonic() - t0 < 60
    assert count(store, "kind = 'request'") == 0
    coord.reap(store)  # its row goes (nothing keeps a tombstone): now it is unknown
    with pytest.raises(NotFound):
        messages.request(me, "dead-one", 1, timeout=120)


def test_request_times_out_and_a_late_reply_is_discarded(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    with pytest.raises(TimeoutExpired) as e:
        messages.request(a, "b", "anyone?", timeout=0.3)
    assert e.value.exit_code == 3
    assert count(store) == 0  # withdrawn: b never sees it
    assert messages.receive(b, 0) is None


def test_reply_rules(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    mid = messages.send(a, "b", "just a message")
    m = messages.receive(b, 0)
    assert m is not None and m.id == mid
    with pytest.raises(InvalidArgument, match="not a request"):
        m.reply("no")
    assert messages.reply(b, str(uuid.uuid4()), 1) is False
    with pytest.raises(NotFound, match="pending request"):
        messages.reply(b, str(uuid.uuid4()), 1, strict=True)
    assert count(store, "kind = 'reply'") == 0


def test_a_reply_to_a_requester_that_died_is_discarded(store: coord.Store, db_path: Path,
                                                       children: list[Any]) -> None:
    me = coord.register(store, "server", app="t")
    code = """
import os, coord
from coord import messages
store = coord.Store(os.environ["COORD_DB"])
inst = coord.register(store, "client", app="t")
print("ready", flush=True)
messages.request(inst, "server", "q", timeout=120)
"""
    p = spawn_python(code, db=db_path)
    children.append(p)
    wait_line(p)
    req = messages.receive(me, 30)
    assert req is not None and req.kind == "request" and req.reply_to == "client"
    assert req.correlation_id == req.id
    p.kill()
    p.wait()
    coord.reap(store)  # the death rule drops its pending request
    assert req.reply("answer") is False
    assert count(store) == 0
    healthy(store)


# -- gather -------------------------------------------------------------------------------


def test_gather_over_five_instances_names_the_silent_one(store: coord.Store, db_path: Path,
                                                         children: list[Any]) -> None:
    me = coord.register(store, "boss", app="crew")
    procs = [responder(children, db_path, f"crew-{i}", app="crew") for i in range(4)]
    procs.append(responder(children, db_path, "crew-mute", "silent", app="crew"))
    for p in procs:
        wait_line(p)
    t0 = time.monotonic()
    got = messages.gather(me, {"q": "status"}, topic="crew/status", timeout=3.0)
    elapsed = time.monotonic() - t0
    assert sorted(m.sender for m in got.replies) == [f"crew-{i}" for i in range(4)]
    assert all(m.payload == {"echo": {"q": "status"}, "from": m.sender} for m in got.replies)
    assert all(m.topic == "crew/status" for m in got.replies)
    assert got.silent == ["crew-mute"] and got.dead == [] and got.missing == ["crew-mute"]
    assert elapsed >= 3.0  # it waited for the silent one until the timeout
    assert count(store) == 0  # the silent one's request was withdrawn
    assert set(got.to_json()) == {"replies", "silent", "dead"}
    healthy(store)


def test_gather_does_not_wait_for_the_dead(store: coord.Store, db_path: Path,
                                           children: list[Any]) -> None:
    me = coord.register(store, "boss", app="duo")
    ok = responder(children, db_path, "duo-ok", app="duo")
    doomed = responder(children, db_path, "duo-doomed", "hang", app="duo")
    wait_line(ok)
    wait_line(doomed)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(
        messages.gather(me, "ping", timeout=120)))
    t0 = time.monotonic()
    t.start()
    wait_line(doomed, "got")
    doomed.kill()
    t.join(60)
    assert not t.is_alive() and time.monotonic() - t0 < 60
    (got,) = result
    assert [m.sender for m in got.replies] == ["duo-ok"]
    assert got.dead == ["duo-doomed"] and got.silent == []


def test_gather_with_nobody_to_ask_returns_at_once(store: coord.Store) -> None:
    me = coord.register(store, "alone", app="solo")
    got = messages.gather(me, 1, timeout=60)
    assert got.replies == [] and got.missing == []


# -- payloads -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, {"x": math.inf}, [[[[[[1]]]]]], object(), b"raw",
                                 "x" * 2000, "\ud800"])
def test_bad_payloads_are_refused_and_nothing_is_stored(db_path: Path, bad: Any) -> None:
    s = coord.Store(db_path, config=Config(payload_limit=1000, payload_max_depth=5))
    try:
        a = coord.register(s, "a", app="t")
        b = coord.register(s, "b", app="t")
        for action in (
            lambda: messages.send(a, "b", bad),
            lambda: messages.broadcast(a, bad),
            lambda: messages.request(a, "b", bad, timeout=1),
            lambda: messages.gather(a, bad, timeout=1),
            lambda: messages.reply(b, str(uuid.uuid4()), bad),
        ):
            with pytest.raises(PayloadError) as e:
                action()
            assert str(e.value).startswith("bad payload")
        assert count(s) == 0
        if isinstance(bad, str) and len(bad) > 1000:
            with pytest.raises(PayloadTooLarge):
                messages.send(a, "b", bad)
    finally:
        coord.instances.close_all()
        s.close()


def test_a_bad_payload_written_around_coord_is_dropped_on_the_way_out(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    messages.send(a, "b", "good")
    bad_id = str(uuid.uuid4())
    sql_write(store,
              "INSERT INTO messages (id, sender_id, sender_incarnation, recipient_id, payload, "
              "created_at, expires_at, expires_mono) VALUES (?, 'a', ?, 'b', 'NaN', 0, 0, ?)",
              [(bad_id, a.incarnation, store.backend.clock.now() + 60)])
    messages.send(a, "b", "also good")
    got = [messages.receive(b, 0) for _ in range(3)]
    assert [m.payload for m in got if m] == ["good", "also good"]
    events = sql_rows(store, "SELECT * FROM events WHERE kind = 'message dropped'")
    assert [e["subject"] for e in events] == [bad_id]


# -- invariants ---------------------------------------------------------------------------


def test_the_checker_sees_broken_message_rows(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    healthy(store)
    now = store.backend.clock.now()
    sql_write(
        store,
        "INSERT INTO messages (id, kind, sender_id, sender_incarnation, recipient_id, payload, "
        "correlation_id, reply_to, created_at, expires_at, expires_mono, delivered_incarnation, "
        "acked) VALUES (?, ?, ?, ?, 'a', ?, ?, ?, 0, 1, ?, ?, ?)",
        [
            (str(uuid.uuid4()), "reply", "a", a.incarnation, "1", None, None, now + 60, None, 0),
            (str(uuid.uuid4()), "request", "ghost", 7, "1", "x", "ghost", now + 60, None, 0),
            (str(uuid.uuid4()), "message", "a", a.incarnation, "{bad", None, None, now + 60, None, 0),
            (str(uuid.uuid4()), "message", "a", a.incarnation, "1", None, None, now + 60, None, 1),
        ])
    text = "\n".join(problems(store))
    assert re.search(r"reply .* has no correlation id", text)
    assert re.search(r"request .* held by ghost#7, which is not registered", text)
    assert re.search(r"payload is not valid JSON", text)
    assert re.search(r"acked but never delivered", text)


def test_module_reexports() -> None:
    assert coord.Message is messages.Message and coord.Gathered is messages.Gathered
    assert coord.messages is messages and hasattr(coord, "kv")


def test_mailbox_for_a_process_acting_as_an_instance(store: coord.Store, monkeypatch:
                                                     pytest.MonkeyPatch) -> None:
    a = coord.register(store, "a", app="t")
    with pytest.raises(NotRegistered, match="COORD_INSTANCE_ID"):
        messages.mailbox(store)
    monkeypatch.setenv("COORD_INSTANCE_ID", "a")
    box = messages.mailbox(store)
    assert (box.id, box.incarnation, box.app) == ("a", a.incarnation, "t")
    assert box.sock is None
    box.send("a", "to myself")
    m = box.receive(0)
    assert m is not None and m.payload == "to myself"
    assert os.environ["COORD_INSTANCE_ID"] == "a"
