"""Import a legacy ``queue-state.json``: the file a TypeScript process manager kept its queue in.

The file is ``{"version": "1.x", "timestamp": ISO-8601, "entries": [...]}``; each entry has
an ``id`` (UUID), a ``process`` request object, a ``status``, a ``priority`` (10 runs first,
FIFO within a priority by ``queuedAt``), ISO-8601 ``queuedAt``/``startedAt``/``completedAt``,
``error``, ``retryCount`` and ``maxRetries``.

How entries become jobs (one transaction: all or nothing):

==============  ==============================================================================
pending         a ready job
processing      a ready job again: it was interrupted when its owner died, so that attempt
                counts (and when it was the last one the job is dead-lettered instead)
completed,      history, not work: reported, not imported
failed,
cancelled
payload         the entry's ``process`` object plus ``"id"``: the entry's id
priority        ``priority``; jobs are added in ``queuedAt`` order, so FIFO holds within one
attempts        ``retryCount``, +1 when it was processing (``retryCount`` missing: 0)
max attempts    ``maxRetries`` + 1 (``maxRetries`` missing: 3, the manager's default)
dedupe key      the entry's id: importing the file again adds nothing, even after the jobs
                ran (until they are purged)
created_at      ``queuedAt``; ``error`` becomes the job's last error
==============  ==============================================================================

A file that is not valid JSON (say, cut off mid-write), is not in this format, or holds an
entry that cannot be read is refused with ``MalformedFile`` naming the problem, and nothing
is imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .db import Store
from .errors import MalformedFile, PayloadError
from .instances import validate_name
from .payload import encode
from .queues import nudge_queue

#: The queue legacy entries go to unless told otherwise.
DEFAULT_QUEUE = "legacy"
STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
#: The legacy manager's default when an entry has no maxRetries.
DEFAULT_MAX_RETRIES = 3
#: Refuse files bigger than this (bytes): a queue state is small.
MAX_FILE_BYTES = 256 << 20


@dataclass
class ImportReport:
    """What an import did. ``imported``: entries that became jobs ({id, job_id, state});
    ``existing``: entries already imported before ({id, job_id}); ``not_imported``: entry
    ids by status (completed, failed, cancelled)."""

    path: str
    queue: str
    imported: list[dict[str, Any]] = field(default_factory=list)
    existing: list[dict[str, Any]] = field(default_factory=list)
    not_imported: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _when(value: Any, what: str) -> float:
    """An ISO-8601 time as epoch seconds (a time without a zone is UTC)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} is not an ISO-8601 time: {value!r}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what} is not an ISO-8601 time: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _count(entry: dict[str, Any], key: str, default: int) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} is not a count: {value!r}")
    return value


def read_state(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and check a queue-state.json; returns its entries. Raises ``MalformedFile``."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise MalformedFile(name, f"cannot read it: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise MalformedFile(name, f"larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise MalformedFile(name, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        hint = " (cut off?)" if e.pos >= len(raw.rstrip()) else ""
        raise MalformedFile(
            name, f"not valid JSON{hint}: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:
        raise MalformedFile(name, f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise MalformedFile(name, 'not a queue state: expected an object with an "entries" array')
    version = doc.get("version")
    if version is not None and not (isinstance(version, str) and version.split(".")[0] == "1"):
        raise MalformedFile(name, f"unsupported version {version!r} (this reads version 1.x)")
    seen: set[str] = set()
    entries: list[dict[str, Any]] = doc["entries"]
    for n, entry in enumerate(entries):
        where = f"entry {n}"
        try:
            if not isinstance(entry, dict):
                raise ValueError("is not an object")
            eid = entry.get("id")
            if not isinstance(eid, str) or not eid:
                raise ValueError("has no id")
            where = f"entry {n} ({eid})"
            if eid in seen:
                raise ValueError("repeats an id")
            seen.add(eid)
            status = entry.get("status")
            if status not in STATUSES:
                raise ValueError(f"has an unknown status {status!r}")
            if status in ("pending", "processing"):
                if not isinstance(entry.get("process"), dict):
                    raise ValueError("has no process object")
                prio = entry.get("priority")
                if not isinstance(prio, int) or isinstance(prio, bool):
                    raise ValueError(f"priority is not an integer: {prio!r}")
                _when(entry.get("queuedAt"), "queuedAt")
                _count(entry, "retryCount", 0)
                _count(entry, "maxRetries", DEFAULT_MAX_RETRIES)
                err = entry.get("error")
                if err is not None and not isinstance(err, str):
                    raise ValueError(f"error is not text: {err!r}")
        except ValueError as e:
            raise MalformedFile(name, f"{where} {e}") from None
    return entries


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON data")


def import_queue_state(
    store: Store, path: str | os.PathLike[str], *, queue: str | None = None
) -> ImportReport:
    """Import the pending and processing entries of a legacy queue-state.json into
    ``queue`` (default ``legacy``, created shared if needed), in one transaction. See the
    module docstring for the mapping. Raises ``MalformedFile`` (nothing imported), and
    ``UnsafePath`` for the database's own files, which are never opened here."""
    queue = validate_name(queue or DEFAULT_QUEUE, "queue name")
    name = os.fspath(path)
    store.refuse_own_file(name)
    entries = read_state(name)
    cfg = store.config
    report = ImportReport(path=name, queue=queue)
    work: list[tuple[float, int, dict[str, Any], str]] = []  # (queuedAt, index, entry, payload)
    for n, entry in enumerate(entries):
        status = entry["status"]
        if status not in ("pending", "processing"):
            report.not_imported.setdefault(status, []).append(entry["id"])
            continue
        body = dict(entry["process"])
        body["id"] = entry["id"]
        try:
            text = encode(body, limit=cfg.payload_limit, max_depth=cfg.payload_max_depth)
        except PayloadError as err:
            raise MalformedFile(name, f"entry {n} ({entry['id']}) process: {err}") from None
        work.append((_when(entry["queuedAt"], "queuedAt"), n, entry, text))
    work.sort(key=lambda w: (w[0], w[1]))

    rows = []
    for queued_at, _, e, text in work:
        attempts = _count(e, "retryCount", 0) + (1 if e["status"] == "processing" else 0)
        max_attempts = _count(e, "maxRetries", DEFAULT_MAX_RETRIES) + 1
        error = e.get("error")
        if e["status"] == "processing" and not error:
            error = "interrupted: it was processing when its owner stopped"
        state = "ready" if attempts < max_attempts else "dead"
        rows.append((text, e["priority"], e["id"], max_attempts, attempts, state, queued_at,
                     error))
    ids, owner = store.backend.queues.import_jobs(queue, rows, name)
    for (_, _, ent, _), (job_id, new) in zip(work, ids, strict=True):
        if new:
            attempts = _count(ent, "retryCount", 0) + (1 if ent["status"] == "processing" else 0)
            dead = attempts >= _count(ent, "maxRetries", DEFAULT_MAX_RETRIES) + 1
            report.imported.append({"id": ent["id"], "job_id": job_id, "status": ent["status"],
                                    "state": "dead" if dead else "ready"})
        else:
            report.existing.append({"id": ent["id"], "job_id": job_id})
    if report.imported:
        nudge_queue(store, queue, owner)
    return report
