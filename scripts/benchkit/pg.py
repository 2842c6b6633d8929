"""The sections on PostgreSQL (``bench.py --db postgresql://…``): coord on a schema of its own
beside PostgreSQL's own limits, measured in the same run on the same server with raw psycopg
(benchkit.pg_limits: a one-row transaction, a minimal SKIP LOCKED claim queue, an advisory-lock
handover, a NOTIFY round trip). Both schemas are new and dropped at the end.

Sections: pg transactions (kv.set vs a raw one-row INSERT, in alternating rounds), pg queue
(put and claim+ack, 1 process, coord and the raw queue in the same rounds), pg messages
(request→reply to a live instance vs a NOTIFY round trip), pg failover (SIGKILL of a lease
holder → the waiter's ``acquire()`` returned, vs PostgreSQL's advisory-lock handover from a
holder of coord's size — a raw waiter on the liveness lock of the same kind of coord holder,
in rotated trials — and, as context, from a bare holder, alone and with a lease-row term
bump), pg cli (cold ``coord instances --json`` vs ``python -c pass`` and
``import psycopg``)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import pg_limits
from .harness import Result, interleaved, mono, rotate, worker_env

SECTION_NAMES = ["transactions", "queue", "messages", "failover", "cli"]
#: The handover limits of the failover section (the target is against the sized one).
RAW_HANDOVER = "raw advisory-lock handover"
SIZED_HANDOVER = "raw advisory-lock handover, holder of coord's size"
LEASE = "bench/leader"
QUEUE = "bench/jobs"


@dataclass
class PgRun:
    """One run's server: the raw limits' context (its own schema) and coord's URL."""

    raw: pg_limits.Ctx
    coord_url: str
    size: str

    @property
    def n(self) -> dict[str, int]:
        return self.raw.size


@contextmanager
def pg_run(url: str, size: str) -> Iterator[PgRun]:
    """Two new schemas on ``url``'s server (the raw limits', coord's), dropped after."""
    import psycopg

    from coord.backend.postgresql.url import parse

    base = parse(url)
    tag = f"{os.getpid()}_{secrets.token_hex(3)}"
    raw_schema, coord_schema = f"coord_bench_{tag}", f"coord_bench_c_{tag}"
    admin = psycopg.connect(base.dsn, autocommit=True)
    try:
        admin.execute(f"create schema {raw_schema}")  # our own name: [a-z0-9_]
        admin.execute(f"set search_path to {raw_schema}")
        sep = "&" if "?" in base.dsn else "?"
        yield PgRun(pg_limits.Ctx(base.dsn, raw_schema, pg_limits.SIZES[size], admin),
                    f"{base.dsn}{sep}schema={coord_schema}", size)
    finally:
        for s in (raw_schema, coord_schema):
            admin.execute(f"drop schema if exists {s} cascade")
        admin.close()


def facts(run: PgRun) -> dict[str, Any]:
    return pg_limits.run_facts(run.raw.admin, run.size, "given server")


def _limit(section: str, impl: str, row: pg_limits.Row, work: str | None = None) -> Result:
    """A raw limit's row as one of this run's results."""
    return Result(section, work or row.work, impl, row.n, 0.0, row.latencies_us, limit=True,
                  rates=row.rates, error=row.error)


def _store(run: PgRun) -> Any:
    import coord
    return coord.Store(run.coord_url)


# -- transactions ------------------------------------------------------------------------------


def section_transactions(run: PgRun) -> list[Result]:
    from coord import kv

    admin = run.raw.admin
    admin.execute("create table tx (id bigserial primary key, client int, i int, "
                  "at timestamptz default clock_timestamp())")
    store = _store(run)
    try:
        n = run.n["tx"]
        raw = pg_limits._connect(run.raw.spec())

        def raw_op(i: int) -> None:
            raw.execute("insert into tx (client, i) values (%s, %s)", (0, i))

        def coord_op(i: int) -> None:
            kv.set(store, f"bench/k{i % 100}", i)

        interleaved(20, [raw_op, coord_op], rounds=1)  # warm-up (and psycopg's prepare)
        (rt, rl), (ct, cl) = interleaved(n, [raw_op, coord_op], rounds=run.n["rounds"])
        raw.close()
    finally:
        store.close()
    work = "one-row write transaction (1 client)"
    return [Result("pg transactions", work, "raw psycopg INSERT", n, rt, rl, limit=True,
                   per_op=True),
            Result("pg transactions", work, "coord kv.set", n, ct, cl, coord=True, per_op=True)]


