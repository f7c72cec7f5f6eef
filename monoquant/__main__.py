"""``python -m monoquant`` runs the CLI."""

from .cli import entry

entry()
