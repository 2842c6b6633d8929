"""The fenced queue put: ``queues.put``/``put_many`` with ``fence=`` (and ``Lease.put``/
``Lease.put_many``) add jobs only while the lease's term is the current one, in the same
transaction; a holder whose term is over stores nothing — not the job, not a new queue."""

from __future__ import annotations

import pytest

import coord
from coord import queues
from coord.errors import LeaseLost
from coord.leases import acquire, release_dead_holders

pytestmark = pytest.mark.contract


def test_a_fenced_put_adds_jobs_only_in_the_current_term(store: coord.Store) -> None:
    a = coord.register(store, "qa", app="t")
    b = coord.register(store, "qb", app="t")
    la = acquire(a, "fence/queue")
    first = la.put("fenced/jobs", {"by": "a"}, priority=2)
    assert la.put("fenced/jobs", {"by": "a"}, dedupe_key="k") == \
        la.put("fenced/jobs", {"again": 1}, dedupe_key="k")  # dedupe holds under the fence
    ids = la.put_many("fenced/jobs", [1, queues.NewJob(2, delay=60)])
    job = queues.get_job(store, first)
    assert (job.state, job.priority, job.payload) == ("ready", 2, {"by": "a"})
    la.release()
    lb = acquire(b, "fence/queue")
    before = queues.stats(store, "fenced/jobs")[0]
    # The old term is over: every fenced put is refused and nothing is stored.
    with pytest.raises(LeaseLost) as e:
        queues.put(store, "fenced/jobs", {"by": "a, late"}, fence=la)
    assert (e.value.name, e.value.term) == ("fence/queue", la.term)
    with pytest.raises(LeaseLost):
        queues.put_many(store, "fenced/jobs", [3, 4], fence=la)
    with pytest.raises(LeaseLost):
        la.put("fenced/new-queue", 1)
    after = queues.stats(store, "fenced/jobs")[0]
    assert (after.ready, after.delayed) == (before.ready, before.delayed) == (3, 1)
    assert [s.id for s in queues.stats(store)] == ["fenced/jobs"]  # no queue was created
    # The current holder puts.
    assert lb.put("fenced/jobs", {"by": "b"}) > max(ids)
    lb.release()


def test_a_holder_whose_lease_was_lost_can_no_longer_put(store: coord.Store) -> None:
    a = coord.register(store, "qd", app="t")
    la = acquire(a, "fence/queue-lost", renew=False)
    la.put("fenced/q", 1)
    # The death rule frees a's leases (as the reaper does for a dead holder).
    assert release_dead_holders(store, [(a.id, a.incarnation)], "died") == 1
    with pytest.raises(LeaseLost):
        la.put("fenced/q", 2)
    assert not la.held
    assert [j.payload for j in queues.list_jobs(store, "fenced/q")] == [1]
