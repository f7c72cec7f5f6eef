"""Kernels: for each scheme, the output specs, quantize and dequantize, on blocks of rows.

A tensor is seen as rows (``[shape[0], prod(shape[1:])]``; 1-D tensors are one row). Every
scheme is row-independent given its scale, so a caller may feed any block of whole rows and get
exactly the bytes one call on the whole tensor gives. Per-tensor scales need one extra pass
(:func:`absmax`) before quantizing; :meth:`Kernel.tensor_scale` turns its result into the scale.

Numerics (pinned by tests and ``docs/format.md``):

* compute in float32;
* symmetric scale = absmax / ((qmax - qmin) / 2): ``/127.5`` int8, ``/7.5`` int4, ``/448`` fp8;
  asymmetric scale = (max(x.max, 0) - min(x.min, 0)) / (qmax - qmin) and
  zero point = round(clamp(qmin - min / scale, qmin, qmax));
* the scale is stored in the weight's dtype, rounded to the *nearest* representable value (as
  compressed-tensors does), and the stored value is the one used to quantize; a zero scale
  becomes the dtype's eps. (Format version 2 rounded it *up*, so no element was clipped; that
  inflated every weight of the model in the same direction, by 0.2 % on average in bf16, which
  costs nothing in SQNR but +6 % perplexity on SmolLM2 int4 g64. An element whose code the
  rounding pushes one step past the range is clamped, an error no larger than half a step.)
* codes = clamp(round_half_even(x / scale + zp), qmin, qmax); fp8 = clamp(x / scale, ±448)
  converted with round-to-nearest-even;
* dequantize = (q - zp) * scale in float32, then the requested dtype.

Example:
    >>> import torch
    >>> from monoquant.schemes import get_scheme
    >>> k = get_kernel(get_scheme("int4"))
    >>> [(s.suffix, tuple(s.shape)) for s in k.out_specs((16, 256), torch.bfloat16)]
    [('_packed', (16, 32)), ('_scale', (16, 2)), ('_shape', (2,))]
    >>> w = torch.randn(16, 256)
    >>> parts = k.quantize_tensor(w)
    >>> (k.dequantize(parts, (16, 256), torch.float32) - w).abs().max() < 0.5 * w.abs().max() / 7
    tensor(True)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .dtypes import itemsize
from .errors import MonoquantError, SchemeError
from .packing import bytes_from_unsigned, codes_per_word, pack_dim0, packed_cols, unpack_dim0, unpack_rows
from .schemes import Scheme

FP16_MAX = 65504.0
FP8_MAX = 448.0


@dataclass(frozen=True)
class OutSpec:
    """One output tensor of a kernel.

    Attributes:
        suffix: appended to the input tensor's name (``"weight"`` -> ``"weight_packed"``);
            ``""`` keeps the name.
        dtype, shape: of the output tensor.
        row_div: input rows per output row for outputs written block by block (1 for most,
            8 or 4 for zero points packed along dim 0); ``None`` for a small constant computed
            once per tensor (``weight_shape``, a per-tensor scale).
    """

    suffix: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    row_div: int | None = 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one output row (for block-wise outputs)."""
        return (math.prod(self.shape[1:]) if len(self.shape) > 1 else 1) * itemsize(self.dtype)


class NonFiniteError(MonoquantError):
    """A block held NaN or Inf (the caller adds the tensor name and the count)."""


class Fp16OverflowError(MonoquantError):
    """A block held values beyond the fp16 range (the caller adds the tensor name)."""


