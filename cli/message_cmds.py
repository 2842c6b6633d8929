"""Commands about messages and shared context: send, broadcast, recv, request, reply, gather,
and the ``kv`` sub-commands.

Sender and receiver are the live instance the command runs under (COORD_INSTANCE_ID, set by
``coord run``), or the one named with ``--as``; from a plain shell, send, broadcast, request
and gather act as a short-lived operator instance (``coord.operator``). Payloads are JSON text given as an argument, or read from stdin with ``-``.
``--json`` prints a message as an object with id, kind, sender, recipient, topic, payload,
correlation_id, reply_to, created_at, expires_at.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ._common import (
    INT64_MAX,
    AsOption,
    JsonOption,
    NoHeadersOption,
    emit_json,
    example,
    handle_errors,
    read_payload,
    read_string,
    store,
    table,
)
from .vocabulary import current

TopicOption = Annotated[str, typer.Option("--topic", "-t", help="Topic of the message.")]
PayloadArg = Annotated[str, typer.Argument(help="JSON payload, or - to read it from stdin.",
                                           show_default=False)]
MSG_COLUMNS = [("id", "ID"), ("kind", "KIND"), ("sender", "FROM"), ("topic", "TOPIC"),
               ("payload_text", "PAYLOAD")]
KV_COLUMNS = [("key", "KEY"), ("version", "VERSION"), ("instance_id", "OWNER"),
              ("value_text", "VALUE")]

kv_app = typer.Typer(
    name="kv",
    help="Shared context: keys with JSON values and versions (get, set, del, ls, cas, watch)."
    "\n\nExamples:\n\n\b\n  coord kv set web/port 8080\n  coord kv get web/port\n"
    "  coord kv watch web/ --prefix",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("send")(send)
    app.command("broadcast")(broadcast)
    app.command("recv")(recv)
    app.command("request")(request)
    app.command("reply")(reply)
    app.command("gather")(gather)
    app.add_typer(kv_app, name="kv")


def _app(me: Any, app: str | None) -> str | None:
    """The app to reach: --app, else the sender's; an operator instance has no app of its own."""
    if app is None and me.operator:
        from coord.errors import InvalidArgument

        raise InvalidArgument("from a plain shell, name the app to reach with --app APP")
    return app


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _show(messages: list[Any], as_json: bool, *, single: bool = False,
          no_headers: bool = False) -> None:
    if as_json:
        objs = [current(m.to_json()) for m in messages]
        emit_json(objs[0] if single else objs)
        return
    rows = [dict(m.to_json(), payload_text=_text(m.payload)) for m in messages]
    table(rows, MSG_COLUMNS, headers=not no_headers)


@example("coord send web-3f2a1c '{\"reload\": true}'",
         "echo '{\"n\": 1}' | coord send web-3f2a1c - --topic jobs")
