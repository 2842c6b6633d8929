"""What every section of the benchmark uses: a measured row (``Result``), the run's sizes and
context, interleaved timing, and the worker processes (this script run with ``--worker``)."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import apsw


# coord and apsw are imported where they are used: the worker processes of the peers and of
# the plain references start without them (a spawn costs less, and measures only the peer).


#: The benchmark's script: every worker process is it, run with --worker.
SCRIPT = Path(__file__).resolve().parent.parent / "bench.py"


#: How often an implementation without a cross-process wait polls (seconds).
POLL = 0.001


def mono() -> float:
    """CLOCK_MONOTONIC: one clock for every process of this boot (latencies across processes)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass
class Result:
    """One measured row: ``work`` done by ``impl``; latencies in microseconds.

    Throughput rows carry ``rates`` (ops/s of each round; the figure is their median);
    latency rows carry ``latencies_us`` (the figure is their p50). ``coord`` marks coord's
    own row of a work: every other row of that work is a reference, and coord's ratio to it
    is coord's figure divided by the reference's (ops/s: above 1 is faster; p50: below 1 is
    faster)."""

    section: str
    work: str
    impl: str
    n: int
    seconds: float
    latencies_us: list[float] = field(default_factory=list, repr=False)
    limit: bool = False  # the floor (or ceiling) of this work
    note: str = ""
    rates: list[float] = field(default_factory=list)
    coord: bool = False
    error: str | None = None
    per_op: bool = False  # latencies of back-to-back operations: n / seconds is a throughput

    @property
    def metric(self) -> str:
        return "ops/s" if self.rates else "p50_us"

    @property
    def ops_per_s(self) -> float | None:
        if self.error is not None:
            return None
        if self.rates:
            return statistics.median(self.rates)
        return self.n / self.seconds if self.per_op and self.seconds else None

    def pct(self, q: float) -> float | None:
        if not self.latencies_us:
            return None
        xs = sorted(self.latencies_us)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def figure(self) -> float | None:
        if self.error is not None:
            return None
        return self.ops_per_s if self.rates else self.pct(0.50)

    def summary(self, ours: Result | None) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("latencies_us", "rates")}
        d.update(
            metric=self.metric,
            rounds=len(self.rates) or None,
            ops_per_s=round1(self.ops_per_s),
            p50_us=round1(self.pct(0.50)),
            p90_us=round1(self.pct(0.90)),
            p99_us=round1(self.pct(0.99)),
            coord_ratio=None if ours is None or ours is self else self.ratio(ours),
        )
        return d

    def ratio(self, ours: Result) -> float | None:
        """coord's figure divided by this row's. Throughput rows measured in the same rounds
        (as many rates each) give the median of the per-round ratios: a slow spell of the
        machine then weighs on both sides of each ratio alike."""
        if self.error is not None or ours.error is not None:
            return None
        if len(self.rates) == len(ours.rates) > 1 and all(self.rates):
            return round(statistics.median(a / b for a, b in zip(ours.rates, self.rates,
                                                                   strict=True)), 3)
        a, b = ours.figure(), self.figure()
        if a is None or not b:
            return None
        return round(a / b, 3)


def round1(x: float | None) -> float | None:
    """``x`` to one decimal (None stays None)."""
    return None if x is None else round(x, 1)


@dataclass(frozen=True)
class Sizes:
    tx: int  # one-row transactions per impl
    jobs: int  # jobs per queue round
    rounds: int
    warmup: int  # untimed jobs first
    timebox: float  # seconds a queue phase may run before it stops (noted when it does)
    budget: float  # seconds an impl may spend on one queue work before skipping rounds
    fan_jobs: int
    lat_jobs: int  # jobs timed at the paced rate
    lat_warmup: int
    rtt: int  # request/reply round trips timed per impl
    rtt_warmup: int
    kills: int  # failover trials per impl
    ttl_kills: int  # trials for the TTL lease row (each takes ~2 s)
    reg_sizes: tuple[int, ...]
    reg_rounds: int
    cli_runs: int


SIZES = {
    "full": Sizes(tx=5000, jobs=10_000, rounds=5, warmup=200, timebox=30.0, budget=40.0,
                  fan_jobs=5000, lat_jobs=1000, lat_warmup=100, rtt=2000, rtt_warmup=200,
                  kills=30, ttl_kills=10, reg_sizes=(10, 1000, 10_000), reg_rounds=3,
                  cli_runs=10),
    "quick": Sizes(tx=500, jobs=1000, rounds=3, warmup=50, timebox=2.5, budget=6.0,
                   fan_jobs=400, lat_jobs=100, lat_warmup=20, rtt=300, rtt_warmup=50,
                   kills=8, ttl_kills=2, reg_sizes=(10, 1000), reg_rounds=3, cli_runs=3),
    "tiny": Sizes(tx=50, jobs=40, rounds=1, warmup=5, timebox=2.0, budget=0.0,
                  fan_jobs=40, lat_jobs=10, lat_warmup=2, rtt=10, rtt_warmup=2,
                  kills=2, ttl_kills=1, reg_sizes=(10, 50), reg_rounds=1, cli_runs=1),
}


