"""fp16 / bf16: a plain dtype change, no scale (the presets ``fp16`` and ``bf16``).

An fp16 cast of a value beyond ±65504 is an error unless ``clamp_fp16`` (then it is clamped and
counted in ``ErrorStats.overflow``); values too small for the target are flushed to zero and
counted in ``ErrorStats.underflow`` when the statistics are asked for.

Example:
    >>> import torch
    >>> from monoquant.schemes import get_scheme
    >>> from monoquant.kernels import get_kernel
    >>> k = get_kernel(get_scheme("fp16"))
    >>> k.quantize_tensor(torch.tensor([[1.0, 1e-9]]))[""].tolist()
    [[1.0, 0.0]]
"""

from __future__ import annotations

import math

import torch

from ..errors import SchemeError
from ..numerics import (
    FP16_MAX,
    TILE_ELEMENTS,
    DecodeOverflowError,
    ErrorStats,
    Fp16OverflowError,
    NonFiniteError,
    OutSpec,
    Workspace,
    absmax,
    dtype_label,
)
from .base import Kernel, register

#: Casts that are exact for every finite value whose magnitude bits (the 16-bit pattern without
#: its sign) are at least the given number, and in range: bfloat16 -> float16 keeps every bfloat16
#: from 2^-17 (bits ``0x3700``) up to 65280 exactly (8 significant bits fit in float16's 11, and
#: float16's subnormal step 2^-24 is finer than bfloat16's last bit from 2^-17 on); a same-dtype
#: cast keeps everything. Checked over all 65536 patterns by ``tests/test_numerics.py``.
EXACT_ABOVE: dict[tuple[torch.dtype, torch.dtype], int] = {
    (torch.bfloat16, torch.float16): 0x3700,
    (torch.bfloat16, torch.bfloat16): 0,
    (torch.float16, torch.float16): 0,
}
#: Elements per chunk of the gate in :meth:`CastKernel._measure_gated`.
GATE_CHUNK = 256


