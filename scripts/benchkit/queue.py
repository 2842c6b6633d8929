"""Section 2: queues. put by one producer process, claim+ack by one consumer process (also in
batches), 1 producer with 4 consumers, and latency at a paced 200 jobs/s, for every
implementation in ``peers``."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .harness import (
    Context,
    Result,
    WorkerFailed,
    finish,
    mono,
    rotate,
    run_worker,
    slug,
    start_worker,
    stop_worker,
    wait_line,
    worker,
)
from .peers import LIMIT_QUEUE, QUEUE_IMPLS, RAW_SCHEMA, TRIO, QueueImpl, job_payload


@worker
def w_q_put(spec: dict[str, Any]) -> dict[str, Any]:
    """Put warmup + n jobs (paced at ``rate`` per second if given), then ``stops`` sentinels."""
    q = QUEUE_IMPLS[spec["impl"]](Path(spec["dir"]), consumer=False)
    warmup, n, rate = spec["warmup"], spec["n"], spec.get("rate")
    paced = rate is not None
    interval = 1.0 / rate if paced else 0.0
    nxt = mono()
    start = t0 = mono()
    done = 0
    for i in range(warmup + n):
        if i == warmup:
            t0 = mono()
            deadline = t0 + spec["timebox"]
        if paced:
            nxt += interval
            delay = nxt - mono()
            if delay > 0:
                time.sleep(delay)
        q.put(job_payload(i, mono() if paced else None, warm=i < warmup))
        if i >= warmup:
            done += 1
            if mono() > deadline:
                break
    seconds = mono() - t0
    for _ in range(spec.get("stops", 0)):
        q.put({"stop": True})
    q.close()
    return {"n": done, "seconds": seconds, "start": start}


def _consume(q: QueueImpl, spec: dict[str, Any], out: dict[str, Any], lock: threading.Lock
             ) -> None:
    """Claim and ack until ``expect`` jobs (drain) or a sentinel; time from the first job
    after the warm-up."""
    expect, warmup = spec.get("expect"), spec.get("warmup", 0)
    give_up = mono() + spec["timebox"] + spec.get("patience", 60.0)
    while mono() < give_up:
        with lock:
            if out["stopped"] or (expect is not None and out["claimed"] >= expect):
                return
        got = q.claim(min(1.0, max(0.0, give_up - mono())))
        if got is None:
            continue
        now = mono()
        payload, handle = got
        if isinstance(payload, dict) and payload.get("stop"):
            q.ack(handle)
            with lock:
                out["stopped"] = True
            return
        q.ack(handle)
        end = mono()
        with lock:
            out["claimed"] += 1
            out["ids"].append(payload["n"])
            if "t" in payload and not payload.get("w"):
                out["latencies_us"].append((now - payload["t"]) * 1e6)
            if expect is not None and out["claimed"] == warmup + 1:
                out["t0"], out["t0_count"] = now, warmup
            if out["first"] is None:
                out["first"] = now
            out["last"] = end
            if out["t0"] is not None and end - out["t0"] > spec["timebox"]:
                out["boxed"] = True
                out["stopped"] = True


def _consume_batches(q: QueueImpl, spec: dict[str, Any], out: dict[str, Any]) -> None:
    """Drain ``expect`` jobs, ``batch`` at a time: claim a batch, ack it in one call; time
    from the first batch after the warm-up."""
    expect, warmup, size = spec["expect"], spec.get("warmup", 0), spec["batch"]
    give_up = mono() + spec["timebox"] + spec.get("patience", 60.0)
    while mono() < give_up and out["claimed"] < expect:
        got = q.claim_batch(size, min(1.0, max(0.0, give_up - mono())))
        if not got:
            continue
        now = mono()
        q.ack_batch([h for _, h in got])
        if out["t0"] is None and out["claimed"] >= warmup:
            out["t0"], out["t0_count"] = now, out["claimed"]
        out["claimed"] += len(got)
        out["ids"].extend(p["n"] for p, _ in got)
        out["last"] = mono()
        if out["t0"] is not None and out["last"] - out["t0"] > spec["timebox"]:
            out["boxed"] = True
            return


@worker
def w_q_consume(spec: dict[str, Any]) -> dict[str, Any]:
    q = QUEUE_IMPLS[spec["impl"]](Path(spec["dir"]), consumer=True)
    out: dict[str, Any] = {"claimed": 0, "ids": [], "latencies_us": [], "t0": None,
                           "first": None, "last": None, "stopped": False, "boxed": False}
    lock = threading.Lock()
    print("ready", flush=True)
    threads = [threading.Thread(target=_consume, args=(q, spec, out, lock))
               for _ in range(spec.get("threads", 1))]
    if spec.get("batch"):
        threads = [threading.Thread(target=_consume_batches, args=(q, spec, out))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.close()
    if spec.get("expect") is not None:  # drain: the rate after the warm-up
        timed = out["claimed"] - out.get("t0_count", spec.get("warmup", 0))
        out["n"] = max(0, timed)
        out["seconds"] = (out["last"] - out["t0"]) if out["t0"] is not None else 0.0
    if not spec.get("want_ids"):
        out["ids"] = []
    return out


def _setup_queue(impl: str, d: Path) -> None:
    QUEUE_IMPLS[impl].setup(d)


def _in_turn(impls: list[str], r: int) -> list[str]:
    """The order of round ``r``: coord and the two raw references back to back (rotated, so
    each goes first in turn) so that their per-round ratios see the same moment of the
    machine; then the others, rotated."""
    trio = [i for i in TRIO if i in impls]
    return rotate(trio, r) + rotate([i for i in impls if i not in trio], r)


def _jobs_label(work: str, jobs: int | None) -> str:
    return work if jobs is None else f"{work[:-1]}, {jobs:_} jobs)".replace("_", " ")


def queue_put_claim(ctx: Context, impls: list[str], jobs: int | None = None) -> list[Result]:
    """put by one producer process, then claim+ack by one consumer process, per round
    (``jobs`` per round: the depth the consumer starts at; default the size's)."""
    s = ctx.sizes
    n_jobs = s.jobs if jobs is None else jobs
    put: dict[str, list[tuple[int, float]]] = {i: [] for i in impls}
    take: dict[str, list[tuple[int, float]]] = {i: [] for i in impls}
    spent = dict.fromkeys(impls, 0.0)
    errors: dict[str, str] = {}
    boxed: dict[str, set[str]] = {i: set() for i in impls}
    stopped: set[str] = set()
    for r in range(s.rounds):
        for impl in _in_turn(impls, r):
            # a slow peer stops when one more round would overrun its budget (coord and the
            # raw references always run every round: their ratios are per round)
            if r > 0 and impl not in TRIO and spent[impl] * (r + 1) / r > s.budget:
                stopped.add(impl)
            if impl in errors or impl in stopped:
                continue
            began = time.monotonic()
            d = ctx.fresh_dir(f"pc-{n_jobs}-{slug(impl)}-{r}")
            try:
                _setup_queue(impl, d)
                p = run_worker("q_put", impl=impl, dir=str(d), n=n_jobs, warmup=s.warmup,
                               timebox=s.timebox)
                if p["n"] < n_jobs:
                    boxed[impl].add("put")
                put[impl].append((p["n"], p["seconds"]))
                c = run_worker("q_consume", impl=impl, dir=str(d), expect=p["n"] + s.warmup,
                               warmup=s.warmup, timebox=s.timebox)
                if c["boxed"]:
                    boxed[impl].add("claim")
                take[impl].append((c["n"], c["seconds"]))
            except WorkerFailed as e:
                errors[impl] = str(e)
            spent[impl] += time.monotonic() - began
    out = []
    for work, data, part in ((_jobs_label("put (1 producer)", jobs), put, "put"),
                             (_jobs_label("claim+ack (1 consumer)", jobs), take, "claim")):
        for impl in impls:
            rows = data[impl]
            note = _queue_note(impl)
            if part in boxed[impl]:
                note = _join(note, f"time-boxed at {s.timebox:.0f} s: {min(n for n, _ in rows)}"
                             f" of {n_jobs} jobs")
            if rows and len(rows) < s.rounds:
                note = _join(note, f"{len(rows)} of {s.rounds} rounds (slow: time budget)")
            out.append(_rate_result("queue", work, impl, rows, note, errors.get(impl)))
    return out


def _rate_result(section: str, work: str, impl: str, rows: list[tuple[int, float]], note: str,
                 error: str | None) -> Result:
    rates = [n / sec for n, sec in rows if sec > 0]
    if not rates and error is None:
        error = "no round completed"
    return Result(section, work, impl, rows[0][0] if rows else 0, sum(x for _, x in rows),
                  rates=rates, limit=impl == LIMIT_QUEUE, coord=impl == "coord", note=note,
                  error=error)


def _queue_note(impl: str) -> str:
    return {
        "coord": "claim with a lease and a token, ack by token in the next claim's "
                 "transaction",
        LIMIT_QUEUE: "one table, no index: UPDATE … RETURNING, DELETE; waits by 1 ms polls",
        RAW_SCHEMA: "coord's schema and statements, no checks, no Python around them; "
                    "waits by 1 ms polls",
        "persist-queue": "SQLiteAckQueue(multithreading=True), synchronous=FULL (its default)",
        "litequeue": "WAL, synchronous=NORMAL (its default)",
        "huey (no ack)": "SqliteStorage: a claim deletes the job (no lease, no ack)",
        "file-per-job dir": "tmp + rename; claim by rename; ack by unlink; no fsync",
    }.get(impl, "")


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def queue_fanout(ctx: Context, impls: list[str]) -> list[Result]:
    """1 producer and 4 consumer processes at once: jobs/s from the first put to the last ack.
    coord and the raw references run in every round (back to back, rotated); the others in
    the first. persist-queue is also run as 4 consumer threads in one process (what it
    supports)."""
    s = ctx.sizes
    rates: dict[str, list[tuple[int, float]]] = {}
    notes: dict[str, dict[str, None]] = {}
    errors: dict[str, str] = {}
    for r in range(s.rounds):
        order = _in_turn(impls, r)
        runs: list[tuple[str, str, int, int]] = [(i, i, 4, 1) for i in order
                                                 if r == 0 or i in TRIO]
        if r == 0 and "persist-queue" in impls:
            runs.append(("persist-queue", "persist-queue (4 threads)", 1, 4))
        for impl, label, procs, threads in runs:
            if label in errors:
                continue
            got = _fanout_round(ctx, impl, label, procs, threads, r)
            if isinstance(got, str):
                errors[label] = got
                continue
            rates.setdefault(label, []).append(got[0])
            notes.setdefault(label, {})[got[1]] = None  # distinct notes, in order
    labels = [x for x in dict.fromkeys([*impls, *rates, *errors]) if x in rates or x in errors]
    return [_rate_result("queue", "1 producer + 4 consumers", label, rates.get(label, []),
                         "; ".join(notes.get(label, {})), errors.get(label)) for label in labels]


def _fanout_round(ctx: Context, impl: str, label: str, procs: int, threads: int, r: int
                  ) -> tuple[tuple[int, float], str] | str:
    """One 1-producer, 4-consumer run: ((jobs, seconds), note), or the error text."""
    s = ctx.sizes
    d = ctx.fresh_dir(f"fan-{slug(label)}-{r}")
    consumers: list[subprocess.Popen[str]] = []
    try:
        _setup_queue(impl, d)
        consumers = [start_worker("q_consume", impl=impl, dir=str(d), threads=threads,
                                  timebox=s.timebox, want_ids=True, patience=30.0)
                     for _ in range(procs)]
        for c in consumers:
            wait_line(c, "ready")
        p = run_worker("q_put", impl=impl, dir=str(d), n=s.fan_jobs, warmup=0,
                       timebox=s.timebox, stops=procs * threads)
        got = [finish(c) for c in consumers]
        ids = [i for g in got for i in g["ids"]]
        last = max((g["last"] for g in got if g["last"] is not None), default=None)
        seconds = (last - p["start"]) if last is not None else 0.0
        unique = len(set(ids))
        note = f"{procs} processes" if procs > 1 else f"{threads} threads in 1 process"
        if len(ids) != unique:
            note = _join(note, f"UNSAFE: {len(ids) - unique} of {unique} jobs delivered "
                               "twice")
        if unique < p["n"]:
            note = _join(note, f"{p['n'] - unique} jobs never claimed")
        if any(g["boxed"] for g in got) or p["n"] < s.fan_jobs:
            note = _join(note, f"time-boxed at {s.timebox:.0f} s")
        return (unique, seconds), note
    except WorkerFailed as e:
        return str(e)
    finally:
        for c in consumers:
            stop_worker(c)


def queue_latency(ctx: Context, impls: list[str]) -> list[Result]:
    """One producer paced at 200 jobs/s, one waiting consumer: put → claimed, per job."""
    s = ctx.sizes
    out = []
    for impl in impls:
        d = ctx.fresh_dir(f"lat-{slug(impl)}")
        c = None
        try:
            _setup_queue(impl, d)
            c = start_worker("q_consume", impl=impl, dir=str(d), timebox=60.0, patience=30.0)
            wait_line(c, "ready")
            run_worker("q_put", impl=impl, dir=str(d), n=s.lat_jobs, warmup=s.lat_warmup,
                       rate=200.0, timebox=60.0, stops=1)
            got = finish(c)
            lat = got["latencies_us"]
            wait = "claim(timeout=) wakes on a nudge" if QUEUE_IMPLS[impl].native_wait else \
                "polls every 1 ms when empty"
            if impl == "huey (no ack)":
                wait += " (huey's own consumer polls every 0.1 s, backing off)"
            if impl == "persist-queue":
                wait += " (its blocking get() waits on an in-process event: up to 10 s " \
                        "across processes)"
            out.append(Result("queue", "latency at 200 jobs/s", impl, len(lat),
                              sum(lat) / 1e6, lat, limit=impl == LIMIT_QUEUE,
                              coord=impl == "coord", note=wait,
                              error=None if lat else "no job arrived"))
        except WorkerFailed as e:
            out.append(Result("queue", "latency at 200 jobs/s", impl, 0, 0.0, error=str(e),
                              coord=impl == "coord", limit=impl == LIMIT_QUEUE))
        finally:
            if c is not None:
                stop_worker(c)
    return out


#: Who claims and acks in batches (claim_many/ack_many; one UPDATE … LIMIT n and one
#: executemany of DELETEs for the minimal queue), and how many jobs a batch takes.
BATCH_IMPLS = ("coord", LIMIT_QUEUE)
BATCH = 10


def queue_batches(ctx: Context) -> list[Result]:
    """One consumer draining the queue BATCH jobs at a time: claim a batch in one
    transaction, ack it in one; coord and the minimal queue back to back in every round."""
    s = ctx.sizes
    work = f"claim+ack, batches of {BATCH} (1 consumer)"
    rows: dict[str, list[tuple[int, float]]] = {i: [] for i in BATCH_IMPLS}
    errors: dict[str, str] = {}
    for r in range(s.rounds):
        for impl in rotate(list(BATCH_IMPLS), r):
            if impl in errors:
                continue
            d = ctx.fresh_dir(f"batch-{slug(impl)}-{r}")
            try:
                _setup_queue(impl, d)
                p = run_worker("q_put", impl=impl, dir=str(d), n=s.jobs, warmup=s.warmup,
                               timebox=s.timebox)
                c = run_worker("q_consume", impl=impl, dir=str(d), expect=p["n"] + s.warmup,
                               warmup=s.warmup, timebox=s.timebox, batch=BATCH)
                rows[impl].append((c["n"], c["seconds"]))
            except WorkerFailed as e:
                errors[impl] = str(e)
    note = {"coord": f"claim_many({BATCH}), ack_many: one transaction each",
            LIMIT_QUEUE: f"UPDATE … LIMIT {BATCH} RETURNING; DELETEs in one transaction"}
    return [_rate_result("queue", work, impl, rows[impl], note[impl], errors.get(impl))
            for impl in BATCH_IMPLS]


#: ``--size`` without a value: the depths put and claim+ack run at.
DEPTHS = (1000, 10_000, 100_000)


def section_queue(ctx: Context) -> list[Result]:
    impls = list(QUEUE_IMPLS)
    depths: list[int | None] = list(ctx.depths) if ctx.depths else [None]
    out = [r for jobs in depths for r in queue_put_claim(ctx, impls, jobs)]
    return out + queue_batches(ctx) + queue_fanout(ctx, impls) + queue_latency(ctx, impls)