@dataclass
class ErrorStats:
    """Accumulated reconstruction error of one tensor (float64 sums over blocks)."""

    numel: int = 0
    sum_sq: float = 0.0
    err_sq: float = 0.0
    max_abs_err: float = 0.0
    overflow: int = 0
    underflow: int = 0

    def merge(self, other: ErrorStats) -> None:
        self.numel += other.numel
        self.sum_sq += other.sum_sq
        self.err_sq += other.err_sq
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.overflow += other.overflow
        self.underflow += other.underflow

    @property
    def sqnr_db(self) -> float:
        """10·log10(Σw² / Σ(w-ŵ)²); ``inf`` for an exact result."""
        if self.err_sq <= 0.0:
            return math.inf
        if self.sum_sq <= 0.0:
            return -math.inf
        return 10.0 * math.log10(self.sum_sq / self.err_sq)

    @property
    def rel_err(self) -> float:
        """‖w-ŵ‖ / ‖w‖."""
        return math.sqrt(self.err_sq / self.sum_sq) if self.sum_sq > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        sq = self.sqnr_db
        return {
            "sqnr_db": round(sq, 4) if math.isfinite(sq) else None,
            "rel_err": self.rel_err,
            "max_abs_err": self.max_abs_err,
            "overflow": self.overflow,
            "underflow": self.underflow,
        }


