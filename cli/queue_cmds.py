"""``coord queue …``: work queues (put, claim, ack, fail, extend, release, cancel, ls, stats,
requeue, adopt, purge, import, create).

Claims belong to the live instance the command runs under (COORD_INSTANCE_ID, e.g. a shell
worker run by ``coord run``) or the one named with ``--as``; without one, ``claim`` is
refused and says how to get one. A job as JSON is an object with
id, queue, state (ready, delayed, claimed, dead, done, cancelled), priority, attempts,
max_attempts, payload, dedupe_key, instance_id, created_at, available_in, expires_in,
last_error, result, finished_at — and token, on the job that ``claim`` printed.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ._common import (
    INT64_MAX,
    INT64_MIN,
    JsonOption,
    NoHeadersOption,
    detail,
    die,
    duration,
    emit_json,
    example,
    handle_errors,
    read_payload,
    store,
    table,
)
from .tables import fmt

queue_app = typer.Typer(
    name="queue",
    help="Work queues: put, claim, ack, fail, inspect, requeue, adopt, import.\n\n"
    "Examples:\n\n\b\n  coord queue put jobs '{\"n\": 1}'\n"
    "  coord run --app worker -- sh -c 'coord queue claim jobs --wait 60 --json'\n"
    "  coord queue stats",
    no_args_is_help=True,
)

QueueArg = Annotated[str, typer.Argument(help="Queue name.", show_default=False)]
TokenArg = Annotated[str, typer.Argument(help="The claim token printed by `coord queue claim`.",
                                         show_default=False)]
# --instance-id is the old name of --as (kept for one release).
InstanceOption = Annotated[
    str | None,
    typer.Option("--as", "--instance-id", metavar="ID", show_default=False,
                 help="Claim as this live instance (default: the instance in COORD_INSTANCE_ID, "
                 "when this command runs under it; --instance-id is the old name)."),
]

JOB_COLUMNS = [("id", "ID"), ("queue", "QUEUE"), ("state", "STATE"), ("priority", "PRI"),
               ("tries", "ATTEMPTS"), ("instance_id", "INSTANCE"), ("when", "DUE/LEASE"),
               ("payload_text", "PAYLOAD"), ("last_error", "LAST ERROR")]
STATS_COLUMNS = [("id", "QUEUE"), ("owner", "OWNER"), ("ready", "READY"), ("delayed", "DELAYED"),
                 ("claimed", "CLAIMED"), ("dead", "DEAD"), ("done", "DONE"),
                 ("cancelled", "CANCELLED"), ("oldest", "OLDEST"), ("max_depth", "MAX")]


def register(app: typer.Typer) -> None:
    """Add the ``queue`` sub-app to the app."""
    app.add_typer(queue_app, name="queue")


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _exists(ctx: typer.Context, queue: str) -> None:
    """Raise NotFound (exit 1) when QUEUE does not exist."""
    from coord.queues import stats

    stats(store(ctx), queue)


# A batch claim's rows: what a worker needs to ack each job.
CLAIM_COLUMNS = [("token", "TOKEN"), ("id", "JOB"), ("tries", "ATTEMPT"), ("lease", "LEASE"),
                 ("payload_text", "PAYLOAD")]
CLAIM_COUNT_MAX = 1000  # one transaction; a bigger batch holds the write lock too long


def _claim_row(j: dict[str, Any]) -> dict[str, Any]:
    return {**j, "tries": f"{j['attempts']} of {j['max_attempts']}",
            "lease": duration(j["expires_in"]), "payload_text": _compact(j["payload"])}


def _job_row(j: dict[str, Any]) -> dict[str, Any]:
    r = dict(j)
    r["tries"] = f"{j['attempts']}/{j['max_attempts']}"
    r["payload_text"] = _compact(j["payload"])
    if j["state"] == "delayed":
        r["when"] = "in " + duration(j["available_in"])
    elif j["state"] == "claimed" and j["expires_in"] is not None:
        r["when"] = "expired" if j["expires_in"] < 0 else duration(j["expires_in"]) + " left"
    else:
        r["when"] = None
    return r


@queue_app.command("create")
@example("coord queue create jobs --max-depth 1000",
         "coord queue create inbox --private --owner web-3f2a1c")
@handle_errors
def create(
    ctx: typer.Context,
    queue: QueueArg,
    private: Annotated[bool, typer.Option("--private", help="Private to the instance in "
                                          "--owner or $COORD_INSTANCE_ID: only it claims.")] = False,
    owner: Annotated[str | None, typer.Option("--owner", help="Owner of a private queue.",
                                              show_default=False)] = None,
    max_depth: Annotated[int | None, typer.Option("--max-depth", min=1, max=INT64_MAX, show_default=False,
                                                  help="Refuse puts (QueueFull) when this "
                                                  "many jobs wait.")] = None,
) -> None:
    """Create QUEUE (shared unless --private/--owner); an existing one keeps its jobs and
    takes the new --max-depth. A shared queue is also created by its first put."""
    import os

    from coord.errors import InvalidArgument
    from coord.instances import get_instance
    from coord.queues import create_queue

    if private and owner is None:
        owner = os.environ.get("COORD_INSTANCE_ID")
        if not owner:
            raise InvalidArgument("--private needs --owner or COORD_INSTANCE_ID")
    if owner is not None:
        get_instance(store(ctx), owner)  # an owner nobody ever registered is refused
    create_queue(store(ctx), queue, owner=owner, max_depth=max_depth)


@queue_app.command("put")
@example("coord queue put jobs '{\"url\": \"https://example.org\"}'",
         "echo '{\"n\": 2}' | coord queue put jobs - --priority 5 --dedupe n2")
@handle_errors
def put(
    ctx: typer.Context,
    queue: QueueArg,
    payload: Annotated[str, typer.Argument(help="JSON payload, or - to read it from stdin.",
                                           show_default=False)],
    priority: Annotated[int, typer.Option("--priority", "-p", min=INT64_MIN, max=INT64_MAX, help="Higher runs first.")] = 0,
    delay: Annotated[float, typer.Option("--delay", min=0, help="Seconds before it may be "
                                         "claimed.")] = 0.0,
    dedupe: Annotated[str | None, typer.Option("--dedupe", show_default=False,
                                               help="Dedupe key: a job with this key already in "
                                               "the queue (until purged) is not added again.")] = None,
    max_attempts: Annotated[int | None, typer.Option("--max-attempts", min=1, max=INT64_MAX, show_default=False,
                                                     help="Claims before it is dead-lettered "
                                                     "(default 5).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Add a job to QUEUE and print its id (the existing job's id for a dedupe repeat)."""
    from coord.queues import put as do_put

    job_id = do_put(store(ctx), queue, read_payload(ctx, payload), priority=priority, delay=delay,
                    dedupe_key=dedupe, max_attempts=max_attempts)
    if as_json:
        emit_json({"id": job_id, "queue": queue})
    else:
        print(job_id)