# -- queue -------------------------------------------------------------------------------------


def section_queue(run: PgRun) -> list[Result]:
    import coord
    from coord import queues

    admin = run.raw.admin
    admin.execute("create table jobs (id bigserial primary key, queue text not null, "
                  "state text not null default 'ready', token bigint, payload jsonb, "
                  "claimed_at timestamptz)")
    admin.execute("create index jobs_ready on jobs (queue, id) where state = 'ready'")
    raw = pg_limits._connect(run.raw.spec())
    store = _store(run)
    inst = coord.register(store, "bench-consumer", app="bench", handle_signals=False)
    n = run.n["jobs"]
    put_w, claim_w = "put (1 producer)", "claim+ack (1 consumer)"
    rates: dict[tuple[str, str], list[float]] = {}

    def raw_put() -> float:
        t = time.perf_counter()
        for i in range(n):
            raw.execute("insert into jobs (queue, payload) values (%s, %s)",
                        ("q", json.dumps({"i": i})))
        return n / (time.perf_counter() - t)

    def raw_drain() -> float:
        import random
        done, t = 0, time.perf_counter()
        while True:
            token = random.getrandbits(62)
            row = raw.execute(pg_limits.CLAIM, (token, "q")).fetchone()
            if row is None:
                break
            if raw.execute("delete from jobs where id = %s and token = %s",
                           (row[0], token)).rowcount != 1:
                raise RuntimeError(f"raw ack of job {row[0]} failed")
            done += 1
        if done != n:
            raise RuntimeError(f"raw queue: {done} of {n} jobs claimed")
        return done / (time.perf_counter() - t)

    def coord_put() -> float:
        t = time.perf_counter()
        for i in range(n):
            queues.put(store, QUEUE, {"i": i})
        return n / (time.perf_counter() - t)

    def coord_drain() -> float:
        done, t = 0, time.perf_counter()
        while (job := queues.claim(store, QUEUE, inst, timeout=0)) is not None:
            queues.ack(store, job)
            done += 1
        if done != n:
            raise RuntimeError(f"coord queue: {done} of {n} jobs claimed")
        return done / (time.perf_counter() - t)

    def coord_drain_folded() -> float:
        # coord's worker loop: each ack rides in the next claim (one commit per job).
        done, t = 0, time.perf_counter()
        job = queues.claim(store, QUEUE, inst, timeout=0)
        while job is not None:
            job = queues.claim(store, QUEUE, inst, timeout=0, ack=job)
            done += 1
        if done != n:
            raise RuntimeError(f"coord queue (claim(ack=)): {done} of {n} jobs claimed")
        return done / (time.perf_counter() - t)

    raw_impl, folded = "raw SKIP LOCKED queue", "coord claim(ack=job)"
    impls = {raw_impl: (raw_put, raw_drain), "coord": (coord_put, coord_drain),
             folded: (coord_put, coord_drain_folded)}
    try:
        for r in range(run.n["rounds"] + 1):  # round 0 warms up
            for impl in rotate(list(impls), r):
                put, drain = impls[impl]
                for work, fn in ((put_w, put), (claim_w, drain)):
                    rate = fn()
                    if r and not (impl == folded and work == put_w):  # coord's put twice
                        rates.setdefault((work, impl), []).append(rate)
            queues.purge(store, QUEUE, everything=True)
            admin.execute("vacuum jobs")  # untimed: each round starts from a clean table
    finally:
        inst.close()
        store.close()
        raw.close()
    out = [Result("pg queue", work, impl, n, 0.0, rates=rates[(work, impl)],
                  limit=impl == raw_impl, coord=impl == "coord")
           for work in (put_w, claim_w) for impl in (raw_impl, "coord")]
    # The same raw rounds beside coord's worker loop, as a work of its own (no target).
    fold_w = "claim+ack, ack in the next claim (1 consumer)"
    return out + [Result("pg queue", fold_w, raw_impl, n, 0.0, rates=rates[(claim_w, raw_impl)],
                         limit=True),
                  Result("pg queue", fold_w, folded, n, 0.0, rates=rates[(claim_w, folded)],
                         coord=True)]


# -- messages ----------------------------------------------------------------------------------

