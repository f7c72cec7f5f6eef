"""On-disk names of quantized tensors, and recognising them again.

A quantized tensor ``P.weight`` becomes, by format:

=================  ==============================================================================
pack-quantized     ``P.weight_packed`` (I32), ``P.weight_scale``, ``P.weight_shape`` (I64)
                   [+ ``P.weight_zero_point`` (I32, packed along dim 0) when asymmetric]
int-quantized      ``P.weight`` (I8), ``P.weight_scale``
naive/float-quant. ``P.weight`` (F8_E4M3), ``P.weight_scale``
=================  ==============================================================================

Example:
    >>> names = ["a.weight_packed", "a.weight_scale", "a.weight_shape", "norm.weight"]
    >>> sorted(find_groups(names))
    ['a.weight']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import MonoquantError
from .packing import packed_cols
from .schemes import Scheme, Strategy
from .storedformats import infer_format, output_name

SUFFIXES = ("_packed", "_scale", "_shape", "_zero_point")


@dataclass(frozen=True)
class Group:
    """The output tensors of one quantized input tensor, keyed by suffix."""

    base: str
    names: dict[str, str]


def find_groups(names: Iterable[str]) -> dict[str, Group]:
    """Find quantized tensors among output names: ``{base name: Group}``.

    A base ``B`` is quantized when ``B_scale`` exists together with ``B_packed`` (and
    ``B_shape``) or with ``B`` itself.
    """
    present = set(names)
    groups: dict[str, Group] = {}
    for n in present:
        if not n.endswith("_scale"):
            continue
        base = n[: -len("_scale")]
        if base + "_packed" in present and base + "_shape" in present:
            found = {s: base + s for s in SUFFIXES if base + s in present}
            groups[base] = Group(base, found)
        elif base + "_packed" in present:  # nvfp4 / mxfp4 (monoquant.formats): no weight_shape
            found = {s: base + s for s in (*SUFFIXES, "_global_scale") if base + s in present}
            sibling = output_name(base, ".input_global_scale")
            if sibling in present:
                found[".input_global_scale"] = sibling
            groups[base] = Group(base, found)
        elif base in present:
            groups[base] = Group(base, {"": base, "_scale": n})
    return groups


def infer_scheme(parts: Mapping[str, torch.Tensor]) -> Scheme:
    """Reconstruct the scheme of one group from its tensors (keyed by suffix; ``_shape`` by value,
    the others may be meta tensors: only shapes and dtypes are used).

    Used when no metadata says it (e.g. a dict loaded with ``safetensors.torch.load_file``).
    """
    from .kernels import as_rows

    fmt = infer_format(parts)
    if fmt is not None:
        return fmt
    scale = parts["_scale"]
    if "_packed" in parts:
        shape = tuple(int(v) for v in parts["_shape"].tolist())
        rows, cols = as_rows(shape)
        words = parts["_packed"].shape[-1]
        if packed_cols(cols, 4) == words and packed_cols(cols, 8) != words:
            bits = 4
        elif packed_cols(cols, 8) == words:
            bits = 8
        else:
            raise MonoquantError(f"packed width {words} does not fit {cols} columns at 4 or 8 bits")
        strategy, group = _strategy(scale, rows, cols)
        sym = "_zero_point" not in parts
        return Scheme(kind="int", bits=bits, strategy=strategy, group_size=group, symmetric=sym)
    q = parts[""]
    shape = tuple(q.shape)
    rows, cols = as_rows(shape)
    strategy, group = _strategy(scale, rows, cols)
    if q.dtype == torch.int8:
        return Scheme(
            kind="int", bits=8, strategy=strategy, group_size=group, dynamic=True, act_strategy="token"
        )
    if q.dtype == torch.float8_e4m3fn:
        return Scheme(kind="float", bits=8, strategy=strategy, dtype=torch.float8_e4m3fn)
    raise MonoquantError(f"cannot tell the scheme of a {q.dtype} tensor with a scale")


def dequantize_group(
    parts: dict[str, torch.Tensor], scheme: Scheme | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The dense tensor of one quantized group (its stored tensors keyed by suffix), decoded with
    ``scheme`` (inferred from the parts when ``None``), in ``dtype`` (default: the stored one).

    Example:
        >>> import torch, monoquant
        >>> q = monoquant.quantize({"l.weight": torch.ones(4, 64)}, "int4")
        >>> w = dequantize_group({s: q["l.weight" + s] for s in ("_packed", "_scale", "_shape")})
        >>> w.shape, bool((w - 1).abs().max() < 0.1)
        (torch.Size([4, 64]), True)
    """
    from .kernels import get_kernel

    scheme = scheme or infer_scheme(parts)
    shape = tuple(int(v) for v in parts["_shape"].tolist()) if "_shape" in parts else dense_shape(parts)
    return get_kernel(scheme).dequantize(parts, shape, dtype)


def dense_shape(parts: Mapping[str, Any]) -> tuple[int, ...]:
    """The dense shape of a group whose parts carry no ``weight_shape`` (anything with ``.shape``):
    the codes' shape, or for packed e2m1 codes (nvfp4/mxfp4) ``[rows, 2 * bytes]``."""
    if "" in parts:
        return tuple(parts[""].shape)
    rows, nbytes = parts["_packed"].shape
    return (int(rows), 2 * int(nbytes))


def _strategy(scale: torch.Tensor, rows: int, cols: int) -> tuple[Strategy, int | None]:
    if scale.numel() == 1 and scale.dim() == 1:
        return "tensor", None
    groups = scale.shape[-1]
    if groups == 1:
        return "channel", None
    return "group", cols // groups
