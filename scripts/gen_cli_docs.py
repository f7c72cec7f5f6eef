#!/usr/bin/env python3
"""Write docs/cli.md from the CLI's own --help texts (tests/test_cli_docs.py keeps them equal).

Usage: python scripts/gen_cli_docs.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

from monoquant.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

INTRO = """# CLI reference

Generated from `monoquant --help` by `python scripts/gen_cli_docs.py`; a test fails when this page and
the real help texts differ.

Exit codes: `0` success; `1` an error (one line on stderr: `monoquant: error: what, where, what to do`;
`-v` adds the traceback); `2` a usage error (unknown flag, missing argument); `3` `verify` found a tensor
below `--min-sqnr`, or `verify --engine` found the model below its thresholds; `130` interrupted (rerun
the same command to resume).
"""


def help_text(*args: str) -> str:
    """The real ``monoquant ARGS --help`` output on a 100-column terminal."""
    res = CliRunner(env={"COLUMNS": "100"}).invoke(main, [*args, "--help"], prog_name="monoquant")
    if res.exit_code != 0:
        raise RuntimeError(res.output)
    return res.output.rstrip("\n")


def render() -> str:
    parts = [INTRO, "## monoquant\n", "```\n" + help_text() + "\n```\n"]
    for name in sorted(main.commands):
        parts.append(f"## monoquant {name}\n")
        parts.append("```\n" + help_text(name) + "\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if DOC.exists() and DOC.read_text() == text else 1)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
