"""Tables that fit: one line per row, the terminal's width (or COLUMNS) with ellipses, full
values on one line when piped, command lines quoted as a shell would, `--no-headers` on every
listing, text from processes shown literally."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import coord_env, wait_until
from coord.cli.tables import fit, literal, render, shorten, width_of

import coord

Cli = Callable[..., subprocess.CompletedProcess[str]]
LOOP = 'while :; do echo "tick tock"; sleep 1; done'


@pytest.fixture
def web(db_path: Path, procs: list[Any], cli: Cli) -> str:
    """A live instance whose command line needs quoting; returns its id."""
    p = subprocess.Popen([sys.executable, "-m", "coord", "run", "--app", "web", "--instance-id",
                          "web-1", "--", "sh", "-c", LOOP], env=coord_env(db_path),
                         stdout=subprocess.DEVNULL)
    procs.append(p)
    wait_until(lambda: json.loads(cli("instances", "--json").stdout), timeout=20)
    return "web-1"


def test_piped_rows_are_whole_lines_with_quoted_command_lines(cli: Cli, web: str) -> None:
    r = cli("instances")
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout  # the header and one line for the one instance
    assert lines[0].split()[:3] == ["ID", "APP", "PID"]
    assert lines[1].startswith("web-1 ")
    assert lines[1].endswith(shlex.join(["sh", "-c", LOOP]))  # whole, and quoted
    assert "…" not in r.stdout


def test_columns_fits_every_line_with_an_ellipsis(cli: Cli, db_path: Path, web: str) -> None:
    r = cli("instances", env=coord_env(db_path, COLUMNS="80"))
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(width_of(line) <= 80 for line in lines), r.stdout
    assert lines[1].startswith("web-1") and lines[1].endswith("…")


def test_a_real_terminal_of_80_columns_gets_one_line_per_row(db_path: Path, web: str) -> None:
    """On a pty sized 80 columns (and no COLUMNS), the table fits it."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = coord_env(db_path)
    env.pop("COLUMNS", None)
    try:
        p = subprocess.run([sys.executable, "-m", "coord", "instances"], env=env, stdout=slave,
                           stderr=subprocess.PIPE, timeout=60)
        assert p.returncode == 0, p.stderr
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the writer side is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    lines = [line for line in out.decode().replace("\r", "").split("\n") if line]
    assert len(lines) == 2 and all(width_of(line) <= 80 for line in lines), lines


def test_text_from_processes_is_literal_and_on_one_line(cli: Cli, store: coord.Store) -> None:
    value = {"m": "[bold red]hi[/bold red]\nsecond line\x1b[31m"}
    assert cli("kv", "set", "app/x", json.dumps(value)).returncode == 0
    r = cli("kv", "ls")
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert "[bold red]hi[/bold red]" in lines[1] and "\x1b" not in r.stdout


# Every command that prints a table, with a setup making it print at least one row.
LISTINGS: list[tuple[list[str], str]] = [
    (["instances"], "ID"), (["ps", "--all"], "ID"), (["orphans"], "ID"), (["top", "-n", "3"], "PID"),
    (["leases"], "NAME"), (["queue", "ls"], "ID"), (["queue", "stats"], "QUEUE"),
    (["kv", "ls"], "KEY"), (["sql", "select 1 as one"], "one"),
]


@pytest.mark.parametrize(("args", "header"), LISTINGS, ids=[" ".join(a) for a, _ in LISTINGS])
def test_no_headers_on_every_listing(invoke: Callable[..., Any], store: coord.Store,
                                     args: list[str], header: str) -> None:
    coord.queues.put(store, "q", {"n": 1})
    coord.kv.set(store, "k", 1)
    with_headers = invoke(*args)
    assert with_headers.exit_code == 0, with_headers.output
    assert with_headers.stdout.split()[0] == header
    bare = invoke(*args, "--no-headers")
    assert bare.exit_code == 0, bare.output
    # The same rows (live figures may differ between the two runs), without the header.
    assert len(bare.stdout.splitlines()) == len(with_headers.stdout.splitlines()) - 1
    assert not bare.stdout or bare.stdout.split()[0] != header


def test_every_table_command_has_no_headers() -> None:
    """The list above is complete: every command with --no-headers is in it, and the other
    table printers (broadcast, recv, gather) have the option too."""
    import typer
    from coord.cli.main import app

    def walk(cmd: Any, path: tuple[str, ...] = ()) -> Any:
        for name, sub in getattr(cmd, "commands", {}).items():
            yield (*path, name), sub
            yield from walk(sub, (*path, name))

    having = {" ".join(p) for p, c in walk(typer.main.get_command(app))
              if any("--no-headers" in getattr(o, "opts", ()) for o in c.params)}
    assert having == {a[0] if a[0] not in ("queue", "kv") else " ".join(a[:2])
                      for a, _ in LISTINGS} | {"broadcast", "recv", "gather"}


def test_render_units() -> None:
    assert literal("a\nb\tc\x1b") == "a\\nb\\tc\\x1b"
    assert shorten("abcdef", 4) == "abc…" and shorten("abc", 4) == "abc"
    assert width_of("日本") == 4 and shorten("日本語", 5) == "日本…"
    assert fit([10, 40], [3, 3], 30) == [10, 18]
    lines = list(render([{"a": 1, "b": "x" * 50}], [("a", "A"), ("b", "B")], width=20))
    assert lines == ["A  B", "1  " + "x" * 16 + "…"]
    assert list(render([], [("a", "A")], width=None, headers=False)) == []
    # Numbers are never shortened; text gives way instead.
    lines = list(render([{"t": 1796116726250, "b": "y" * 40}], [("t", "TERM"), ("b", "B")],
                        width=24))
    assert lines[1].startswith("1796116726250  ") and lines[1].endswith("…")
