"""The layout's rules, read from the source with ``ast``: no import circles beyond the known
ones (which must still be there, so the list shrinks as they are removed), and the
capability modules moved behind the engine seam hold no SQL and import no engine library."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The import circles that remain, each as the set of modules it joins; each goes when the
#: step of ``coord.backend``'s plan that names it lands, and this list shrinks with it.
KNOWN_CIRCLES: set[frozenset[str]] = set()
# Gone: db -> migrate/reaper -> instances -> db (with coord.tree), when Store's constructor
# stopped migrating and rebasing itself: opening a store is the engine's ``open``
# (coord/backend/sqlite/opening.py), above Store, and the death rule's state changes and
# the liveness verdict live in the engine, so instances and the reaper no longer import
# each other.

#: The modules outside the engine folders that import an engine's module: the package
#: registers its engines, ``coord.instances`` still re-exports the SQLite verdict for
#: ``coord.queues``, and ``coord.db`` parses a PostgreSQL location (``postgresql.url``,
#: standard library only) to name the store's host-local directory. Each must still do so
#: (the list only shrinks).
ENGINE_IMPORTERS = ("coord/__init__.py", "coord/db.py", "coord/instances.py")


def _outside_the_engines() -> list[str]:
    """Every module of coord/ and cli/ that is not in an engine folder (coord/backend/*/),
    the protocol's own modules (coord/backend/*.py) included."""
    files = [*(ROOT / "coord").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]
    return sorted(str(f.relative_to(ROOT)) for f in files
                  if not f.relative_to(ROOT).is_relative_to("coord/backend")
                  or f.parent == ROOT / "coord/backend")


#: Modules whose storage lives in an engine: no SQL, no apsw. Every module outside the engine
#: folders (the store's connections, transactions and busy retry went into
#: coord/backend/sqlite/ too).
BEHIND_THE_SEAM = tuple(_outside_the_engines())

SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|REPLACE|UPSERT|CREATE|DROP|ALTER|PRAGMA|BEGIN|COMMIT|"
    r"ROLLBACK|SAVEPOINT|ATTACH|VACUUM|WHERE|VALUES|RETURNING|JOIN)\b"
)


def _modules() -> dict[str, Path]:
    """Every module of the installed namespace: coord/** and cli/** (as coord.cli)."""
    out: dict[str, Path] = {}
    for base, prefix in ((ROOT / "coord", "coord"), (ROOT / "cli", "coord.cli")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, name: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The coord modules ``name`` imports anywhere (inside functions too: an import there
    still makes the circle, it only delays it), except under ``if TYPE_CHECKING``."""
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from . import nudge` imports a module, not the package
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in known else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {
        name: _imports(ast.parse(path.read_text(), str(path)), name,
                       path.name == "__init__.py", known)
        for name, path in mods.items()
    }


def _circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[frozenset[str]] = set()

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part: set[str] = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.add(w)
                if w == v:
                    break
            if len(part) > 1:
                out.add(frozenset(part))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_import_graph_is_read() -> None:
    graph = _graph()
    # The walk sees relative, package and function-level imports alike.
    assert "coord.backend" in graph["coord.db"]
    assert "coord.backend" in graph["coord.kv"]
    assert "coord.nudge" in graph["coord.instances"]  # `from . import nudge`
    assert "coord" not in graph["coord.instances"]  # ... names the module, not the package
    assert "coord.tree" in graph["coord.reaper"]  # imported inside reap()
    # opening a store sits above Store
    assert "coord.backend.sqlite.migrations" not in graph["coord.db"]
    assert "coord.db" not in graph["coord.backend"]  # only under TYPE_CHECKING there


def test_no_import_circles_but_the_known_ones() -> None:
    circles = _circles(_graph())
    new = [sorted(c) for c in circles - KNOWN_CIRCLES]
    assert not new, f"new import circles: {new}"
    gone = [sorted(c) for c in KNOWN_CIRCLES - circles]
    assert not gone, f"known circles changed or gone, update KNOWN_CIRCLES: {gone}"


def test_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == {frozenset({"a", "b", "c"})}


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the constant nodes that are docstrings (prose, which may name SQL)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def sql_literals(path: Path) -> list[str]:
    """String literals of ``path`` (docstrings aside) that read as SQL."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docs and SQL_WORDS.search(node.value)
    ]


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("rel", BEHIND_THE_SEAM)
def test_capability_module_holds_no_sql_and_no_apsw(rel: str) -> None:
    path = ROOT / rel
    assert sql_literals(path) == []
    assert "apsw" not in imported_roots(path)


def test_every_module_is_checked() -> None:
    # The walk finds the capability modules, the CLI and the protocol, not the engine.
    for rel in ("coord/kv.py", "coord/queues.py", "coord/demo.py", "coord/metrics.py",
                "coord/adhoc.py", "cli/lease_cmds.py", "coord/backend/__init__.py"):
        assert rel in BEHIND_THE_SEAM
    assert not [m for m in BEHIND_THE_SEAM if m.startswith("coord/backend/sqlite/")]


def test_the_store_is_checked() -> None:
    assert "coord/db.py" in BEHIND_THE_SEAM


def test_psycopg_is_imported_only_in_the_postgresql_engine() -> None:
    # Anywhere, function-level and TYPE_CHECKING imports included. The tests start and reach
    # their own clusters with it, and the PostgreSQL benchmark (scripts/) drives a server.
    files = [*(ROOT / "coord").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]
    found = {str(f.relative_to(ROOT)) for f in files if "psycopg" in imported_roots(f)}
    assert found, "the finder must see the engine's own psycopg imports"
    outside = sorted(m for m in found if not m.startswith("coord/backend/postgresql/"))
    assert not outside, f"psycopg imported outside coord/backend/postgresql/: {outside}"


_PROTOCOL_MODULES = {p.stem for p in (ROOT / "coord/backend").glob("*.py")}


@functools.cache
def _graph_by_path() -> dict[str, set[str]]:
    graph, mods = _graph(), _modules()
    return {str(path.relative_to(ROOT)): graph[name] for name, path in mods.items()}


def _engine_imports(rel: str) -> set[str]:
    """The engine modules (``coord.backend.<engine>...``) that ``rel`` imports."""
    return {m for m in _graph_by_path()[rel] if m.startswith("coord.backend.")
            and m.split(".")[2] not in _PROTOCOL_MODULES}


@pytest.mark.parametrize("rel", BEHIND_THE_SEAM)
def test_only_the_protocol_is_imported_outside_the_engines(rel: str) -> None:
    """Capability modules reach an engine through ``store.backend`` and the protocol's
    types, never by importing an engine's module (but the known ones, which must still)."""
    found = _engine_imports(rel)
    if rel in ENGINE_IMPORTERS:
        assert found, f"{rel} no longer imports an engine: drop it from ENGINE_IMPORTERS"
    else:
        assert not found, f"{rel} imports engine modules {sorted(found)}"


def test_the_sql_finder_finds_sql() -> None:
    # The engine's files are where the SQL went: the finder must see it there.
    assert sql_literals(ROOT / "coord/backend/sqlite/kv.py")
    assert "apsw" in imported_roots(ROOT / "coord/backend/sqlite/kv.py")


@pytest.mark.parametrize("rel", ["coord/kv.py", "coord/messages.py", "coord/leases.py",
                                 "coord/lease_rules.py", "coord/lease_keeper.py"])
def test_capability_module_reaches_the_engine_only_through_the_store(rel: str) -> None:
    graph = _graph()
    name = "coord." + Path(rel).stem
    assert not {m for m in graph[name] if m.startswith("coord.backend.")}


def private_imports(source: str) -> list[str]:
    """Names with one leading underscore that a module imports from coord (relative or
    absolute): another module's private parts, a missing seam."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("coord")):
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_cross_module_imports() -> None:
    files = [*sorted((ROOT / "coord").rglob("*.py")), *sorted((ROOT / "cli").glob("*.py"))]
    bad = {str(f.relative_to(ROOT)): names for f in files
           if (names := private_imports(f.read_text(encoding="utf-8")))}
    assert not bad, f"private names imported across modules: {bad}"


def test_the_private_import_finder_finds_one() -> None:
    assert private_imports("from .queues import _nudge, put\nfrom os import _exit") == [
        "queues._nudge"]
    assert private_imports("from coord.db import __all__, Store") == []