@handle_errors
def send(
    ctx: typer.Context,
    to: Annotated[str, typer.Argument(help="Id of the receiving instance.", show_default=False)],
    payload: PayloadArg,
    topic: TopicOption = "",
    ttl: Annotated[float | None, typer.Option("--ttl", help="Seconds the message is kept until "
                                              "received (default: the message TTL, 1 h).")] = None,
    as_: AsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a message to one instance; prints its id.

    From a plain shell (no instance), the sender is a short-lived operator instance
    (cli-<user>-<6 hex>) registered for the command's life."""
    from coord.operator import acting

    s = store(ctx)
    value = read_payload(ctx, payload)
    with acting(s, as_, what="coord send") as me:
        mid = me.mailbox(s).send(to, value, topic=topic, ttl=ttl)
    if as_json:
        emit_json(current({"id": mid, "recipient": to, "topic": topic}))
    else:
        print(mid)


@example("coord broadcast '\"config changed\"' --app web --topic config")
@handle_errors
def broadcast(
    ctx: typer.Context,
    payload: PayloadArg,
    topic: TopicOption = "",
    app: Annotated[str | None, typer.Option("--app", help="Send to this app's instances "
                                            "(default: the sender's app).")] = None,
    as_: AsOption = None,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """Send a message to every other live instance of an app (one message each).

    From a plain shell, name the app with --app (the operator instance has none of its own)."""
    from coord.operator import acting

    s = store(ctx)
    value = read_payload(ctx, payload)
    with acting(s, as_, what="coord broadcast") as me:
        sent = me.mailbox(s).broadcast(value, topic=topic, app=_app(me, app))
    rows = [current({"id": mid, "recipient": to, "topic": topic}) for to, mid in sent.items()]
    if as_json:
        emit_json(rows)
    else:
        table(rows, [("recipient", "RECIPIENT"), ("id", "MESSAGE ID")], headers=not no_headers)


@example("coord recv --wait 30 --json",
         "coord recv --topic jobs")
@handle_errors
def recv(
    ctx: typer.Context,
    topic: Annotated[str | None, typer.Option("--topic", "-t", help="Only messages of this "
                                              "topic.")] = None,
    wait: Annotated[float, typer.Option("--wait", "-w", help="Seconds to wait for a message "
                                        "(0: don't wait).")] = 0.0,
    as_: AsOption = None,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """Receive the next message or request for this instance; exit 3 when none arrived.

    It counts as delivered now and is acknowledged by the next recv; answer a request with
    `coord reply ID PAYLOAD`."""
    from coord.errors import TimeoutExpired
    from coord.operator import resolve

    s = store(ctx)
    msg = resolve(s, as_, "coord recv").mailbox(s).receive(wait, topic=topic)
    if msg is None:
        raise TimeoutExpired("recv", wait)
    _show([msg], as_json, single=True, no_headers=no_headers)


@example("coord request web-3f2a1c '{\"q\": \"status\"}' --timeout 5")
@handle_errors
def request(
    ctx: typer.Context,
    to: Annotated[str, typer.Argument(help="Id of the instance to ask.", show_default=False)],
    payload: PayloadArg,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the "
                                           "reply.")] = 30.0,
    topic: TopicOption = "",
    as_: AsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a request and wait for its reply; prints the reply's payload (exit 3 on timeout,
    1 when the recipient died).

    From a plain shell, a short-lived operator instance sends it and receives the reply."""
    from coord.operator import acting

    s = store(ctx)
    value = read_payload(ctx, payload)
    with acting(s, as_, what="coord request") as me:
        answer = me.mailbox(s).request(to, value, timeout=timeout, topic=topic)
    if as_json:
        emit_json(current(answer.to_json()))
    else:
        print(_text(answer.payload))


@example("coord reply 5f0c...e1 '{\"status\": \"ok\"}'")
@handle_errors
def reply(
    ctx: typer.Context,
    msg_id: Annotated[str, typer.Argument(help="Id of the request to answer.", show_default=False)],
    payload: PayloadArg,
    as_: AsOption = None,
) -> None:
    """Answer a request received with `coord recv` (as the instance that received it)."""
    from coord.operator import resolve

    s = store(ctx)
    value = read_payload(ctx, payload)
    resolve(s, as_, "coord reply").mailbox(s).reply(msg_id, value, strict=True)


@example("coord gather '{\"q\": \"load\"}' --app web --timeout 2 --json")
@handle_errors
def gather(
    ctx: typer.Context,
    payload: PayloadArg,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the "
                                           "replies.")] = 5.0,
    topic: TopicOption = "",
    app: Annotated[str | None, typer.Option("--app", help="Ask this app's instances "
                                            "(default: the sender's app).")] = None,
    as_: AsOption = None,
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """Ask every other live instance of an app and collect the replies; names who did not
    answer. Exit 3 when there was someone to ask and nobody answered.

    From a plain shell, name the app with --app; a short-lived operator instance asks."""
    from coord.errors import EXIT_TIMEOUT
    from coord.operator import acting

    s = store(ctx)
    value = read_payload(ctx, payload)
    with acting(s, as_, what="coord gather") as me:
        got = me.mailbox(s).gather(value, topic=topic, timeout=timeout, app=_app(me, app))
    if as_json:
        gathered = got.to_json()
        emit_json(dict(gathered, replies=[current(m) for m in gathered["replies"]]))
    else:
        if got.replies:
            table([{"sender": m.sender, "payload_text": _text(m.payload)} for m in got.replies],
                  [("sender", "FROM"), ("payload_text", "REPLY")], headers=not no_headers)
        for i in got.silent:
            print(f"no answer: {i}")
        for i in got.dead:
            print(f"died before answering: {i}")
    if got.missing and not got.replies:
        raise typer.Exit(EXIT_TIMEOUT)


# -- kv --------------------------------------------------------------------------------------

KeyArg = Annotated[str, typer.Argument(help="The key (plain string; e.g. app/name).",
                                       show_default=False)]
EphemeralOption = Annotated[bool, typer.Option(
    "--ephemeral", help="Bind the key to the instance this command runs under (or --as ID): "
    "it vanishes when that instance dies or leaves.")]


def _owner(ctx: typer.Context, ephemeral: bool, as_: str | None) -> Any:
    if not ephemeral:
        return None
    from coord.operator import resolve

    return resolve(store(ctx), as_, "an ephemeral key")


StringOption = Annotated[bool, typer.Option(
    "--string", help="Store VALUE as a JSON string as it is (no quoting needed).")]


def _kv_value(ctx: typer.Context, value: str, string: bool) -> Any:
    if string:
        return read_string(ctx, value)
    return read_payload(ctx, value, hint=" (to store it as a string, add --string)")


def _kv_rows(entries: list[Any]) -> list[dict[str, Any]]:
    return [dict(e.to_json(), value_text=_text(e.value)) for e in entries]


@kv_app.command("get")
@example("coord kv get web/port",
         "coord kv get web/port --json")
@handle_errors
def kv_get(ctx: typer.Context, key: KeyArg, as_json: JsonOption = False) -> None:
    """Print a key's value as JSON (with --json: the entry with version and owner)."""
    from coord import kv
    from coord.errors import NotFound

    entry = kv.get(store(ctx), key)
    if entry is None:
        raise NotFound("key", key)
    if as_json:
        emit_json(current(entry.to_json(), id_from="key"))
    else:
        print(_text(entry.value))


@kv_app.command("set")
@example("coord kv set web/port 8080",
         "coord kv set web/name my-app --string",
         "coord kv set web/port 8080 --ephemeral   # under `coord run`")
@handle_errors
def kv_set(
    ctx: typer.Context,
    key: KeyArg,
    value: Annotated[str, typer.Argument(help="JSON value, or - to read it from stdin.",
                                         show_default=False)],
    ephemeral: EphemeralOption = False,
    string: StringOption = False,
    as_: AsOption = None,
) -> None:
    """Set a key; prints its new version. VALUE is JSON (`8080`, `'"text"'`, `'{"a": 1}'`);
    with --string it is stored as a JSON string as it is (`coord kv set web/name my-app
    --string`)."""
    from coord import kv

    owner = _owner(ctx, ephemeral, as_)
    print(kv.set(store(ctx), key, _kv_value(ctx, value, string), owner=owner))


@kv_app.command("cas")
@example("coord kv cas web/port 0 8080      # only if absent",
         "coord kv cas web/port 12 8081")
@handle_errors
def kv_cas(
    ctx: typer.Context,
    key: KeyArg,
    version: Annotated[int, typer.Argument(min=0, max=INT64_MAX, help="The version the key must still have (0: the "
                                           "key must not exist).", show_default=False)],
    value: Annotated[str, typer.Argument(help="JSON value, or - to read it from stdin.",
                                         show_default=False)],
    ephemeral: EphemeralOption = False,
    string: StringOption = False,
    as_: AsOption = None,
) -> None:
    """Compare-and-set: set the key only if its version is still VERSION; prints the new
    version (exit 1 with the version found when it moved on)."""
    from coord import kv

    owner = _owner(ctx, ephemeral, as_)
    print(kv.cas(store(ctx), key, _kv_value(ctx, value, string), version=version, owner=owner))


@kv_app.command("del")
@example("coord kv del web/port",
         "coord kv del web/port --version 12")
@handle_errors
def kv_del(
    ctx: typer.Context,
    key: KeyArg,
    version: Annotated[int | None, typer.Option("--version", min=0, max=INT64_MAX, help="Delete only while the key "
                                                "has this version.")] = None,
) -> None:
    """Delete a key (exit 1 when there is no such key)."""
    from coord import kv
    from coord.errors import NotFound

    if not kv.delete(store(ctx), key, version=version):
        raise NotFound("key", key)


@kv_app.command("ls")
@example("coord kv ls web/",
         "coord kv ls --json")
@handle_errors
def kv_ls(
    ctx: typer.Context,
    prefix: Annotated[str, typer.Argument(help="Only keys starting with this.")] = "",
    as_json: JsonOption = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """List keys (those starting with PREFIX) with their versions, owners and values."""
    from coord import kv

    entries = kv.list_keys(store(ctx), prefix)
    if as_json:
        emit_json([current(e.to_json(), id_from="key") for e in entries])
    else:
        table(_kv_rows(entries), KV_COLUMNS, headers=not no_headers)


@kv_app.command("watch")
@example("coord kv watch web/ --prefix",
         "coord kv watch web/port --count 1 --timeout 60")
@handle_errors
def kv_watch(
    ctx: typer.Context,
    key: KeyArg,
    prefix: Annotated[bool, typer.Option("--prefix", help="Watch every key starting with "
                                         "KEY.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Stop after this many "
                                                  "seconds without a change.")] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, max=INT64_MAX, help="Stop after this many "
                                              "changes.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Print each change of a key (or prefix) as it happens, one line each (JSON lines with
    --json). Exit 3 when the timeout passed without any change."""
    from coord import kv
    from coord.errors import TimeoutExpired

    seen = 0
    for change in kv.watch(store(ctx), key, prefix=prefix, timeout=timeout):
        seen += 1
        if as_json:
            emit_json(current(change.to_json(), id_from="key"))
        elif change.entry is None:
            print(f"deleted {change.key}", flush=True)
        else:
            print(f"set {change.key} {change.entry.version} {_text(change.entry.value)}",
                  flush=True)
        if count is not None and seen >= count:
            return
    if not seen:
        raise TimeoutExpired(f"watch {key}", timeout or 0)
