"""Rows wider than a block are processed in column chunks (monoquant/widerows.py): the bytes equal
the whole-row path's, and memory no longer grows with the row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import monoquant
from monoquant.verify import verify
from tests.helpers import read_dir_bytes

SCHEMES = [
    ("int8", {}),
    ("int4", {}),
    ("fp8", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {"per_tensor": True}),
    ("fp8", {"per_tensor": True}),
    ("int4", {"group_size": 32, "optimize": True}),
    ("int8", {"group_size": 64}),
    ("int4", {"asymmetric": True}),
    ("int8", {"optimize": True}),
]


@pytest.mark.parametrize(("scheme", "opts"), SCHEMES)
def test_column_chunks_give_the_whole_row_bytes(tmp_path: Path, scheme: str, opts: dict) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(3, 8192, generator=g) * torch.linspace(0.1, 3, 8192)).to(torch.bfloat16)
    w[1, 4000] = 40.0  # an outlier in a middle chunk: the row scale must see it
    src = tmp_path / "in"
    src.mkdir()
    save_file(
        {"l.weight": w, "m.weight": torch.randn(16, 256, generator=g).to(torch.bfloat16)},
        str(src / "model.safetensors"),
    )
    whole = monoquant.stream(src, tmp_path / "whole", scheme, block_bytes=1 << 20, stats="exact", **opts)
    chunked = monoquant.stream(src, tmp_path / "chunked", scheme, block_bytes=1024, stats="exact", **opts)
    assert read_dir_bytes(tmp_path / "whole") == read_dir_bytes(tmp_path / "chunked")
    assert set(whole.stats) == set(chunked.stats)
    if "l.weight" not in whole.stats:  # bf16 -> bf16 is a copy
        return
    a, b = whole.stats["l.weight"], chunked.stats["l.weight"]
    assert b.sqnr_db == pytest.approx(a.sqnr_db, abs=1e-3) and b.numel == a.numel  # float32 partial sums
    assert verify(tmp_path / "chunked", against=src).ok


@pytest.mark.slow
def test_one_huge_row_stays_bounded(tmp_path: Path) -> None:
    """A single 256 MiB row (64 Mi float32 values): the run's anonymous peak stays far below the
    1.2 GiB it took when the row was one block."""
    src = tmp_path / "in"
    src.mkdir()
    save_file({"big.weight": torch.randn(1, 64 << 20)}, str(src / "model.safetensors"))
    code = (
        f"import json, monoquant; r = monoquant.stream({str(src)!r}, {str(tmp_path / 'out')!r}, 'int8', "
        "stats='off', overlap=False); print(json.dumps(r.memory))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    peak = json.loads(r.stdout)["peak_anon"]
    assert peak < 400 << 20, f"peak anonymous memory {peak / 2**20:.0f} MiB"