@queue_app.command("claim")
@example("coord queue claim jobs --wait 30 --json   # under `coord run`",
         "coord queue claim jobs --as worker-1 --lease 120",
         "coord queue claim jobs --count 10 --json | jq -r '.[].token'")
@handle_errors
def claim(
    ctx: typer.Context,
    queue: QueueArg,
    lease: Annotated[float | None, typer.Option("--lease", show_default=False,
                                                help="Seconds the claim lasts before the job "
                                                "goes back (default: config claim_lease, 60).")] = None,
    wait: Annotated[float, typer.Option("--wait", min=0, help="Seconds to wait for a job; "
                                        "exit 3 if none arrived.")] = 0.0,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, max=CLAIM_COUNT_MAX,
                                              show_default=False,
                                              help="Claim up to this many jobs in one "
                                              "transaction (each with its own token); "
                                              "prints a table, or a JSON array.")] = None,
    instance_id: InstanceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Claim the next job of QUEUE (highest priority, then oldest) for this instance and
    print it with its claim token; exit 3 when nothing arrived within --wait. With --count,
    claim up to that many at once (waiting only for the first)."""
    import sys

    from coord.errors import EXIT_TIMEOUT, NotFound
    from coord.operator import resolve
    from coord.queues import claim as do_claim
    from coord.queues import claim_many

    me = resolve(store(ctx), instance_id, "coord queue claim")  # before any word about waiting
    try:
        _exists(ctx, queue)
        missing = ""
    except NotFound:
        # A queue is created by its first put: wait as on an empty one, but say so.
        missing = " (the queue does not exist yet: its first put creates it)"
        if wait > 0 and sys.stderr.isatty():
            print(f"coord: queue {queue!r} does not exist yet; waiting up to {wait:g}s for its "
                  "first put", file=sys.stderr)
    if count is not None:
        jobs = claim_many(store(ctx), queue, count, me.id, lease=lease, timeout=wait)
        if not jobs:
            die(f"queue {queue!r}: nothing within {wait:g}s{missing}", EXIT_TIMEOUT,
                "TimeoutExpired")
        if as_json:
            emit_json([j.to_json() for j in jobs])
            return
        table([_claim_row(j.to_json()) for j in jobs], CLAIM_COLUMNS)
        return
    job = do_claim(store(ctx), queue, me.id, lease=lease, timeout=wait)
    if job is None:
        die(f"queue {queue!r}: nothing within {wait:g}s{missing}", EXIT_TIMEOUT, "TimeoutExpired")
    if as_json:
        emit_json(job.to_json())
        return
    print(f"token     {job.token}")
    print(f"job       {job.id}")
    print(f"queue     {job.queue}")
    print(f"attempt   {job.attempts} of {job.max_attempts}")
    print(f"lease     {duration(job.expires_in)}")
    print(f"payload   {_compact(job.payload)}")


@queue_app.command("ack")
@example("coord queue ack 7:9f2c... --result '{\"ok\": true}'")
@handle_errors
def ack(
    ctx: typer.Context,
    token: TokenArg,
    result: Annotated[str | None, typer.Option("--result", show_default=False,
                                               help="Small JSON result to keep (or - for "
                                               "stdin).")] = None,
) -> None:
    """Mark the claimed job done. Fails (exit 1) if the claim has moved on."""
    from coord.queues import ack as do_ack

    do_ack(store(ctx), token, None if result is None else read_payload(ctx, result))


@queue_app.command("fail")
@example("coord queue fail 7:9f2c... --error 'timeout' --retry-in 30")
@handle_errors
def fail(
    ctx: typer.Context,
    token: TokenArg,
    error: Annotated[str, typer.Option("--error", help="What went wrong (kept as last error).")] = "",
    retry_in: Annotated[float | None, typer.Option("--retry-in", min=0, show_default=False,
                                                   help="Seconds before the retry (default: "
                                                   "exponential backoff with jitter).")] = None,
) -> None:
    """Record a failed attempt: the job is retried later, or dead-lettered when out of
    attempts. Prints the job's new state (ready or dead)."""
    from coord.queues import fail as do_fail

    print(do_fail(store(ctx), token, error, retry_in=retry_in))


