"""MXFP4 and MXFP8: OCP microscaling formats, groups of 32 elements sharing one power-of-two
scale stored as an e8m0 byte (``weight_scale``, uint8, ``2 ** (e - 127)``).

* MXFP4: e2m1 codes, two per byte (``weight_packed``, compressed-tensors
  ``mxfp4-pack-quantized``; presets ``MXFP4A16`` and, with ``--dynamic``, ``MXFP4``).
* MXFP8: float8_e4m3fn elements (``weight``, ``mxfp8-quantized``; ``MXFP8A16`` / ``MXFP8``).

Scale exponent, as compressed-tensors' ``generate_mx_scales`` computes it: the group absmax is
rounded to a power of two (up when its mantissa is at least 1.75, else down), and the element
type's ``floor(log2(max))`` (2 for e2m1, 8 for e4m3) is subtracted:
``e = clamp(floor(log2(round_pow2(amax))) + 127 - offset, 0, 255)``; an all-zero group gets
``e = 0``. Codes: ``clamp(x / 2**(e-127), ±max)`` rounded to the element type (e2m1 ties to
even, fp8 round-to-nearest-even). Dequantize: ``code * 2**(e-127)``, exact.

Example:
    >>> import torch
    >>> mx_exponents(torch.tensor([6.0, 7.0, 1.0, 0.0]), 4).tolist()
    [127, 128, 125, 0]
"""

from __future__ import annotations

import torch

from ..numerics import FP8_MAX, ErrorStats, OutSpec, Workspace, as_rows, check_finite, fp8_to_float, sampled
from .base import Kernel, register
from .common import (
    FP4_MAX,
    decode_e2m1,
    e2m1_keys,
    group_absmax,
    group_sq_err,
    pack_keys,
    value_of_keys,
)

GROUP = 32
#: floor(log2(max element)) of the element types (e2m1: 6, e4m3: 448).
OFFSET = {4: 2, 8: 8}


def mx_exponents(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 e8m0 exponents of float32 group absmax values (see the module docstring)."""
    bits_i = amax.float().contiguous().view(torch.int32)
    field = ((bits_i + (1 << 21)) & 0x7F800000) >> 23  # exponent of round_pow2(amax)
    e = (field - OFFSET[bits]).clamp_(0, 255)
    e = torch.where(field == 0, torch.zeros_like(e), e)  # zero (or subnormal) group: log2 -> -inf
    e = torch.where(field == 255, torch.full_like(e, 255), e)
    return e.to(torch.uint8)


def mx_scales(e: torch.Tensor) -> torch.Tensor:
    """float32 ``2 ** (e - 127)`` of uint8 exponents, exactly (e = 0 is the subnormal 2**-127)."""
    ei = e.to(torch.int32)
    bits_i = torch.where(ei > 0, ei << 23, torch.full_like(ei, 0x00400000))
    return bits_i.view(torch.float32)


@register("mxfp4", "mxfp8")
class MXKernel(Kernel):
    """The MXFP4 / MXFP8 unit (see the module docstring)."""

    @property
    def _qmax(self) -> float:
        return FP4_MAX if self.scheme.bits == 4 else FP8_MAX

    def out_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[OutSpec, ...]:
        shape = tuple(int(d) for d in shape)
        rows, cols = as_rows(shape)
        scale = OutSpec("_scale", torch.uint8, (rows, cols // GROUP))
        if self.scheme.bits == 4:
            return (OutSpec("_packed", torch.uint8, (rows, cols // 2)), scale)
        return (OutSpec("", torch.float8_e4m3fn, shape), scale)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) < 2:
            return f"{len(shape)}-D tensor (quantization needs rows and columns)"
        rows, cols = as_rows(shape)
        if rows == 0 or cols == 0:
            return "empty tensor"
        if cols % GROUP:
            return f"{cols} input columns are not a multiple of the {self.scheme.kind} group size {GROUP}"
        return None

    @property
    def block_rows_multiple(self) -> int:
        return 1

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
        groups = c // GROUP
        qmax = self._qmax
        xf = ws.get("xf", r * c, torch.float32).view(r, c)
        xf.copy_(x)
        v = xf.view(r, groups, GROUP)
        y = ws.get("tmp", r * c, torch.float32).view(r, groups, GROUP)
        amax = group_absmax(torch.abs(v, out=y))
        check_finite(amax)
        e = mx_exponents(amax, self.scheme.bits)
        if self.scheme.optimize:
            e = self._search(v, e, y)
        sf = mx_scales(e)
        torch.div(v, sf.unsqueeze(-1), out=y)
        k = 1 if self.scheme.optimize else max(int(stats_rows), 1)
        if self.scheme.bits == 4:  # the codes saturate at ±6 (the clamp)
            keys = e2m1_keys(
                y.view(r, c),
                ws.get("keys", r * c, torch.int32).view(r, c),
                y.view(r, c).view(torch.int32),
            )
            if stats is not None:
                ks = sampled(keys, k)
                dq = value_of_keys(ks).view(ks.shape[0], groups, GROUP) * sampled(sf, k).unsqueeze(-1)
                stats.add(sampled(xf, k), dq)
            return {"_packed": pack_keys(keys), "_scale": e}
        y.clamp_(-qmax, qmax)
        q8 = ws.get("q", r * c, torch.float8_e4m3fn).view(r, c)
        q8.copy_(y.view(r, c))
        if stats is not None:
            qs = sampled(q8, k)
            dq = fp8_to_float(qs, ws=ws).view(qs.shape[0], groups, GROUP) * sampled(sf, k).unsqueeze(-1)
            stats.add(sampled(xf, k), dq)
        return {"": q8, "_scale": e}

    def _search(self, v: torch.Tensor, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per group, the exponent among ``e``, ``e - 1``, ``e + 1`` with the least error
        ``Σ w²·(w - ŵ)²`` (``e``, round-to-nearest, wins ties: never worse)."""
        qmax = self._qmax
        # each error weighted by its weight's square: the candidates are a factor of 2 apart and
        # e - 1 clips hard, so the extremes weigh more than in the int search's |w| (measured on
        # SmolLM2: |w| still made the model worse than round-to-nearest, |w|² better)
        wgt = v.square()
        best_e, best_err = e, None
        ei = e.to(torch.int32)
        for d in (0, -1, 1):
            cand = (ei + d).clamp_(0, 254).to(torch.uint8) if d else e
            sf = mx_scales(cand).unsqueeze(-1)
            torch.div(v, sf, out=y)
            if self.scheme.bits == 4:
                dq = value_of_keys(e2m1_keys(y)).mul_(sf)
            else:
                dq = fp8_to_float(y.clamp_(-qmax, qmax).to(torch.float8_e4m3fn)).mul_(sf)
            err = group_sq_err(dq, v, wgt)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_e = torch.where(better, cand, best_e)
        return best_e

    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        rows, cols = as_rows(tuple(shape))
        if self.scheme.bits == 4:
            q = decode_e2m1(parts["_packed"].reshape(rows, cols // 2), cols)
        else:
            q = fp8_to_float(parts[""].reshape(rows, cols))
        sf = mx_scales(parts["_scale"].reshape(rows, cols // GROUP))
        w = q.view(rows, cols // GROUP, GROUP) * sf.unsqueeze(-1)
        return w.reshape(shape).to(dtype or self.default_dtype)
