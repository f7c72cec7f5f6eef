"""What the microscaling units share: the e2m1 (FP4) code table, its encoding and packing,
group maxima and squared errors by fixed pairwise trees.

FP4 e2m1 codes: bit 3 is the sign, bits 0-2 index ``[0, 0.5, 1, 1.5, 2, 3, 4, 6]``. Rounding is
to nearest, ties to the even code, exactly as compressed-tensors' ``cast_to_fp4`` (thresholds
0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5); a negative value that rounds to zero keeps its sign
(code 8), while an input ``-0.0`` gets code 0, as compressed-tensors' packer writes them.
Two codes per byte, the even column in the low nibble.

Codes are found by one table lookup on the float32 bits (sign, exponent, two mantissa bits and
a sticky bit decide the rounding), checked against the threshold comparisons on every key.

Example:
    >>> import torch
    >>> y = torch.tensor([[0.25, -0.3, 0.75, 5.0, -6.0, 2.6]])
    >>> encode_e2m1(y).tolist()
    [[0, 9, 2, 6, 15, 5]]
    >>> decode_e2m1(pack_nibbles(encode_e2m1(y)), 6).tolist()
    [[0.0, -0.5, 1.0, 4.0, -6.0, 3.0]]
"""

from __future__ import annotations

import torch

from ..numerics import FP8_MAX, ErrorStats, absmax, ceil_div, sampled
from ..packing import pack_nibbles
from .base import Kernel

#: The base of the units (kept under its former name).
FormatKernel = Kernel

E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)
E2M1_VALUES = E2M1_VALUES.to(torch.float32)
FP4_MAX = 6.0
# (threshold, strict): |y| > t (strict) or |y| >= t counts one more code step
_E2M1_STEPS = (
    (0.25, True),
    (0.75, False),
    (1.25, True),
    (1.75, False),
    (2.5, True),
    (3.5, False),
    (5.0, True),
)


def encode_e2m1_reference(y: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, 0-15) of float32 values ``y`` (clamped to ±6 first), by comparisons
    with the thresholds: the definition :func:`encode_e2m1` is tested against."""
    y = y.clamp(-FP4_MAX, FP4_MAX)
    a = y.abs()
    idx = torch.zeros(y.shape, dtype=torch.uint8)
    for t, strict in _E2M1_STEPS:
        idx += (a > t) if strict else (a >= t)
    idx |= (y < 0).to(torch.uint8) << 3
    return idx


def _key_table() -> torch.Tensor:
    """e2m1 code for each key ``(sign, exponent, 2 top mantissa bits) * 2 + sticky`` of a float32
    (sticky: any lower mantissa bit set): that is all the rounding (ties included) looks at."""
    keys = torch.arange(4096, dtype=torch.int32)
    rep = ((keys >> 1) << 21) | (keys & 1)  # a representative float32 of each key
    vals = rep.view(torch.float32)
    vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
    return encode_e2m1_reference(vals)


_E2M1_KEYS = _key_table()
#: the e2m1 value (float32) of each key
E2M1_KEY_VALUES = E2M1_VALUES[_E2M1_KEYS.long()]


def e2m1_keys(
    y: torch.Tensor, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 rounding keys of float32 ``y`` (any magnitude: beyond ±6 saturates to code 7).
    ``scratch`` may be ``y``'s own memory (viewed as int32): it is overwritten last."""
    b = y.view(torch.int32)
    key = torch.bitwise_right_shift(b, 21, out=out).bitwise_and_(0x7FF).bitwise_left_shift_(1)
    sticky = torch.bitwise_and(b, 0x1FFFFF, out=scratch).clamp_(max=1)
    return key.add_(sticky)


def encode_e2m1(y: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, 0-15) of float32 values ``y``, saturating at ±6 (one table lookup on
    the bits; equal to :func:`encode_e2m1_reference`)."""
    return codes_of_keys(e2m1_keys(y.contiguous()))


def codes_of_keys(keys: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes of contiguous int32 rounding keys (``index_select``: the fast gather)."""
    return torch.index_select(_E2M1_KEYS, 0, keys.reshape(-1)).view(keys.shape)


def value_of_keys(keys: torch.Tensor) -> torch.Tensor:
    """float32 e2m1 values of int32 rounding keys."""
    return torch.index_select(E2M1_KEY_VALUES, 0, keys.reshape(-1)).view(keys.shape)


def pack_keys(keys: torch.Tensor) -> torch.Tensor:
    """``[r, c]`` rounding keys (contiguous, c even) -> ``[r, c/2]`` packed code bytes."""
    return pack_nibbles(codes_of_keys(keys))


def group_absmax(a: torch.Tensor) -> torch.Tensor:
    """max over the last dimension (a power of two) of ``a`` (|x|, float32) by a pairwise tree of
    elementwise maxima (faster than a library reduction over short groups); ``a`` is consumed."""
    w = a.shape[-1]
    while w > 1:
        h = w // 2
        a = torch.maximum(a[..., :h], a[..., h:w])
        w = h
    return a[..., 0]


def decode_e2m1(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """``[r, c/2]`` packed bytes -> ``[r, c]`` float32 values."""
    r = packed.shape[0]
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(r, cols)
    return E2M1_VALUES[codes.long()]


def accumulate(stats: ErrorStats, x: torch.Tensor, dq: torch.Tensor) -> None:
    """Add the error of ``dq`` (float32 reconstruction) against ``x`` (float32 input)."""
    stats.add(x, dq)


def check_finite_block(x: torch.Tensor) -> None:
    """Raise :class:`~monoquant.kernels.NonFiniteError` when ``x`` holds NaN or Inf."""
    absmax(x)


__all__ = [
    "E2M1_VALUES",
    "FP4_MAX",
    "FP8_MAX",
    "FormatKernel",
    "accumulate",
    "ceil_div",
    "check_finite_block",
    "decode_e2m1",
    "encode_e2m1",
    "pack_nibbles",
    "sampled",
]


def group_sq_err(dq: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ weight·(dq - x)² over the last dimension (a power of two; ``weight`` 1 when ``None``) by
    a fixed pairwise tree of elementwise adds: the same value whatever the number of rows or
    threads. ``dq`` is consumed."""
    e = dq.sub_(x).square_()
    if weight is not None:
        e.mul_(weight)
    w = e.shape[-1]
    while w > 1:
        h = w // 2
        e = e[..., :h] + e[..., h:w]
        w = h
    return e[..., 0]