ANSWERER = textwrap.dedent("""
    import sys, coord
    from coord import messages
    store = coord.Store(sys.argv[1])
    inst = coord.register(store, "bench-answerer", app="bench")
    print("ready", flush=True)
    while True:
        m = messages.receive(inst, timeout=5.0)
        if m is not None and m.kind == "request":
            if m.payload == "stop":
                m.reply("bye")
                break
            m.reply(m.payload)
    inst.close()
""")


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=worker_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)


def _line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"process {p.pid} ended ({p.wait()}) before answering")
    return line.strip()


def _end(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()
    if p.stdout is not None:
        p.stdout.close()


def section_messages(run: PgRun) -> list[Result]:
    import coord
    from coord import messages

    work = "request→reply round trip"
    raw, floor = pg_limits.section_notify(run.raw)
    store = _store(run)
    answerer = _spawn(ANSWERER, run.coord_url)
    lat: list[float] = []
    try:
        _line(answerer)
        inst = coord.register(store, "bench-asker", app="bench", handle_signals=False)
        n = run.n["notifies"]
        warm = max(5, n // 10)
        for i in range(warm + n):
            t = time.perf_counter()
            rep = messages.request(inst, "bench-answerer", i, timeout=10.0)
            dt = (time.perf_counter() - t) * 1e6
            if rep.payload != i:
                raise RuntimeError(f"request {i} answered {rep.payload!r}")
            if i >= warm:
                lat.append(dt)
        messages.request(inst, "bench-answerer", "stop", timeout=10.0)
        answerer.wait(timeout=10)
        inst.close()
    finally:
        _end(answerer)
        store.close()
    return [_limit("pg messages", "raw NOTIFY round trip (2 processes)", raw, work),
            Result("pg messages", work, "raw request→reply, coord's three writes", floor.n,
                   0.0, floor.latencies_us, error=floor.error,
                   note="each write one statement, coord's commit modes, minimal SQL, the "
                   "NOTIFY read on the working connection: PostgreSQL's own floor here"),
            Result("pg messages", work, "coord request (NOTIFY-woken)", len(lat),
                   sum(lat) / 1e6, lat, coord=True)]


# -- failover ----------------------------------------------------------------------------------

# Prints the advisory-lock key its liveness session holds: the raw waiter of the coord-sized
# handover waits on it.
HOLDER = textwrap.dedent("""
    import sys, time, coord
    from coord import leases
    store = coord.Store(sys.argv[1])
    inst = coord.register(store, sys.argv[2], app="bench")
    lease = leases.acquire(inst, sys.argv[3], timeout=30)
    proof = store.backend.liveness.by_member((inst.id, inst.incarnation))
    print("held", proof.key, flush=True)
    time.sleep(3600)
""")

WAITER = textwrap.dedent("""
    import sys, time, coord
    from coord import leases
    store = coord.Store(sys.argv[1])
    inst = coord.register(store, sys.argv[2], app="bench")
    print("waiting", flush=True)
    lease = leases.acquire(inst, sys.argv[3], timeout=60)
    print("held", time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)
    lease.release()
    inst.close()
""")


def _coord_trial(run: PgRun, trial: int) -> float:
    """One SIGKILL of a coord holder with a coord candidate waiting: µs until its
    ``acquire()`` returned."""
    holder = _spawn(HOLDER, run.coord_url, f"bench-h{trial}", LEASE)
    waiter: subprocess.Popen[str] | None = None
    try:
        if _line(holder).split()[0] != "held":
            raise RuntimeError("the holder did not take the lease")
        waiter = _spawn(WAITER, run.coord_url, f"bench-w{trial}", LEASE)
        _line(waiter)
        time.sleep(0.3)  # the waiter is inside acquire(), waiting
        t0 = mono()
        os.kill(holder.pid, signal.SIGKILL)
        held = _line(waiter).split()
        if held[0] != "held":
            raise RuntimeError(f"the waiter said {held}")
        waiter.wait(timeout=30)
        return (float(held[1]) - t0) * 1e6
    finally:
        _end(holder)
        if waiter is not None:
            _end(waiter)


def _sized_trial(run: PgRun, trial: int, waiter: pg_limits.Worker) -> float:
    """One SIGKILL of the same coord holder with a raw psycopg waiter blocked on the advisory
    lock its liveness session holds: µs until that waiter holds it. PostgreSQL's own
    handover from a dying process of coord's size (its sessions, threads and memory)."""
    holder = _spawn(HOLDER, run.coord_url, f"bench-s{trial}", f"{LEASE}-sized")
    try:
        said = _line(holder).split()
        if said[0] != "held":
            raise RuntimeError("the holder did not take the lease")
        waiter.send(f"wait {said[1]}")
        pg_limits._wait_blocked(run.raw.admin, waiter.ready["backend"])
        t0 = mono()
        os.kill(holder.pid, signal.SIGKILL)
        return (float(waiter.read()["held"]) - t0) * 1e6
    finally:
        _end(holder)


def _rounds(run: PgRun, trials: int) -> tuple[list[float], list[float]]:
    """coord's failover and the coord-sized raw handover, one trial of each in turn (rotated,
    fresh processes each), so that a busy spell of the machine falls on both alike."""
    coord_lat: list[float] = []
    sized: list[float] = []
    with pg_limits.workers(1, "waiter", lease=False, **run.raw.spec()) as (waiter,):
        for trial in range(trials + 1):  # trial 0 warms up
            for kind in rotate(["coord", "sized"], trial):
                lat = (_coord_trial(run, trial) if kind == "coord"
                       else _sized_trial(run, trial, waiter))
                if trial:
                    (coord_lat if kind == "coord" else sized).append(lat)
    return coord_lat, sized


def section_failover(run: PgRun) -> list[Result]:
    work = "SIGKILL holder → next holder"
    run.raw.admin.execute("create table lease (name text primary key, term bigint not null, "
                          "holder int, renewed timestamptz)")
    run.raw.admin.execute("insert into lease values ('l', 1, null, clock_timestamp())")
    plain = pg_limits._handover(run.raw, lease=False)
    bump = pg_limits._handover(run.raw, lease=True)
    lat, sized = _rounds(run, run.n["handovers"])
    return [Result("pg failover", work, RAW_HANDOVER, plain.n, 0.0, plain.latencies_us,
                   error=plain.error,
                   note="a bare holder: one session, psycopg alone (context: a smaller exit)"),
            Result("pg failover", work, "raw advisory lock + term bump", bump.n, 0.0,
                   bump.latencies_us, error=bump.error, note="the same, then a committed UPDATE"),
            Result("pg failover", work, SIZED_HANDOVER, len(sized), sum(sized) / 1e6, sized,
                   limit=True, note="a raw waiter on the liveness lock of coord's own holder "
                   "(its sessions, threads and memory); rotated with coord"),
            Result("pg failover", work, "coord (acquire() returned)", len(lat), sum(lat) / 1e6,
                   lat, coord=True)]


# -- cli ---------------------------------------------------------------------------------------


def section_cli(run: PgRun) -> list[Result]:
    import coord

    store = _store(run)
    inst = coord.register(store, "bench-cli", app="bench", handle_signals=False)
    py = sys.executable
    cmds = {
        "coord instances --json": [py, "-m", "coord", "instances", "--json"],
        "python -c pass": [py, "-c", "pass"],
        'python -c "import psycopg"': [py, "-c", "import psycopg"],
    }
    env = {**worker_env(), "COORD_DB": run.coord_url}
    lat: dict[str, list[float]] = {k: [] for k in cmds}
    errors: dict[str, str] = {}
    runs = max(3, run.n["rounds"] * 2)
    try:
        for r in range(runs + 1):  # the first run of each warms the page cache
            for k in rotate(list(cmds), r):
                t = time.perf_counter()
                p = subprocess.run(cmds[k], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, check=False)
                if p.returncode != 0:
                    errors[k] = f"exit {p.returncode}: {p.stderr.strip()[-300:]}"
                elif r:
                    lat[k].append((time.perf_counter() - t) * 1e6)
    finally:
        inst.close()
        store.close()
    work = "cold start: coord instances --json"
    return [Result("pg cli", work, k, len(lat[k]), sum(lat[k]) / 1e6, lat[k],
                   coord=k == "coord instances --json", limit=k == "python -c pass",
                   note="same interpreter, wall time of the whole process", error=errors.get(k))
            for k in cmds]


SECTIONS: dict[str, Callable[[PgRun], list[Result]]] = {
    "transactions": section_transactions, "queue": section_queue,
    "messages": section_messages, "failover": section_failover, "cli": section_cli,
}