@queue_app.command("extend")
@example("coord queue extend 7:9f2c... --lease 300")
@handle_errors
def extend(
    ctx: typer.Context,
    token: TokenArg,
    lease: Annotated[float | None, typer.Option("--lease", show_default=False,
                                                help="New lease from now, seconds (default: "
                                                "config claim_lease).")] = None,
) -> None:
    """Renew a claim's lease (a long job keeps its claim). Fails if the claim moved on."""
    from coord.queues import extend as do_extend

    do_extend(store(ctx), token, lease)


@queue_app.command("release")
@example("coord queue release 7:9f2c...")
@handle_errors
def release(ctx: typer.Context, token: TokenArg) -> None:
    """Hand a claimed job back untried: ready again at once, the attempt not counted."""
    from coord.queues import release as do_release

    do_release(store(ctx), token)


@queue_app.command("cancel")
@example("coord queue cancel 42")
@handle_errors
def cancel(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(min=1, max=INT64_MAX, help="Job id.", show_default=False)],
) -> None:
    """Cancel a job that waits (ready, delayed or dead); a claimed job cannot be cancelled."""
    from coord.queues import cancel as do_cancel

    do_cancel(store(ctx), job_id)


@queue_app.command("ls")
@example("coord queue ls jobs --state dead",
         "coord queue ls --state all -n 20 --json")
