"""Kernels: the registered format unit of a scheme (:func:`get_kernel`), and the names the
pipeline, plan, verify and the in-memory API use from the numerics core.

A kernel is the set of pure functions of one scheme on blocks of whole rows (output specs,
quantize, dequantize; :class:`monoquant.formats.base.Kernel`). Each format family is one small
unit in :mod:`monoquant.formats`, registered by its key; this module only looks the unit up and
keeps one instance per scheme (kernels are stateless). The numerics (scales, zero points,
rounding, error statistics) live once in :mod:`monoquant.numerics`; see docs/format.md.

Example (the int unit's own example, in :mod:`monoquant.formats.integer`, shows a round trip):
    >>> from monoquant.schemes import get_scheme
    >>> [type(get_kernel(get_scheme(s))).__name__ for s in ("int4", "fp8", "fp16", "nvfp4a16")]
    ['IntKernel', 'FP8Kernel', 'CastKernel', 'NVFP4Kernel']
    >>> get_kernel(get_scheme("int4")) is get_kernel(get_scheme("int4"))  # one instance per scheme
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import SchemeError
from .formats import kernel_for
from .formats.base import Kernel
from .numerics import (
    FP8_MAX,
    FP16_MAX,
    DecodeOverflowError,
    ErrorStats,
    Fp16OverflowError,
    NonFiniteError,
    OutSpec,
    Workspace,
    absmax,
    as_rows,
    decode_cap,
    dtype_label,
    int_code_magnitude,
    scale_dtype_for,
    stored_scale,
)

if TYPE_CHECKING:  # pragma: no cover
    from .schemes import Scheme

__all__ = [
    "FP8_MAX",
    "FP16_MAX",
    "DecodeOverflowError",
    "ErrorStats",
    "Fp16OverflowError",
    "Kernel",
    "NonFiniteError",
    "OutSpec",
    "Workspace",
    "absmax",
    "as_rows",
    "code_magnitude",
    "decode_cap",
    "dtype_label",
    "get_kernel",
    "scale_dtype_for",
    "stored_scale",
]

_KERNELS: dict[Scheme, Kernel] = {}


def get_kernel(scheme: Scheme) -> Kernel:
    """The kernel of ``scheme`` (one instance per scheme, kept: kernels are stateless).

    Raises:
        SchemeError: no registered unit implements the scheme.
    """
    k = _KERNELS.get(scheme)
    if k is None:
        found = kernel_for(scheme)
        if found is None:
            raise SchemeError(f"no kernel is registered for the scheme {scheme.name}")
        k = _KERNELS[scheme] = found
    return k


def code_magnitude(scheme: Scheme) -> float:
    """The largest ``|code|`` (``|q - zp|`` when asymmetric) a decode multiplies a scale by."""
    if scheme.kind == "float":
        return FP8_MAX
    return int_code_magnitude(scheme.qmin, scheme.qmax, scheme.symmetric)
