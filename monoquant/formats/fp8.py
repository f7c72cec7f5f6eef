"""fp8 (float8_e4m3fn) with one scale per output channel or per tensor (presets ``fp8``,
``fp8-tensor``, ``fp8-dynamic``; compressed-tensors ``naive-quantized``, or ``float-quantized``
with ``--dynamic``).

Numerics (float32): scale ``absmax / 448`` stored in the weight's dtype rounded to nearest and
capped so that ``448 * scale`` decodes finitely in that dtype; codes
``fp8(clamp(x / scale, ±448))`` (round-to-nearest-even); dequantize ``code * scale``.

Example:
    >>> import torch
    >>> from monoquant.schemes import get_scheme
    >>> from monoquant.kernels import get_kernel
    >>> k = get_kernel(get_scheme("fp8"))
    >>> [(s.suffix, s.dtype) for s in k.out_specs((4, 8), torch.bfloat16)]
    [('', torch.float8_e4m3fn), ('_scale', torch.bfloat16)]
"""

from __future__ import annotations

import torch

from ..errors import SchemeError
from ..numerics import (
    FP8_MAX,
    ErrorStats,
    OutSpec,
    Workspace,
    as_rows,
    contiguous_rows,
    decode_error,
    group_range,
    per_row,
    scale_dtype_for,
    symmetric_scale,
    tensor_scale,
)
from .base import Kernel, register, scale_spec


@register("float")
class FP8Kernel(Kernel):
    """The per-channel / per-tensor fp8 unit (see the module docstring)."""

    default_dtype = None  # the scale's dtype: the original weight dtype

    def out_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[OutSpec, ...]:
        shape = tuple(int(d) for d in shape)
        rows, cols = as_rows(shape)
        sdt = scale_dtype_for(dtype)
        return (
            OutSpec("", torch.float8_e4m3fn, shape),
            scale_spec(self.scheme.strategy, rows, cols, None, sdt),
        )

    @property
    def needs_absmax(self) -> bool:
        return self.scheme.strategy == "tensor"

    def tensor_scale(self, amax: float, dtype: torch.dtype) -> torch.Tensor:
        return tensor_scale(amax, FP8_MAX, scale_dtype_for(dtype), FP8_MAX, self.scheme.name)

    def constants(self, shape: tuple[int, ...], tensor_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.scheme.strategy != "tensor":
            return {}
        if tensor_scale is None:
            raise SchemeError("a per-tensor scheme needs the tensor scale (absmax pass)")
        return {"_scale": tensor_scale}

    def quantize_block(
        self,
        x: torch.Tensor,
        *,
        tensor_scale: torch.Tensor | None = None,
        ws: Workspace | None = None,
        stats: ErrorStats | None = None,
        clamp_fp16: bool = False,
        stats_rows: int = 1,
    ) -> dict[str, torch.Tensor]:
        ws = ws if ws is not None else Workspace()
        k = max(int(stats_rows), 1)
        r, c = x.shape
        n = r * c
        sdt = scale_dtype_for(x.dtype)
        xf = ws.get("xf", n, torch.float32).view(r, c)
        xf.copy_(x)
        v = xf.view(r, 1, c)
        if self.scheme.strategy == "tensor":
            if tensor_scale is None:
                raise SchemeError("a per-tensor scheme needs the tensor scale (absmax pass)")
            scale = tensor_scale
            sf = scale.float().view(1, 1, 1)
        else:
            mx, mn = group_range(v)
            scale = symmetric_scale(mx, mn, FP8_MAX, sdt, FP8_MAX)
            sf = scale.float().unsqueeze(-1)
        y = ws.get("tmp", n, torch.float32).view(r, 1, c)
        torch.div(v, sf, out=y)
        y.clamp_(-FP8_MAX, FP8_MAX)
        q8 = ws.get("q", n, torch.float8_e4m3fn).view(r, c)
        q8.copy_(y.view(r, c))
        if stats is not None:
            ys = y[::k]
            ys.copy_(q8.view(r, 1, c)[::k])  # fp8 codes as float32
            xs = contiguous_rows(v[::k], ws)
            stats.add_error(xs, decode_error(xs, ys, per_row(sf, r, k), None, ws, sdt))
        out = {"": q8}
        if self.scheme.strategy != "tensor":
            out["_scale"] = scale.view(r, 1)
        return out

    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rebuild the dense tensor, in ``dtype`` (default: the scale's dtype, the weight's)."""
        scale = parts["_scale"]
        dtype = dtype or scale.dtype
        rows, cols = as_rows(tuple(shape))
        q = parts[""].reshape(rows, cols).float()
        if self.scheme.strategy == "tensor":
            w = q * scale.float().view(1, 1)
        else:
            w = q.view(rows, 1, cols) * scale.float().view(rows, 1, 1)
        return w.reshape(shape).to(dtype)
