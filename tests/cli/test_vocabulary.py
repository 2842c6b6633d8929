"""One JSON vocabulary: every listing's --json keys are in the documented list (`id`,
`instance_id`, `alive`, `*_at` for wall-clock times ...), old names only beside their new
ones, and the README shows the same list (`python tests/cli/test_vocabulary.py` rewrites it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from coord.cli.vocabulary import KEYS, RENAMED

import coord

ROOT = Path(__file__).resolve().parents[2]
# Values that hold the user's data or free-form maps: their keys are not coord's words.
OPAQUE = {"payload", "value", "result", "labels", "detail", "counts", "not_imported"}
Invoke = Callable[..., Any]


def objects(value: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every JSON object in ``value`` (not inside opaque values), with where it is."""
    if isinstance(value, dict):
        yield path, value
        for k, v in value.items():
            if k not in OPAQUE:
                yield from objects(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from objects(v, f"{path}[{i}]")


@pytest.fixture
def world(store: coord.Store) -> Iterator[dict[str, Any]]:
    """One of everything: an instance with a process, a lease, jobs, a key, a message."""
    inst = coord.register(store, "voc-1", app="voc", heartbeat=False)
    proc = coord.processes.spawn(inst, ["sleep", "60"])
    lease = coord.leases.acquire(inst, "voc/lead", timeout=0)
    job = coord.queues.put(store, "voc/jobs", {"n": 1})
    coord.queues.put(store, "voc/jobs", {"n": 2})
    coord.kv.set(store, "voc/port", 8080, owner=inst)
    coord.messages.send(inst, "voc-1", {"hello": 1})
    coord.register(store, "voc-2", app="voc", heartbeat=False)  # someone to broadcast to
    old = coord.register(store, "voc-old", app="voc", heartbeat=False)
    orphan = coord.processes.spawn(old, ["sleep", "60"])
    old.close()  # it leaves its process running: an orphan
    yield {"job": job, "proc": proc.id}
    lease.release()
    coord.processes.stop(inst, proc.id, grace=0.1)
    coord.processes.kill_orphans(store, grace=0.1)
    for child in (proc, orphan):
        if child.popen is not None:
            child.popen.wait(10)


LISTINGS: list[list[str]] = [
    ["instances", "--all"], ["instance", "voc-1"], ["ps", "--all"], ["orphans"], ["top", "-n", "2"],
    ["leases"], ["leader", "voc/lead"], ["events"], ["queue", "ls"], ["queue", "show", "{job}"],
    ["queue", "stats"], ["queue", "put", "voc/jobs", "3"], ["queue", "claim", "voc/jobs"],
    ["kv", "ls"], ["kv", "get", "voc/port"], ["send", "voc-1", "2"], ["broadcast", "3"],
    ["recv"], ["reap", "--dry-run"], ["doctor"], ["metrics"],
    ["queue", "import", str(ROOT / "tests" / "fixtures" / "murmuration-queue-state.json")],
]
REPORTS = {"top", "reap", "doctor", "metrics", "import"}  # not rows of objects with ids


@pytest.mark.parametrize("args", LISTINGS, ids=[" ".join(a) for a in LISTINGS])
def test_every_listing_speaks_the_vocabulary(invoke: Invoke, world: dict[str, Any],
                                             args: list[str]) -> None:
    argv = [a.format(**world) for a in args]
    r = invoke(*argv, "--json", env={"COORD_INSTANCE_ID": "voc-1"})
    assert r.exit_code == 0 or (args[0] == "doctor" and r.exit_code == 1), r.output  # an orphan
    out = json.loads(r.stdout)
    found = list(objects(out))
    assert found, "no objects to check"
    for where, obj in found:
        unknown = set(obj) - set(KEYS) - set(RENAMED)
        assert not unknown, f"{' '.join(args)}{where}: keys not in the vocabulary: {unknown}"
        for key, v in obj.items():
            if key.endswith("_at"):
                assert v is None or isinstance(v, (int, float)), (where, key, v)
        for old, new in RENAMED.items():
            if old in obj:  # an old name only beside its new one, with the same value
                assert new in obj and obj[new] == obj[old], (where, old, new)
    rows = out if isinstance(out, list) else [out]
    if not REPORTS & set(args):
        assert all("id" in row for row in rows), f"{' '.join(args)}: an object without id"


def test_owners_are_instance_id_and_times_are_at(invoke: Invoke, world: dict[str, Any]) -> None:
    lease = json.loads(invoke("leader", "voc/lead", "--json").stdout)
    assert (lease["id"], lease["instance_id"], lease["incarnation"]) == (
        "voc/lead", "voc-1", lease["holder_incarnation"])
    assert isinstance(lease["acquired_at"], float)
    entry = json.loads(invoke("kv", "get", "voc/port", "--json").stdout)
    assert (entry["id"], entry["instance_id"]) == ("voc/port", "voc-1")
    msg = json.loads(invoke("recv", "--json", env={"COORD_INSTANCE_ID": "voc-1"}).stdout)
    assert (msg["sender_id"], msg["recipient_id"]) == ("voc-1", "voc-1")
    event = json.loads(invoke("events", "--json").stdout)[-1]
    assert isinstance(event["created_at"], float) and event["created_at"] == event["at"]


def vocabulary_markdown() -> str:
    lines = ["| key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in KEYS.items()]
    lines += ["", "Old names, printed beside the new ones for one release:", "",
              "| old key | now |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in RENAMED.items()]
    return "\n".join(lines) + "\n"


START, END = "<!-- json-keys:start -->\n", "<!-- json-keys:end -->"


def test_readme_shows_the_vocabulary() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split(START, 1)[1].split(END, 1)[0]
    assert section.strip() == vocabulary_markdown().strip(), (
        "regenerate with: python tests/cli/test_vocabulary.py")


if __name__ == "__main__":
    readme = ROOT / "README.md"
    head, rest = readme.read_text().split(START, 1)
    readme.write_text(head + START + "\n" + vocabulary_markdown() + "\n" + END
                      + rest.split(END, 1)[1])
