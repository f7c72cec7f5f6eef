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
Adding a format means one new module listed in :data:`UNITS`, its presets in
``monoquant.schemes``, its golden bytes and its tests (docs/architecture.md, "How to add a format").

Example:
    >>> from monoquant.schemes import get_scheme
    >>> type(kernel_for(get_scheme("nvfp4a16"))).__name__, type(kernel_for(get_scheme("int8"))).__name__
    ('NVFP4Kernel', 'IntKernel')
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..schemes import Scheme
    from .base import Kernel

#: The unit modules, imported (and so registered) on the first lookup.
UNITS = ("cast", "integer", "fp8", "fp8_block", "nvfp4", "mxfp")

_REGISTRY: dict[str, type[Any]] = {}
_loaded = False


def register(*keys: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: the kernel class implementing schemes of these keys (kinds or ``strategy:X``)."""

    def deco(cls: type[Any]) -> type[Any]:
        for k in keys:
            if _REGISTRY.get(k, cls) is not cls:
                raise ValueError(
                    f"format key {k!r} is registered twice ({_REGISTRY[k].__name__}, {cls.__name__})"
                )
            _REGISTRY[k] = cls
        return cls

    return deco


def format_key(scheme: Scheme) -> str:
    """The registry key of ``scheme``: ``strategy:<strategy>`` when a unit claims that strategy,
    else the scheme's kind."""
    _load_units()
    by_strategy = f"strategy:{scheme.strategy}"
    return by_strategy if by_strategy in _REGISTRY else scheme.kind


def kernel_for(scheme: Scheme) -> Kernel | None:
    """A new kernel of the registered unit for ``scheme``, or ``None`` when no unit implements it."""
    cls = _REGISTRY.get(format_key(scheme))
    return cls(scheme) if cls is not None else None


def registered() -> dict[str, str]:
    """Registry key -> kernel class name (for docs and tests)."""
    _load_units()
    return {k: c.__name__ for k, c in sorted(_REGISTRY.items())}


def _load_units() -> None:
    global _loaded
    if not _loaded:
        for unit in UNITS:  # registration on import
            importlib.import_module(f"{__name__}.{unit}")
        _loaded = True
