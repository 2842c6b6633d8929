"""A database that outlives a reboot (COORD_DB on a persistent path): on the first open in
the new boot every instance of the old boot is dead and the death rule applies once; queued
work and the term sequence survive; monotonic times are rebased."""

from __future__ import annotations

from pathlib import Path

import coord
from coord import kv, leases, messages, queues


def _pretend_previous_boot(db: Path) -> None:
    s = coord.Store(db)
    s.write(lambda c: (c.execute("UPDATE meta SET value = 'old-boot' WHERE key = 'boot_id'"),
                       c.execute("UPDATE instances SET boot_id = 'old-boot'")))
    s.close()


def test_reboot_applies_the_death_rule_and_keeps_the_work(db_path: Path) -> None:
    s = coord.Store(db_path)
    a = coord.register(s, "a", app="t", heartbeat=False, handle_signals=False)
    b = coord.register(s, "b", app="t", heartbeat=False, handle_signals=False)
    queues.create_queue(s, "a/private", owner="a")
    queues.put(s, "a/private", {"n": 1})
    queues.put(s, "shared", {"n": 2})
    job = queues.claim(s, "shared", b, lease=3600)
    assert job is not None
    lease = leases.acquire(a, "t/leader", timeout=0, renew=False)
    kv.set(s, "t/port", 8080, owner=a)
    kv.set(s, "t/config", {"x": 1})
    messages.send(b, "a", {"hello": 1}, ttl=3600)
    old_term = lease.term
    _pretend_previous_boot(db_path)

    s2 = coord.Store(db_path)  # first open in the "new boot"
    infos = {i.id: i for i in coord.list_instances(s2, include_dead=True)}
    assert not any(i.alive for i in infos.values())
    assert infos["a"].tombstone and infos["a"].status == "reboot"  # still owns a queued job
    assert "b" not in infos  # nothing kept it
    assert leases.get_lease(s2, "t/leader").holder is None
    assert kv.get(s2, "t/port") is None and kv.get(s2, "t/config") is not None
    assert queues.get_job(s2, job.id).state == "ready"
    assert [j.state for j in queues.list_jobs(s2, "a/private")] == ["ready"]
    left = s2.value("SELECT expires_mono - ? FROM messages WHERE recipient_id = 'a'", (s2.mono(),))
    assert 3000 < left <= 3600  # the remaining TTL carried over through the wall clock
    # A restart of "a" resumes its private queue and gets its message; terms keep growing.
    a2 = coord.register(s2, "a", app="t", heartbeat=False, handle_signals=False)
    got = queues.claim(s2, "a/private", a2)
    assert got is not None and got.payload == {"n": 1}
    msg = messages.receive(a2, timeout=0)
    assert msg is not None and msg.payload == {"hello": 1}
    lease2 = leases.acquire(a2, "t/leader", timeout=0, renew=False)
    assert lease2.term > old_term
    assert coord.reap(s2) is not None
    from coord.check import check

    assert [p for p in check(s2, strict=True) if not p.pending] == []
    lease2.release()
    a2.close()
    for inst in (a, b):
        inst.close()  # already buried by the reboot: nothing to do, nothing raised
    s2.close()
    s.close()


def test_rebase_happens_once(db_path: Path) -> None:
    coord.Store(db_path).close()
    _pretend_previous_boot(db_path)
    coord.Store(db_path).close()
    coord.Store(db_path).close()
    s = coord.Store(db_path)
    reboots = s.value("SELECT count(*) FROM events WHERE kind = 'reboot'")
    assert reboots == 1
    s.close()


def test_terms_of_a_recreated_database_exceed_the_old_ones(db_path: Path) -> None:
    import shutil

    s = coord.Store(db_path)
    inst = coord.register(s, "a", app="t", heartbeat=False, handle_signals=False)
    for _ in range(5):
        leases.acquire(inst, "t/leader", timeout=0, renew=False).release()
    old = leases.get_lease(s, "t/leader").term
    inst.close()
    s.close()
    # The runtime directory is wiped (logout, reboot): a brand-new database.
    shutil.rmtree(db_path.parent)
    db_path.parent.mkdir(mode=0o700)
    s = coord.Store(db_path)
    inst = coord.register(s, "a", app="t", heartbeat=False, handle_signals=False)
    new = leases.acquire(inst, "t/leader", timeout=0, renew=False)
    assert old is not None and new.term > old
    new.release()
    inst.close()
    s.close()
