"""The layering of docs/architecture.md, held by a test: no import cycle among monoquant's modules,
and every module imports only what its row of the layering table allows.

Imports are read from the source (``ast``), module-level and inside functions alike (a lazy import
is a dependency too); only ``if TYPE_CHECKING:`` blocks are left out (annotations, never run).
The table is read from docs/architecture.md itself, so the document and the rule cannot drift
apart: add a row there and this test enforces it.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "monoquant"
DOC = ROOT / "docs" / "architecture.md"


def module_names() -> dict[str, Path]:
    """Dotted names relative to ``monoquant`` (``kernels``, ``formats``, ``formats.base``) -> file."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "monoquant"] = f
    return out


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The monoquant modules ``name`` imports (outside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    if name == "monoquant":
        package = []
    found: set[str] = set()

    def target(mod: str) -> None:
        if mod in known:
            found.add(mod)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("monoquant."):
                    target(a.name.removeprefix("monoquant."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("monoquant"):
                mod = node.module.removeprefix("monoquant").lstrip(".")
            else:
                mod = None
            if mod is not None:
                for a in node.names:  # `from . import fp8` names a submodule
                    sub = f"{mod}.{a.name}" if mod else a.name
                    if sub in known:
                        found.add(sub)
                    elif mod:
                        target(mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return found


#: Edges left out of the cycle check, each with its reason (none now: ``remote`` -> ``journal``
#: went away when ``atomic_write`` moved to the leaf ``atomicfile``).
KNOWN_EDGES: set[tuple[str, str]] = set()


def import_graph() -> dict[str, set[str]]:
    mods = module_names()
    known = set(mods)
    graph = {n: imports_of(n, p, known) for n, p in mods.items()}
    for a, b in KNOWN_EDGES:
        graph[a].discard(b)
    return graph


def layering_table() -> list[tuple[list[str], list[str]]]:
    """Rows ``(module patterns, allowed import patterns)`` of the table in docs/architecture.md
    (the one after the ``<!-- layering -->`` marker)."""
    text = DOC.read_text()
    start = text.index("<!-- layering -->")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or set(cells[0]) <= {"-", ":", " "} or cells[0] == "Layer":
            continue
        mods = re.findall(r"`([^`]+)`", cells[1])
        allowed = re.findall(r"`([^`]+)`", cells[2])
        rows.append((mods, allowed))
    return rows


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def test_the_table_is_read_and_names_real_modules():
    rows = layering_table()
    assert len(rows) >= 8
    mods = set(module_names())
    for pats, allowed in rows:
        for p in [*pats, *allowed]:
            assert any(fnmatch.fnmatchcase(m, p) for m in mods), (
                f"docs/architecture.md names {p!r}: no such module"
            )


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = [*stack[stack.index(m) :], m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)


def test_every_module_imports_only_what_its_layer_allows():
    graph = import_graph()
    rows = layering_table()
    bad = []
    for name, deps in sorted(graph.items()):
        row = next((r for r in rows if _matches(name, r[0])), None)
        if row is None:
            continue
        bad += [f"{name} imports {d}" for d in sorted(deps) if not _matches(d, row[1])]
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_numerics_core_and_reader_in_particular():
    graph = import_graph()
    assert graph["numerics"] <= {"errors"}
    assert not {d for d in graph["reader"] if d == "kernels" or d.startswith("formats")}
    units = [n for n in graph if n.startswith("formats.")]
    assert {"formats.cast", "formats.integer", "formats.fp8", "formats.nvfp4"} <= set(units)
    for u in units:
        assert graph[u] <= {"errors", "numerics", "packing", "optimize", "formats.base", "formats.common"}, u


def test_the_check_sees_a_cycle_and_a_lazy_import(tmp_path):
    """The reader of imports is not blind: a lazy (function-level) import counts, TYPE_CHECKING does not."""
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .kernels import Kernel\n"
        "def f():\n    from .schemes import get_scheme\n    from . import numerics\n"
    )
    assert imports_of("m", f, {"kernels", "schemes", "numerics"}) == {"schemes", "numerics"}
