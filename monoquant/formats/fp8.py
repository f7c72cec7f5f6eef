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
    TILE_ELEMENTS,
    ErrorStats,
    OutSpec,
    Workspace,
    as_rows,
    contiguous_rows,
    decode_error,
    fp8_to_float,
    per_row,
    scale_dtype_for,
    symmetric_tile_scale,
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

    @property
    def tiled_scratch(self) -> bool:
        return True

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
        sdt = scale_dtype_for(x.dtype)
        per_tensor = self.scheme.strategy == "tensor"
        if per_tensor and tensor_scale is None:
            raise SchemeError("a per-tensor scheme needs the tensor scale (absmax pass)")
        # tiles of whole rows that fit the cache, as the integer unit (bytes independent of it)
        # exact statistics (k == 1) are measured on each tile while it is in the cache
        tile = max(1, min(r, TILE_ELEMENTS // max(c, 1)))
        per_tile = stats is not None and k == 1
        xf_buf = ws.get("xf", tile * c, torch.float32)
        y_buf = ws.get("tmp", tile * c, torch.float32)
        q8 = ws.get("q", r * c, torch.float8_e4m3fn).view(r, c)
        scales = torch.empty(0 if per_tensor else r, 1, dtype=sdt)
        sc_buf = ws.get("sf", tile, torch.float32)
        sf = tensor_scale.float().view(1, 1, 1) if tensor_scale is not None else xf_buf[:0]
        xf = xf_buf[:0].view(0, 1, c)
        y = y_buf[:0].view(0, 1, c)
        for a in range(0, r, tile):
            b = min(a + tile, r)
            t = b - a
            xf = xf_buf[: t * c].view(t, 1, c)
            xf.copy_(x[a:b].reshape(t, 1, c))
            if not per_tensor:
                sf = symmetric_tile_scale(xf, FP8_MAX, scales[a:b], sc_buf[:t].view(t, 1), FP8_MAX)
            y = y_buf[: t * c].view(t, 1, c)
            torch.div(xf, sf, out=y)
            y.clamp_(-FP8_MAX, FP8_MAX)
            q8[a:b].copy_(y.view(t, c))
            if per_tile and stats is not None:
                fp8_to_float(q8[a:b].view(t, 1, c), out=y, ws=ws)  # the fp8 codes as float32
                stats.add_error(xf, decode_error(xf, y, sf, None, ws, sdt))
        if stats is not None and not per_tile:
            sf_all = sf if per_tensor else scales.float().unsqueeze(-1)
            if tile == r:  # one tile: the block itself
                xs = contiguous_rows(xf[::k], ws)
                ys = y[::k]
            else:
                m = xs_rows = -(-r // k)
                xs = ws.get("xs", m * c, torch.float32).view(xs_rows, 1, c)
                xs.copy_(x[::k].reshape(m, 1, c))
                ys = ws.get("ys", m * c, torch.float32).view(m, 1, c)
            fp8_to_float(q8.view(r, 1, c)[::k], out=ys, ws=ws)  # fp8 codes as float32
            stats.add_error(xs, decode_error(xs, ys, per_row(sf_all, r, k), None, ws, sdt))
        out = {"": q8}
        if not per_tensor:
            out["_scale"] = scales
        return out

    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rebuild the dense tensor, in ``dtype`` (default: the scale's dtype, the weight's)."""
        scale = parts["_scale"]
        dtype = dtype or scale.dtype
        rows, cols = as_rows(tuple(shape))
        q = fp8_to_float(parts[""].reshape(rows, cols))
        if self.scheme.strategy == "tensor":
            w = q * scale.float().view(1, 1)
        else:
            w = q.view(rows, 1, cols) * scale.float().view(rows, 1, 1)
        return w.reshape(shape).to(dtype)
