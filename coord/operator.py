"""Who a CLI command acts as.

Commands that only need a sender or a mailbox for their own duration (``send``,
``broadcast``, ``request``, ``gather``, ``stop --instance``) work from an operator's plain
shell: without an instance they register a short-lived *operator instance*
(``cli-<user>-<6 hex>``, app ``cli``) for the command's own life, so messages show who sent
them and replies have a mailbox to come to. Commands whose meaning is "be this instance"
(``recv``, ``queue claim``, ``reply``, ephemeral keys) need a real one.

Acting as an existing instance is allowed when it is the one the command runs under — the
instance named by ``COORD_INSTANCE_ID`` is this process or one of its ancestors, checked by
pid and start token (``coord run`` and ``coord elect`` export it to CMD) — or when it is
named explicitly (``--as ID``). A ``COORD_INSTANCE_ID`` copied into another shell would
otherwise let that shell consume the instance's messages while it runs elsewhere.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import NotRegistered, PermissionDenied
from .identity import ancestry

if TYPE_CHECKING:
    from .db import Store
    from .instances import Instance
    from .messages import Mailbox

__all__ = ["OPERATOR_APP", "Actor", "acting", "operator_id", "resolve"]

OPERATOR_APP = "cli"

HOW = ("{what} acts as an instance: run it under one (`coord run --app APP -- CMD` sets "
       "COORD_INSTANCE_ID for CMD), or name a live instance with --as ID")


@dataclass(frozen=True)
class Actor:
    """The instance a command acts as; ``instance`` is set for an operator instance this
    process registered (and closes when the command ends)."""

    id: str
    incarnation: int
    app: str
    instance: Instance | None = None

    @property
    def operator(self) -> bool:
        return self.instance is not None

    def mailbox(self, store: Store) -> Mailbox:
        from .messages import Mailbox

        if self.instance is not None:
            return Mailbox.of(self.instance)  # its own socket: replies wake it at once
        return Mailbox(store, self.id, self.incarnation, self.app)


def operator_id() -> str:
    """A fresh operator instance id: ``cli-<user>-<6 hex>`` (the user of the process's
    effective uid, not $USER, which anyone can set)."""
    from .instances import generate_id

    return generate_id(f"{OPERATOR_APP}-{operator_user()}")


def operator_user() -> str:
    """The user of the process's effective uid (not $USER, which anyone can set)."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def resolve(store: Store, as_id: str | None, what: str = "this command") -> Actor:
    """The existing instance a command acts as: ``as_id`` when given, else the one in
    ``COORD_INSTANCE_ID`` if the command runs under it. Raises ``NotRegistered`` (with how
    to get one) when there is none, ``PermissionDenied`` for an instance elsewhere."""
    from .instances import require_live

    if as_id:
        info = require_live(store, as_id)
        return Actor(info.id, info.incarnation, info.app)
    env = os.environ.get("COORD_INSTANCE_ID")
    if not env:
        raise NotRegistered(None, "no instance: " + HOW.format(what=what))
    info = require_live(store, env)
    if (info.pid, info.start_token) not in ancestry(os.getpid()):
        raise PermissionDenied(
            f"COORD_INSTANCE_ID={env} is a live instance (pid {info.pid}) that this command "
            f"does not run under; to act as it anyway, pass --as {env}")
    return Actor(info.id, info.incarnation, info.app)


@contextmanager
def acting(store: Store, as_id: str | None, *, what: str = "this command",
           operator: bool = True) -> Iterator[Actor]:
    """The instance a command acts as (see ``resolve``); with ``operator`` and no instance
    at all, a short-lived operator instance registered for the ``with`` block."""
    if as_id or os.environ.get("COORD_INSTANCE_ID") or not operator:
        yield resolve(store, as_id, what)
        return
    from .instances import register

    inst = register(store, operator_id(), app=OPERATOR_APP, cmdline=["coord", *sys.argv[1:]])
    try:
        yield Actor(inst.id, inst.incarnation, inst.app, inst)
    finally:
        inst.close()
