"""coord's one error tree.

Every error a caller can see is a ``CoordError``; apsw and OS errors are translated at the
engine's store boundary (``coord.backend.sqlite.connection``) so callers never catch
``apsw.*`` themselves::

    CoordError                      exit 1 unless noted
    ├── UnsafePath(path, reason)        the database path or a file beside it is unsafe
    ├── NotADatabase(path, reason)      a file at the path is not a coord database
    ├── SchemaTooNew(found, supported)  written by a newer coord
    ├── StorageError(path, reason)      disk full, read-only, I/O error
    ├── UnsafeFork(path, parent_pid)    a forked child touched a database its parent had open
    ├── Busy(seconds)                   still locked after bounded retries
    ├── NotFound(kind, name)            no such instance, job, message, key ...
    ├── InvalidArgument(reason)         bad input from the caller (exit 2 in the CLI)
    ├── PayloadError(reason)            not JSON data, NaN, too deep ...
    │   └── PayloadTooLarge(size, limit)
    ├── InstanceIdInUse(id, pid)        the id is held by a live instance
    ├── NotRegistered(id)               the instance is unknown or dead
    ├── CannotRun(command, reason)      exit 127 (not found) or 126 (not executable)
    ├── PermissionDenied(reason)        e.g. signalling another instance's process
    ├── ReadOnlyViolation(reason)       ``coord sql`` refused a write
    ├── LeaseNotAcquired(name, holder)  exit 75
    ├── LeaseLost(name, term)           exit 75
    ├── ClaimLost(token, *others)       the job's claim moved on (ack_many: each lost one)
    ├── QueueFull(queue, depth)
    ├── MalformedFile(path, reason)     an imported file is not in the expected format
    ├── RecipientDead(id)               a request's recipient died while we waited
    ├── VersionConflict(key, expected, found)
    └── TimeoutExpired(what, seconds)   exit 3: nothing arrived in time

Errors build their own message from structured fields and survive pickling, so they can
cross process boundaries (multiprocessing) intact.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_TEMPFAIL = 75


class CoordError(Exception):
    """Base of every error coord raises."""

    exit_code: int = EXIT_ERROR

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.args = args

    def __str__(self) -> str:
        return self.message()

    def message(self) -> str:
        return " ".join(str(a) for a in self.args) or type(self).__name__

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class UnsafePath(CoordError):
    def __init__(self, path: object, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def message(self) -> str:
        return f"refusing {self.path}: {self.reason}"


class NotADatabase(CoordError):
    def __init__(self, path: object, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def message(self) -> str:
        return (
            f"{self.path} is not a coord database ({self.reason}); it was left untouched — "
            "move it away or point --db/COORD_DB elsewhere"
        )


class SchemaTooNew(CoordError):
    def __init__(self, found: int, supported: int, path: object = "") -> None:
        super().__init__(found, supported, str(path))
        self.found, self.supported, self.path = found, supported, str(path)

    def message(self) -> str:
        return (
            f"{self.path or 'database'} has schema version {self.found}, newer than this coord "
            f"supports ({self.supported}); upgrade coord"
        )


class StorageError(CoordError):
    def __init__(self, path: object, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def message(self) -> str:
        return f"{self.path}: {self.reason}"


class UnsafeFork(CoordError):
    """A process forked while its parent had a connection to ``path`` open used coord on it.

    SQLite's POSIX locks belong to the parent; the child's inherited copy of SQLite's lock
    table claims them anyway, so its commits could vanish with a WAL another process deletes.
    Nothing was read or written."""

    def __init__(self, path: object, parent_pid: int) -> None:
        super().__init__(str(path), parent_pid)
        self.path, self.parent_pid = str(path), parent_pid

    def message(self) -> str:
        return (
            f"{self.path}: this process was forked by pid {self.parent_pid} while that process "
            "had the database open, and SQLite's locks do not survive fork, so coord refuses to "
            "use it here (nothing was read or written); start children with the 'spawn' or "
            "'forkserver' multiprocessing start method, or create coord objects only in a child "
            "of a process that never opened this database (open the store after the fork, in "
            "the worker)"
        )


class Busy(CoordError):
    def __init__(self, seconds: float, path: object = "") -> None:
        super().__init__(seconds, str(path))
        self.seconds, self.path = seconds, str(path)

    def message(self) -> str:
        return f"database {self.path} still busy after retrying for {self.seconds:.1f}s"


class NotFound(CoordError):
    def __init__(self, kind: str, name: object) -> None:
        super().__init__(kind, str(name))
        self.kind, self.name = kind, str(name)

    def message(self) -> str:
        return f"no such {self.kind}: {self.name!r}"


class InvalidArgument(CoordError):
    exit_code = EXIT_USAGE

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def message(self) -> str:
        return self.reason


class PayloadError(CoordError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def message(self) -> str:
        return f"bad payload: {self.reason}"


class PayloadTooLarge(PayloadError):
    def __init__(self, size: int, limit: int) -> None:
        CoordError.__init__(self, size, limit)
        self.size, self.limit = size, limit
        self.reason = f"{size} bytes exceeds the limit of {limit} bytes"


class InstanceIdInUse(CoordError):
    def __init__(self, id: str, pid: int) -> None:
        super().__init__(id, pid)
        self.id, self.pid = id, pid

    def message(self) -> str:
        return f"instance id {self.id!r} is held by a live instance (pid {self.pid})"


class NotRegistered(CoordError):
    def __init__(self, id: str | None, reason: str = "") -> None:
        super().__init__(id, reason)
        self.id, self.reason = id, reason

    def message(self) -> str:
        if self.id is None:
            return self.reason or "no instance: set COORD_INSTANCE_ID (e.g. run under `coord run`)"
        return f"instance {self.id!r} is not a live registered instance" + (
            f": {self.reason}" if self.reason else ""
        )


class CannotRun(CoordError):
    """CMD could not be started (``run``, ``elect``, ``lock``): exit 127 when it was not
    found, 126 when it was found but could not be executed, as shells do."""

    def __init__(self, command: str, reason: str, not_found: bool = True) -> None:
        super().__init__(command, reason, not_found)
        self.command, self.reason, self.not_found = command, reason, not_found
        self.exit_code = 127 if not_found else 126

    def message(self) -> str:
        return f"cannot run {self.command!r}: {self.reason}"


class PermissionDenied(CoordError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def message(self) -> str:
        return f"not permitted: {self.reason}"


class ReadOnlyViolation(CoordError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def message(self) -> str:
        return f"read-only: {self.reason}"


class LeaseNotAcquired(CoordError):
    exit_code = EXIT_TEMPFAIL

    def __init__(self, name: str, holder: str | None = None) -> None:
        super().__init__(name, holder)
        self.name, self.holder = name, holder

    def message(self) -> str:
        by = f" (held by {self.holder})" if self.holder else ""
        return f"lease {self.name!r} not obtained{by}"


class LeaseLost(CoordError):
    exit_code = EXIT_TEMPFAIL

    def __init__(self, name: str, term: int) -> None:
        super().__init__(name, term)
        self.name, self.term = name, term

    def message(self) -> str:
        return f"lease {self.name!r} term {self.term} is no longer held"


class ClaimLost(CoordError):
    """A claim has moved on. ``token`` is the (first) lost claim; ``tokens`` every lost one
    (``ack_many`` acks the claims still held and then raises for the rest)."""

    def __init__(self, token: str, *others: str) -> None:
        super().__init__(token, *others)
        self.token = token
        self.tokens = (token, *others)

    def message(self) -> str:
        if len(self.tokens) > 1:
            return (f"{len(self.tokens)} claims are no longer held (expired, released or "
                    f"redelivered), the first {self.token!r}")
        return f"claim {self.token!r} is no longer held (expired, released or redelivered)"


class QueueFull(CoordError):
    def __init__(self, queue: str, depth: int) -> None:
        super().__init__(queue, depth)
        self.queue, self.depth = queue, depth

    def message(self) -> str:
        return f"queue {self.queue!r} is full ({self.depth} jobs waiting)"


class MalformedFile(CoordError):
    def __init__(self, path: object, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def message(self) -> str:
        return f"{self.path}: {self.reason}; nothing was imported"


class RecipientDead(CoordError):
    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.id = id

    def message(self) -> str:
        return f"instance {self.id!r} died before replying"


class VersionConflict(CoordError):
    def __init__(self, key: str, expected: int | None, found: int | None) -> None:
        super().__init__(key, expected, found)
        self.key, self.expected, self.found = key, expected, found

    def message(self) -> str:
        return f"key {self.key!r}: expected version {self.expected}, found {self.found}"


class TimeoutExpired(CoordError):
    exit_code = EXIT_TIMEOUT

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(what, seconds)
        self.what, self.seconds = what, seconds

    def message(self) -> str:
        return f"{self.what}: nothing within {self.seconds:g}s"