@handle_errors
def ls(
    ctx: typer.Context,
    queue: Annotated[str | None, typer.Argument(help="Only this queue.", show_default=False)] = None,
    state: Annotated[str | None, typer.Option("--state", "-s", show_default=False,
                                              help="ready, delayed, claimed, dead, done, "
                                              "cancelled, all (default: not finished).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, max=INT64_MAX, show_default=False,
                                              help="At most this many jobs.")] = None,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """List jobs in claim order: by queue, then priority (high first), then FIFO."""
    from coord.queues import list_jobs

    if queue is not None:
        _exists(ctx, queue)
    jobs = [j.to_json() for j in list_jobs(store(ctx), queue, state=state, limit=limit)]
    if as_json:
        emit_json(jobs)
    else:
        table([_job_row(j) for j in jobs], JOB_COLUMNS, headers=not no_headers)


@queue_app.command("show")
@example("coord queue show 42",
         "coord queue show 42 --json | jq .last_error")
@handle_errors
def show(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(min=1, max=INT64_MAX, help="Job id.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Show one job: state, attempts, payload, last error, result (exit 1 when there is no
    such job)."""
    import time

    from coord.queues import get_job

    job = get_job(store(ctx), job_id).to_json()
    if as_json:
        emit_json(job)
        return
    row = _job_row(job)
    row["attempts_h"] = row["tries"]
    row["result_text"] = None if job["result"] is None else _compact(job["result"])
    for key in ("created_at", "finished_at"):
        t = job[key]
        row[key + "_h"] = None if t is None else time.strftime("%Y-%m-%d %H:%M:%S",
                                                                time.localtime(t))
    detail(row, ("id", "queue", "state", "priority", "attempts_h", "instance_id", "when",
                 "dedupe_key", "created_at_h", "finished_at_h", "last_error", "payload_text",
                 "result_text"))


@queue_app.command("stats")
@example("coord queue stats",
         "coord queue stats jobs --json")
@handle_errors
def stats(
    ctx: typer.Context,
    queue: Annotated[str | None, typer.Argument(help="Only this queue.", show_default=False)] = None,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """Per queue: ready, delayed, claimed, dead, done and cancelled jobs, and the age of the
    oldest ready job. A private queue shows its owner (and whether it is alive)."""
    from coord.queues import stats as do_stats

    rows = [s.to_json() for s in do_stats(store(ctx), queue)]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["owner"] = (None if r["instance_id"] is None
                      else f"{r['instance_id']}{'' if r['alive'] else ' (dead)'}")
        r["oldest"] = duration(r["oldest_age"])
    table(rows, STATS_COLUMNS, headers=not no_headers)


@queue_app.command("requeue")
@example("coord queue requeue 42",
         "coord queue requeue --dead jobs")
@handle_errors
def requeue(
    ctx: typer.Context,
    job_id: Annotated[int | None, typer.Argument(min=1, max=INT64_MAX, help="A dead or cancelled job's id.",
                                                 show_default=False)] = None,
    dead: Annotated[str | None, typer.Option("--dead", show_default=False,
                                             help="Requeue every dead job of this queue.")] = None,
) -> None:
    """Put a dead or cancelled job back in its queue (fresh attempts), or with --dead QUEUE
    every dead job of QUEUE."""
    from coord.errors import InvalidArgument
    from coord.queues import requeue as do_requeue
    from coord.queues import requeue_dead

    if (job_id is None) == (dead is None):
        raise InvalidArgument("give a JOB_ID or --dead QUEUE (one of them)")
    if dead is not None:
        _exists(ctx, dead)
        print(requeue_dead(store(ctx), dead))
    else:
        assert job_id is not None
        do_requeue(store(ctx), job_id)


@queue_app.command("adopt")
@example("coord queue adopt web-3f2a1c --to web-77b0e2",
         "coord queue adopt web-3f2a1c --to-queue jobs")
@handle_errors
def adopt(
    ctx: typer.Context,
    from_instance: Annotated[str, typer.Argument(help="The dead instance whose private queues "
                                                 "to take.", show_default=False)],
    to: Annotated[str | None, typer.Option("--to", show_default=False,
                                           help="New owner (default: $COORD_INSTANCE_ID).")] = None,
    to_queue: Annotated[str | None, typer.Option("--to-queue", show_default=False,
                                                 help="Instead, move the waiting jobs into this "
                                                 "queue.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Adopt a dead instance's private queues: give them to another instance id, or move
    their waiting jobs into another queue. A live instance's queues are refused."""
    import os

    from coord.errors import InvalidArgument
    from coord.queues import adopt as do_adopt

    if to is None and to_queue is None:
        to = os.environ.get("COORD_INSTANCE_ID") or None
        if to is None:
            raise InvalidArgument("give --to ID or --to-queue NAME (or set COORD_INSTANCE_ID)")
    got = do_adopt(store(ctx), from_instance, to=to, to_queue=to_queue)
    if as_json:
        emit_json(got.to_json())
    elif got.to is not None:
        print(f"{', '.join(got.queues)} now owned by {got.to}")
    else:
        extra = f" ({got.left} left: same dedupe key already there)" if got.left else ""
        print(f"moved {got.jobs} jobs from {', '.join(got.queues)} to {got.to_queue}{extra}")


@queue_app.command("purge")
@example("coord queue purge jobs",
         "coord queue purge scratch --all")
@handle_errors
def purge(
    ctx: typer.Context,
    queue: QueueArg,
    everything: Annotated[bool, typer.Option("--all", help="Delete the queue itself and every "
                                             "job in it, claimed ones too.")] = False,
) -> None:
    """Delete QUEUE's finished jobs (done, dead, cancelled), freeing their dedupe keys; print
    how many went."""
    from coord.queues import purge as do_purge

    print(do_purge(store(ctx), queue, everything=everything))


@queue_app.command("import")
@example("coord queue import ./queue-state.json --queue legacy")
@handle_errors
def import_(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="A legacy queue-state.json.", show_default=False)],
    queue: Annotated[str | None, typer.Option("--queue", "-q", show_default=False,
                                              help="Queue to import into (default: legacy).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Import a legacy queue-state.json: pending and processing entries become ready jobs
    (priority and order kept), finished ones are only reported. Importing the same file
    again adds nothing. A malformed or truncated file is refused and nothing is imported;
    so are the database's own files (coord.db, -wal, -shm), which are never opened."""
    from coord.legacy import import_queue_state

    report = import_queue_state(store(ctx), file, queue=queue)
    if as_json:
        emit_json(report.to_json())
        return
    print(f"imported {len(report.imported)} jobs into {report.queue}"
          + (f", {len(report.existing)} already there" if report.existing else ""))
    for item in report.imported:
        note = " (dead-lettered: out of attempts)" if item["state"] == "dead" else ""
        print(f"  job {item['job_id']:<6} {item['id']} ({item['status']}){note}")
    for status, ids in sorted(report.not_imported.items()):
        print(f"not imported ({status}): {fmt(ids)}")
