"""What is in a checkpoint — input or output: tensors, dtypes, sizes, shards, quantization state.

Example:
    >>> info = inspect_checkpoint("out/")                   # doctest: +SKIP
    >>> info["totals"]["bits_per_weight"], info["quantized"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .dtypes import dtype_name
from .outreader import quantized_entries
from .reader import RowReader, open_checkpoint
from .schemes import MICROSCALE_KINDS


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a checkpoint from its headers (plus the tiny ``weight_shape`` tensors)."""
    ckpt = open_checkpoint(path)
    with RowReader("mmap") as reader:
        entries = quantized_entries(ckpt, reader)
    in_group = {r.name: base for base, e in entries.items() for r in e.parts.values()}
    tensors: list[dict[str, Any]] = []
    q_numel = q_bytes = 0
    for base, e in entries.items():
        numel = math.prod(e.shape)
        nbytes = sum(r.nbytes for r in e.parts.values())
        q_numel += numel
        q_bytes += nbytes
        first = min(e.parts.values(), key=lambda r: (r.file.name, r.offset))
        tensors.append(
            {
                "name": base,
                "state": "quantized",
                "scheme": e.scheme.name,
                "format": e.scheme.format,
                "shape": list(e.shape),
                # the original dtype (classic schemes store scales in it); NVFP4/MX scales are fp8/e8m0
                "dtype": "-" if e.scheme.kind in MICROSCALE_KINDS else dtype_name(e.parts["_scale"].dtype),
                "bytes": nbytes,
                "bits_per_weight": round(8 * nbytes / numel, 4) if numel else None,
                "file": first.file.name,
                "parts": {
                    r.name: {"dtype": dtype_name(r.dtype), "shape": list(r.shape)} for r in e.parts.values()
                },
            }
        )
    for r in ckpt.tensors:
        if r.name in in_group:
            continue
        tensors.append(
            {
                "name": r.name,
                "state": "dense",
                "dtype": dtype_name(r.dtype),
                "shape": list(r.shape),
                "bytes": r.nbytes,
                "file": r.file.name,
            }
        )
    files = {}
    for f in ckpt.files:
        files[f.name] = {"bytes": f.stat().st_size, "tensors": sum(1 for r in ckpt.tensors if r.file == f)}
    by_dtype: dict[str, int] = {}
    for t in tensors:
        key = t["scheme"] if t["state"] == "quantized" else t["dtype"]
        by_dtype[key] = by_dtype.get(key, 0) + t["bytes"]
    qc = None
    root = Path(path)
    cfg = root / "config.json" if root.is_dir() else None
    if cfg is not None and cfg.exists():
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config")
        except (ValueError, AttributeError, RecursionError):
            qc = None
    return {
        "path": str(root),
        "files": files,
        "totals": {
            "tensors": len(tensors),
            "quantized": len(entries),
            "bytes": sum(t["bytes"] for t in tensors),
            "bits_per_weight": round(8 * q_bytes / q_numel, 4) if q_numel else None,
            "bytes_by_kind": by_dtype,
        },
        "quantization_config": qc,
        "tensors": sorted(tensors, key=lambda t: t["name"]),
    }
