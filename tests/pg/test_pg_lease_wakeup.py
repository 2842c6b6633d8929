"""A lease made free on PostgreSQL is announced on its channel (NOTIFY at the commit), so a
candidate on another host — which no nudge socket reaches — is woken by the release, not
by its next poll; the channel the SQL names is the one a waiter LISTENs on."""

from __future__ import annotations

import pytest
from pg_fixtures import import_psycopg

import coord
from coord.backend import lease_channel
from coord.backend.postgresql.listen import channel_name
from coord.leases import acquire, release_dead_holders

psycopg = import_psycopg()


def _announced(listener: object, channel: str) -> list[str]:
    return [n.channel for n in listener.notifies(timeout=5, stop_after=1)  # type: ignore[attr-defined]
            if n.channel == channel]


@pytest.mark.parametrize("name", ["l/short", "l/" + "long-name-" * 8])
def test_a_release_and_a_burial_announce_the_lease_free(pg_store: coord.Store, pg_url: str,
                                                         name: str) -> None:
    assert pg_store.location is not None
    channel = channel_name(pg_store.location.schema, lease_channel(name))
    inst = coord.register(pg_store, "holder", app="t", handle_signals=False)
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{channel}"')
        lease = acquire(inst, name, timeout=5)
        lease.release()
        assert _announced(listener, channel) == [channel]
        lease = acquire(inst, name, timeout=5)
        assert release_dead_holders(pg_store, [(inst.id, inst.incarnation)], "died") == 1
        assert _announced(listener, channel) == [channel]
    inst.close()
