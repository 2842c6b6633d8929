"""PostgreSQL: a transaction that makes a job ready and due sends ``NOTIFY`` on its queue's
channel, at commit (a hint for waiting claimers on any host); one that does not, does not.
The listener here is a plain session of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import reg
from contract_engines import fresh_schema
from pg_fixtures import import_psycopg

import coord
from coord import queues
from coord.backend.postgresql.queue_rows import channel
from coord.reaper import bury_dead

psycopg = import_psycopg()


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[coord.Store]:
    with fresh_schema(pg_url) as url:
        s = coord.Store(url)
        yield s
        coord.instances.close_all()
        s.close()


class Listener:
    def __init__(self, url: str, *channels: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        for ch in channels:
            self.conn.execute(f'LISTEN "{ch}"')

    def heard(self, wait: float = 0.3) -> list[str]:
        """The channels notified since the last call (each once per transaction)."""
        return [n.channel for n in self.conn.notifies(timeout=wait)]


@pytest.fixture
def listen(pg_url: str) -> Iterator[Any]:
    made: list[Listener] = []

    def make(*channels: str) -> Listener:
        made.append(Listener(pg_url, *channels))
        return made[-1]

    yield make
    for x in made:
        x.conn.close()


def test_the_channel_is_named_alike_in_python_and_in_sql(pg_store: coord.Store) -> None:
    db = pg_store.backend.db  # type: ignore[attr-defined]
    for q in ("work", "a.b-c_d", "ünï"):
        sql = db.value("SELECT 'coord_q_' || substr(md5(current_schema() || ':' || %s), 1, 16)",
                       (q,))
        assert pg_store.backend.queues.channel(q) == channel(db.location.schema, q) == sql
    # Channels are per database, not per schema: two deployments' queues of one name differ.
    assert channel("one", "work") != channel("two", "work")


def test_what_makes_a_job_ready_notifies_its_queue(pg_store: coord.Store, listen: Any,
                                                   pg_url: str) -> None:
    s, ch = pg_store, pg_store.backend.queues.channel
    ear = listen(ch("work"), ch("other"))
    w = reg(s, "w")
    queues.put(s, "work", 1)
    assert ear.heard() == [ch("work")]
    queues.put(s, "work", 2, delay=60)  # not due: nobody to wake
    queues.put_many(s, "other", [queues.NewJob(1, delay=60)])
    assert ear.heard() == []
    queues.put_many(s, "work", [3, 4, 5])
    assert ear.heard() == [ch("work")]  # once for the transaction
    job = queues.claim(s, "work", w)
    assert job is not None and ear.heard() == []  # a claim makes nothing ready
    queues.release(s, job)
    assert ear.heard() == [ch("work")]
    job = queues.claim(s, "work", w)
    assert job is not None
    queues.fail(s, job, "later")  # backoff: ready only later
    assert ear.heard() == []
    job = queues.claim(s, "work", w)
    assert job is not None
    queues.fail(s, job, "again now", retry_in=0)
    assert ear.heard() == [ch("work")]
    job = queues.claim(s, "work", w, lease=1)
    assert job is not None
    queues.ack(s, job)
    assert ear.heard() == []
    job = queues.claim(s, "work", w)
    assert job is not None
    bury_dead(s, [s.backend.instances.by_id("w")], "died")  # the death rule's back to ready
    assert ear.heard() == [ch("work")]
    dead = queues.put(s, "other", "x", max_attempts=1)
    w2 = reg(s, "w2")
    assert ear.heard() == [ch("other")]
    j = queues.claim(s, "other", w2)
    assert j is not None and j.id == dead
    queues.fail(s, j, "out of attempts")
    assert ear.heard() == []
    queues.requeue(s, dead)
    assert ear.heard() == [ch("other")]


def test_a_bounded_put_notifies_only_when_it_adds(pg_store: coord.Store,
                                                  listen: Any) -> None:
    s, ch = pg_store, pg_store.backend.queues.channel
    ear = listen(ch("bounded"))
    queues.create_queue(s, "bounded", max_depth=5)
    queues.put(s, "bounded", 1)
    assert ear.heard() == [ch("bounded")]
    queues.put(s, "bounded", 2, dedupe_key="k")
    queues.put(s, "bounded", 3, dedupe_key="k")  # a repeat adds nothing
    assert ear.heard() == [ch("bounded")]
