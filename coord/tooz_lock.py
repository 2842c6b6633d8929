"""tooz locks on coord (``CoordLock``): exclusive holds are a coord lease, shared holds
ephemeral kv keys (see ``coord.tooz_driver``)."""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from tooz import locking, utils

from . import kv, leases
from .db import Store
from .errors import LeaseNotAcquired, NotFound
from .instances import Instance, get_instance
from .tooz_common import enc, lock_lease, translated

if TYPE_CHECKING:
    from .tooz_driver import CoordDriver

__all__ = ["CoordLock"]


def _wait(store: Store, ready: Callable[[], tuple[bool, list[int]]],
          deadline: float | None) -> bool:
    """Wait until ``ready()`` says (True, _) or ``deadline`` (monotonic; None: for ever).
    ``ready`` also names the pids whose exit should wake us (holders that may die)."""
    pids: list[int] = []

    def check() -> bool | None:
        nonlocal pids
        ok, pids = ready()
        return True if ok else None

    while True:
        left = None if deadline is None else deadline - store.mono()
        if left is not None and left <= 0:
            return bool(check())
        # Slices of at most a second: an expiring TTL moves no data_version.
        if store.backend.wakeup.wait_for(check, 1.0 if left is None else min(1.0, left),
                                         watch_pids=lambda: pids):
            return True


class CoordLock(locking.Lock):
    """A tooz lock: the coord lease ``tooz/locks/<name>``, held by the coordinator's instance.

    Exclusive holders hold the lease. Shared holders each hold an ephemeral kv key
    ``tooz/locks/<name>/shared/<instance>.<token>`` instead, written *before* they look at
    the lease, while an exclusive holder takes the lease *before* it looks for shared keys:
    whichever looks second sees the other, so the two never both hold the lock (at worst
    both back off). A waiting exclusive holder keeps the lease while the shared holders
    drain, so new shared holders cannot starve it. Dead holders' leases and keys are free
    at once (coord's death rule).

    Not re-entrant. Any thread may release it. The lease is renewed in the background while
    held; ``is_still_owner()`` asks the database.
    """

    def __init__(self, driver: CoordDriver, name: bytes) -> None:
        super().__init__(name)
        self._driver = driver
        self.lease_name = lock_lease(name)
        self.shared_prefix = self.lease_name + "/shared/"
        self._lease: leases.Lease | None = None
        self._shared: list[str] = []  # this object's shared keys, newest last
        self._mutex = threading.Lock()

    def acquire(
        self,
        blocking: bool | float = True,
        shared: bool = False,
        timeout: float | None = None,
    ) -> bool:
        wait, limit = utils.convert_blocking(blocking, timeout)
        inst = self._driver.membership.instance()
        store = inst.store
        deadline = None if limit is None else store.mono() + max(0.0, limit)
        with translated():
            if shared:
                return self._acquire_shared(inst, wait, deadline)
            return self._acquire_exclusive(inst, wait, limit, deadline)

    def _acquire_exclusive(self, inst: Instance, wait: bool, limit: float | None,
                           deadline: float | None) -> bool:
        ttl = self._driver.timeout
        if not wait:
            lease = leases.try_acquire(inst, self.lease_name, ttl=ttl)
        else:
            try:
                lease = leases.acquire(inst, self.lease_name, ttl=ttl, timeout=limit)
            except LeaseNotAcquired:
                lease = None
        if lease is None:
            return False
        if not self._no_shared()[0] and not (wait and _wait(inst.store, self._no_shared, deadline)):
            lease.release()
            return False
        with self._mutex:
            self._lease = lease
        with self._driver.membership.lock:
            self._driver.membership.held.add(lease)
        return True

    def _acquire_shared(self, inst: Instance, wait: bool, deadline: float | None) -> bool:
        store = inst.store
        while True:
            key = f"{self.shared_prefix}{inst.id}.{secrets.token_hex(6)}"
            kv.set(store, key, {"member": enc(self._driver.membership.member_id)}, owner=inst)
            if self._no_exclusive()[0]:
                with self._mutex:
                    self._shared.append(key)
                return True
            kv.delete(store, key)
            if not wait or not _wait(store, self._no_exclusive, deadline):
                return False

    def _no_exclusive(self) -> tuple[bool, list[int]]:
        """Is the lease free (or its holder dead or expired)? And the holder's pid."""
        info = leases.get_lease(self._driver.membership.store(), self.lease_name)
        if info.holder is None or not info.alive or (info.expires_in or 0.0) < 0:
            return True, []
        return False, [info.holder_pid] if info.holder_pid else []

    def _no_shared(self) -> tuple[bool, list[int]]:
        """No live shared holder? And their pids."""
        store = self._driver.membership.store()
        found = kv.list_keys(store, self.shared_prefix)
        pids = []
        for owner in {e.owner_id for e in found if e.owner_id is not None}:
            with contextlib.suppress(NotFound):
                pids.append(get_instance(store, owner).pid)
        return not found, pids

    def _current(self, lease: leases.Lease) -> bool:
        info = leases.get_lease(lease.store, self.lease_name)
        return (lease.held and info.term == lease.term
                and (info.holder, info.holder_incarnation) == lease.holder)

    def release(self) -> bool:
        """Release (the latest shared hold first); False when this lock object did not hold
        it, or its hold was lost or broken."""
        with self._mutex:
            key = self._shared.pop() if self._shared else None
            lease = None
            if key is None:
                lease, self._lease = self._lease, None
        with translated():
            if key is not None:
                return kv.delete(self._driver.membership.store(), key)
            if lease is None:
                return False
            with self._driver.membership.lock:
                self._driver.membership.held.discard(lease)
            was_ours = self._current(lease)
            lease.release()
        return was_ours

    def is_still_owner(self) -> bool:
        lease, keys = self._lease, list(self._shared)
        with translated():
            if keys:
                store = self._driver.membership.store()
                return any(kv.get(store, k) is not None for k in keys)
            return lease is not None and self._current(lease)

    def heartbeat(self) -> bool:
        """Renew now; False when not held (renewal also runs in the background, and shared
        holds need none: they last as long as the coordinator's instance)."""
        lease = self._lease
        if lease is None:
            return bool(self._shared) and self.is_still_owner()
        with translated():
            return lease.renew()

    @property
    def acquired(self) -> bool:
        lease = self._lease
        return bool(self._shared) or (lease is not None and lease.held)

    def break_(self) -> bool:
        """Free the lock whoever holds it (for operators and tests); waiters take it at once.
        The former holders' ``release()`` then returns False."""
        store = self._driver.membership.store()
        with translated():
            broken = False
            for e in kv.list_keys(store, self.shared_prefix):
                broken = kv.delete(store, e.key) or broken
            info = leases.get_lease(store, self.lease_name)
            if info.holder is not None and info.term is not None \
                    and info.holder_incarnation is not None:
                freed = leases.release(store, self.lease_name, info.term,
                                       (info.holder, info.holder_incarnation), "broken")
                broken = freed or broken
            return broken
