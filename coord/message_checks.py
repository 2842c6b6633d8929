"""The invariants of messages (``coord.check``): what the engine finds broken, and the requests
and replies still held for instances that are gone or dead (the death rule takes them)."""

from __future__ import annotations

from .db import Row, Store


def problems(
    store: Store, instances: dict[str, Row], verdicts: dict[str, tuple[bool, str]]
) -> list[tuple[str, bool]]:
    """Broken message invariants as (detail, pending); pending ones await the reaper."""
    ops = store.backend.messages
    out = [(p.detail, p.pending) for p in ops.problems()]

    def registered(id: str, inc: int | None) -> bool:
        row = instances.get(id)
        if row is not None and row["status"] == "alive" and inc in (None, row["incarnation"]):
            return True
        # Look again: it may have registered after the snapshot was taken.
        fresh = store.backend.instances.registration(id)
        return fresh is not None and fresh[1] == "alive" and inc in (None, fresh[0])

    # A dead sender's requests and the replies to a dead requester go with the death rule.
    requests, replies = ops.holders()
    for mid, (who, inc) in requests:
        if not registered(who, inc):
            out.append((f"request {mid} held by {who}#{inc}, which is not registered", False))
        elif who in verdicts and not verdicts[who][0]:
            out.append((f"request {mid} held by {who}#{inc}, {verdicts[who][1]}", True))
    for mid, who in replies:
        if not registered(who, None):
            out.append((f"reply {mid} is addressed to {who}, which is not registered", False))
        elif who in verdicts and not verdicts[who][0]:
            out.append((f"reply {mid} is addressed to {who}, {verdicts[who][1]}", True))
    return out
