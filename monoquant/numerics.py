"""The numerics core: buffers, row views, scale and zero-point math, error sums and SQNR.

Everything the kernels, ``--optimize``, ``verify``, the in-memory API, mixed precision and the
scripts compute the same way lives here once. This module imports nothing from monoquant except
:mod:`monoquant.errors` (the exception classes, a leaf), so every layer may use it.

Numerics (pinned by tests and ``docs/format.md``):

* compute in float32;
* symmetric scale = absmax / half (``half`` = ``(qmax - qmin) / 2``: ``127.5`` int8, ``7.5``
  int4; ``448`` fp8), :func:`symmetric_tile_scale`; asymmetric scale = (max(x.max, 0) - min(x.min, 0))
  / (qmax - qmin) and zero point = round(clamp(qmin - min / scale, qmin, qmax)),
  :func:`asymmetric_params`;
* a scale is stored in the weight's dtype rounded to the *nearest* value (:func:`stored_scale`),
  and the stored value is the one used to quantize;
* error statistics are float64 sums of float32 (or stored-dtype) values: one accumulator,
  :class:`ErrorStats`, one SQNR, :func:`sqnr_db`.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    >>> scale = torch.empty(1, 1, dtype=torch.bfloat16)
    >>> _ = symmetric_tile_scale(x.view(1, 1, 4), 127.5, scale, torch.empty(1, 1), 128.0)
    >>> scale.tolist()
    [[0.0157470703125]]
    >>> st = ErrorStats()
    >>> st.add(x, x + 0.01)
    >>> round(st.sqnr_db, 2)
    41.18
    >>> sqnr_db(2.0, 0.0), sqnr_db(0.0, 1.0)
    (inf, -inf)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .errors import MonoquantError

FP16_MAX = 65504.0
FP8_MAX = 448.0
#: Elements per tile of the cast and fp8 kernels (4 MiB of float32: the steps of one tile run in
#: the cache). Speed only: the bytes do not depend on it.
TILE_ELEMENTS = 1 << 20
#: Elements per tile of the integer kernels: half as many. A tile of theirs holds float32
#: temporaries (the input, the codes, which the decode error then overwrites) and a bf16 decode,
#: and the two kernel threads of a stream share the cache: 512 K elements were faster than 1 M
#: with four buffers and tie with three (``scripts/two_cores.py``; docs/benchmarks.md). Speed
#: only, as above.
INT_TILE_ELEMENTS = 1 << 19


# ---- errors the kernels raise (callers add the tensor name) ------------------------------------
class NonFiniteError(MonoquantError):
    """A block held NaN or Inf (the caller adds the tensor name and the count)."""


class Fp16OverflowError(MonoquantError):
    """A block held values beyond the fp16 range (the caller adds the tensor name)."""


class DecodeOverflowError(MonoquantError):
    """Codes times scale exceed the stored dtype's range: a loader would decode ``inf``."""


# ---- shapes and buffers ------------------------------------------------------------------------
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

    Example:
        >>> OutSpec("_scale", torch.bfloat16, (16, 2)).row_bytes
        4
    """

    suffix: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    row_div: int | None = 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one output row (for block-wise outputs)."""
        return (math.prod(self.shape[1:]) if len(self.shape) > 1 else 1) * self.dtype.itemsize


#: the workspace buffers a block's outputs (or its input) may live in until the block is written:
#: codes (``q``, packed ``u8``), cast outputs (``cast``) and ``pread`` input (``read``). Every
#: other buffer a kernel takes is scratch, done with when ``quantize_block`` returns.
BLOCK_KEYS = frozenset({"q", "u8", "cast", "read"})