@dataclass
class Context:
    quick: bool
    base: Path
    size: str = "full"
    depths: tuple[int, ...] = ()  # --size: put and claim+ack at each of these depths

    @property
    def sizes(self) -> Sizes:
        return SIZES[self.size]

    def fresh_dir(self, name: str) -> Path:
        d = self.base / name
        d.mkdir(mode=0o700)
        return d

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def interleaved(n: int, ops: list[Callable[[int], object]], rounds: int = 10
                ) -> list[tuple[float, list[float]]]:
    """Run each op n times, in alternating rounds so that a busy moment of the machine falls
    on all of them alike; (total seconds, latencies in µs) per op."""
    clock = time.perf_counter
    totals = [0.0] * len(ops)
    lats: list[list[float]] = [[] for _ in ops]
    per_round = max(1, n // rounds)
    done = 0
    while done < n:
        k = min(per_round, n - done)
        for j, op in enumerate(ops):
            lat = lats[j]
            start = clock()
            for i in range(done, done + k):
                t = clock()
                op(i)
                lat.append((clock() - t) * 1e6)
            totals[j] += clock() - start
        done += k
    return list(zip(totals, lats, strict=True))


# -- worker processes ------------------------------------------------------------------------
# Every process a section needs is this script run with --worker '{"role": ..., ...}': it
# prints progress lines, then its result as one JSON line last.


class WorkerFailed(RuntimeError):
    pass


def worker_env() -> dict[str, str]:
    """The environment of a worker process: no COORD_* settings of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def start_worker(role: str, **spec: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--worker", json.dumps({"role": role, **spec})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=worker_env(),
    )


def wait_line(p: subprocess.Popen[str], word: str, timeout: float = 60.0) -> str:
    """Read the worker's stdout until a line starting with ``word``: byte by byte from the
    descriptor, so that nothing after that line is buffered here (finish() reads the rest)."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    line = b""
    try:
        while True:
            if not sel.select(max(0.0, end - time.monotonic())):
                raise WorkerFailed(f"worker {p.pid}: no {word!r} line within {timeout:.0f} s")
            ch = os.read(fd, 1)
            if not ch:
                raise WorkerFailed(f"worker {p.pid} exited before {word!r}: {stderr_tail(p)}")
            if ch != b"\n":
                line += ch
                continue
            text, line = line.decode(), b""
            if text.startswith(word):
                return text
    finally:
        sel.close()


def stderr_tail(p: subprocess.Popen[str]) -> str:
    """The last line a failed worker wrote to stderr (or its exit status)."""
    with contextlib.suppress(Exception):
        p.wait(timeout=5)
    err = p.stderr.read() if p.stderr is not None else ""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"status {p.returncode}"


def finish(p: subprocess.Popen[str], timeout: float = 300.0) -> dict[str, Any]:
    """Wait for a worker; its last stdout line is the result."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_worker(p)
        raise WorkerFailed(f"worker {p.pid} took longer than {timeout:.0f} s") from None
    lines = out.strip().splitlines()
    if p.returncode != 0 or not lines:
        tail = [x for x in err.strip().splitlines() if x.strip()]
        raise WorkerFailed(tail[-1] if tail else f"worker exited with status {p.returncode}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_worker(role: str, timeout: float = 300.0, **spec: Any) -> dict[str, Any]:
    return finish(start_worker(role, **spec), timeout)


def stop_worker(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    with contextlib.suppress(Exception):
        p.communicate(timeout=10)


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {}


def worker(fn: Callable[[dict[str, Any]], dict[str, Any] | None]
           ) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    WORKERS[fn.__name__.removeprefix("w_")] = fn
    return fn


def run_as_worker(spec_text: str) -> int:
    spec = json.loads(spec_text)
    result = WORKERS[spec.pop("role")](spec)
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


def raw_connection(path: Path | str) -> apsw.Connection:
    """A raw apsw connection with coord's own settings (WAL, synchronous=NORMAL ...)."""
    import apsw

    from coord.backend.sqlite.connection import CONNECTION_PRAGMAS
    conn = apsw.Connection(str(path))
    conn.set_busy_timeout(5000)
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    for name, value in CONNECTION_PRAGMAS:
        conn.execute(f"PRAGMA {name}={value}").fetchall()
    return conn


def rotate(xs: list[str], r: int) -> list[str]:
    """``xs`` rotated by ``r``: who goes first in round ``r``."""
    r %= len(xs)
    return xs[r:] + xs[:r]


def slug(s: str) -> str:
    """``s`` as a file name: every character but letters and digits becomes ``-``."""
    return "".join(ch if ch.isalnum() else "-" for ch in s)

