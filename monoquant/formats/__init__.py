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

import dataclasses
from collections.abc import Callable, Iterable, Mapping
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
    from . import fp8_block, mxfp, nvfp4  # noqa: F401  (registration on import; cached after the first)


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
        >>> names = ["l.0.attn.q_proj.weight", "l.0.attn.k_proj.weight", "l.0.mlp.up_proj.weight"]
        >>> g = shared_scale_groups(names)
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


def shared_scales(
    decided: list[tuple[Any, Any, Any]],
) -> tuple[list[tuple[Any, Any, Any]], dict[str, tuple[Any, ...]]]:
    """For the plan: ``(ref, decision, specs)`` rows -> the same rows, with the reason of each
    NVFP4 tensor that shares its global scale saying so, and ``{name: (refs sharing it)}``.

    Tensors are grouped only with tensors of the same scheme (what the engine fuses holds one
    scheme). The plan (``--dry-run``) shows the groups in each tensor's reason. The reason of an
    FP8-block tensor whose input width is not a multiple of 128 says what that means for loaders.
    """
    decided = [_block_width_note(row) for row in decided]
    by_scheme: dict[str, list[str]] = {}
    refs = {}
    for ref, d, _specs in decided:
        if d.action == "quantize" and d.scheme is not None and d.scheme.kind == "nvfp4":
            by_scheme.setdefault(d.scheme.name, []).append(ref.name)
            refs[ref.name] = ref
    groups: dict[str, tuple[str, ...]] = {}
    for names in by_scheme.values():
        groups.update(shared_scale_groups(names))
    if not groups:
        return decided, {}
    out = []
    for ref, d, specs in decided:
        members = groups.get(ref.name)
        if members:
            others = ", ".join(m[: -len(".weight")].rpartition(".")[2] for m in members if m != ref.name)
            d = dataclasses.replace(
                d, reason=f"{d.reason}; global scale shared with {others} (fused in the engine)"
            )
        out.append((ref, d, specs))
    return out, {n: tuple(refs[m] for m in ms) for n, ms in groups.items()}


def _block_width_note(row: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    ref, d, specs = row
    if d.action != "quantize" or d.scheme is None or d.scheme.strategy != "block" or len(ref.shape) < 2:
        return row
    cols = 1
    for s in ref.shape[1:]:
        cols *= int(s)
    if cols % 128 == 0:
        return row
    note = (
        f"; {cols} input columns: partial last 128-block (compressed-tensors' activation groups of 128 "
        "need a multiple of 128 to run compressed: load with dequantize=True)"
    )
    return ref, dataclasses.replace(d, reason=d.reason + note), specs


def infer_format(parts: Mapping[str, Any]) -> Scheme | None:
    """The scheme of one stored group (tensors keyed by suffix) when it is one of the formats
    here, from dtypes and shapes alone; ``None`` otherwise (the classic schemes).

    NVFP4 is told by its ``_global_scale`` (W4A4 by ``.input_global_scale``), MXFP4 by uint8
    codes without it, MXFP8 by a uint8 scale beside float8 codes, FP8 block by a scale grid of
    ``[ceil(rows/128), ceil(cols/128)]`` that is not one per row. MXFP4/MXFP8 are returned as
    their weight-only presets (the activations do not change the stored weights).
    """
    import torch

    from ..schemes import FORMAT_PRESETS

    scale = parts.get("_scale")
    if scale is None:
        return None
    if "_packed" in parts and parts["_packed"].dtype == torch.uint8:
        if "_global_scale" in parts:
            return FORMAT_PRESETS["nvfp4" if ".input_global_scale" in parts else "nvfp4a16"]
        return FORMAT_PRESETS["mxfp4a16"]
    q = parts.get("")
    if q is None or q.dtype != torch.float8_e4m3fn:
        return None
    if scale.dtype == torch.uint8:
        return FORMAT_PRESETS["mxfp8a16"]
    rows = int(q.shape[0]) if q.dim() else 1
    cols = q.numel() // max(rows, 1)
    grid = (-(-rows // 128), -(-cols // 128))
    if (
        scale.dim() == 2
        and tuple(scale.shape) == grid
        and not (scale.shape[0] == rows and scale.shape[1] == 1)
    ):
        return FORMAT_PRESETS["fp8-block"]
    return None


#: absmax of the other members of a shared-scale group, by the identity of their bytes (file, offset,
#: size, mtime): each member's first pass reads the others once per run, not once per member.
_PEER_AMAX: dict[tuple[Any, ...], float] = {}


def shared_absmax(members: tuple[Any, ...], own: Any, block_rows: int) -> float:
    """max |x| over the tensors of ``members`` other than ``own`` (TensorRefs), read through a
    separate ``pread`` reader: the run's mapping (and the pages it holds) is left alone.

    The values are cached by the identity of each tensor's bytes, so the members of one group
    read each other once.

    Raises:
        TensorValueError: a member holds NaN or Inf (the message names that member).
    """
    import os

    import torch

    from ..inmemory import nonfinite_error
    from ..kernels import NonFiniteError, absmax, as_rows
    from ..reader import RowReader

    out = 0.0
    with RowReader("pread") as rd:
        for ref in members:
            if ref == own:
                continue
            try:
                if isinstance(ref.file, (str, os.PathLike)):
                    st = os.stat(ref.file)
                    version: tuple[Any, ...] = (st.st_size, st.st_mtime_ns)
                else:  # a RemotePath (s3://...): its size and version tag (ETag, generation)
                    version = (ref.file.size, ref.file.etag)
                key: tuple[Any, ...] = (str(ref.file), ref.name, ref.offset, ref.nbytes, *version)
            except (OSError, AttributeError):
                key = ()
            amax = _PEER_AMAX.get(key) if key else None
            if amax is None:
                amax = 0.0
                n = as_rows(ref.shape)[0]
                try:
                    for a in range(0, n, block_rows):
                        amax = max(amax, absmax(rd.rows(ref, a, min(a + block_rows, n))))
                except NonFiniteError:
                    bad = sum(
                        int((~torch.isfinite(rd.rows(ref, a, min(a + block_rows, n)))).sum())
                        for a in range(0, n, block_rows)
                    )
                    raise nonfinite_error(ref.name, bad, f"{ref.file.name}: ") from None
                if key:
                    if len(_PEER_AMAX) > 256:
                        _PEER_AMAX.clear()
                    _PEER_AMAX[key] = amax
            out = max(out, amax)
    return out
