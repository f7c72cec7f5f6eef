"""The layering of the public API, job control, options and the output reader
(docs/architecture.md), read from the source: each rule names the modules it checks, so a
new import that breaks it fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "monoquant"
MODULES = {p.stem: p for p in PKG.glob("*.py")}


def imports(module: str) -> list[tuple[int, str, str]]:
    """``(line, imported module, name)`` of every import of ``monoquant/<module>.py`` (relative
    or absolute; ``name`` is ``""`` for ``import x``)."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and not mod.startswith("monoquant"):
                continue
            mod = mod.removeprefix("monoquant.").removeprefix("monoquant")
            for a in node.names:
                # ``from . import pipeline`` imports the module ``pipeline``
                out.append((node.lineno, mod or a.name, a.name if mod else ""))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("monoquant."):
                    out.append((node.lineno, a.name.removeprefix("monoquant."), ""))
    return out


def uses(module: str, name: str) -> list[int]:
    """Lines of ``monoquant/<module>.py`` that mention the identifier ``name``."""
    tree = ast.parse(MODULES[module].read_text())
    return sorted(
        {
            n.lineno
            for n in ast.walk(tree)
            if (isinstance(n, ast.Name) and n.id == name) or (isinstance(n, ast.Attribute) and n.attr == name)
        }
    )


def test_the_public_api_uses_only_the_job_entry_point() -> None:
    got = [(line, name) for line, mod, name in imports("pipeline") if mod == "jobs"]
    assert [name for _, name in got] == ["run_job"], got
    private = [line for line, mod, name in imports("pipeline") if name.startswith("_")]
    assert not private, f"pipeline.py imports private names at lines {private}"


def test_nothing_imports_the_cli() -> None:
    bad = [
        f"{m}.py:{line}"
        for m in MODULES
        if m not in ("cli", "__main__")
        for line, mod, _ in imports(m)
        if mod == "cli"
    ]
    assert not bad, f"only python -m monoquant may import the CLI: {bad}"


def test_job_control_stays_below_the_public_api() -> None:
    """jobs.py runs a plan; it does not reach back into the API module or the CLI."""
    bad = [(line, mod) for line, mod, _ in imports("jobs") if mod in ("pipeline", "cli")]
    assert not bad


@pytest.mark.parametrize("module", ["loader", "verify", "inspection"])
def test_outputs_are_read_through_the_output_reader(module: str) -> None:
    assert any(mod == "outreader" for _, mod, _ in imports(module)), f"{module}.py does not use outreader"


def test_nothing_else_decodes_an_output_directory() -> None:
    """No module but the output reader opens safetensors files with ``safe_open`` or parses the
    scheme metadata of an index (``Scheme.from_dict``)."""
    for name in ("safe_open", "from_dict"):
        bad = {m: uses(m, name) for m in MODULES if m not in ("outreader", "schemes") and uses(m, name)}
        assert not bad, f"{name} used outside monoquant/outreader.py: {bad}"


def test_options_are_resolved_in_one_module() -> None:
    """``get_scheme`` (names and keyword options -> a Scheme) is called by the option resolver,
    and by the modules that build candidate schemes of their own (mixed precision), nowhere
    else: the public functions hand resolved values down."""
    callers = {m for m in MODULES if m not in ("schemes",) and uses(m, "get_scheme")}
    assert callers <= {"options", "mixed"}, callers


def test_shard_and_index_names_have_one_definition() -> None:
    """The output file names are spelled in monoquant/outnames.py only (plan.py re-exports)."""
    bad = []
    for m, path in MODULES.items():
        if m == "outnames":
            continue
        tree = ast.parse(path.read_text())
        for n in ast.walk(tree):
            name = n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else ""
            if name in ("model.safetensors.index.json", ".partial") or "-of-{" in name:
                bad.append(f"{m}.py:{n.lineno} {name!r}")
    assert not bad, bad


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The import reader sees relative, absolute and module imports."""
    src = (
        "from .jobs import _run_shards\nfrom monoquant.cli import main\n"
        "import monoquant.outreader\nfrom . import verify\n"
    )
    (tmp_path / "x.py").write_text(src)
    MODULES["_probe_x"] = tmp_path / "x.py"
    try:
        assert imports("_probe_x") == [
            (1, "jobs", "_run_shards"),
            (2, "cli", "main"),
            (3, "outreader", ""),
            (4, "verify", ""),
        ]
        assert uses("_probe_x", "main") == []
    finally:
        del MODULES["_probe_x"]
