"""The words of the CLI's JSON: one list of keys, the same meaning everywhere.

``id`` is an object's own id (a lease's or a queue's is its name, a key's is the key);
``instance_id`` is the instance it belongs to (owner, holder, claimer, member) and
``incarnation`` that instance's incarnation; other instances are ``*_id``
(``sender_id``, ``recipient_id``); ``alive`` is liveness; ``*_at`` are wall-clock times in
Unix seconds (for people; expiry never uses them); ``*_in`` are seconds from now.
``KEYS`` lists every key a listing prints, with its meaning; the README shows the same list
and tests/cli/test_vocabulary.py checks every listing against it. Old names are kept beside
the new ones for one release (``RENAMED``).
"""

from __future__ import annotations

from typing import Any

# Old key -> its current name; both are printed for one release.
RENAMED = {
    "holder": "instance_id",
    "holder_incarnation": "incarnation",
    "holder_pid": "pid",
    "since": "acquired_at",
    "sender": "sender_id",
    "recipient": "recipient_id",
    "at": "created_at",
}


def current(obj: dict[str, Any], *, id_from: str | None = None) -> dict[str, Any]:
    """``obj`` with the current name beside every old one (and ``id`` copied from the key
    ``id_from`` when the object's id has a name of its own, like a kv entry's ``key``)."""
    out = dict(obj)
    if id_from is not None and "id" not in out:
        out = {"id": out.get(id_from), **out}
    for old, new in RENAMED.items():
        if old in obj and new not in obj:
            out[new] = obj[old]
    return out


KEYS: dict[str, str] = {
    # identity and ownership
    "id": "the object's own id (for a lease or queue its name, for a key the key)",
    "instance_id": "the instance the object belongs to: owner, holder, claimer, member",
    "incarnation": "that instance's incarnation (every registration bumps it)",
    "alive": "liveness: of the instance (instances, holders, owners) or of the process",
    "sender_id": "the instance that sent a message",
    "sender_incarnation": "its incarnation",
    "recipient_id": "the instance a message is for",
    "correlation_id": "the request a reply answers (a request's own id)",
    "reply_to": "the instance a request's reply goes to",
    # wall-clock times (Unix seconds, for people)
    "created_at": "when it was made (a job, message, key, event)",
    "started_at": "when the instance or process started",
    "ended_at": "when it ended",
    "heartbeat_at": "the instance's last heartbeat",
    "acquired_at": "when the current holder took the lease",
    "renewed_at": "the lease's last renewal",
    "updated_at": "the key's last change",
    "expires_at": "when the message expires unreceived",
    "finished_at": "when the job was done, dead-lettered or cancelled",
    # durations (seconds)
    "expires_in": "seconds until the lease or claim expires (negative: expired)",
    "available_in": "seconds until a delayed job is due",
    "heartbeat_age": "seconds since the last heartbeat",
    "uptime": "seconds since the process started",
    "oldest_age": "age of the oldest due job, seconds",
    "ttl": "time to live, seconds",
    "watchdog": "the watchdog interval (progress heartbeat), seconds",
    # instances and processes
    "app": "the instance's app name",
    "status": "instance: alive or why not (died, hung, left ...); process: its state",
    "tombstone": "a dead instance kept while it still owns jobs or processes",
    "pid": "process id (for a lease: the holder's)",
    "pgid": "process group id",
    "tree": "a member of a coord run/elect/lock wrapper's process tree (ended with it)",
    "start_token": "start time of the process in ticks since boot (with pid: identity)",
    "boot_id": "the boot the process belongs to",
    "pidns": "the pid namespace",
    "uid": "user id",
    "user": "user name",
    "host": "host name",
    "cwd": "working directory",
    "cmdline": "command line, as a list of words",
    "labels": "labels given at registration (JSON object)",
    "lock_path": "the instance's lock file (its proof of life)",
    "nudge_path": "the instance's wake-up socket",
    "name": "a process's name; a lease's or metric's name",
    "rss": "resident memory, bytes",
    "cpu_percent": "CPU use, percent",
    "memory_percent": "share of the machine's memory, percent",
    "orphan": "a running process whose instance is dead",
    "exit_code": "the process's exit status",
    "signal": "the signal that ended the process",
    "log_path": "the process's log file (run --log)",
    "how": "how a process was ended: gone, terminated, killed, survived",
    "others": "the other live instances, in short",
    # leases
    "term": "the fencing token: grows on every change of holder, never reused",
    # queues and jobs
    "queue": "the job's queue",
    "state": "ready, delayed, claimed, dead, done, cancelled",
    "priority": "higher is claimed first",
    "attempts": "claims so far",
    "max_attempts": "claims before the job is dead-lettered",
    "payload": "the JSON data of a job or message",
    "dedupe_key": "the job's dedupe key",
    "token": "the claim token (only on the job claim printed)",
    "last_error": "the last failure's message",
    "result": "the small JSON result given with ack",
    "max_depth": "most jobs that may wait in the queue",
    "ready": "jobs due now", "delayed": "jobs not yet due", "claimed": "jobs claimed",
    "dead": "dead-lettered jobs (reap: instances found dead)", "done": "jobs done",
    "cancelled": "cancelled jobs",
    "to": "the new owner of adopted queues", "to_queue": "the queue adopted jobs moved to",
    "queues": "the queues adopted", "jobs": "jobs moved", "left": "jobs left in place",
    "imported": "entries imported", "job_id": "the job an imported entry became", "existing": "entries imported before",
    "not_imported": "finished entries, by status",
    # messages and keys
    "kind": "message, request or reply; an event's kind",
    "topic": "the message's topic",
    "replies": "gather: the replies", "silent": "gather: who did not answer",
    "key": "the key", "value": "the key's JSON value", "version": "the key's version",
    "ephemeral": "bound to its instance: gone when it is",
    "event": "kv watch: set or deleted",
    # events
    "subject": "what the event is about (a lease, queue, process ...)",
    "detail": "the event's details (JSON object)",
    # reap, doctor, metrics
    "dry_run": "nothing was changed",
    "claims_released": "claims released", "events_trimmed": "events trimmed",
    "jobs_purged": "jobs purged", "leases_expired": "leases expired",
    "messages_expired": "messages expired", "processes_exited": "processes marked exited",
    "trees_ended": "dead wrappers whose process trees were ended",
    "tombstones_removed": "tombstones removed",
    "type": "a metric's type", "help": "a metric's help", "samples": "a metric's samples",
    "path": "the database path", "ok": "healthy", "journal_mode": "SQLite journal mode",
    "schema_version": "the database's schema version",
    "supported_schema_version": "the schema version this coord writes",
    "application_id": "SQLite application id", "size_bytes": "database size, bytes",
    "wal_bytes": "write-ahead log size, bytes", "busy_timeout_ms": "busy timeout, ms",
    "busy_retries": "writes retried after the busy timeout", "problems": "what is wrong",
    "pending": "what awaits the reaper", "permissions": "unsafe permissions",
    "counts": "rows per table", "check": "which check found it",
}
