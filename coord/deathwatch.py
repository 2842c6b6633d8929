"""The elected reaper's watch: every registered instance of this host, by pidfd.

The instance that holds the ``coord/reaper`` lease runs one ``DeathWatch`` thread. It holds a
pidfd for every live registered instance of its host (same boot and pid namespace) in one
``epoll`` set — not ``select``, which fails above 1 024 descriptors — so the death of any of
them wakes it at once, even when no candidate is waiting for what the dead one held. It then
applies the death rule (``reaper.bury_dead``, one short transaction) and hands the ending of
the dead instance's process tree (``tree.end_dead_trees``: TERM, grace, KILL) to a thread of
its own, so neither this watch nor any heartbeat waits for a grace period.

New registrations are picked up when the registry changes (the engine's
``instances.changes()``, looked at every ``LOOK_EVERY`` seconds); one that has already died
by then is acted on at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .clock import boot_id
from .db import Row
from .identity import pid_namespace, start_token

if TYPE_CHECKING:
    from .instances import Instance

#: How often the watch looks for new registrations (and re-checks that it is still on duty).
LOOK_EVERY = 0.05



class DeathWatch:
    """Watch every live instance of this host while ``on_duty()`` holds; see the module."""

    def __init__(self, inst: Instance, on_duty: Callable[[], bool]) -> None:
        self.inst, self.on_duty = inst, on_duty
        self._stop = threading.Event()
        self._enders: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"coord-deathwatch-{inst.id}")

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def start(self) -> DeathWatch:
        _raise_fd_limit()
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _active(self) -> bool:
        return not self._stop.is_set() and not self.inst.closed and self.on_duty()

    def _run(self) -> None:
        store = self.inst.store
        ep = select.epoll()
        watched: dict[int, Row] = {}  # pidfd -> instance row
        by_key: dict[tuple[str, int], int] = {}  # (id, incarnation) -> pidfd
        version: object = None
        try:
            while self._active():
                try:
                    v = store.backend.instances.changes()
                    dead: list[Row] = []
                    if v != version:
                        version = v
                        dead += self._refresh(ep, watched, by_key)
                    for fd, _ in ep.poll(LOOK_EVERY):
                        row = watched.pop(fd, None)
                        if row is not None:
                            by_key.pop((row["id"], row["incarnation"]), None)
                            ep.unregister(fd)
                            os.close(fd)
                            dead.append(row)
                    if dead:
                        self._act(dead)
                except Exception as e:  # keep watching: the next look retries
                    self.inst.log.warning("death watch: %s", e)
                    self._stop.wait(LOOK_EVERY)
        finally:
            for fd in watched:
                os.close(fd)
            ep.close()

    def _refresh(self, ep: select.epoll, watched: dict[int, Row],
                 by_key: dict[tuple[str, int], int]) -> list[Row]:
        """Watch the instances registered since the last look, forget those gone; returns
        the new ones that are already dead."""
        boot, ns, me = boot_id(), pid_namespace(), os.getpid()
        current = {(r["id"], r["incarnation"]): r for r in self.inst.store.backend.death.alive()
                   if r["boot_id"] == boot and r["pidns"] == ns and r["pid"] != me}
        for key in [k for k in by_key if k not in current]:
            fd = by_key.pop(key)
            watched.pop(fd, None)
            ep.unregister(fd)
            os.close(fd)
        dead = []
        for key, row in current.items():
            if key in by_key:
                continue
            try:
                fd = os.pidfd_open(row["pid"])
            except ProcessLookupError:
                dead.append(row)
                continue
            except OSError as e:  # out of descriptors: the periodic reap still covers it
                self.inst.log.warning("death watch cannot watch %s: %s", row["id"], e)
                continue
            if start_token(row["pid"]) != row["start_token"]:
                os.close(fd)
                dead.append(row)
                continue
            watched[fd] = row
            by_key[key] = fd
            ep.register(fd, select.EPOLLIN)
        return dead

    def _act(self, rows: Iterable[Row]) -> None:
        """Bury those of ``rows`` that are dead, then end their trees in another thread."""
        from .reaper import bury_dead

        store = self.inst.store
        liveness = store.backend.liveness
        look = liveness.look()
        by_verdict: dict[str, list[Row]] = {}
        for row in rows:
            alive, verdict = liveness.judge(row, look)
            if not alive:
                by_verdict.setdefault(verdict, []).append(row)
        owners = []
        for verdict, dead in by_verdict.items():
            bury_dead(store, dead, verdict)  # and their lock files and sockets go
            owners += [(r["id"], r["incarnation"]) for r in dead]
            self.inst.log.info("death watch: %s %s", verdict,
                               ", ".join(f"{r['id']}#{r['incarnation']}" for r in dead))
        if owners:
            self.end_trees(owners)

    def end_trees(self, owners: Iterable[tuple[str, int]] | None = None) -> None:
        """End the trees of dead instances (of ``owners``, or all) in a thread of its own."""
        from .tree import end_dead_trees

        store = self.inst.store
        only = None if owners is None else list(owners)

        def work() -> None:
            try:
                for t in end_dead_trees(store, only=only):
                    self.inst.log.info("ended the process tree of dead %s#%d: %s",
                                       t["instance_id"], t["incarnation"], t["how"])
            except Exception as e:
                self.inst.log.warning("ending a dead instance's tree failed: %s", e)
            finally:
                with self._lock:
                    self._enders.discard(threading.current_thread())

        t = threading.Thread(target=work, daemon=True, name=f"coord-tree-ender-{self.inst.id}")
        with self._lock:
            if owners is None and any(e.name.endswith("-all") for e in self._enders):
                return  # a sweep of all dead trees is already under way
            if owners is None:
                t.name += "-all"
            self._enders.add(t)
        with contextlib.suppress(RuntimeError):
            t.start()


def _raise_fd_limit() -> None:
    """One pidfd per instance of the host: lift the soft descriptor limit (often 1 024) to
    the hard one, which any process may do."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
