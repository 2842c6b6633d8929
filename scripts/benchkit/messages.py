"""Section 3: request -> reply between two processes; coord vs a pipe round trip (the
limit) and file-per-message IPC."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .harness import (
    POLL,
    Context,
    Result,
    WorkerFailed,
    mono,
    rotate,
    start_worker,
    stop_worker,
    wait_line,
    worker,
)


@worker
def w_msg_coord(spec: dict[str, Any]) -> None:
    """Answer every request with its own payload until "stop"."""
    import coord
    from coord import messages
    store = coord.Store(spec["db"])
    inst = coord.register(store, spec["id"], app="bench")
    print("ready", flush=True)
    while True:
        m = messages.receive(inst, timeout=None)
        if m is None:
            continue
        m.reply(m.payload)
        if m.payload == "stop":
            break
    inst.close()
    store.close()


@worker
def w_msg_pipe(spec: dict[str, Any]) -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        payload = json.loads(line)
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
        if payload == "stop":
            break


def _drop_file(directory: str, tmp: str, name: str, payload: Any) -> None:
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(json.dumps(payload))
    os.rename(path, os.path.join(directory, name))


def _take_file(directory: str) -> Any | None:
    names = os.listdir(directory)
    if not names:
        return None
    path = os.path.join(directory, min(names))
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    return json.loads(text)


@worker
def w_msg_files(spec: dict[str, Any]) -> None:
    """File-per-message IPC: poll the inbox every 1 ms; reply into the sender's inbox."""
    inbox, tmp = spec["inbox"], spec["tmp"]
    print("ready", flush=True)
    while True:
        msg = _take_file(inbox)
        if msg is None:
            time.sleep(POLL)
            continue
        _drop_file(msg["reply_to"], tmp, f"{msg['id']}.json", msg["payload"])
        if msg["payload"] == "stop":
            break


def section_messages(ctx: Context) -> list[Result]:
    import coord
    from coord import messages

    s = ctx.sizes
    d = ctx.fresh_dir("msg")
    store = coord.Store(d / "coord.db")
    me = coord.register(store, "bench-client", app="bench")
    boxes = {x: str(d / x) for x in ("server", "client", "tmp")}
    for path in boxes.values():
        os.mkdir(path, 0o700)
    servers = {
        "coord": start_worker("msg_coord", db=str(d / "coord.db"), id="bench-server"),
        "pipe": start_worker("msg_pipe"),
        "file-per-message dir": start_worker("msg_files", inbox=boxes["server"],
                                             tmp=boxes["tmp"]),
    }
    seq = iter(range(10**9))

    def via_coord(payload: Any) -> Any:
        return messages.request(me, "bench-server", payload, timeout=30).payload

    def via_pipe(payload: Any) -> Any:
        p = servers["pipe"]
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(payload) + "\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    def via_files(payload: Any) -> Any:
        i = next(seq)
        _drop_file(boxes["server"], boxes["tmp"], f"{i:012d}.json",
                   {"id": f"{i:012d}", "reply_to": boxes["client"], "payload": payload})
        end = mono() + 30
        while mono() < end:
            got = _take_file(boxes["client"])
            if got is not None:
                return got
            time.sleep(POLL)
        raise TimeoutError("no reply file within 30 s")

    ops: dict[str, Callable[[Any], Any]] = {
        "coord": via_coord, "pipe": via_pipe, "file-per-message dir": via_files}
    lats: dict[str, list[float]] = {k: [] for k in ops}
    errors: dict[str, str] = {}
    try:
        for k, p in servers.items():
            try:
                wait_line(p, "ready")
            except WorkerFailed as e:
                errors[k] = str(e)
        rounds = max(1, s.rounds)
        for r in range(rounds):
            for k in rotate(list(ops), r):
                if k in errors:
                    continue
                count = s.rtt // rounds + (s.rtt_warmup if r == 0 else 0)
                try:
                    for i in range(count):
                        payload = {"n": i, "ask": "status"}
                        t = time.perf_counter()
                        answer = ops[k](payload)
                        dt = (time.perf_counter() - t) * 1e6
                        if answer != payload:
                            raise WorkerFailed(f"wrong reply {answer!r} to {payload!r}")
                        if r > 0 or i >= s.rtt_warmup:
                            lats[k].append(dt)
                except Exception as e:  # a broken reference is reported, not fatal
                    errors[k] = f"{type(e).__name__}: {e}"
        for k in ops:
            if k not in errors:
                with contextlib.suppress(Exception):
                    ops[k]("stop")
    finally:
        for p in servers.values():
            stop_worker(p)
        me.close()
        store.close()
    notes = {
        "coord": "messages.request(); the responder waits in receive(timeout=None)",
        "pipe": "a JSON line each way over two pipes",
        "file-per-message dir": "a JSON file per message (tmp + rename), inboxes polled "
                                "every 1 ms",
    }
    return [Result("messages", "request→reply round trip", k, len(lats[k]), sum(lats[k]) / 1e6,
                   lats[k], limit=k == "pipe", coord=k == "coord", note=notes[k], per_op=True,
                   error=errors.get(k) or (None if lats[k] else "no round trip"))
            for k in ops]
