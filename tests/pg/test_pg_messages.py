"""Messages on PostgreSQL under READ COMMITTED: a write by an instance cannot interleave with
its burial. The burial (the death rule locks the instance's row FOR UPDATE) is played by a
transaction of the test's own that marks the row dead and holds it uncommitted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from contract_engines import fresh_schema
from engine_sql import value as sql_value
from pg_fixtures import import_psycopg

import coord
from coord import messages
from coord.errors import NotRegistered

psycopg = import_psycopg()


@pytest.fixture
def pg(pg_url: str) -> Iterator[tuple[coord.Store, str]]:
    with fresh_schema(pg_url) as url:
        s = coord.Store(url)
        try:
            yield s, url
        finally:
            coord.instances.close_all()
            s.close()


@pytest.mark.parametrize("action", ["send", "receive", "reply"])
def test_a_write_waits_for_a_burial_and_then_is_refused(pg: tuple[coord.Store, str],
                                                        pg_url: str, action: str) -> None:
    store, url = pg
    schema = url.rsplit("schema=", 1)[1]
    a = coord.register(store, "a", app="t", heartbeat=False)
    b = coord.register(store, "b", app="t", heartbeat=False)
    req = None
    if action == "reply":
        box = messages.Mailbox(store, "a", a.incarnation, "t")
        threading.Thread(target=lambda: _ignore(lambda: box.request("b", 1, timeout=30)),
                         daemon=True).start()
        req = messages.receive(b, 10)
        assert req is not None
    else:
        messages.send(b, "a", "waiting for a")
    actor, other = (b, "a") if action == "reply" else (a, "b")
    outcome: list[Any] = []

    def act() -> None:
        try:
            if action == "send":
                outcome.append(messages.send(actor, other, "x"))
            elif action == "receive":
                outcome.append(messages.receive(actor, 0))
            else:
                assert req is not None
                outcome.append(req.reply("late"))
        except NotRegistered as e:
            outcome.append(e)

    before = sql_value(store, "SELECT count(*) FROM messages")
    with psycopg.connect(pg_url, autocommit=False) as burial:
        burial.execute(f"SELECT 1 FROM {schema}.instances WHERE id = %s FOR UPDATE",
                       (actor.id,))
        burial.execute(f"UPDATE {schema}.instances SET status = 'dead' WHERE id = %s",
                       (actor.id,))
        t = threading.Thread(target=act, daemon=True)
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and outcome == []  # it waits for the burial to end
        burial.commit()
    t.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], NotRegistered), outcome
    assert sql_value(store, "SELECT count(*) FROM messages") <= before


def _ignore(fn: Any) -> None:
    try:
        fn()
    except Exception:
        pass
