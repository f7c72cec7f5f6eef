"""FP8 block: float8_e4m3fn weights with one scale per 128x128 block (DeepSeek-V3 style;
compressed-tensors ``float-quantized`` with ``strategy: block``, ``block_structure: [128, 128]``;
preset ``FP8_BLOCK``), activations declared dynamic per token-group of 128.

Where a dimension is not a multiple of 128 the last block is partial and the scale grid is
``[ceil(rows / 128), ceil(cols / 128)]``, as compressed-tensors writes it (it pads with zeros,
which do not change a block's absmax). Rows are streamed in blocks of a multiple of 128 rows
(:attr:`FP8BlockKernel.block_rows_multiple`), so every block's absmax is complete in one pass.

Numerics (as monoquant's per-channel fp8, see docs/format.md): float32; scale
``absmax(block) / 448`` stored in the weight dtype rounded *up* (a zero becomes the dtype's
eps); codes ``fp8(clamp(x / scale, ±448))``; dequantize ``code * scale``.

Example:
    >>> import torch
    >>> from monoquant.schemes import get_scheme
    >>> from monoquant.kernels import get_kernel
    >>> k = get_kernel(get_scheme("fp8-block"))
    >>> [(s.suffix, s.shape) for s in k.out_specs((576, 1536), torch.bfloat16)]
    [('', (576, 1536)), ('_scale', (5, 12))]
"""

from __future__ import annotations

import torch

from ..numerics import (
    FP8_MAX,
    ErrorStats,
    OutSpec,
    Workspace,
    as_rows,
    ceil_div,
    check_finite,
    fp8_to_float,
    sampled,
    scale_dtype_for,
    stored_scale,
)
from .base import Kernel, register
from .common import group_absmax

BLOCK = 128


@register("strategy:block")
class FP8BlockKernel(Kernel):
    """The FP8-block unit (see the module docstring)."""

    def out_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[OutSpec, ...]:
        shape = tuple(int(d) for d in shape)
        rows, cols = as_rows(shape)
        grid = (ceil_div(rows, BLOCK), ceil_div(cols, BLOCK))
        return (
            OutSpec("", torch.float8_e4m3fn, shape),
            OutSpec("_scale", scale_dtype_for(dtype), grid, BLOCK),
        )

    @property
    def block_rows_multiple(self) -> int:
        return BLOCK

    default_dtype = None  # the scale's dtype: the original weight dtype

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
        r, c = x.shape
        nbc = ceil_div(c, BLOCK)
        full = (c // BLOCK) * BLOCK
        xf = ws.get("xf", r * c, torch.float32).view(r, c)
        xf.copy_(x)
        # per row and column block: max |x| (a pairwise tree over the 128 columns), then over each
        # 128-row band
        y = ws.get("tmp", r * c, torch.float32).view(r, c)
        a = torch.abs(xf, out=y)
        m = torch.empty(r, nbc)
        if full:
            m[:, : full // BLOCK] = group_absmax(a[:, :full].view(r, full // BLOCK, BLOCK))
        if full < c:
            m[:, -1] = a[:, full:].amax(dim=-1)
        amax = torch.stack([m[i : i + BLOCK].amax(dim=0) for i in range(0, r, BLOCK)])
        check_finite(amax)
        scale = stored_scale(
            amax / FP8_MAX, scale_dtype_for(x.dtype), FP8_MAX
        )  # [nbr, nbc], 448 * scale finite
        sf = scale.float().repeat_interleave(BLOCK, dim=0)[:r]  # [r, nbc]
        if full:
            fv = xf[:, :full].view(r, full // BLOCK, BLOCK)
            torch.div(fv, sf[:, : full // BLOCK].unsqueeze(-1), out=y[:, :full].view(r, full // BLOCK, BLOCK))
        if full < c:
            torch.div(xf[:, full:], sf[:, -1:], out=y[:, full:])
        y.clamp_(-FP8_MAX, FP8_MAX)
        q8 = ws.get("q", r * c, torch.float8_e4m3fn).view(r, c)
        q8.copy_(y)
        if stats is not None:
            k = max(int(stats_rows), 1)
            stats.add(sampled(xf, k), self._dense(fp8_to_float(sampled(q8, k), ws=ws), sampled(sf, k)))
        return {"": q8, "_scale": scale}

    @staticmethod
    def _dense(q: torch.Tensor, sf_rows: torch.Tensor) -> torch.Tensor:
        """float32 codes ``[r, c]`` times their block scales (``sf_rows``: ``[r, ceil(c/128)]``)."""
        c = q.shape[1]
        return q * sf_rows.repeat_interleave(BLOCK, dim=1)[:, :c]

    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        rows, cols = as_rows(tuple(shape))
        scale = parts["_scale"]
        sf = scale.float().repeat_interleave(BLOCK, dim=0)[:rows]
        w = self._dense(fp8_to_float(parts[""].reshape(rows, cols)), sf)
        return w.reshape(shape).to(dtype or scale.dtype)
