"""Formats as small registered units: FP8 block, NVFP4, MXFP4 and MXFP8.

Each unit is one module holding one kernel class with the interface of
:class:`monoquant.kernels.Kernel` (output specs, shape check, row multiple, per-tensor first pass,
``quantize_block``, ``dequantize``, error statistics), registered for the scheme kinds (or
strategy) it implements. :func:`monoquant.kernels.get_kernel` consults :func:`kernel_for` first,
so adding a format means one new module, one ``@register``, its presets in
:data:`monoquant.schemes.FORMAT_PRESETS`, its golden bytes and its tests — nothing else.

Two conventions shared by the units live here too:

* :func:`output_name`: an output suffix starting with ``.`` names a sibling of the module
  (``...q_proj.weight`` + ``.input_global_scale`` -> ``...q_proj.input_global_scale``), the
  others extend the weight's name (``_packed`` -> ``...q_proj.weight_packed``).
* :func:`shared_scale_groups`: NVFP4's per-tensor global scale must be *one* value for the
  tensors an engine fuses into one layer (see :data:`FUSED_SETS`).

Example:
    >>> from monoquant.schemes import get_scheme
    >>> type(kernel_for(get_scheme("nvfp4a16"))).__name__
    'NVFP4Kernel'
    >>> output_name("m.q_proj.weight", ".input_global_scale"), output_name("m.q_proj.weight", "_packed")
    ('m.q_proj.input_global_scale', 'm.q_proj.weight_packed')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..schemes import Scheme

_REGISTRY: dict[str, type[Any]] = {}


def register(*keys: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: the kernel class implementing schemes of these kinds (or ``strategy:X``)."""

    def deco(cls: type[Any]) -> type[Any]:
        for k in keys:
            _REGISTRY[k] = cls
        return cls

    return deco


def kernel_for(scheme: Scheme) -> Any | None:
    """A new kernel of the registered unit for ``scheme``, or ``None`` for the classic schemes."""
    _load_units()
    cls = _REGISTRY.get(f"strategy:{scheme.strategy}") or _REGISTRY.get(scheme.kind)
    return cls(scheme) if cls is not None else None


def registered() -> dict[str, str]:
    """Registry key -> kernel class name (for docs and tests)."""
    _load_units()
    return {k: c.__name__ for k, c in sorted(_REGISTRY.items())}


def _load_units() -> None:
    if not _REGISTRY:
        from . import fp8_block, mxfp, nvfp4  # noqa: F401  (registration on import)


def output_name(name: str, suffix: str) -> str:
    """The on-disk name of the output ``suffix`` of input tensor ``name``."""
    if suffix.startswith("."):
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        return module + suffix
    return name + suffix


#: Sibling modules that vLLM loads into one fused layer (QKVParallelLinear,
#: MergedColumnParallelLinear, the fused MoE w13): their NVFP4 global scales must be equal, or
#: vLLM keeps the largest and the others' fp8 group scales are read against the wrong global
#: scale. The same sets as llm-compressor's model-free path (attention q/k/v, MLA q_a + kv_a,
#: gate/up and expert w1/w3), plus BERT-style query/key/value (vLLM's BERT fuses them too).
FUSED_SETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("wq_a", "wkv_a_with_mqa"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)


def shared_scale_groups(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Weight name -> the names (itself included, in :data:`FUSED_SETS` order) that share its
    global scale; only names in a group of two or more appear.

    ``names`` are the weights quantized with a global-scale scheme; a set is grouped among the
    members present under the same parent module (model-agnostic: names only).

    Example:
        >>> g = shared_scale_groups(["l.0.attn.q_proj.weight", "l.0.attn.k_proj.weight", "l.0.mlp.up_proj.weight"])
        >>> g["l.0.attn.k_proj.weight"]
        ('l.0.attn.q_proj.weight', 'l.0.attn.k_proj.weight')
        >>> "l.0.mlp.up_proj.weight" in g
        False
    """
    present = {n for n in names if n.endswith(".weight")}
    out: dict[str, tuple[str, ...]] = {}
    for n in sorted(present):
        parent, _, leaf = n[: -len(".weight")].rpartition(".")
        prefix = parent + "." if parent else ""
        for fused in FUSED_SETS:
            if leaf in fused:
                members = tuple(m for m in (f"{prefix}{x}.weight" for x in fused) if m in present)
                if len(members) > 1:
                    out[n] = members
                break
    return out