@dataclass
class Workspace:
    """Reusable flat buffers, keyed by purpose, grown on demand.

    Fresh allocations cost page faults (~0.7 s per GB on small VMs), so the streaming path
    keeps one workspace per worker and reuses it for every block of every tensor.
    """

    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def get(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get((key, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype)
            self.buffers[(key, dtype)] = buf
        return buf[:numel]


def as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view monoquant processes: ``[shape[0], prod(shape[1:])]``; 1-D is one row."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def absmax(x: torch.Tensor) -> float:
    """max |x| of a block (the first pass of per-tensor scales); raises on NaN/Inf."""
    if x.numel() == 0:
        return 0.0
    hi = float(x.amax())
    lo = float(x.amin())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        raise NonFiniteError("NaN or Inf")
    return max(hi, -lo)


def stored_scale(scale: torch.Tensor, dtype: torch.dtype, mag: float | None = None) -> torch.Tensor:
    """Round float32 scales to the nearest value of ``dtype`` (ties to even); zeros become the
    dtype's eps.

    With ``mag`` (the largest code magnitude a decode multiplies the scale by), a scale is also
    capped at :func:`decode_cap`, so that ``code * scale`` stays finite when a loader decodes in
    ``dtype`` (an fp16 weight near 65504: a scale times 448 or 128 could be ``inf``). Only groups
    whose values reach the top of ``dtype``'s range are affected: their extreme values are
    clipped by less than one quantization step.

    Example:
        >>> stored_scale(torch.tensor([1.00390625, 1.005, 0.0]), torch.bfloat16).tolist()
        [1.0, 1.0078125, 0.0078125]
    """
    st = scale.to(dtype)
    zero = st == 0
    if bool(zero.any()):
        st = st.masked_fill(zero, torch.finfo(dtype).eps)
    if mag is not None:
        cap = decode_cap(dtype, mag)  # cached; compared as a Python float: one reduction per block
        if float(st.max()) > float(cap):
            st = torch.minimum(st, cap)
    return st


@functools.lru_cache(maxsize=64)
def decode_cap(dtype: torch.dtype, mag: float) -> torch.Tensor:
    """The largest ``dtype`` value ``s`` with ``mag * s <= finfo(dtype).max`` exactly, so that a
    decode in ``dtype`` (``code * s`` with ``|code| <= mag``) cannot overflow to ``inf``.

    Example:
        >>> float(decode_cap(torch.float16, 448)) * 448 <= 65504
        True
    """
    top = torch.finfo(dtype).max
    cap = torch.tensor(top / mag, dtype=torch.float64).to(dtype)
    while float(cap) * mag > top:
        cap = torch.nextafter(cap, torch.tensor(0.0, dtype=dtype))
    return cap


def code_magnitude(scheme: Scheme) -> float:
    """The largest ``|code|`` (``|q - zp|`` when asymmetric) a decode multiplies a scale by."""
    if scheme.kind == "float":
        return FP8_MAX
    if scheme.symmetric:
        return float(max(-scheme.qmin, scheme.qmax))
    return float(scheme.qmax - scheme.qmin)


class DecodeOverflowError(MonoquantError):
    """Codes times scale exceed the stored dtype's range: a loader would decode ``inf``."""


def check_decodes_finite(
    codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, scheme: Scheme, dtype: torch.dtype
) -> None:
    """Raise :class:`DecodeOverflowError` when some ``(code - zp) * scale`` (exact) exceeds the
    range of ``dtype`` (the dtype loaders decode in). ``codes`` is ``[rows, groups, g]``
    (float codes), ``scale``/``zp`` ``[rows, groups]``. Cheap unless a scale is near the top."""
    top = torch.finfo(dtype).max
    sd = scale.double().reshape(codes.shape[0], codes.shape[1])
    if float(sd.max()) * code_magnitude(scheme) <= top:
        return
    hi = codes.amax(dim=-1).double()
    lo = codes.amin(dim=-1).double()
    if zp is not None:
        z = zp.double().reshape(sd.shape)
        hi, lo = hi - z, lo - z
    worst = float((torch.maximum(hi.abs(), lo.abs()) * sd).max())
    if worst > top:
        raise DecodeOverflowError(
            f"its values reach {worst:.6g}, beyond {dtype_label(dtype)} (max {top:.6g}) once decoded with the "
            f"{scheme.name} scale"
        )


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Scales are stored in the weight's own dtype (float64 weights get float32 scales)."""
    return torch.float32 if dtype == torch.float64 else dtype


class Kernel:
    """The three pure functions of one scheme (plus the per-tensor scale helper).

    Args:
        scheme: the scheme to implement.
    """

    def __init__(self, scheme: Scheme):
        self.scheme = scheme

    # ---- shapes -----------------------------------------------------------------------------
    def out_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[OutSpec, ...]:
        """Output tensors for an input of ``shape``/``dtype``, in on-disk order."""
        s = self.scheme
        shape = tuple(int(d) for d in shape)
        if s.kind == "cast":
            return (OutSpec("", s.dtype, shape),)  # type: ignore[arg-type]
        rows, cols = as_rows(shape)
        sdt = scale_dtype_for(dtype)
        scale = self._scale_spec(rows, cols, sdt)
        if s.format == "pack-quantized":
            specs = [
                OutSpec("_packed", torch.int32, (rows, packed_cols(cols, s.bits))),
                scale,
                OutSpec("_shape", torch.int64, (len(shape),), None),
            ]
            if not s.symmetric:
                groups = scale.shape[1]
                per = codes_per_word(s.bits)
                specs.append(OutSpec("_zero_point", torch.int32, (packed_cols(rows, s.bits), groups), per))
            return tuple(specs)
        qdtype = torch.int8 if s.kind == "int" else s.dtype
        return (OutSpec("", qdtype, shape), scale)  # type: ignore[arg-type]

    def _scale_spec(self, rows: int, cols: int, sdt: torch.dtype) -> OutSpec:
        s = self.scheme
        if s.strategy == "tensor":
            return OutSpec("_scale", sdt, (1,), None)
        if s.strategy == "channel":
            return OutSpec("_scale", sdt, (rows, 1))
        return OutSpec("_scale", sdt, (rows, cols // s.group_size))  # type: ignore[operator]

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of ``shape`` cannot take this scheme, or ``None`` when it can."""
        s = self.scheme
        if s.kind == "cast":
            return None
        if len(shape) < 2:
            return f"{len(shape)}-D tensor (quantization needs rows and columns)"
        rows, cols = as_rows(shape)
        if rows == 0 or cols == 0:
            return "empty tensor"
        if s.strategy == "group" and cols % s.group_size:  # type: ignore[operator]
            return f"{cols} input columns are not a multiple of the group size {s.group_size}"
        return None

    @property
    def block_rows_multiple(self) -> int:
        """Blocks fed to :meth:`quantize_block` must hold a multiple of this many rows (except
        the last), so packed zero points fall on word boundaries."""
        s = self.scheme
        return codes_per_word(s.bits) if (s.kind == "int" and not s.symmetric) else 1

    @property
    def needs_absmax(self) -> bool:
        """True when a first pass over the tensor must compute its absmax."""
        return self.scheme.strategy == "tensor"

    def tensor_scale(self, amax: float, dtype: torch.dtype) -> torch.Tensor:
        """The stored per-tensor scale ``[1]`` for a tensor whose absmax is ``amax``."""
        half = FP8_MAX if self.scheme.kind == "float" else (self.scheme.qmax - self.scheme.qmin) / 2
        sdt = scale_dtype_for(dtype)
        if amax > torch.finfo(sdt).max:
            raise DecodeOverflowError(
                f"|x| reaches {amax:.6g}, beyond the {dtype_label(sdt)} scales of {self.scheme.name}"
            )
        return stored_scale(
            torch.tensor([amax], dtype=torch.float32) / half, sdt, code_magnitude(self.scheme)
        )

    def constants(self, shape: tuple[int, ...], tensor_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Outputs computed once per tensor (``weight_shape``, a per-tensor scale)."""
        out: dict[str, torch.Tensor] = {}
        if self.scheme.format == "pack-quantized":
            out["_shape"] = torch.tensor(shape, dtype=torch.int64)
        if self.scheme.strategy == "tensor":
            if tensor_scale is None:
                raise SchemeError("a per-tensor scheme needs the tensor scale (absmax pass)")
            out["_scale"] = tensor_scale
        return out

    # ---- quantize ---------------------------------------------------------------------------
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
        """Quantize a block of whole rows ``x`` (2-D, the input dtype) into the block-wise outputs.

        Returned tensors may be views into ``ws`` buffers: consume them before the next call.
        Constants (see :meth:`constants`) are not included. ``stats`` accumulates the error of
        every ``stats_rows``-th row of the block (1: all rows; an even spread keeps the estimate
        unbiased; the ``--optimize`` path measures all rows).

        Raises:
            NonFiniteError: the block holds NaN or Inf.
            Fp16OverflowError: an fp16 cast meets |x| > 65504 and ``clamp_fp16`` is false.
        """
        ws = ws if ws is not None else Workspace()
        k = max(int(stats_rows), 1)
        if self.scheme.kind == "cast":
            return self._cast_block(x, ws, stats, clamp_fp16, k)
        if self.scheme.optimize:
            from .optimize import optimized_block

            return optimized_block(self, x, tensor_scale=tensor_scale, ws=ws, stats=stats)
        return self._quant_block(x, tensor_scale, ws, stats, k)

    def _cast_block(
        self, x: torch.Tensor, ws: Workspace, stats: ErrorStats | None, clamp_fp16: bool, k: int = 1
    ) -> dict[str, torch.Tensor]:
        target: torch.dtype = self.scheme.dtype  # type: ignore[assignment]
        if x.numel() == 0:  # a 0-element tensor: nothing to check or measure
            return {"": ws.get("cast", 0, target).view(x.shape)}
        hi, lo = float(x.amax()), float(x.amin())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            raise NonFiniteError("NaN or Inf")
        out = ws.get("cast", x.numel(), target).view(x.shape)
        over = target == torch.float16 and max(hi, -lo) > FP16_MAX
        if over and not clamp_fp16:
            raise Fp16OverflowError(f"max |x| = {max(hi, -lo):.6g} > {FP16_MAX:g}")
        if over:
            out.copy_(torch.clamp(x, -FP16_MAX, FP16_MAX))
        else:
            out.copy_(x)
            if max(hi, -lo) > torch.finfo(target).max and not bool(torch.isfinite(out).all()):
                raise DecodeOverflowError(
                    f"max |x| = {max(hi, -lo):.6g} rounds to inf in {dtype_label(target)} (max {torch.finfo(target).max:.6g})"
                )
        if stats is not None:
            xs, os_ = x[::k], out[::k]
            n = xs.numel()
            xf = ws.get("xf", n, torch.float32).view(xs.shape)
            xf.copy_(xs)
            back = ws.get("tmp", n, torch.float32).view(xs.shape)
            back.copy_(os_)
            stats.numel += n
            if over:
                stats.overflow += int((xf.abs() > FP16_MAX).sum())
            # values flushed to zero; counting is slow, so only where some |x| is that small
            smallest = torch.finfo(target).tiny * torch.finfo(target).eps
            if float(torch.abs(xf, out=ws.get("err", n, torch.float32).view(xs.shape)).amin()) < smallest:
                stats.underflow += int(torch.count_nonzero(xs)) - int(torch.count_nonzero(os_))
            flat = xf.view(-1)
            stats.sum_sq += float(torch.dot(flat, flat))
            _accumulate_error(stats, xf, back, torch.ones((), dtype=torch.float32))
        return {"": out}

    def _quant_block(
        self,
        x: torch.Tensor,
        tensor_scale: torch.Tensor | None,
        ws: Workspace,
        stats: ErrorStats | None,
        k: int = 1,
    ) -> dict[str, torch.Tensor]:
        # Pass count matters more than arithmetic here (the block streams through the caches
        # ~8 times): reductions read without writing (amax and amin instead of abs + amax),
        # codes are finished on bytes (xor on int8), and the error statistics reuse the float
        # input buffer in place (addcmul) instead of re-reading the bf16 input.
        s = self.scheme
        r, c = x.shape
        n = r * c
        sdt = scale_dtype_for(x.dtype)
        xf = ws.get("xf", n, torch.float32).view(r, c)
        xf.copy_(x)
        g = c if s.strategy != "group" else s.group_size
        groups = c // g  # type: ignore[operator]
        v = xf.view(r, groups, g)  # type: ignore[arg-type]
        zp = None
        if s.strategy == "tensor":
            if tensor_scale is None:
                raise SchemeError("a per-tensor scheme needs the tensor scale (absmax pass)")
            scale = tensor_scale
            sf = scale.float().view(1, 1, 1)
        else:
            mx = v.amax(dim=-1)
            mn = v.amin(dim=-1)
            # one check instead of two: NaN or ±Inf in mx or mn makes this non-finite (halves: no overflow)
            _check_finite(mx * 0.5 - mn * 0.5)
            if s.symmetric:
                half = FP8_MAX if s.kind == "float" else (s.qmax - s.qmin) / 2
                scale = stored_scale(torch.maximum(mx, mn.neg_()) / half, sdt, code_magnitude(s))
                sf = scale.float().unsqueeze(-1)
            else:
                mn.clamp_(max=0)
                mx.clamp_(min=0)
                scale = stored_scale((mx - mn) / (s.qmax - s.qmin), sdt)
                _check_scale_range(scale, s)
                sf32 = scale.float()
                zp = (s.qmin - mn / sf32).clamp_(s.qmin, s.qmax).round_()
                sf = sf32.unsqueeze(-1)
        y = ws.get("tmp", n, torch.float32).view(r, groups, g)  # type: ignore[arg-type]
        torch.div(v, sf, out=y)
        out: dict[str, torch.Tensor] = {}
        if s.kind == "float":
            y.clamp_(-FP8_MAX, FP8_MAX)
            q8 = ws.get("q", n, s.dtype).view(r, c)  # type: ignore[arg-type]
            q8.copy_(y.view(r, c))
            if stats is not None:
                ys = y[::k]
                ys.copy_(q8.view(r, groups, g)[::k])  # type: ignore[arg-type]  # fp8 codes as float32
                _sampled_error(stats, v[::k], ys, _rows(sf, r, k), None, ws, sdt)
            out[""] = q8
        else:
            if zp is not None:
                y.add_(zp.unsqueeze(-1))
            y.round_().clamp_(s.qmin, s.qmax)
            if zp is not None:
                check_decodes_finite(y, scale, zp, s, sdt)
            if stats is not None:
                zps = None if zp is None else zp.unsqueeze(-1)[::k]
                _sampled_error(stats, v[::k], y[::k], _rows(sf, r, k), zps, ws, sdt)
            if s.format == "pack-quantized":
                out["_packed"] = self._pack_codes(y.view(r, c), ws)
            else:
                q8 = ws.get("q", n, torch.int8).view(r, c)
                q8.copy_(y.view(r, c))
                out[""] = q8
        if s.strategy != "tensor":
            out["_scale"] = scale.view(r, groups)
        if zp is not None:
            out["_zero_point"] = pack_dim0(zp.to(torch.int8).view(r, groups), s.bits)
        return out

    def _pack_codes(self, y: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """Float codes ``y`` (integers in [qmin, qmax]) -> packed int32 rows (offset binary)."""
        bits = self.scheme.bits
        r, c = y.shape
        nb = 4 * packed_cols(c, bits)
        u8 = ws.get("u8", r * nb, torch.uint8).view(r, nb)
        if bits == 8 and c == nb:
            q8 = u8.view(torch.int8)
            q8.copy_(y)
            u8.bitwise_xor_(0x80)  # q + 128 on the bytes of two's complement codes
        elif bits == 4 and 2 * nb == c:
            half = ws.get("half", r * (c // 2), torch.float32).view(r, c // 2)
            pair = y.view(r, c // 2, 2)
            torch.add(pair[..., 0], pair[..., 1], alpha=16, out=half)
            half.add_(8 + 16 * 8)  # (q0 + 8) + 16 * (q1 + 8)
            u8.copy_(half)
        else:  # rows that do not fill whole words: the general (slower) path
            y.add_(1 << (bits - 1))
            bytes_from_unsigned(y, bits, out=u8)
        return u8.view(torch.int32)

    def quantize_tensor(
        self,
        w: torch.Tensor,
        *,
        stats: ErrorStats | None = None,
        clamp_fp16: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Quantize a whole tensor held in memory; returns every output keyed by suffix."""
        shape = tuple(w.shape)
        rows, cols = as_rows(shape)
        x = w.detach().reshape(rows, cols)
        if x.device.type != "cpu":
            x = x.cpu()
        tscale = None
        if self.needs_absmax:
            tscale = self.tensor_scale(absmax(x), x.dtype)
        block = self.quantize_block(
            x, tensor_scale=tscale, ws=Workspace(), stats=stats, clamp_fp16=clamp_fp16
        )
        parts = dict(block)
        parts.update(self.constants(shape, tscale))
        specs = self.out_specs(shape, w.dtype)
        # fresh, canonically strided tensors (block outputs may be views into the workspace)
        return {sp.suffix: parts[sp.suffix].reshape(-1).clone().view(sp.shape) for sp in specs}

    # ---- dequantize -------------------------------------------------------------------------
    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rebuild the dense tensor from its outputs (keyed by suffix), in ``dtype``
        (default: the scale's dtype, i.e. the original weight dtype)."""
        s = self.scheme
        if s.kind == "cast":
            w = parts[""]
            return w.to(dtype) if dtype is not None else w
        scale = parts["_scale"]
        dtype = dtype or scale.dtype
        rows, cols = as_rows(tuple(shape))
        if s.format == "pack-quantized":
            q = unpack_rows(parts["_packed"], s.bits, cols).float()
        else:
            q = parts[""].reshape(rows, cols).float()
        if s.strategy == "tensor":
            w = q * scale.float().view(1, 1)
            return w.reshape(shape).to(dtype)
        groups = scale.shape[-1]
        qv = q.view(rows, groups, cols // groups)
        if not s.symmetric:
            zp = unpack_dim0(parts["_zero_point"], s.bits, rows).float()
            qv = qv - zp.view(rows, groups, 1)
        w = qv * scale.float().view(rows, groups, 1)
        return w.reshape(shape).to(dtype)


def _check_scale_range(scale: torch.Tensor, scheme: Scheme) -> None:
    """A scale that rounded up to ``inf`` (float64 weights beyond float32, whose scales are
    float32) cannot be written."""
    if not bool(torch.isfinite(scale).all()):
        raise DecodeOverflowError(
            f"its range does not fit the {dtype_label(scale.dtype)} scales of {scheme.name}"
        )


def _check_finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError("NaN or Inf")


def _rows(t: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """Every ``k``-th row of a per-row tensor (a broadcast per-tensor one is left whole)."""
    return t[::k] if t.shape[0] == r else t


def _sampled_error(
    stats: ErrorStats,
    x: torch.Tensor,
    q: torch.Tensor,
    sf: torch.Tensor,
    zp: torch.Tensor | None,
    ws: Workspace,
    decode_dtype: torch.dtype = torch.float32,
) -> None:
    """Error of the sampled rows: ``x`` the float32 input, ``q`` the codes (float or fp8),
    ``sf`` the float scales, ``zp`` the zero points; none of them is modified.

    The decoded values are rounded to ``decode_dtype`` (the stored scale's dtype, i.e. the weight's)
    as the loaders and ``monoquant verify`` decode them: a bf16 weight's error is measured on its
    bf16 decode. (A float32 product of a code and a stored scale rounded once to that dtype is
    what a native multiply in that dtype gives.)"""
    if x.is_contiguous():
        xs = x  # every row: no gather needed (x is read-only here)
    else:
        xs = ws.get("xs", x.numel(), torch.float32).view(x.shape)
        xs.copy_(x)  # the sampled rows, gathered contiguous
    e = ws.get("err", x.numel(), torch.float32).view(x.shape)
    if decode_dtype != torch.float32:
        if zp is not None:
            torch.sub(q, zp, out=e)
            e.mul_(sf)
        else:
            torch.mul(q, sf, out=e)
        rounded = ws.get("dec", x.numel(), decode_dtype).view(x.shape)
        rounded.copy_(e)  # the decode as the loaders see it (a reused buffer: no allocation per block)
        e.copy_(rounded)
        e.sub_(xs)  # (decode - x): the error, sign irrelevant below
    elif zp is not None:
        torch.sub(q, zp, out=e)
        torch.addcmul(xs, e, sf, value=-1, out=e)  # x - (q - zp)·s: the error, negated
    else:
        torch.addcmul(xs, q, sf, value=-1, out=e)  # x - q·s in one pass
    stats.numel += x.numel()
    xf = xs.reshape(-1)
    stats.sum_sq += float(torch.dot(xf, xf))
    flat = e.view(-1)
    stats.err_sq += float(torch.dot(flat, flat))
    if flat.numel():
        stats.max_abs_err = max(stats.max_abs_err, float(flat.amax()), -float(flat.amin()))


def _accumulate_error(stats: ErrorStats, x: torch.Tensor, q: torch.Tensor, sf: torch.Tensor) -> None:
    """err = q * scale - x, accumulated into ``stats``; ``x`` (the float32 input) is overwritten."""
    torch.addcmul(x, q, sf, value=-1, out=x)
    flat = x.reshape(-1)
    stats.err_sq += float(torch.dot(flat, flat))
    if flat.numel():
        stats.max_abs_err = max(stats.max_abs_err, float(flat.amax()), -float(flat.amin()))


_KERNELS: dict[Scheme, Kernel] = {}


def get_kernel(scheme: Scheme) -> Kernel:
    """The kernel of ``scheme`` (kernels are stateless; one instance per scheme is cached)."""
    k = _KERNELS.get(scheme)
    if k is None:
        from .formats import kernel_for  # registered format units (FP8 block, NVFP4, MX)

        k = _KERNELS[scheme] = kernel_for(scheme) or Kernel(scheme)
    return k