@register("cast")
class CastKernel(Kernel):
    """The fp16/bf16 cast unit (see the module docstring)."""

    default_dtype = None

    @property
    def target(self) -> torch.dtype:
        dt = self.scheme.dtype
        if dt is None:  # the scheme validation requires float16 or bfloat16
            raise SchemeError("a cast scheme needs a target dtype")
        return dt

    def out_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[OutSpec, ...]:
        return (OutSpec("", self.target, tuple(int(d) for d in shape)),)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        return None  # any tensor can be cast

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
        target = self.target
        if x.numel() == 0:  # a 0-element tensor: nothing to check or measure
            return {"": ws.get("cast", 0, target).view(x.shape)}
        out = ws.get("cast", x.numel(), target).view(x.shape)
        if x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16):
            self._cast_tiles(x, out, ws, clamp_fp16, stats, k)
        else:
            over = self._cast_whole(x, out, clamp_fp16)
            if stats is not None:
                self._measure(x[::k], out[::k], ws, stats, over)
        return {"": out}

    def _cast_whole(self, x: torch.Tensor, out: torch.Tensor, clamp_fp16: bool) -> bool:
        """Range checks and the cast on the whole block; True when values were clamped to fp16."""
        hi, lo = float(x.amax()), float(x.amin())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            raise NonFiniteError("NaN or Inf")
        top = max(hi, -lo)
        over = self._overflows(top, x, clamp_fp16)
        if over:  # clamped in float32 or wider: 65504 is not a bfloat16 (it rounds to 65536, inf in fp16)
            out.copy_(torch.clamp(x if x.itemsize >= 4 else x.float(), -FP16_MAX, FP16_MAX))
        else:
            out.copy_(x)
            self._check_finite_cast(top, x, out)
        return over

    def _cast_tiles(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        ws: Workspace,
        clamp_fp16: bool,
        stats: ErrorStats | None,
        k: int,
    ) -> None:
        """The same, tile by tile for 16-bit inputs: each tile is widened to float32 once (exact),
        its range read there (float32 reductions are several times faster than 16-bit ones),
        cast from it and, with ``stats``, measured while it is in the cache (every ``k``-th row);
        the bytes are those of the direct cast. Where the cast is exact for all but the smallest
        values (:data:`EXACT_ABOVE`), exact statistics read the error only in the chunks that
        hold such a value (:meth:`_measure_gated`)."""
        r, c = x.shape
        tile = max(1, min(r, TILE_ELEMENTS // max(c, 1)))
        buf = ws.get("tile", tile * c, torch.float32)
        gate = EXACT_ABOVE.get((x.dtype, self.target)) if stats is not None and k == 1 else None
        for a in range(0, r, tile):
            b = min(a + tile, r)
            f = buf[: (b - a) * c].view(b - a, c)
            f.copy_(x[a:b])
            bits = None
            if gate is not None:  # the magnitudes' bits serve the range check and the gate
                bits = ws.get("bits", f.numel(), torch.int16).view(b - a, c)
                torch.bitwise_and(x[a:b].view(torch.int16), 0x7FFF, out=bits)
                top = float(torch.amax(bits).view(1).view(x.dtype)[0])
                if not math.isfinite(top):
                    raise NonFiniteError("NaN or Inf")
            else:
                lo_t, hi_t = torch.aminmax(f)
                hi, lo = float(hi_t), float(lo_t)
                if not (math.isfinite(hi) and math.isfinite(lo)):
                    raise NonFiniteError("NaN or Inf")
                top = max(hi, -lo)
            over = self._overflows(top, x, clamp_fp16)
            if over:  # clamped in the float32 tile (in bfloat16, 65504 rounds to 65536: inf in fp16)
                out[a:b].copy_(torch.clamp(f, -FP16_MAX, FP16_MAX))
            else:
                out[a:b].copy_(f)
                self._check_finite_cast(top, x, out[a:b])
            if stats is None:
                continue
            if bits is not None and gate is not None and not over:
                self._measure_gated(f, out[a:b], bits, gate, ws, stats)
                continue
            i0 = -(-a // k) * k - a  # the first measured row of this tile
            if i0 < b - a:
                self._measure(f[i0::k], out[a:b][i0::k], ws, stats, over)

    def _overflows(self, top: float, x: torch.Tensor, clamp_fp16: bool) -> bool:
        """Whether values beyond fp16 must be clamped; raises when they may not be (the message
        gives the whole block's max, after its NaN check, as on the whole block)."""
        if self.target != torch.float16 or top <= FP16_MAX:
            return False
        if not clamp_fp16:
            raise Fp16OverflowError(f"max |x| = {absmax(x):.6g} > {FP16_MAX:g}")
        return True

    def _check_finite_cast(self, top: float, x: torch.Tensor, out: torch.Tensor) -> None:
        target = self.target
        if top > torch.finfo(target).max and not bool(torch.isfinite(out).all()):
            raise DecodeOverflowError(
                f"max |x| = {absmax(x):.6g} rounds to inf in {dtype_label(target)} "
                f"(max {torch.finfo(target).max:.6g})"
            )

    @staticmethod
    def _measure(xs: torch.Tensor, os_: torch.Tensor, ws: Workspace, stats: ErrorStats, over: bool) -> None:
        n = xs.numel()
        if xs.dtype == torch.float32 and xs.is_contiguous():
            xf = xs  # already widened (a tile)
        else:
            xf = ws.get("xf", n, torch.float32).view(xs.shape)
            xf.copy_(xs)
        err = ws.get("tmp", n, torch.float32).view(xs.shape)
        err.copy_(os_)
        if over:
            stats.overflow += int((xf.abs() > FP16_MAX).sum())
        stats.underflow += _flushed(xf, err, ws)
        err.sub_(xf)
        stats.add_error(xf, err)

    @staticmethod
    def _measure_gated(
        f: torch.Tensor, o: torch.Tensor, bits: torch.Tensor, gate: int, ws: Workspace, stats: ErrorStats
    ) -> None:
        """Exact statistics of one tile whose cast changes only values with magnitude bits below
        ``gate``: Σx² over the whole tile (one dot product), the error and the values flushed to
        zero over just the chunks of :data:`GATE_CHUNK` elements that hold such a value (found from
        each chunk's smallest magnitude), plus the tail. The same sums as measuring everything,
        since every other element's error is exactly 0."""
        n = f.numel()
        ff, of, bf = f.view(-1), o.reshape(-1), bits.view(-1)
        g = n - n % GATE_CHUNK
        chunks = torch.nonzero(torch.amin(bf[:g].view(-1, GATE_CHUNK), dim=1) < gate).view(-1)
        sel = int(chunks.numel()) * GATE_CHUNK
        m = sel + (n - g)  # the selected chunks and the tail
        xs = ws.get("gate_x", m, torch.float32)
        err = ws.get("tmp", m, torch.float32)
        if sel:
            torch.index_select(ff[:g].view(-1, GATE_CHUNK), 0, chunks, out=xs[:sel].view(-1, GATE_CHUNK))
            err[:sel].view(-1, GATE_CHUNK).copy_(of[:g].view(-1, GATE_CHUNK).index_select(0, chunks))
        xs[sel:].copy_(ff[g:])
        err[sel:].copy_(of[g:])
        stats.underflow += _flushed(xs, err, ws)
        err.sub_(xs)
        stats.add_error(ff, err)  # Σx² over the whole tile, the error where it can be non-zero

    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The cast tensor itself, in ``dtype`` when given."""
        w = parts[""]
        return w.to(dtype) if dtype is not None else w


def _flushed(x: torch.Tensor, out: torch.Tensor, ws: Workspace) -> int:
    """How many non-zero elements of ``x`` are 0 in ``out`` (both float32, same shape): values
    flushed to zero by the cast. Two float32 0/1 indicators and their dot product, three passes
    (``count_nonzero`` and boolean masks are several times slower); exact while the count stays
    below 2^24.

    Example:
        >>> _flushed(torch.tensor([1.0, 1e-9, 0.0]), torch.tensor([1.0, 0.0, 0.0]), Workspace())
        1
    """
    n = x.numel()
    if n >= 1 << 24:
        return int(torch.count_nonzero(x)) - int(torch.count_nonzero(out))
    a = ws.get("ind_a", n, torch.float32).view(x.shape)
    b = ws.get("ind_b", n, torch.float32).view(x.shape)
    torch.eq(out, 0, out=a)
    torch.ne(x, 0, out=b)
    return int(torch.dot(a.view(-1), b.view(-1)))
