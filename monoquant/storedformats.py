"""How the outputs of a format are named and recognised on disk.

* :func:`output_name`: an output suffix starting with ``.`` names a sibling of the module
  (``...q_proj.weight`` + ``.input_global_scale`` -> ``...q_proj.input_global_scale``), the
  others extend the weight's name (``_packed`` -> ``...q_proj.weight_packed``).
* :func:`infer_format`: the scheme of a stored group of the FP8-block, NVFP4 and MX formats, from
  dtypes and shapes alone.

Example:
    >>> output_name("m.q_proj.weight", ".input_global_scale"), output_name("m.q_proj.weight", "_packed")
    ('m.q_proj.input_global_scale', 'm.q_proj.weight_packed')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .schemes import FORMAT_PRESETS, Scheme


def output_name(name: str, suffix: str) -> str:
    """The on-disk name of the output ``suffix`` of input tensor ``name``."""
    if suffix.startswith("."):
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        return module + suffix
    return name + suffix


def infer_format(parts: Mapping[str, Any]) -> Scheme | None:
    """The scheme of one stored group (tensors keyed by suffix) when it is one of the formats
    here, from dtypes and shapes alone; ``None`` otherwise (the classic schemes).

    NVFP4 is told by its ``_global_scale`` (W4A4 by ``.input_global_scale``), MXFP4 by uint8
    codes without it, MXFP8 by a uint8 scale beside float8 codes, FP8 block by a scale grid of
    ``[ceil(rows/128), ceil(cols/128)]`` that is not one per row. MXFP4/MXFP8 are returned as
    their weight-only presets (the activations do not change the stored weights).
    """
    scale = parts.get("_scale")
    if scale is None:
        return None
    if "_packed" in parts and parts["_packed"].dtype == torch.uint8:
        if "_global_scale" in parts:
            return FORMAT_PRESETS["nvfp4" if ".input_global_scale" in parts else "nvfp4a16"]
        return FORMAT_PRESETS["mxfp4a16"]
    q = parts.get("")
    if q is None or q.dtype != torch.float8_e4m3fn:
        return None
    if scale.dtype == torch.uint8:
        return FORMAT_PRESETS["mxfp8a16"]
    rows = int(q.shape[0]) if q.dim() else 1
    cols = q.numel() // max(rows, 1)
    grid = (-(-rows // 128), -(-cols // 128))
    if (
        scale.dim() == 2
        and tuple(scale.shape) == grid
        and not (scale.shape[0] == rows and scale.shape[1] == 1)
    ):
        return FORMAT_PRESETS["fp8-block"]
    return None
