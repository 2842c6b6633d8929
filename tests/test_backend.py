"""The engine seam: each store owns its engine, and state the engine keeps (expiry from its
own clock, replies taken and not yet deleted) behaves as the capability modules promise."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import coord
from coord import message_checks, messages
from coord.backend import open_backend
from coord.clock import Clock


def _replies(store: coord.Store) -> int:
    return int(store.value("SELECT count(*) FROM messages WHERE kind = 'reply'"))


def test_each_store_owns_its_engine(db_path: Path) -> None:
    with coord.Store(db_path) as one, coord.Store(db_path) as two:
        assert one.backend.name == "sqlite"
        assert one.backend is not two.backend
    with pytest.raises(LookupError, match="no coord engine named 'nope'.*sqlite"):
        open_backend("nope", one)


def _answer_one(store: coord.Store, who: coord.Instance) -> None:
    m = messages.receive(who, 10)
    assert m is not None
    m.reply({"re": m.payload})


def test_a_reply_taken_here_goes_with_the_requesters_next_write(store: coord.Store) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    t = threading.Thread(target=_answer_one, args=(store, b))
    t.start()
    try:
        assert messages.request(a, "b", 1, timeout=10).payload == {"re": 1}
    finally:
        t.join()
    assert _replies(store) == 1  # taken, kept on the store's engine until a writes next
    messages.send(a, "b", "next")
    assert _replies(store) == 0


def test_a_mailbox_acting_for_an_instance_elsewhere_deletes_its_reply_at_once(
    store: coord.Store,
) -> None:
    a = coord.register(store, "a", app="t")
    b = coord.register(store, "b", app="t")
    remote = messages.Mailbox(store, a.id, a.incarnation, a.app)  # no socket: not ours
    t = threading.Thread(target=_answer_one, args=(store, b))
    t.start()
    try:
        assert remote.request("b", 2, timeout=10).payload == {"re": 2}
    finally:
        t.join()
    assert _replies(store) == 0


def test_expiry_is_the_engines_clock(db_path: Path) -> None:
    now = [time.clock_gettime(time.CLOCK_MONOTONIC)]
    store = coord.Store(db_path, clock=Clock(mono=lambda: now[0]))
    try:
        a = coord.register(store, "a", app="t", heartbeat=False)
        b = coord.register(store, "b", app="t", heartbeat=False)
        messages.send(a, "b", "soon stale", ttl=5)
        now[0] += 4
        assert not [p for p in message_checks.problems(store, {}, {}) if "expired" in p[0]]
        now[0] += 2  # past its TTL by the engine's clock; the wall clock has not moved
        assert messages.receive(b, 0) is None
        assert ("1 expired messages, awaiting the reaper", True) in message_checks.problems(
            store, {}, {})
    finally:
        coord.instances.close_all()
        store.close()
