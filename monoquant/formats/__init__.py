"""Formats as small registered units: one module per format family, one kernel class each.

=====================  =========================================  =================================
registry key           unit (module: class)                        schemes
=====================  =========================================  =================================
``cast``               :mod:`.cast`: ``CastKernel``                fp16, bf16
``int``                :mod:`.integer`: ``IntKernel``              int8, int4, w8a8 (all strategies)
``float``              :mod:`.fp8`: ``FP8Kernel``                  fp8, fp8-tensor, fp8-dynamic
``strategy:block``     :mod:`.fp8_block`: ``FP8BlockKernel``       fp8-block
``nvfp4``              :mod:`.nvfp4`: ``NVFP4Kernel``              nvfp4a16, nvfp4
``mxfp4``, ``mxfp8``   :mod:`.mxfp`: ``MXKernel``                  mxfp4(a16), mxfp8(a16)
=====================  =========================================  =================================

A unit subclasses :class:`monoquant.formats.base.Kernel`, imports only the numerics core
(:mod:`monoquant.numerics`, :mod:`monoquant.packing`, :mod:`monoquant.optimize`), the base and
:mod:`.common`, and registers itself with :func:`register` under its key: a scheme's key is
``strategy:<strategy>`` when a unit registered that, else its ``kind`` (:func:`format_key`).
Adding a format means one new module (named in the import line below), its presets in
``monoquant.schemes``, its golden bytes and its tests (docs/architecture.md, "How to add a format").

Example:
    >>> from monoquant.schemes import get_scheme
    >>> type(kernel_for(get_scheme("nvfp4a16"))).__name__, type(kernel_for(get_scheme("int8"))).__name__
    ('NVFP4Kernel', 'IntKernel')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The units, imported here so that each registers itself (one line per unit).
from . import cast, fp8, fp8_block, integer, mxfp, nvfp4  # noqa: F401
from .base import REGISTRY, register

if TYPE_CHECKING:  # pragma: no cover
    from ..schemes import Scheme
    from .base import Kernel

__all__ = ["REGISTRY", "format_key", "kernel_for", "register", "registered"]


def format_key(scheme: Scheme) -> str:
    """The registry key of ``scheme``: ``strategy:<strategy>`` when a unit claims that strategy,
    else the scheme's kind."""
    by_strategy = f"strategy:{scheme.strategy}"
    return by_strategy if by_strategy in REGISTRY else scheme.kind


def kernel_for(scheme: Scheme) -> Kernel | None:
    """A new kernel of the registered unit for ``scheme``, or ``None`` when no unit implements it."""
    cls = REGISTRY.get(format_key(scheme))
    return cls(scheme) if cls is not None else None


def registered() -> dict[str, str]:
    """Registry key -> kernel class name (for docs and tests)."""
    return {k: c.__name__ for k, c in sorted(REGISTRY.items())}
