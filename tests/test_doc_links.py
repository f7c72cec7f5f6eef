"""The docs are self-contained: every link of README.md and docs/*.md leads to a file of this
repository or to a public web address, and no page cites a path outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCED = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
PUBLIC = re.compile(r"^(https?://|mailto:)")
#: where a page once pointed outside the repository (the machine the project was built on)
OUTSIDE = re.compile(r"shared/research|\.\./shared|/work/")


def links(page: Path) -> list[str]:
    """Every link target of ``page`` outside fenced code blocks (inline and reference style)."""
    text = FENCED.sub("", page.read_text())
    return [*LINK.findall(text), *REF_DEF.findall(text)]


def broken(page: Path, target: str) -> str | None:
    """Why ``target`` (a link of ``page``) leads outside the repository, or ``None``."""
    if PUBLIC.match(target) or target.startswith("#"):
        return None
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
        return "not a public web address"
    path = target.split("#", 1)[0]
    if path.startswith("/"):
        return "an absolute path"
    dest = (page.parent / path).resolve()
    if ROOT not in dest.parents and dest != ROOT:
        return "outside the repository"
    if not dest.exists():
        return "no such file in the repository"
    return None


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_stay_in_the_repository(page: Path) -> None:
    bad = [f"{t} ({why})" for t in links(page) if (why := broken(page, t)) is not None]
    assert not bad, f"{page.relative_to(ROOT)} links outside the repository: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_page_cites_a_path_outside_the_repository(page: Path) -> None:
    hits = [
        f"line {page.read_text().count(chr(10), 0, m.start()) + 1}: {m.group()}"
        for m in OUTSIDE.finditer(page.read_text())
    ]
    assert not hits, f"{page.relative_to(ROOT)} cites paths outside the repository: {hits}"


def test_the_check_catches_links_outside(tmp_path: Path) -> None:
    """The checks can fail: links to a missing file, a parent directory, an absolute path."""
    page = ROOT / "docs" / "format.md"
    assert broken(page, "../../shared/research/REPORT.md") == "outside the repository"
    assert broken(page, "/work/shared/x.md") == "an absolute path"
    assert broken(page, "nonexistent.md#x") == "no such file in the repository"
    assert broken(page, "file:///etc/passwd") == "not a public web address"
    assert broken(page, "loading.md#vllm") is None
    assert broken(page, "https://github.com/vllm-project/compressed-tensors") is None
    doc = tmp_path / "p.md"
    doc.write_text("see [x](../y.md) and\n```\n[not a link](nowhere.md)\n```\n[r]: ref.md\n")
    assert links(doc) == ["../y.md", "ref.md"]
    assert OUTSIDE.search("the method of `shared/research/perf_anchors.md`")
