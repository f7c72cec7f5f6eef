"""docs/cli.md is the CLI's real help text, and every command is documented."""

import importlib.util
from pathlib import Path

from monoquant.cli import main

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_equals_help():
    gen = load_generator()
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), "run: python scripts/gen_cli_docs.py"


def test_every_command_and_option_has_help():
    for name, cmd in main.commands.items():
        assert cmd.help, name
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, f"{name} {p.opts}"