@dataclass
class Workspace:
    """Reusable flat buffers, keyed by purpose, grown on demand.

    Fresh allocations cost page faults (~0.7 s per GB on small VMs), so the streaming path
    keeps its workspaces and reuses them for every block of every tensor.

    A block in flight (quantized, waiting to be written) needs only its :data:`BLOCK_KEYS`
    buffers; the kernel's scratch (float32 tiles, errors, ...) is free once the kernel returns.
    So :meth:`with_scratch` gives a view that keeps the block buffers here and takes the scratch
    from the kernel thread's own workspace: blocks in flight then cost their outputs only.

    Example:
        >>> ws = Workspace()
        >>> a = ws.get("xf", 8, torch.float32)
        >>> b = ws.get("xf", 4, torch.float32)   # the same memory, no new allocation
        >>> a.data_ptr() == b.data_ptr()
        True
        >>> mine = Workspace()
        >>> v = ws.with_scratch(mine)
        >>> v.get("xf", 8, torch.float32).data_ptr() == mine.get("xf", 8, torch.float32).data_ptr()
        True
        >>> v.get("q", 8, torch.int8).data_ptr() == ws.get("q", 8, torch.int8).data_ptr()
        True
    """

    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict)
    scratch: Workspace | None = None

    def with_scratch(self, scratch: Workspace | None) -> Workspace:
        """This workspace's block buffers with ``scratch``'s for everything else (``self`` when
        ``scratch`` is ``None``)."""
        return self if scratch is None else Workspace(self.buffers, scratch)

    def get(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.scratch is not None and key not in BLOCK_KEYS:
            return self.scratch.get(key, numel, dtype)
        buf = self.buffers.get((key, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype)
            self.buffers[(key, dtype)] = buf
        return buf[:numel]


def as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view monoquant processes: ``[shape[0], prod(shape[1:])]``; 1-D is one row.

    Example:
        >>> as_rows((4, 3, 2)), as_rows((7,)), as_rows(())
        ((4, 6), (1, 7), (1, 1))
    """
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def sampled(x: torch.Tensor, k: int) -> torch.Tensor:
    """Every ``k``-th row (dimension 0) of ``x``; ``x`` itself when ``k <= 1``."""
    return x[::k] if k > 1 else x


def per_row(t: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """Every ``k``-th row of a per-row tensor of ``r`` rows (a broadcast per-tensor one is left whole)."""
    return t[::k] if t.shape[0] == r else t


def contiguous_rows(v: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """``v`` when contiguous, else a contiguous copy in a ``ws`` buffer (the sampled rows)."""
    if v.is_contiguous():
        return v
    xs = ws.get("xs", v.numel(), torch.float32).view(v.shape)
    xs.copy_(v)
    return xs


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- fp8 codes ---------------------------------------------------------------------------------
def fp8_to_float(
    q: torch.Tensor, out: torch.Tensor | None = None, ws: Workspace | None = None
) -> torch.Tensor:
    """The float32 values of float8_e4m3fn codes ``q`` (any shape and strides), exactly as
    ``q.float()`` gives them (NaN codes included), about seven times faster (0.8 against 5.6 ns
    an element, one thread).

    torch widens fp8 one element at a time (5.6 ns an element here, more than the whole
    int8 kernel); this goes through integer ops that run vectorized: each code as int8, sign
    extended to int16 and shifted left by 7, is a float16 with the code's sign, exponent and
    mantissa in place (bit 14, set by the sign extension of a negative code, is cleared),
    worth ``code / 256`` exactly, subnormals included; widened to float32 and multiplied by 256
    (exact). e4m3fn has no infinities, and its NaN codes (magnitude bits ``0x7F``) would read
    1.875 x 256: they are found from the codes' largest magnitude (one reduction) and set to NaN.

    ``out``: a float32 tensor of ``q``'s shape to write to; ``ws``: where the int16 scratch
    lives (else it is allocated).

    Example:
        >>> q = torch.tensor([448.0, -0.001953125, 0.0, -3.25]).to(torch.float8_e4m3fn)
        >>> fp8_to_float(q).tolist() == q.float().tolist()
        True
    """
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32)
    n = q.numel()
    if n == 0:
        return out
    ws = ws if ws is not None else Workspace()
    bits = ws.get("fp8_bits", n, torch.int16).view(q.shape)
    bits.copy_(q.view(torch.int8))  # sign-extended
    mag = ws.get("fp8_mag", n, torch.uint8).view(q.shape)
    torch.bitwise_and(q.view(torch.uint8), 0x7F, out=mag)
    nan = int(mag.amax()) == 0x7F
    bits.bitwise_left_shift_(7).bitwise_and_(-16385)  # 0xBFFF: clear bit 14
    out.copy_(bits.view(torch.float16)).mul_(256.0)
    if nan:
        out.masked_fill_(mag == 0x7F, math.nan)
    return out


# ---- ranges and scales -------------------------------------------------------------------------
def absmax(x: torch.Tensor) -> float:
    """max |x| of a block (the first pass of per-tensor scales); raises on NaN/Inf."""
    if x.numel() == 0:
        return 0.0
    hi = float(x.amax())
    lo = float(x.amin())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        raise NonFiniteError("NaN or Inf")
    return max(hi, -lo)


def check_finite(t: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` when ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError("NaN or Inf")


def group_range(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, min) over the last dimension of ``v`` (float32 ``[rows, groups, g]``): two reads,
    no write; raises :class:`NonFiniteError` when either holds NaN or Inf."""
    mx = v.amax(dim=-1)  # two reads: torch.aminmax over a dimension is 14x slower (tile_ops.py)
    mn = v.amin(dim=-1)
    # NaN or ±Inf in mx or mn makes this sum NaN or ±Inf; so can finite values beyond half of
    # float32's range (mx - mn overflows), which the exact check below then clears (halves: no
    # overflow). Three torch calls where the exact check takes six, and each holds the GIL.
    if not math.isfinite(float((mx - mn).sum())):
        check_finite(mx * 0.5 - mn * 0.5)
    return mx, mn


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Scales are stored in the weight's own dtype (float64 weights get float32 scales)."""
    return torch.float32 if dtype == torch.float64 else dtype


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def stored_scale(scale: torch.Tensor, dtype: torch.dtype, mag: float | None = None) -> torch.Tensor:
    """Round float32 scales (``>= 0``) to the nearest value of ``dtype`` (ties to even); zeros
    become the dtype's eps.

    With ``mag`` (the largest code magnitude a decode multiplies the scale by), a scale is also
    capped at :func:`decode_cap`, so that ``code * scale`` stays finite when a loader decodes in
    ``dtype`` (an fp16 weight near 65504: a scale times 448 or 128 could be ``inf``). Only groups
    whose values reach the top of ``dtype``'s range are affected: their extreme values are
    clipped by less than one quantization step.

    Example:
        >>> stored_scale(torch.tensor([1.00390625, 1.005, 0.0]), torch.bfloat16).tolist()
        [1.0, 1.0078125, 0.0078125]
    """
    st = scale.to(dtype, copy=True)  # its own memory: the zeros and the cap are set in place
    if st.numel():
        settle_stored(st, mag)
    return st


def settle_stored(st: torch.Tensor, mag: float | None) -> tuple[float, float]:
    """In place, on scales ``st`` (``>= 0``) already rounded to their dtype: zeros become the
    dtype's eps and, with ``mag``, scales above :func:`decode_cap` are capped (see
    :func:`stored_scale`). Returns the least and the largest scale as they were (NaN when one is
    NaN), from the one reduction both checks share."""
    # the scales are >= 0 (ranges and magnitudes), so "some scale is 0" is "the least is 0": both
    # checks from one reduction and one conversion (each torch call holds the GIL)
    lo, hi = torch.stack(torch.aminmax(st)).tolist()
    if not lo > 0:  # (also a NaN or a negative scale beside a zero, as a plain "any zero" test)
        st.masked_fill_(st == 0, torch.finfo(st.dtype).eps)
    if mag is not None and hi > decode_cap_value(st.dtype, mag):
        torch.minimum(st, decode_cap(st.dtype, mag), out=st)
    return lo, hi


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


@functools.lru_cache(maxsize=64)
def decode_cap_value(dtype: torch.dtype, mag: float) -> float:
    """:func:`decode_cap` as a Python float."""
    return float(decode_cap(dtype, mag))


def int_half_range(qmin: int, qmax: int) -> float:
    """The divisor of a symmetric integer scale: ``(qmax - qmin) / 2`` (127.5 int8, 7.5 int4)."""
    return (qmax - qmin) / 2


def int_code_magnitude(qmin: int, qmax: int, symmetric: bool) -> float:
    """The largest ``|code|`` (``|q - zp|`` when asymmetric) a decode multiplies a scale by."""
    return float(max(-qmin, qmax)) if symmetric else float(qmax - qmin)


def symmetric_tile_scale(
    xf: torch.Tensor, half: float, stored: torch.Tensor, sc: torch.Tensor, mag: float
) -> torch.Tensor:
    """The stored symmetric scales ``max(max, -min) / half`` of a float32 tile ``xf``
    (``[rows, groups, g]``), rounded as :func:`stored_scale` rounds them, in few torch calls:
    written into ``stored`` (the block's scale rows, in the weight's dtype) and as float32 into
    ``sc`` (``[rows, groups]``); returns ``sc`` as ``[rows, groups, 1]``.

    One reduction of the stored scales both finds NaN/Inf in the tile (a NaN or ±Inf value makes
    its group's scale NaN or Inf) and checks for zeros and the decode cap.

    Raises:
        NonFiniteError: the tile holds NaN or Inf.

    Example:
        >>> xf = torch.tensor([[[1.0, -3.0]], [[0.0, 0.0]]])
        >>> st, sc = torch.empty(2, 1, dtype=torch.bfloat16), torch.empty(2, 1)
        >>> symmetric_tile_scale(xf, 127.5, st, sc, 128.0).flatten().tolist() == sc.flatten().tolist()
        True
        >>> st.flatten().tolist()   # 3 / 127.5 in bf16; an all-zero group gets the dtype's eps
        [0.0235595703125, 0.0078125]
    """
    mx = xf.amax(dim=-1)  # two reductions: torch.aminmax over a dimension is 14x slower (tile_ops.py)
    mn = xf.amin(dim=-1)
    torch.maximum(mx, mn.neg_(), out=sc)
    sc.div_(half)
    stored.copy_(sc)  # rounded to the stored dtype, ties to even
    lo, hi = settle_stored(stored, mag)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NonFiniteError("NaN or Inf")
    sc.copy_(stored)
    return sc.unsqueeze(-1)


def tensor_scale(amax: float, half: float, sdt: torch.dtype, mag: float, name: str) -> torch.Tensor:
    """The stored per-tensor scale ``[1]`` of a tensor whose absmax is ``amax``.

    Raises:
        DecodeOverflowError: ``amax`` is beyond the range of ``sdt`` (float64 weights).
    """
    if amax > torch.finfo(sdt).max:
        raise DecodeOverflowError(f"|x| reaches {amax:.6g}, beyond the {dtype_label(sdt)} scales of {name}")
    return stored_scale(torch.tensor([amax], dtype=torch.float32) / half, sdt, mag)


def asymmetric_params(
    mx: torch.Tensor, mn: torch.Tensor, qmin: int, qmax: int, sdt: torch.dtype, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored asymmetric scales and float zero points of groups with max ``mx`` and min ``mn``
    (both clamped in place to include 0).

    Raises:
        DecodeOverflowError: a scale rounded to ``inf`` in ``sdt`` (float64 weights beyond float32).
    """
    mn.clamp_(max=0)
    mx.clamp_(min=0)
    scale = stored_scale((mx - mn) / (qmax - qmin), sdt)
    if not bool(torch.isfinite(scale).all()):
        raise DecodeOverflowError(f"its range does not fit the {dtype_label(scale.dtype)} scales of {name}")
    zp = (qmin - mn / scale.float()).clamp_(qmin, qmax).round_()
    return scale, zp


def check_decodes_finite(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    mag: float,
    name: str,
    dtype: torch.dtype,
) -> None:
    """Raise :class:`DecodeOverflowError` when some ``(code - zp) * scale`` (exact) exceeds the
    range of ``dtype`` (the dtype loaders decode in). ``codes`` is ``[rows, groups, g]``
    (float codes), ``scale``/``zp`` ``[rows, groups]``, ``mag`` the largest code magnitude.
    Cheap unless a scale is near the top."""
    worst = decode_worst(codes, scale, zp, mag, dtype)
    if worst > torch.finfo(dtype).max:
        raise DecodeOverflowError(decode_overflow_message(worst, dtype, name))


def decode_worst(
    codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, mag: float, dtype: torch.dtype
) -> float:
    """The largest ``|code - zp| * scale`` (exact) of the block, or 0.0 when no scale is near the
    top of ``dtype`` (then none can exceed it: the cheap, usual case)."""
    sd = scale.double().reshape(codes.shape[0], codes.shape[1])
    if codes.numel() == 0 or float(sd.max()) * mag <= torch.finfo(dtype).max:
        return 0.0
    hi = codes.amax(dim=-1).double()
    lo = codes.amin(dim=-1).double()
    if zp is not None:
        z = zp.double().reshape(sd.shape)
        hi, lo = hi - z, lo - z
    return float((torch.maximum(hi.abs(), lo.abs()) * sd).max())


def decode_overflow_message(worst: float, dtype: torch.dtype, name: str) -> str:
    top = torch.finfo(dtype).max
    return (
        f"its values reach {worst:.6g}, beyond {dtype_label(dtype)} (max {top:.6g}) once decoded "
        f"with the {name} scale"
    )


def group_sums(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` (``[..., g, m]``, float) over its dimension ``-2`` by a fixed pairwise tree, in place.

    Every column is summed by the same sequence of elementwise adds, so a column's sum depends
    neither on the other columns, nor on how many there are, nor on the number of threads
    (library reductions guarantee none of this). With groups laid out as columns, each level of
    the tree is one add of two contiguous halves. ``t`` is overwritten; the result is a view of
    its row 0.

    Example:
        >>> group_sums(torch.tensor([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5], [4.0, 0.5], [5.0, 0.5]])).tolist()
        [15.0, 2.5]
    """
    w = t.shape[-2]
    while w > 1:
        if w % 2:
            t[..., 0, :].add_(t[..., w - 1, :])
            w -= 1
        h = w // 2
        t[..., :h, :].add_(t[..., h:w, :])
        w = h
    return t[..., 0, :]


def exact_sum(t: torch.Tensor) -> float:
    """Deterministic sum of a 2-D tensor (pairwise tree over columns, then rows), as a float;
    ``t`` is overwritten."""
    col = group_sums(t.t())  # [rows]
    return float(group_sums(col.reshape(-1, 1).clone())[0])


# ---- decode error and its statistics ------------------------------------------------------------
def decode_error(
    x: torch.Tensor,
    q: torch.Tensor,
    sf: torch.Tensor,
    zp: torch.Tensor | None,
    ws: Workspace,
    decode_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    rounded: torch.Tensor | None = None,
) -> torch.Tensor:
    """The error ``±(decode - x)`` of codes ``q`` (float32 or fp8) with float32 scales ``sf`` and
    zero points ``zp`` against the float32 input ``x`` (same shape, contiguous); written to
    ``out`` (float32, ``x``'s shape; it may be ``q`` itself, whose codes are then overwritten)
    or a ``ws`` buffer. ``rounded``: a ``decode_dtype`` buffer of ``x``'s shape for the decode
    (the tiled kernels keep one per tile shape), else a ``ws`` buffer.

    The decode is rounded to ``decode_dtype`` (the stored scale's dtype, i.e. the weight's) as
    the loaders and ``monoquant verify`` decode: a bf16 weight's error is measured on its bf16
    decode (a float32 product of a code and a stored scale rounded once to that dtype is what a
    native multiply in that dtype gives). The sign is irrelevant to every statistic.
    """
    e = out if out is not None else ws.get("err", x.numel(), torch.float32).view(x.shape)
    if decode_dtype != torch.float32:
        if zp is not None:
            torch.sub(q, zp, out=e)
            e.mul_(sf)
        else:
            torch.mul(q, sf, out=e)
        if rounded is None:
            rounded = ws.get("dec", x.numel(), decode_dtype).view(x.shape)
        rounded.copy_(e)  # the decode as the loaders see it (a reused buffer: no allocation per block)
        e.copy_(rounded)
        e.sub_(x)
    elif zp is not None:
        torch.sub(q, zp, out=e)
        torch.addcmul(x, e, sf, value=-1, out=e)  # x - (q - zp)·s: the error, negated
    else:
        torch.addcmul(x, q, sf, value=-1, out=e)  # x - q·s in one pass
    return e


def sqnr_db(signal: float, noise: float) -> float:
    """``10·log10(signal / noise)`` of two sums of squares; ``inf`` when ``noise`` is 0 (exact),
    ``-inf`` when only the signal is 0.

    Example:
        >>> sqnr_db(100.0, 1.0), sqnr_db(1.0, 0.0)
        (20.0, inf)
    """
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def tensor_sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """SQNR of ``approx`` against ``ref`` (whole tensors, float64 sums).

    Example:
        >>> tensor_sqnr_db(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.1]))  # doctest: +ELLIPSIS
        26.98...
    """
    st = ErrorStats()
    st.add(ref.double(), approx.double())
    return st.sqnr_db


def unsafe_square_sums(ss: float, es: float, max_err: float) -> bool:
    """Whether float32 sums of squares may have overflowed or underflowed (values beyond about
    1e19 or below about 1e-12): then they are redone in float64, so a tensor of huge values does
    not read ``nan`` dB, nor one of tiny values ``inf`` (exact) when it is not.

    Example:
        >>> unsafe_square_sums(400.0, 0.01, 0.002), unsafe_square_sums(float("inf"), 1.0, 1.0)
        (False, True)
        >>> unsafe_square_sums(1e-30, 0.0, 1e-16)  # errors that squared to 0 in float32
        True
    """
    if not (math.isfinite(ss) and math.isfinite(es)):
        return True
    return 0.0 < ss < 1e-24 or 0.0 < es < 1e-24 or (es == 0.0 and max_err > 0.0)


class TileSums:
    """A tile's four error figures ``[min err, max err, Σx², Σerr²]`` as one float32 buffer and
    the views the reductions write into (made once per kernel call, not per tile)."""

    def __init__(self) -> None:
        self.buf = torch.empty(4)
        self.lo_hi = (self.buf[0], self.buf[1])
        self.ss = self.buf[2]
        self.es = self.buf[3]


@dataclass
class ErrorStats:
    """Accumulated reconstruction error of one tensor (float64 sums over blocks).

    Every path adds through :meth:`add_sums`: :meth:`add` (a decode), :meth:`add_error` (an
    error already computed in a buffer, the kernels' fast path).
    """

    numel: int = 0
    sum_sq: float = 0.0
    err_sq: float = 0.0
    max_abs_err: float = 0.0
    overflow: int = 0
    underflow: int = 0

    def add_sums(self, numel: int, sum_sq: float, err_sq: float, max_abs_err: float) -> None:
        """Add one block's sums (Σx², Σ(x̂-x)², max |x̂-x|) over ``numel`` elements."""
        self.numel += numel
        self.sum_sq += sum_sq
        self.err_sq += err_sq
        self.max_abs_err = max(self.max_abs_err, max_abs_err)

    def add_error(self, x: torch.Tensor, err: torch.Tensor) -> None:
        """Add one block: ``x`` the input, ``err`` its error (either sign), same dtype. ``err``
        may hold fewer elements than ``x``, as long as it holds every non-zero error (the gated
        fp16 statistics measure only where the cast can change a value)."""
        xf = x.reshape(-1)
        flat = err.reshape(-1)
        if flat.numel():  # the four figures in one conversion (each torch call holds the GIL)
            lo, hi = torch.aminmax(flat)
            self.add_error_sums(xf, flat, torch.stack((lo, hi, torch.dot(xf, xf), torch.dot(flat, flat))))
        else:
            self.add_error_sums(xf, flat, None)

    def add_tile(self, xf: torch.Tensor, err: torch.Tensor, sums: TileSums) -> None:
        """:meth:`add_error` of a kernel tile: ``xf`` and ``err`` flat float32 views (``err`` not
        empty), the four figures written into ``sums``' buffer (no tensor made per tile)."""
        torch.aminmax(err, out=sums.lo_hi)
        torch.dot(xf, xf, out=sums.ss)
        torch.dot(err, err, out=sums.es)
        self.add_error_sums(xf, err, sums.buf)

    def add_error_sums(self, xf: torch.Tensor, flat: torch.Tensor, sums: torch.Tensor | None) -> None:
        """Add a block whose ``[min err, max err, Σx², Σerr²]`` (float32) are ``sums`` (``None``:
        no error terms, ``flat`` empty); squares beyond float32's range are redone in float64."""
        if sums is not None:
            lo_f, hi_f, ss, es = sums.tolist()
            mx = max(hi_f, -lo_f)
        else:
            ss, es, mx = float(torch.dot(xf, xf)), 0.0, 0.0
        if unsafe_square_sums(ss, es, mx):  # rare: squares beyond float32's range, redone in float64
            xd, ed = xf.double(), flat.double()
            ss, es = float(torch.dot(xd, xd)), float(torch.dot(ed, ed))
        self.add_sums(xf.numel(), ss, es, mx)

    def add(self, x: torch.Tensor, dq: torch.Tensor) -> None:
        """Add one block: ``x`` the input, ``dq`` its decode (same float dtype)."""
        self.add_error(x, dq.reshape(x.shape) - x)

    def merge(self, other: ErrorStats) -> None:
        self.add_sums(other.numel, other.sum_sq, other.err_sq, other.max_abs_err)
        self.overflow += other.overflow
        self.underflow += other.underflow

    @property
    def sqnr_db(self) -> float:
        """10·log10(Σw² / Σ(w-ŵ)²); ``inf`` for an exact result."""
        return sqnr_db(self.sum_sq, self.err_sq)

    @property
    def rel_err(self) -> float:
        """‖w-ŵ‖ / ‖w‖."""
        return math.sqrt(self.err_sq / self.sum_sq) if self.sum_sq > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | None]:
        sq = self.sqnr_db
        return {
            "sqnr_db": round(sq, 4) if math.isfinite(sq) else None,
            "rel_err": self.rel_err,
            "max_abs_err": self.max_abs_err,
            "overflow": self.overflow,
            "underflow": self.underflow,
        }
