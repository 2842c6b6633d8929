"""PostgreSQL's own limits for the work coord does, measured with raw psycopg 3: what a
PostgreSQL engine for coord can at best reach on this machine, and the figures it is compared
with.

Run (psycopg comes with the postgres extra: ``pip install -e '.[postgres]'``):

    .venv/bin/python scripts/bench_pg.py                    # starts a private cluster, a table
    .venv/bin/python scripts/bench_pg.py --db postgresql://user@host:5432/db   # a given server
    .venv/bin/python scripts/bench_pg.py --quick --json     # small sizes, one JSON line each
    .venv/bin/python scripts/bench_pg.py --tiny --json      # the smallest: the CI smoke test
    .venv/bin/python scripts/bench_pg.py --netns            # also cut links (root: namespaces)

Without ``--db`` (or ``COORD_TEST_PG``) a private cluster is started in a temporary directory
with tests/pgcluster.py and stopped at the end. On a given server everything is done in a
schema of its own (``coord_bench_<pid>``), dropped at the end; advisory-lock keys are random.

A benchmark, not a test: nothing here asserts on speed. Sections (SECTIONS, in order):
  1. transactions: one-row INSERT transactions (autocommit), 1 client and 4 client processes.
  2. skip_locked: a one-table queue; claim (UPDATE ... WHERE id = (SELECT ... FOR UPDATE
     SKIP LOCKED LIMIT 1) RETURNING) and ack (DELETE by id and claim token) as two
     transactions per job, 1 and 4 consumer processes draining a pre-filled queue.
  3. advisory_handover: a holder process holds ``pg_advisory_lock(k)``, a waiter blocks on it
     (seen waiting in pg_stat_activity), the holder is SIGKILLed: time until the waiter holds
     it; and the same followed by a committed term bump in a lease row.
  4. notify: a NOTIFY round trip between two processes (ping on one channel, pong on another);
     and a request→reply with the three writes coord's makes (the request with its NOTIFY,
     its delivery mark, the reply with the request's deletion and a NOTIFY carrying the
     reply), each one statement in autocommit with coord's commit modes, minimal SQL and no
     other work: PostgreSQL's own floor for that round trip here.
  5. import: cold ``python -c "import psycopg"`` beside ``python -c pass``.
  6. partition (only with --netns; root): a client in a network namespace holds an advisory
     lock with server-side keepalives (or idle_session_timeout alone) set on its session;
     its link is cut silently: time until a waiter holds the lock, and until the cut
     client's next query fails.
Throughput figures are the median of rounds; latencies are p50 and p99 over every sample
after a warm-up. Every time is CLOCK_MONOTONIC (one clock for every process of this boot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The script every worker process runs (with --worker ROLE JSON).
SCRIPT = Path(__file__).resolve().parents[1] / "bench_pg.py"
ROOT = SCRIPT.parents[1]

SECTIONS = ["transactions", "skip_locked", "advisory_handover", "notify", "import"]

SIZES = {
    # transactions per client per round, rounds, queue jobs per round, handover trials,
    # notify round trips
    "full": {"tx": 2000, "rounds": 5, "jobs": 4000, "handovers": 60, "notifies": 3000},
    "quick": {"tx": 500, "rounds": 3, "jobs": 1000, "handovers": 20, "notifies": 500},
    "tiny": {"tx": 30, "rounds": 2, "jobs": 40, "handovers": 3, "notifies": 20},
}


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass
class Row:
    """One measured figure: ops/s (``rates``, one per round: the figure is the median) or a
    latency (``latencies_us``: the figure is the p50)."""

    section: str
    work: str
    n: int
    rates: list[float] = field(default_factory=list)
    latencies_us: list[float] = field(default_factory=list)
    error: str | None = None

    def pct(self, q: float) -> float | None:
        xs = sorted(self.latencies_us)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "work": self.work, "n": self.n, "error": self.error,
            "metric": "ops/s" if self.rates else "p50_us",
            "ops_per_s": round(statistics.median(self.rates), 1) if self.rates else None,
            "p50_us": _r(self.pct(0.5)), "p99_us": _r(self.pct(0.99)),
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# -- worker processes --------------------------------------------------------------------
# Each worker is this script run with --worker ROLE JSON: it prints "ready ..." and then
# follows commands on stdin, one per line, answering one JSON line each.


def _connect(spec: dict[str, Any]) -> Any:
    import psycopg

    conn = psycopg.connect(spec["url"], autocommit=True)
    conn.execute(f"set search_path to {spec['schema']}")  # the schema name is ours: [a-z0-9_]
    return conn


def worker_tx(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    conn = _connect(spec)
    yield {"ready": True}
    while sys.stdin.readline().strip() == "go":
        t0 = mono()
        for i in range(spec["n"]):
            conn.execute("insert into tx (client, i) values (%s, %s)", (spec["client"], i))
        yield {"start": t0, "end": mono(), "n": spec["n"]}


CLAIM = """update jobs set state = 'claimed', token = %s, claimed_at = clock_timestamp()
 where id = (select id from jobs where queue = %s and state = 'ready'
             order by id limit 1 for update skip locked)
 returning id, payload"""


def worker_consume(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    conn = _connect(spec)
    yield {"ready": True}
    while sys.stdin.readline().strip() == "go":
        done, t0 = 0, mono()
        while True:
            token = random.getrandbits(62)
            row = conn.execute(CLAIM, (token, "q")).fetchone()
            if row is None:
                break
            cur = conn.execute("delete from jobs where id = %s and token = %s", (row[0], token))
            if cur.rowcount != 1:
                raise RuntimeError(f"ack of job {row[0]} by its own claim failed")
            done += 1
        yield {"start": t0, "end": mono(), "n": done}


def worker_holder(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    conn = _connect(spec)
    conn.execute("select pg_advisory_lock(%s)", (spec["key"],))
    yield {"ready": True}
    time.sleep(3600)  # held until SIGKILLed


def worker_waiter(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    conn = _connect(spec)
    backend = conn.execute("select pg_backend_pid()").fetchone()[0]
    yield {"ready": True, "backend": backend}
    while line := sys.stdin.readline().split():
        key = int(line[1])
        conn.execute("select pg_advisory_lock(%s)", (key,))
        if spec["lease"]:
            with conn.transaction():
                conn.execute("select term from lease where name = 'l' for update")
                conn.execute("update lease set term = term + 1, holder = %s, "
                             "renewed = clock_timestamp() where name = 'l'", (backend,))
        t = mono()
        conn.execute("select pg_advisory_unlock(%s)", (key,))
        yield {"held": t}


def worker_pong(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    conn = _connect(spec)
    conn.execute(f"listen {spec['ping']}")
    sender = _connect(spec)
    yield {"ready": True}
    for n in conn.notifies():
        if n.payload == "stop":
            break
        sender.execute("select pg_notify(%s, %s)", (spec["pong"], n.payload))


def _notes(conn: Any, heard: list[str], timeout: float) -> list[str]:
    """Wait on ``conn`` (which LISTENs) for notifications: their payloads, those its own
    statements already read (``heard``, kept by a notify handler) first."""
    import select

    pg = conn.pgconn
    out, heard[:] = list(heard), []
    while not out:
        pg.consume_input()
        while (n := pg.notifies()) is not None:
            out.append(n.extra.decode())
        if not out and not select.select([pg.socket], [], [], timeout)[0]:
            raise TimeoutError("no notification")
    return out


# The raw request→reply's writes: the delivery mark (the oldest request not yet delivered),
# then the reply, which deletes its request and carries itself in its NOTIFY. The request's
# and the mark's commits do not wait for the WAL flush, the reply's does: coord's modes.
RR_MARK = ("with m as (update rr_req set delivered = true where seq = (select seq from rr_req "
           "where not delivered order by seq limit 1) returning id, payload) "
           "select m.id, m.payload, set_config('synchronous_commit', 'off', true) from m")
RR_REPLY = ("with d as (delete from rr_req where id = %s returning id), "
            "i as (insert into rr_rep select id, %s from d returning id) "
            "select pg_notify(%s, %s) from i")
RR_REQUEST = ("with i as (insert into rr_req (id, payload) values (%s, %s) returning 1) "
              "select pg_notify(%s, ''), set_config('synchronous_commit', 'off', true) from i")


def _listening(spec: dict[str, Any], channel: str) -> tuple[Any, list[str]]:
    """A connection that LISTENs on ``channel`` (a name of ours: [a-z0-9_]), and the list
    its notify handler keeps what its own statements read of notifications in."""
    conn = _connect(spec)
    heard: list[str] = []
    conn.add_notify_handler(lambda n: heard.append(n.payload))
    conn.execute(f"listen {channel}")
    return conn, heard


def worker_answer(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    conn, heard = _listening(spec, spec["ping"])
    yield {"ready": True}
    while True:
        _notes(conn, heard, 60.0)
        while (row := conn.execute(RR_MARK).fetchone()) is not None:
            conn.execute(RR_REPLY, (row[0], row[1], spec["pong"], row[1])).fetchall()
            if row[1] == "stop":
                return


# The partition section's settings: the server ends a silent session after 1 s idle and two
# unanswered keepalive probes 1 s apart (or 1.5 s of unacknowledged data); the client gives
# up on unacknowledged data after 1.5 s.
SERVER_TIMEOUTS = {"tcp_keepalives_idle": 1, "tcp_keepalives_interval": 1,
                   "tcp_keepalives_count": 2, "tcp_user_timeout": 1500}
# The other way to end it: the server's own timer on an idle session, whatever TCP knows.
IDLE_TIMEOUT = {"idle_session_timeout": 2000}
CLIENT_TIMEOUTS = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1,
                   "keepalives_count": 2, "tcp_user_timeout": 1500}


def worker_partitioned(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    import psycopg

    conn = psycopg.connect(spec["url"], autocommit=True)
    for name, value in spec["settings"].items():
        conn.execute(f"set {name} = {int(value)}")  # names: the constants above
    conn.execute("select pg_advisory_lock(%s)", (spec["key"],))
    yield {"ready": True}
    sys.stdin.readline()  # sent just after the link is cut
    try:
        conn.execute("select 1")
        yield {"failed": None}
    except psycopg.Error as e:
        yield {"failed": mono(), "error": type(e).__name__}


WORKERS: dict[str, Callable[[dict[str, Any]], Iterator[dict[str, Any]]]] = {
    "tx": worker_tx, "consume": worker_consume, "holder": worker_holder,
    "waiter": worker_waiter, "pong": worker_pong, "answer": worker_answer,
    "partitioned": worker_partitioned,
}


def run_as_worker(role: str, spec_text: str) -> int:
    for answer in WORKERS[role](json.loads(spec_text)):
        print(json.dumps(answer), flush=True)
    return 0


class Worker:
    """A worker process, always ended by ``close`` (SIGKILL of its own pid if need be)."""

    def __init__(self, role: str, prefix: tuple[str, ...] = (), **spec: Any) -> None:
        self.role = role
        self.p = subprocess.Popen([*prefix, sys.executable, str(SCRIPT), "--worker", role,
                                   json.dumps(spec)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.ready = self.read()

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.role} exited ({self.p.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()

    def close(self) -> None:
        if self.p.poll() is None and self.p.stdin is not None:
            try:
                self.p.stdin.close()  # an empty line ends every command loop
                self.p.wait(timeout=10)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                pass
        self.kill()
        if self.p.stdout is not None:
            self.p.stdout.close()


@contextmanager
def workers(count: int, role: str, **spec: Any) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for i in range(count):
            started.append(Worker(role, client=i, **spec))
        yield started
    finally:
        for w in started:
            w.close()


def _parallel_round(ws: list[Worker]) -> float:
    for w in ws:
        w.send("go")
    answers = [w.read() for w in ws]
    total = sum(a["n"] for a in answers)
    return float(total / (max(a["end"] for a in answers) - min(a["start"] for a in answers)))


# -- sections ----------------------------------------------------------------------------


@dataclass
class Ctx:
    url: str
    schema: str
    size: dict[str, int]
    admin: Any  # a psycopg connection for setup and observation

    def spec(self) -> dict[str, Any]:
        return {"url": self.url, "schema": self.schema}


def section_transactions(ctx: Ctx) -> list[Row]:
    ctx.admin.execute("create table tx (id bigserial primary key, client int, i int, "
                      "at timestamptz default clock_timestamp())")
    rows = []
    for clients in (1, 4):
        row = Row("transactions", f"one-row INSERT ({clients} client{'s' * (clients > 1)})",
                  ctx.size["tx"] * clients)
        with workers(clients, "tx", n=ctx.size["tx"], **ctx.spec()) as ws:
            _parallel_round(ws)  # warm-up
            row.rates = [_parallel_round(ws) for _ in range(ctx.size["rounds"])]
        rows.append(row)
    return rows


def section_skip_locked(ctx: Ctx) -> list[Row]:
    ctx.admin.execute("create table jobs (id bigserial primary key, queue text not null, "
                      "state text not null default 'ready', token bigint, payload jsonb, "
                      "claimed_at timestamptz)")
    ctx.admin.execute("create index jobs_ready on jobs (queue, id) where state = 'ready'")

    def fill() -> None:
        with ctx.admin.cursor() as cur, cur.copy("copy jobs (queue, payload) from stdin") as cp:
            for i in range(ctx.size["jobs"]):
                cp.write_row(("q", json.dumps({"i": i})))
        ctx.admin.execute("analyze jobs")

    rows = []
    for consumers in (1, 4):
        row = Row("skip_locked", f"claim+ack ({consumers} consumer{'s' * (consumers > 1)})",
                  ctx.size["jobs"])
        with workers(consumers, "consume", **ctx.spec()) as ws:
            for r in range(ctx.size["rounds"] + 1):
                fill()
                rate = _parallel_round(ws)
                if r:  # round 0 warms up
                    row.rates.append(rate)
                left = ctx.admin.execute("select count(*) from jobs").fetchone()[0]
                if left:
                    raise RuntimeError(f"{left} jobs left after the consumers drained the queue")
                ctx.admin.execute("vacuum jobs")  # untimed: each round starts from a clean table
        rows.append(row)
    return rows


def _wait_blocked(admin: Any, backend: int, timeout: float = 10.0) -> None:
    deadline = mono() + timeout
    while mono() < deadline:
        got = admin.execute("select wait_event_type from pg_stat_activity where pid = %s",
                                (backend,)).fetchone()
        if got is not None and got[0] == "Lock":
            return
        time.sleep(0.002)
    raise RuntimeError(f"the waiter's backend {backend} never waited for the lock")


def _handover(ctx: Ctx, lease: bool) -> Row:
    name = "advisory lock + lease term bump" if lease else "advisory lock"
    row = Row("advisory_handover", f"SIGKILL holder -> waiter holds ({name})",
              ctx.size["handovers"])
    base_key = random.getrandbits(62)
    with workers(1, "waiter", lease=lease, **ctx.spec()) as (waiter,):
        for trial in range(ctx.size["handovers"] + 1):
            key = base_key + trial
            holder = Worker("holder", key=key, **ctx.spec())
            try:
                waiter.send(f"wait {key}")
                _wait_blocked(ctx.admin, waiter.ready["backend"])
                t0 = mono()
                os.kill(holder.p.pid, signal.SIGKILL)
                held = waiter.read()["held"]
            finally:
                holder.close()
            if trial:  # trial 0 warms up
                row.latencies_us.append((held - t0) * 1e6)
    return row


def section_advisory_handover(ctx: Ctx) -> list[Row]:
    ctx.admin.execute("create table lease (name text primary key, term bigint not null, "
                      "holder int, renewed timestamptz)")
    ctx.admin.execute("insert into lease values ('l', 1, null, clock_timestamp())")
    return [_handover(ctx, lease=False), _handover(ctx, lease=True)]


def section_notify(ctx: Ctx) -> list[Row]:
    import psycopg

    tag = ctx.schema.replace("coord_bench_", "")
    ping, pong = f"coord_bench_ping_{tag}", f"coord_bench_pong_{tag}"
    row = Row("notify", "NOTIFY round trip (2 processes)", ctx.size["notifies"])
    listener = psycopg.connect(ctx.url, autocommit=True)
    try:
        listener.execute(f"listen {pong}")
        with workers(1, "pong", ping=ping, pong=pong, **ctx.spec()):
            warm = max(5, ctx.size["notifies"] // 10)
            for i in range(warm + ctx.size["notifies"]):
                t0 = mono()
                ctx.admin.execute("select pg_notify(%s, %s)", (ping, str(i)))
                got = [n.payload for n in listener.notifies(timeout=10.0, stop_after=1)]
                t1 = mono()
                if got != [str(i)]:
                    raise RuntimeError(f"round trip {i}: got {got}")
                if i >= warm:
                    row.latencies_us.append((t1 - t0) * 1e6)
            ctx.admin.execute("select pg_notify(%s, 'stop')", (ping,))
    finally:
        listener.close()
    return [row, request_reply(ctx)]


def request_reply(ctx: Ctx) -> Row:
    """The raw request→reply (see the module's section 4): µs from the request's send until
    its reply is heard, over ``notifies`` round trips after a warm-up."""
    tag = ctx.schema.replace("coord_bench_", "")
    ping, pong = f"coord_bench_rq_{tag}", f"coord_bench_rp_{tag}"
    ctx.admin.execute("create table rr_req (seq bigint generated always as identity primary "
                      "key, id text unique not null, payload text not null, delivered "
                      "boolean not null default false)")
    ctx.admin.execute("create table rr_rep (id text primary key, payload text not null)")
    row = Row("notify", "request→reply, coord's three writes (2 processes)",
              ctx.size["notifies"])
    conn, heard = _listening(ctx.spec(), pong)
    try:
        with workers(1, "answer", ping=ping, pong=pong, **ctx.spec()):
            warm = max(5, ctx.size["notifies"] // 10)
            for i in range(warm + ctx.size["notifies"] + 1):
                last = i == warm + ctx.size["notifies"]
                text = "stop" if last else str(i)
                t0 = mono()
                conn.execute(RR_REQUEST, (f"r{i}", text, ping)).fetchall()
                got = _notes(conn, heard, 10.0)
                t1 = mono()
                if got != [text]:
                    raise RuntimeError(f"request {i}: heard {got}")
                if warm <= i and not last:
                    row.latencies_us.append((t1 - t0) * 1e6)
                # The requester deletes the reply it took (coord folds that into its next
                # write): not timed.
                conn.execute("delete from rr_rep where id = %s", (f"r{i}",))
    finally:
        conn.close()
    return row


def section_partition(ctx: Ctx) -> list[Row]:
    """A host's link is cut silently (tests/multihost/netns.py): how long until the server
    frees the cut session's advisory lock to a waiter, and until the cut client's own query
    fails. Uses a server of its own, inside the harness's namespaces (needs root)."""
    import psycopg

    sys.path.insert(0, str(ROOT / "tests" / "multihost"))
    from netns import Net

    trials = max(2, ctx.size["handovers"] // 4)
    variants = [(SERVER_TIMEOUTS, "keepalives 1 s + 1 s x 2, user timeout 1.5 s"),
                (IDLE_TIMEOUT, "idle_session_timeout 2 s alone")]
    rows = [Row("partition", f"cut -> a waiter holds the cut session's lock ({name})", trials)
            for _, name in variants]
    failed = Row("partition", "cut -> the cut client's query fails (tcp_user_timeout 1.5 s)",
                 trials * len(variants))
    with Net(hosts=1) as net:
        host = net.hosts[0]
        admin = psycopg.connect(net.admin_url, autocommit=True)
        try:
            with workers(1, "waiter", lease=False, url=net.admin_url, schema="public") as (w,):
                for _ in range(trials):
                    for (settings, _), freed in zip(variants, rows, strict=True):
                        key = random.getrandbits(62)
                        holder = Worker("partitioned", prefix=("ip", "netns", "exec", host.ns),
                                        url=net.url(host, **CLIENT_TIMEOUTS), key=key,
                                        settings=settings)
                        try:
                            w.send(f"wait {key}")
                            _wait_blocked(admin, w.ready["backend"])
                            t0 = mono()
                            net.cut(host)
                            holder.send("go")
                            freed.latencies_us.append((w.read()["held"] - t0) * 1e6)
                            answer = holder.read()
                            if answer["failed"] is None:
                                raise RuntimeError("a query over a cut link succeeded")
                            failed.latencies_us.append((answer["failed"] - t0) * 1e6)
                        finally:
                            holder.close()
                            net.heal(host)
        finally:
            admin.close()
    return [*rows, failed]


def section_import(ctx: Ctx) -> list[Row]:
    """Cold start cost of the driver: ``python -c "import psycopg"`` beside ``python -c pass``
    (a PostgreSQL URL pays the difference at start-up; SQLite users never do)."""
    n = max(3, ctx.size["rounds"] * 2)
    rows = []
    for work, code in (("python -c pass", "pass"), ('python -c "import psycopg"',
                                                     "import psycopg")):
        row = Row("import", work, n)
        for i in range(n + 1):
            t0 = mono()
            subprocess.run([sys.executable, "-c", code], check=True)
            if i:  # the first run warms the page cache
                row.latencies_us.append((mono() - t0) * 1e6)
        rows.append(row)
    return rows


SECTION_FNS: dict[str, Callable[[Ctx], list[Row]]] = {
    "transactions": section_transactions, "skip_locked": section_skip_locked,
    "advisory_handover": section_advisory_handover, "notify": section_notify,
    "import": section_import, "partition": section_partition,
}


# -- the run -----------------------------------------------------------------------------


def run_facts(admin: Any, size: str, where: str) -> dict[str, Any]:
    import psycopg

    def setting(name: str) -> str:
        return str(admin.execute("select current_setting(%s)", (name,)).fetchone()[0])

    return {
        "size": size, "server": where, "python": platform.python_version(),
        "psycopg": psycopg.__version__, "libpq": psycopg.pq.version(),
        "psycopg_impl": psycopg.pq.__impl__, "server_version": setting("server_version"),
        "synchronous_commit": setting("synchronous_commit"), "fsync": setting("fsync"),
        "cpus": os.cpu_count(), "kernel": platform.release(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def print_table(results: dict[str, list[Row]], run: dict[str, Any]) -> None:
    print(f"PostgreSQL {run['server_version']} ({run['server']}) · psycopg {run['psycopg']} "
          f"({run['psycopg_impl']}, libpq {run['libpq']}) · Python {run['python']} · "
          f"{run['cpus']} CPUs · Linux {run['kernel']} · synchronous_commit="
          f"{run['synchronous_commit']} fsync={run['fsync']} · load {run['load_avg']} · "
          f"{run['size']} run, {run['seconds']} s")
    for section, rows in results.items():
        print(f"\n== {section} ==")
        print(f"{'WORK':78} {'N':>6} {'OPS/S':>9} {'P50 ms':>9} {'P99 ms':>9}")
        for r in rows:
            d = r.as_dict()
            if r.error:
                print(f"{r.work:78} {r.n:>6} FAILED: {r.error}")
                continue
            ops = f"{d['ops_per_s']:.0f}" if d["ops_per_s"] is not None else "-"
            p50 = f"{d['p50_us'] / 1000:.2f}" if d["p50_us"] is not None else "-"
            p99 = f"{d['p99_us'] / 1000:.2f}" if d["p99_us"] is not None else "-"
            print(f"{r.work:78} {r.n:>6} {ops:>9} {p50:>9} {p99:>9}")


@contextmanager
def server(url: str | None) -> Iterator[tuple[str, str]]:
    """The URL to measure, and what it is: the given one, or a private cluster's."""
    if url:
        yield url, "given server"
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from pgcluster import new_cluster

    cluster = new_cluster(prefix="coord-bench-pg-")
    try:
        yield cluster.url(), "private cluster, unix socket"
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--db", help="a postgresql:// URL (default: $COORD_TEST_PG, else a private "
                                 "cluster started for the run)")
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--tiny", action="store_true", help="the smallest sizes (smoke test)")
    ap.add_argument("--json", action="store_true", help="one JSON object per section, per line")
    ap.add_argument("--json-out", metavar="PATH", help="also write the JSON lines to PATH")
    ap.add_argument("--only", metavar="SECTIONS",
                    help="comma-separated: " + ",".join([*SECTIONS, "partition"]))
    ap.add_argument("--netns", action="store_true",
                    help="also run the partition section (root: network namespaces, and a "
                         "server of its own inside them)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_as_worker(*args.worker)
    wanted = [*SECTIONS, "partition"] if args.netns else SECTIONS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(wanted) - set(SECTION_FNS)
        if unknown:
            ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
        if "partition" in wanted and not args.netns:
            ap.error("the partition section needs --netns")
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    import psycopg

    schema = f"coord_bench_{os.getpid()}_{secrets.token_hex(3)}"
    started = mono()
    results: dict[str, list[Row]] = {}
    with server(args.db or os.environ.get("COORD_TEST_PG")) as (url, where):
        admin = psycopg.connect(url, autocommit=True)
        try:
            admin.execute(f"create schema {schema}")
            admin.execute(f"set search_path to {schema}")
            run = run_facts(admin, size, where)
            ctx = Ctx(url, schema, SIZES[size], admin)
            for name in wanted:
                t = mono()
                try:
                    results[name] = SECTION_FNS[name](ctx)
                except Exception as e:  # one section's failure is reported, the rest run
                    results[name] = [Row(name, "(section)", 0, error=f"{type(e).__name__}: {e}")]
                print(f"{name}: {mono() - t:.1f} s", file=sys.stderr)
        finally:
            admin.execute(f"drop schema if exists {schema} cascade")
            admin.close()
    run["seconds"] = round(mono() - started, 1)
    lines = [json.dumps({"section": name, "run": run, "rows": [r.as_dict() for r in rows]})
             for name, rows in results.items()]
    if args.json_out:
        Path(args.json_out).write_text("\n".join(lines) + "\n")
    if args.json:
        print("\n".join(lines))
    else:
        print_table(results, run)
    failed = any(r.error for rows in results.values() for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    with suppress(BrokenPipeError):
        sys.exit(main())
