"""Every command — including the sub-apps others add — has help text, every option and
argument is described, and `--help` works for each. The README's quick start is exactly the
two commands it promises, and CI runs the second."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from coord.cli.main import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def walk(cmd: Any, path: tuple[str, ...] = ("coord",)) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(command path, command) for the root and every command and group below it."""
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from walk(sub, (*path, name))


COMMANDS = list(walk(typer.main.get_command(app)))
IDS = [" ".join(p) for p, _ in COMMANDS]


def test_the_tree_has_the_store_commands() -> None:
    assert {"coord path", "coord sql", "coord doctor"} <= set(IDS)


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_command_has_help_text(path: tuple[str, ...], cmd: Any) -> None:
    text = (cmd.help or cmd.short_help or "").strip()
    assert text, f"{' '.join(path)} has no help text (give it a docstring)"
    for param in cmd.params:
        if getattr(param, "hidden", False):
            continue
        assert (getattr(param, "help", None) or "").strip(), (
            f"{' '.join(path)}: {param.name} has no help text")


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_every_help_has_an_example(path: tuple[str, ...], cmd: Any) -> None:
    """`--help` of every command and group shows at least one example command line."""
    out = CliRunner().invoke(app, [*path[1:], "--help"]).stdout
    text = out.split("\nArguments:", 1)[0].split("\nOptions:", 1)[0]
    assert re.search(r"\n  Examples?:\n", text), f"{' '.join(path)} --help has no example"
    examples = text.split("xample", 1)[1].split("\n\n", 2)[1]
    lines = [line.strip() for line in examples.splitlines() if line.strip()]
    assert lines and all(re.search(r"\bcoord\b", line) for line in lines), lines
    named = " ".join(path[1:])
    assert any(f"coord {named}" in line for line in lines), (named, lines)


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_help_works(path: tuple[str, ...], cmd: Any) -> None:
    r = CliRunner().invoke(app, [*path[1:], "--help"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"Usage: {' '.join(path)}") or f"Usage: {' '.join(path)}" in r.stdout
    assert "Traceback" not in r.output


def test_short_help_option_and_real_process() -> None:
    assert CliRunner().invoke(app, ["-h"]).exit_code == 0
    r = subprocess.run([sys.executable, "-m", "coord", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "Usage: coord" in r.stdout and r.stderr == ""


def test_source_checkout_resolves_cli_and_schema() -> None:
    """Python started in the clone (cwd first on sys.path) imports the source tree's coord,
    even when a normal install exists: coord.cli and coord.schema must still resolve. -S
    keeps out the editable install's import hook, so only coord itself can make this work."""
    import sysconfig

    code = ("import coord.cli.main, coord.schema, coord.backend.sqlite.migrations as m; "
            "print(coord.cli.__file__, coord.schema.__file__, m.latest_version())")
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={"PYTHONPATH": sysconfig.get_paths()["purelib"]})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == [str(ROOT / "cli" / "__init__.py"),
                                    str(ROOT / "schema" / "__init__.py")]


# -- the README's promises ----------------------------------------------------------------------


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the quick start has one code block"
    return [line for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_is_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "coord demo" in commands[0] and "pip install ." in commands[0]
    assert all(tool in commands[1] for tool in ("[test]", "ruff check", "mypy", "pytest"))


def test_ci_runs_the_second_command() -> None:
    ci = ROOT / ".ci" / "run"
    assert ci.stat().st_mode & 0o111, ".ci/run must be executable"
    lines = [line.strip() for line in ci.read_text().splitlines()]
    assert lines[0].startswith("#!") and "bash" in lines[0]
    assert quick_start_commands()[1] in lines


def test_cli_reference_documents_every_command() -> None:
    reference = (ROOT / "docs" / "cli.md").read_text()
    missing = [" ".join(p) for p, _ in COMMANDS if f"### `{' '.join(p)}" not in reference]
    assert not missing, f"docs/cli.md lacks {missing}"


def test_readme_names_every_command_and_links_the_reference() -> None:
    section = (ROOT / "README.md").read_text().split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    assert "(docs/cli.md)" in section
    top = sorted({p[1] for p, _ in COMMANDS if len(p) > 1})
    missing = [n for n in top if f"`{n}" not in section and f"`coord {n}`" not in section]
    assert not missing, f"README's CLI reference section does not name {missing}"


def test_readme_python_example_runs(db_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    env["COORD_DB"] = str(db_path)  # coord.Store() with no path uses it
    r = subprocess.run([sys.executable, "-c", example], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("leader with term ")


def test_readme_lists_every_config_field() -> None:
    from dataclasses import fields

    from coord.config import Config

    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for f in fields(Config):
        assert f"| `{f.name}` | `COORD_{f.name.upper()}` |" in section, f.name


# -- the CLI reference (docs/cli.md), generated from the commands' own help -----------------------


def _usage(path: tuple[str, ...], cmd: Any) -> str:
    """`coord queue put [--priority PRIORITY] ... QUEUE PAYLOAD`: options, then arguments."""
    options, arguments = [], []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            name = (p.metavar or p.name or "").upper()
            name = f"-- {name}..." if p.nargs == -1 else name
            arguments.append(name if p.required else f"[{name}]")
        else:
            flag = next((o for o in p.opts if o.startswith("--")), p.opts[0])  # the first long name
            if not p.is_flag:
                flag += " " + (p.metavar or (p.name or "").upper())
            options.append(flag if p.required else f"[{flag}]")
    return " ".join([*path, *options, *arguments])


def _paragraphs(text: str) -> str:
    """Paragraphs joined into lines; one marked \\b (kept as it is, an example) as a code block."""
    out = []
    for par in text.strip().split("\n\n"):
        if par.startswith("\b\n"):
            lines = [line[2:] if line.startswith("  ") else line for line in par[2:].splitlines()]
            out.append("```sh\n" + "\n".join(lines) + "\n```")
        elif par.strip():
            out.append(" ".join(par.split()))
    return "\n\n".join(out)


def reference_markdown() -> str:
    """The CLI reference: each command's usage, help text and parameters, in the order the
    commands were registered."""
    out: list[str] = []

    def emit(path: tuple[str, ...], cmd: Any, level: int) -> None:
        out.append(f"{'#' * level} `{_usage(path, cmd)}`\n")
        out.append(_paragraphs(cmd.help or cmd.short_help or "") + "\n")
        described = []
        for p in cmd.params:
            if getattr(p, "hidden", False) or not getattr(p, "help", None):
                continue
            if p.param_type_name == "argument":
                label = (p.metavar or p.name or "").upper()
            else:
                label = ", ".join(p.opts)
            extra = f" [env: {p.envvar}]" if getattr(p, "envvar", None) else ""
            described.append(f"- `{label}`: {' '.join(p.help.split())}{extra}")
        if described:
            out.append("\n".join(described) + "\n")
        for name, sub in getattr(cmd, "commands", {}).items():
            emit((*path, name), sub, 4 if len(path) > 1 else 3)

    emit(("coord",), typer.main.get_command(app), 3)
    return "\n".join(out).rstrip() + "\n"


def write_reference(readme: Path = ROOT / "docs" / "cli.md") -> None:
    start, end = "<!-- cli-reference:start -->\n", "<!-- cli-reference:end -->"
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + reference_markdown() + "\n" + end + tail)


def test_cli_reference_is_current() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    assert reference_markdown() in text, "regenerate with: python tests/cli/test_help.py"


if __name__ == "__main__":
    # Regenerate the CLI reference (docs/cli.md): python tests/cli/test_help.py
    write_reference()


def test_command_table_names_each_commands_module() -> None:
    """main() builds only the invoked command's module: its table must be complete and true."""
    from coord.cli import main as cli_main

    for module in cli_main.MODULES:
        built = cli_main.build((module,))
        names = {c.name for c in built.registered_commands} | {g.name for g in built.registered_groups}
        assert names == {n for n, m in cli_main.COMMANDS.items() if m == module}, module
