"""The typed fenced operations every engine has: ``kv.set``/``kv.cas`` with ``fence=`` (and
``Lease.set``/``Lease.cas``) write only while the lease's term is the current one, in the
same transaction, and a holder whose term is over cannot write — not even once."""

from __future__ import annotations

import engine_sql
import pytest

import coord
from coord import kv
from coord.errors import LeaseLost, VersionConflict
from coord.leases import acquire, release_dead_holders

pytestmark = pytest.mark.contract


def test_fenced_kv_set_and_cas_run_only_in_the_current_term(store: coord.Store) -> None:
    a = coord.register(store, "fa", app="t")
    b = coord.register(store, "fb", app="t")
    la = acquire(a, "fence/kv")
    v1 = la.set("fence/state", {"by": "a"})
    v2 = la.cas("fence/state", {"by": "a", "n": 2}, version=v1)
    assert kv.get(store, "fence/state").value == {"by": "a", "n": 2}
    with pytest.raises(VersionConflict):
        la.cas("fence/state", {"stale": True}, version=v1)  # the version still counts
    la.release()
    lb = acquire(b, "fence/kv")
    # The old term is over: refused whatever the version, and nothing is written.
    with pytest.raises(LeaseLost) as e:
        kv.set(store, "fence/state", {"by": "a, late"}, fence=la)
    assert (e.value.name, e.value.term) == ("fence/kv", la.term)
    with pytest.raises(LeaseLost):
        kv.cas(store, "fence/state", {"by": "a, late"}, version=v2, fence=la)
    with pytest.raises(LeaseLost):
        la.set("fence/other", 1)
    assert kv.get(store, "fence/other") is None
    assert kv.get(store, "fence/state").version == v2
    # The current holder writes; an ephemeral key bound to it works under the fence too.
    lb.set("fence/state", {"by": "b"}, owner=b)
    entry = kv.get(store, "fence/state")
    assert entry.value == {"by": "b"} and entry.owner_id == "fb"
    lb.release()


def test_a_holder_whose_lease_was_lost_can_no_longer_set(store: coord.Store) -> None:
    a = coord.register(store, "fd", app="t")
    la = acquire(a, "fence/lost", renew=False)
    la.set("fence/k", 1)
    # The death rule frees a's leases (as the reaper does for a dead holder).
    assert release_dead_holders(store, [(a.id, a.incarnation)], "died") == 1
    with pytest.raises(LeaseLost):
        la.set("fence/k", 2)
    assert not la.held and kv.get(store, "fence/k").value == 1


def test_fenced_statements_in_the_engines_own_sql(store: coord.Store) -> None:
    # PostgreSQL's placeholders are %s, SQLite's ?; a statement without parameters runs as
    # written (a literal % included) on both.
    a = coord.register(store, "fs", app="t")
    lease = acquire(a, "fence/sql")
    mark = "%s" if store.engine == "postgresql" else "?"
    upsert = ("INSERT INTO meta (key, value) VALUES ('fence/m', {}) "
              "ON CONFLICT (key) DO UPDATE SET value = excluded.value RETURNING value")
    assert lease.write(upsert.format(mark), ("one",)) == [{"value": "one"}]
    assert lease.write("SELECT value FROM meta WHERE key LIKE 'fence/%'") == [{"value": "one"}]
    assert lease.write("UPDATE meta SET value = 'two' WHERE key = 'fence/m'") == []
    term = lease.term
    lease.release()
    with pytest.raises(LeaseLost):
        coord.leases.fenced_write(store, "fence/sql", term, upsert.format(mark), ("late",))
    assert engine_sql.value(store, "SELECT value FROM meta WHERE key = 'fence/m'") == "two"


def test_a_fenced_write_racing_the_takeover_never_lands_after_it(fast_store: coord.Store) -> None:
    # The old holder writes as fast as it can, checked by the store alone (no local
    # deadline), while the next holder waits out the TTL and takes over: every write of the
    # old term committed before the new term began, none after.
    import threading
    from types import SimpleNamespace

    a = coord.register(fast_store, "fr-a", app="t")
    b = coord.register(fast_store, "fr-b", app="t")
    la = acquire(a, "fence/race", renew=False, ttl=0.5)
    fence = SimpleNamespace(name=la.name, term=la.term)
    wrote: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        n = 0
        while not stop.is_set():
            try:
                wrote.append(kv.set(fast_store, "fence/race/v", {"by": "a", "n": n}, fence=fence))
            except LeaseLost:
                return
            n += 1

    t = threading.Thread(target=hammer)
    t.start()
    lb = acquire(b, "fence/race", timeout=10)
    vb = lb.set("fence/race/v", {"by": "b"})
    stop.set()
    t.join(30)
    assert wrote and max(wrote) < vb
    assert kv.get(fast_store, "fence/race/v").value == {"by": "b"}
    with pytest.raises(LeaseLost):
        kv.set(fast_store, "fence/race/v", {"by": "a", "late": True}, fence=fence)
    lb.release()
