"""Every docstring example in the package runs and prints what it shows (``doctest``), so an
example cannot drift from the code. Examples that need files or a run write ``# doctest: +SKIP``."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import tempfile
from pathlib import Path

import pytest

import monoquant

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(monoquant.__path__, "monoquant.") if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the examples' mkdtemp() directories go under this test's tmp_path, which pytest removes
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mod = importlib.import_module(name)
    r = doctest.testmod(
        mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True, verbose=False
    )
    assert r.failed == 0, (
        f"{name}: {r.failed} of {r.attempted} docstring examples failed (see the output above)"
    )


def test_a_wrong_example_is_caught() -> None:
    """The check is not blind: a docstring whose printed value is wrong fails."""

    def f() -> None:
        """
        >>> 1 + 1
        3
        """

    runner = doctest.DocTestRunner(verbose=False)
    for t in doctest.DocTestFinder().find(f, "f", globs={}):
        runner.run(t, out=lambda s: None)
    assert runner.failures == 1
