"""Per-tensor scales shared by the tensors an engine fuses into one layer (NVFP4's global scale).

NVFP4's per-tensor global scale must be *one* value for the tensors vLLM loads into one fused
layer (:data:`FUSED_SETS`): :func:`shared_scale_groups` finds them by name, :func:`shared_scales`
marks them in the plan (the streaming first
pass reads the other members' absmax with :func:`monoquant.peeramax.shared_absmax`).

Example:
    >>> names = ["l.0.attn.q_proj.weight", "l.0.attn.k_proj.weight", "l.0.mlp.up_proj.weight"]
    >>> shared_scale_groups(names)["l.0.attn.q_proj.weight"]
    ('l.0.attn.q_proj.weight', 'l.0.attn.k_proj.weight')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

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
