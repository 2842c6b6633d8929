"""coord: a coordination store for the many copies of one tool that run side by side.

On one machine all state lives in one SQLite database in WAL mode; across several hosts, in
one schema of a PostgreSQL server (``coord.db.Store`` opens either; ``coord.backend`` is the
seam between the rules and the engines). Instances register
(``register``), track their processes, hold leases, keep queues and message each other; when
one dies, ``coord.reaper`` applies one death rule to everything it held.
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any

# The engines register themselves by name (``coord.backend``); their modules load when a
# store is first opened.
from .backend import postgresql as _postgresql  # noqa: F401
from .backend import sqlite as _sqlite  # noqa: F401

if TYPE_CHECKING:
    from . import kv, leases, messages, queues
    from .clock import Clock
    from .config import Config
    from .db import Store
    from .errors import (
        Busy,
        ClaimLost,
        CoordError,
        InstanceIdInUse,
        InvalidArgument,
        LeaseLost,
        LeaseNotAcquired,
        NotADatabase,
        NotFound,
        NotRegistered,
        PayloadError,
        PayloadTooLarge,
        PermissionDenied,
        QueueFull,
        ReadOnlyViolation,
        RecipientDead,
        SchemaTooNew,
        StorageError,
        TimeoutExpired,
        UnsafeFork,
        UnsafePath,
        VersionConflict,
    )
    from .instances import Instance, InstanceInfo, get_instance, list_instances, register
    from .kv import Entry
    from .leases import (
        Candidate,
        Lease,
        LeaseInfo,
        acquire,
        fenced_write,
        get_lease,
        list_leases,
        try_acquire,
    )
    from .messages import Gathered, Mailbox, Message
    from .processes import (
        ProcessInfo,
        Tracked,
        end_group,
        end_process,
        kill_orphans,
        list_processes,
        orphans,
        poll_children,
        spawn,
        stop,
        top,
        track,
    )
    from .queues import Job, NewJob, Queue, QueueStats
    from .reaper import ReapReport, reap

# Where each exported name lives. Modules load on first use, so a command that needs only a
# few of them (the CLI's cold start) does not pay for the rest.
_EXPORTS = {
    "Busy": "errors",
    "Candidate": "leases",
    "ClaimLost": "errors",
    "Clock": "clock",
    "Config": "config",
    "CoordError": "errors",
    "Entry": "kv",
    "Gathered": "messages",
    "Instance": "instances",
    "InstanceIdInUse": "errors",
    "InstanceInfo": "instances",
    "InvalidArgument": "errors",
    "Job": "queues",
    "Lease": "leases",
    "LeaseInfo": "leases",
    "LeaseLost": "errors",
    "LeaseNotAcquired": "errors",
    "Mailbox": "messages",
    "Message": "messages",
    "NewJob": "queues",
    "NotADatabase": "errors",
    "NotFound": "errors",
    "NotRegistered": "errors",
    "PayloadError": "errors",
    "PayloadTooLarge": "errors",
    "PermissionDenied": "errors",
    "ProcessInfo": "processes",
    "Queue": "queues",
    "QueueFull": "errors",
    "QueueStats": "queues",
    "ReadOnlyViolation": "errors",
    "ReapReport": "reaper",
    "RecipientDead": "errors",
    "SchemaTooNew": "errors",
    "StorageError": "errors",
    "Store": "db",
    "TimeoutExpired": "errors",
    "Tracked": "processes",
    "UnsafeFork": "errors",
    "UnsafePath": "errors",
    "VersionConflict": "errors",
    "acquire": "leases",
    "end_group": "processes",
    "end_process": "processes",
    "fenced_write": "leases",
    "get_instance": "instances",
    "get_lease": "leases",
    "kill_orphans": "processes",
    "list_instances": "instances",
    "list_leases": "leases",
    "list_processes": "processes",
    "orphans": "processes",
    "poll_children": "processes",
    "reap": "reaper",
    "register": "instances",
    "spawn": "processes",
    "stop": "processes",
    "top": "processes",
    "track": "processes",
    "try_acquire": "leases",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _EXPORTS:
        value = getattr(importlib.import_module("." + _EXPORTS[name], __name__), name)
    else:
        try:
            value = importlib.import_module("." + name, __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'coord' has no attribute {name!r}") from None
    globals()[name] = value
    return value


# Imported from a source checkout (the repository root on sys.path: `python -m coord` or a
# `python -c` worker started in the clone, even beside a normal install): the sibling
# folders cli/ and schema/ are coord.cli and coord.schema, as the installed package-dir
# mapping makes them.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_checkout, "schema", "__init__.py")
):
    __path__.append(_checkout)

__version__ = "0.1.0"

__all__ = [
    "Busy",
    "Candidate",
    "ClaimLost",
    "Clock",
    "Config",
    "CoordError",
    "Entry",
    "Gathered",
    "Instance",
    "InstanceIdInUse",
    "InstanceInfo",
    "InvalidArgument",
    "Job",
    "Lease",
    "LeaseInfo",
    "LeaseLost",
    "LeaseNotAcquired",
    "Mailbox",
    "Message",
    "NewJob",
    "NotADatabase",
    "NotFound",
    "NotRegistered",
    "PayloadError",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProcessInfo",
    "Queue",
    "QueueFull",
    "QueueStats",
    "ReadOnlyViolation",
    "RecipientDead",
    "ReapReport",
    "SchemaTooNew",
    "StorageError",
    "Store",
    "TimeoutExpired",
    "Tracked",
    "UnsafeFork",
    "UnsafePath",
    "VersionConflict",
    "acquire",
    "end_group",
    "end_process",
    "fenced_write",
    "get_instance",
    "get_lease",
    "kv",
    "kill_orphans",
    "leases",
    "list_instances",
    "list_leases",
    "messages",
    "queues",
    "list_processes",
    "orphans",
    "poll_children",
    "reap",
    "register",
    "spawn",
    "stop",
    "top",
    "track",
    "try_acquire",
    "__version__",
]
