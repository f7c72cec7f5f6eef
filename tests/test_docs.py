"""Every ```python example in the user docs runs as written.

The ```python blocks of each page are executed in order, in one namespace per page (so a later block
may use what an earlier one defined, as a reader running them in order would), each block in a fresh
empty working directory. ``tempfile`` is pointed at pytest's temporary directory so whatever the
examples create is cleaned up. Any exception fails the test with the page and line of the block.
"""

from __future__ import annotations

import re
import tempfile
import traceback
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["getting-started.md", "python-api.md", "format.md"]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block of ``page``."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_pages_have_examples():
    for name in PAGES:
        assert python_blocks(DOCS / name), f"docs/{name}: no ```python block found"


@pytest.mark.parametrize("name", PAGES)
def test_python_examples_run(name, tmp_path, monkeypatch):
    page = DOCS / name
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for i, (line, code) in enumerate(python_blocks(page)):
        work = tmp_path / f"block-{i:02d}-line-{line}"
        work.mkdir()
        monkeypatch.chdir(work)
        try:
            exec(compile(code, f"docs/{name}:{line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"docs/{name}, the ```python block at line {line} failed:\n{traceback.format_exc()}")
