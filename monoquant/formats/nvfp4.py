"""NVFP4: e2m1 codes in groups of 16, one float8_e4m3fn scale per group, one float32 global
scale per tensor (compressed-tensors ``nvfp4-pack-quantized``; presets ``NVFP4A16`` and, with
``--dynamic``, ``NVFP4``).

Numerics (float32; exactly compressed-tensors' ``generate_gparam``/``calculate_qparams``/
``quantize`` on float32 input, see docs/format.md):

* global scale ``g = 448 * 6 / absmax`` (absmax over the tensor, or over the tensors an engine
  fuses, see :func:`monoquant.fusedscales.shared_scale_groups`); stored as ``weight_global_scale``;
* group scale ``s = fp8(clamp(g * (amax_group / 6), ±448))``, a zero becoming 0.125;
* codes ``e2m1(clamp(x / (s / g), ±6))``, two per byte (``weight_packed``, uint8);
* dequantize ``code * (s / g)``.

With ``--dynamic`` (W4A4) activations are declared per group of 16 with a static global scale:
``input_global_scale`` is written as 1.0 (no calibration data; see ``Scheme.compat_notes``).

Example:
    >>> import torch
    >>> from monoquant.schemes import get_scheme
    >>> from monoquant.kernels import get_kernel
    >>> k = get_kernel(get_scheme("nvfp4a16"))
    >>> [(s.suffix, s.dtype, s.shape) for s in k.out_specs((32, 64), torch.bfloat16)][:2]
    [('_packed', torch.uint8, (32, 32)), ('_scale', torch.float8_e4m3fn, (32, 4))]
    >>> w = torch.randn(32, 64)
    >>> dq = k.dequantize(k.quantize_tensor(w), (32, 64), torch.float32)
    >>> bool(((dq - w).abs() <= w.abs().amax() / 6).all())
    True
"""

from __future__ import annotations

import torch

from ..errors import SchemeError
from ..numerics import FP8_MAX, ErrorStats, OutSpec, Workspace, as_rows, check_finite, sampled
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

GROUP = 16
#: Relative clipping ranges tried per group by ``--optimize`` (1.0 is round-to-nearest).
SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def global_scale(amax: float) -> torch.Tensor:
    """``[1]`` float32: ``448 * 6 / amax`` (amax floored at float32 tiny; non-finite -> 1.0).

    Example:
        >>> global_scale(2688.0).tolist(), global_scale(0.0).tolist()
        ([1.0], [1.0])
    """
    a = torch.tensor([amax], dtype=torch.float32).clamp_(min=torch.finfo(torch.float32).tiny)
    g = FP8_MAX * FP4_MAX / a
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def group_scales(amax: torch.Tensor, g: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
    """float8_e4m3fn group scales for group absmax ``amax`` (float32) and global scale ``g``."""
    s = amax / FP4_MAX if ratio == 1.0 else (amax * ratio) / FP4_MAX
    s = (g * s).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.tensor(0.125), s)
    return s.to(torch.float8_e4m3fn)


@register("nvfp4")
class NVFP4Kernel(Kernel):
    """The NVFP4 unit (see the module docstring)."""

    def out_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[OutSpec, ...]:
        rows, cols = as_rows(tuple(int(d) for d in shape))
        specs = [
            OutSpec("_packed", torch.uint8, (rows, cols // 2)),
            OutSpec("_scale", torch.float8_e4m3fn, (rows, cols // GROUP)),
            OutSpec("_global_scale", torch.float32, (1,), None),
        ]
        if self.scheme.dynamic:
            specs.append(OutSpec(".input_global_scale", torch.float32, (1,), None))
        return tuple(specs)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) < 2:
            return f"{len(shape)}-D tensor (quantization needs rows and columns)"
        rows, cols = as_rows(shape)
        if rows == 0 or cols == 0:
            return "empty tensor"
        if cols % GROUP:
            return f"{cols} input columns are not a multiple of the nvfp4 group size {GROUP}"
        return None

    @property
    def block_rows_multiple(self) -> int:
        return 1

    @property
    def needs_absmax(self) -> bool:
        return True

    def tensor_scale(self, amax: float, dtype: torch.dtype) -> torch.Tensor:
        return global_scale(amax)

    def constants(self, shape: tuple[int, ...], tensor_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if tensor_scale is None:
            raise SchemeError("nvfp4 needs the global scale (absmax pass)")
        out = {"_global_scale": tensor_scale}
        if self.scheme.dynamic:
            out[".input_global_scale"] = torch.ones(1, dtype=torch.float32)
        return out

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
        if tensor_scale is None:
            raise SchemeError("nvfp4 needs the global scale (absmax pass)")
        ws = ws if ws is not None else Workspace()
        r, c = x.shape
        groups = c // GROUP
        xf = ws.get("xf", r * c, torch.float32).view(r, c)
        xf.copy_(x)
        v = xf.view(r, groups, GROUP)
        y = ws.get("tmp", r * c, torch.float32).view(r, groups, GROUP)
        amax = group_absmax(torch.abs(v, out=y))
        check_finite(amax)
        g = tensor_scale.float()
        s8 = group_scales(amax, g)
        eff = s8.float() / g
        if self.scheme.optimize:
            s8, eff = self._search(v, amax, g, s8, eff, y)
        torch.div(v, eff.unsqueeze(-1), out=y)  # the codes saturate at ±6 (the clamp)
        keys = e2m1_keys(
            y.view(r, c),
            ws.get("keys", r * c, torch.int32).view(r, c),
            y.view(r, c).view(torch.int32),
        )
        if stats is not None:
            k = 1 if self.scheme.optimize else max(int(stats_rows), 1)
            ks = sampled(keys, k)
            dq = value_of_keys(ks).view(ks.shape[0], groups, GROUP) * sampled(eff, k).unsqueeze(-1)
            stats.add(sampled(xf, k), dq)
        return {"_packed": pack_keys(keys), "_scale": s8}

    def _search(
        self,
        v: torch.Tensor,
        amax: torch.Tensor,
        g: torch.Tensor,
        s8: torch.Tensor,
        eff: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the candidate scale (clipping ratio in :data:`SEARCH`) with the least
        error ``Σ |w|·(w - ŵ)²``; round-to-nearest (ratio 1.0) wins ties, so it is never worse."""
        best_err = None
        wgt = v.abs()  # each error weighted by its weight's magnitude, as the int search does
        for ratio in SEARCH:
            cand = s8 if ratio == 1.0 else group_scales(amax, g, ratio)
            ce = eff if ratio == 1.0 else cand.float() / g
            torch.div(v, ce.unsqueeze(-1), out=y)
            dq = value_of_keys(e2m1_keys(y)).mul_(ce.unsqueeze(-1))
            err = group_sq_err(dq, v, wgt)
            if best_err is None:
                best_err, s8, eff = err, cand, ce
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                s8 = torch.where(better, cand.float(), s8.float()).to(torch.float8_e4m3fn)
                eff = torch.where(better, ce, eff)
        return s8, eff

    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        rows, cols = as_rows(tuple(shape))
        q = decode_e2m1(parts["_packed"].reshape(rows, cols // 2), cols).view(rows, cols // GROUP, GROUP)
        eff = parts["_scale"].reshape(rows, cols // GROUP).float() / parts["_global_scale"].float()
        return (q * eff.unsqueeze(-1)).reshape(shape).to(dtype or self.default_dtype)
