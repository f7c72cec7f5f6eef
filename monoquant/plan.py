"""The plan: every output tensor's name, dtype, shape, bytes, shard and offset — from headers only.

Round-to-nearest output sizes depend only on input shapes and the scheme, so the full header of
every output shard is known before any weight is read. That gives the header-first streaming
writer, final shard names from the start, ``--dry-run``, and the resume fingerprint.

Example:
    >>> from monoquant.reader import open_checkpoint            # doctest: +SKIP
    >>> p = make_plan(open_checkpoint("ckpt/"), "int4")         # doctest: +SKIP
    >>> p.shards[0].filename, p.totals()["bits_per_weight"]     # doctest: +SKIP
    ('model-00001-of-00001.safetensors', 4.13)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .dtypes import dtype_name, itemsize, to_st
from .errors import CheckpointError
from .fusedscales import shared_scales
from .kernels import OutSpec, as_rows, get_kernel
from .options import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_SHARD, PlanOptions, parse_size, resolve_scheme
from .outnames import INDEX_NAME as INDEX_NAME  # re-exported: callers import it from here
from .outnames import shard_name
from .reader import Checkpoint, TensorRef
from .rules import Decision, Rules, decide, summarize_warnings
from .schemes import FORMAT_VERSION, Scheme
from .storedformats import output_name

#: Chooses a scheme per tensor (mixed precision); ``None`` = use the decision of the rules.
Chooser = Callable[[TensorRef, Decision], Decision]


@dataclass(frozen=True)
class PlannedOutput:
    """One output tensor: its name, dtype, shape, where it goes in its shard."""

    name: str
    spec: OutSpec
    offset: int  # within the shard's data section

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes


@dataclass(frozen=True)
class PlannedTensor:
    """One input tensor, what happens to it, and its outputs."""

    ref: TensorRef
    decision: Decision
    outputs: tuple[PlannedOutput, ...]
    shard: int
    #: tensors whose absmax sets this tensor's per-tensor scale too (NVFP4's fused layers; itself
    #: included; empty when only its own), see :func:`monoquant.fusedscales.shared_scales`
    shared: tuple[TensorRef, ...] = ()

    @property
    def out_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its file name, tensors (indices into ``Plan.tensors``) and header."""

    index: int
    filename: str
    tensors: tuple[int, ...]
    header: bytes
    data_size: int

    @property
    def file_size(self) -> int:
        return 8 + len(self.header) + self.data_size


@dataclass(frozen=True)
class Plan:
    """Everything a run will do, computed from headers alone."""

    source: str
    scheme: Scheme
    rules: Rules
    tensors: tuple[PlannedTensor, ...]
    shards: tuple[ShardPlan, ...]
    max_shard_size: int
    clamp_fp16: bool
    fingerprint: str
    block_bytes: int = DEFAULT_BLOCK_BYTES
    #: JSON-able options that change the output and so enter the fingerprint
    extra: dict[str, Any] = field(default_factory=dict)
    #: mixed precision: the chooser's summary (estimates; not part of the fingerprint)
    mixed_summary: dict[str, Any] | None = None

    # ---- summaries --------------------------------------------------------------------------
    def totals(self) -> dict[str, Any]:
        """Counts and sizes: tensors per action, bytes in/out, bits per weight of quantized tensors."""
        counts = {"quantize": 0, "cast": 0, "copy": 0}
        q_in = q_out = q_numel = 0
        for t in self.tensors:
            counts[t.decision.action] += 1
            if t.decision.action == "quantize" or t.decision.eligible:  # mixed precision: kept ones count too
                q_numel += t.ref.numel
                q_in += t.ref.nbytes
                q_out += t.out_bytes
        bytes_in = sum(t.ref.nbytes for t in self.tensors)
        bytes_out = sum(t.out_bytes for t in self.tensors)
        out: dict[str, Any] = {
            "tensors": len(self.tensors),
            "quantized": counts["quantize"],
            "cast": counts["cast"],
            "copied": counts["copy"],
            "shards": len(self.shards),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "ratio": round(bytes_out / bytes_in, 4) if bytes_in else None,
            "bits_per_weight": round(8 * q_out / q_numel, 4) if q_numel else None,
            "quantized_bytes_in": q_in,
            "quantized_bytes_out": q_out,
            "estimated_peak_bytes": estimate_peak(self),
            "warnings": [t.ref.name for t in self.tensors if t.decision.warn],
            "warning_summary": summarize_warnings([(t.ref.name, t.decision) for t in self.tensors]),
        }
        if self.mixed_summary is not None:
            out["mixed"] = self.mixed_summary
        return out

    def schemes_used(self) -> dict[str, Scheme]:
        """Scheme name -> scheme, for every scheme some tensor uses (mixed precision: several)."""
        out: dict[str, Scheme] = {}
        for t in self.tensors:
            s = t.decision.scheme
            if s is not None and t.decision.action == "quantize":
                out.setdefault(s.name, s)
        return out

    def to_json(self) -> dict[str, Any]:
        """Machine-readable plan (``--dry-run --json``)."""
        return {
            "source": self.source,
            "scheme": self.scheme.to_dict(),
            "rules": self.rules.to_dict(),
            "max_shard_size": self.max_shard_size,
            "fingerprint": self.fingerprint,
            "format_version": FORMAT_VERSION,
            "totals": self.totals(),
            "shards": [
                {"file": s.filename, "bytes": s.file_size, "tensors": len(s.tensors)} for s in self.shards
            ],
            "tensors": [
                {
                    "name": t.ref.name,
                    "file": t.ref.file.name,
                    "dtype": dtype_name(t.ref.dtype),
                    "shape": list(t.ref.shape),
                    "bytes_in": t.ref.nbytes,
                    "action": t.decision.action,
                    "scheme": t.decision.scheme.name if t.decision.scheme else None,
                    "reason": t.decision.reason,
                    "warn": t.decision.warn,
                    "shard": self.shards[t.shard].filename,
                    "bytes_out": t.out_bytes,
                    "outputs": [
                        {
                            "name": o.name,
                            "dtype": dtype_name(o.spec.dtype),
                            "shape": list(o.spec.shape),
                            "bytes": o.nbytes,
                        }
                        for o in t.outputs
                    ],
                }
                for t in self.tensors
            ],
        }


def estimate_peak(plan: Plan) -> int:
    """Rough peak memory of a run: interpreter + torch, plus the reusable block buffers."""
    base = 260 * 1024 * 1024
    elems = max((_block_elems(plan, t) for t in plan.tensors), default=0)
    # float32 staging + scratch + codes + read buffer, per worker
    return base + elems * (4 + 4 + 2 + 4)


def _block_elems(plan: Plan, t: PlannedTensor) -> int:
    _rows, cols = as_rows(t.ref.shape)
    return block_rows_for(t, plan.block_bytes) * cols


def block_rows_for(t: PlannedTensor, block_bytes: int) -> int:
    """Rows per block for ``t``: about ``block_bytes`` of input, a multiple of the kernel's
    row multiple, at least one such multiple."""
    rows, cols = as_rows(t.ref.shape)
    row_bytes = max(cols * itemsize(t.ref.dtype), 1)
    mult = 1
    if t.decision.scheme is not None and t.decision.action == "quantize":
        mult = get_kernel(t.decision.scheme).block_rows_multiple
    n = max(block_bytes // row_bytes, 1)
    n = max(n // mult, 1) * mult
    return min(n, max(rows, 1))


# ---- building ------------------------------------------------------------------------------------
def _alignment(dtype: torch.dtype) -> int:
    return itemsize(dtype)


def make_plan(
    ckpt: Checkpoint,
    scheme: str | Scheme = "int8",
    *,
    rules: Rules | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    clamp_fp16: bool = False,
    chooser: Chooser | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    extra: dict[str, Any] | None = None,
    **scheme_options: Any,
) -> Plan:
    """Build the plan of a run from the checkpoint's headers (nothing is read).

    Args:
        ckpt: an opened checkpoint.
        scheme: preset name or Scheme; ``scheme_options`` as in :func:`~monoquant.get_scheme`.
        rules: include/exclude overrides.
        max_shard_size: bytes (or ``"5GB"``) per output shard; a tensor larger than this gets a
            shard of its own.
        clamp_fp16: saturate fp16 casts instead of failing.
        chooser: optional per-tensor override of the decision (mixed precision).
        block_bytes: input bytes per processing block (does not change the output bytes).
        extra: JSON-able options that change the output and so enter the fingerprint.
    """
    opts = PlanOptions(
        rules=rules or Rules(),
        max_shard_size=parse_size(max_shard_size),
        clamp_fp16=clamp_fp16,
        block_bytes=block_bytes,
    )
    return _assemble(ckpt, resolve_scheme(scheme, scheme_options), opts, chooser, dict(extra or {}))


def build_plan(ckpt: Checkpoint, scheme: Scheme, opts: PlanOptions) -> Plan:
    """The plan of a run whose options are resolved (:func:`monoquant.options.resolve`).

    From headers only, except for mixed precision (``opts.mixed``): each eligible tensor's
    error is estimated on sampled rows first (:func:`monoquant.mixed.budget_chooser`); the
    target enters the fingerprint, the chooser's summary is kept in ``Plan.mixed_summary``.
    """
    if not opts.mixed:
        return _assemble(ckpt, scheme, opts, None, {})
    from .mixed import budget_chooser

    _refuse_quantized(ckpt)  # before sampling rows of it

    chooser = budget_chooser(ckpt, scheme, opts.rules, target_bpw=opts.target_bpw, min_sqnr=opts.min_sqnr)
    return _assemble(ckpt, scheme, opts, chooser, {"mixed": chooser.summary["options"]}, chooser.summary)


def _refuse_quantized(ckpt: Checkpoint) -> None:
    cfg = ckpt.config
    if cfg is not None and isinstance(cfg.get("quantization_config"), dict):
        method = cfg["quantization_config"].get("quant_method", "unknown")
        raise CheckpointError(
            f"{ckpt.root / 'config.json'}: the checkpoint is already quantized (quant_method {method!r}); "
            "monoquant needs the dense (original) checkpoint"
        )


def _assemble(
    ckpt: Checkpoint,
    sch: Scheme,
    opts: PlanOptions,
    chooser: Chooser | None,
    extra: dict[str, Any],
    mixed_summary: dict[str, Any] | None = None,
) -> Plan:
    _refuse_quantized(ckpt)
    rules, max_bytes, clamp_fp16 = opts.rules, opts.max_shard_size, opts.clamp_fp16
    decided: list[tuple[TensorRef, Decision, tuple[OutSpec, ...]]] = []
    for ref in ckpt.tensors:
        d = decide(ref.name, ref.dtype, ref.shape, sch, rules)
        if chooser is not None:
            d = chooser(ref, d)
        if d.action == "copy":
            specs: tuple[OutSpec, ...] = (OutSpec("", ref.dtype, ref.shape),)
        else:
            assert d.scheme is not None  # every decision but "copy" has one
            specs = get_kernel(d.scheme).out_specs(ref.shape, ref.dtype)
        decided.append((ref, d, specs))
    decided, shared = shared_scales(decided)
    _check_name_collisions(decided)

    # shard assignment: greedy in input order
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_ref, _d, specs) in enumerate(decided):
        nb = sum(s.nbytes for s in specs)
        if groups[-1] and size + nb > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nb
    n_shards = len(groups)

    tensors: list[PlannedTensor | None] = [None] * len(decided)
    shards: list[ShardPlan] = []
    for si, members in enumerate(groups):
        filename = shard_name(si, n_shards)
        entries: list[tuple[int, int, int, str, OutSpec]] = []  # (-align, order, k, name, spec)
        order = 0
        for ti in members:
            ref, _d, specs = decided[ti]
            for sp in specs:
                entries.append((-_alignment(sp.dtype), order, ti, output_name(ref.name, sp.suffix), sp))
                order += 1
        entries.sort(key=lambda e: (e[0], e[1]))
        offset = 0
        outs: dict[int, list[PlannedOutput]] = {ti: [] for ti in members}
        header_obj: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for _neg, _o, ti, name, sp in entries:
            outs[ti].append(PlannedOutput(name, sp, offset))
            header_obj[name] = {
                "dtype": to_st(sp.dtype),
                "shape": list(sp.shape),
                "data_offsets": [offset, offset + sp.nbytes],
            }
            offset += sp.nbytes
        header = json.dumps(header_obj, separators=(",", ":")).encode()
        header += b" " * (-(8 + len(header)) % 8)  # data section starts 8-byte aligned
        for ti in members:
            ref, d, specs = decided[ti]
            by_suffix = {o.spec.suffix: o for o in outs[ti]}
            tensors[ti] = PlannedTensor(
                ref, d, tuple(by_suffix[s.suffix] for s in specs), si, shared.get(ref.name, ())
            )
        shards.append(ShardPlan(si, filename, tuple(members), header, offset))

    final = tuple(t for t in tensors if t is not None)
    fp = fingerprint(ckpt, sch, rules, max_bytes, clamp_fp16, final, extra)
    return Plan(
        source=str(ckpt.root),
        scheme=sch,
        rules=rules,
        tensors=final,
        shards=tuple(shards),
        max_shard_size=max_bytes,
        clamp_fp16=clamp_fp16,
        fingerprint=fp,
        block_bytes=opts.block_bytes,
        extra=extra,
        mixed_summary=mixed_summary,
    )


def _check_name_collisions(decided: list[tuple[TensorRef, Decision, tuple[OutSpec, ...]]]) -> None:
    seen: dict[str, str] = {}
    for ref, _d, specs in decided:
        for sp in specs:
            name = output_name(ref.name, sp.suffix)
            if name in seen:
                raise CheckpointError(
                    f"output name {name!r} would come from both {seen[name]!r} and {ref.name!r}; "
                    f"--exclude one of them"
                )
            seen[name] = ref.name


def fingerprint(
    ckpt: Checkpoint,
    scheme: Scheme,
    rules: Rules,
    max_bytes: int,
    clamp_fp16: bool,
    tensors: tuple[PlannedTensor, ...],
    extra: dict[str, Any],
) -> str:
    """sha256 of everything that determines the output bytes: input headers (names, dtypes,
    shapes, files, sizes), the scheme, rules, options, per-tensor decisions and the format version."""
    h = hashlib.sha256()
    head = {
        "format_version": FORMAT_VERSION,
        "scheme": scheme.to_dict(),
        "rules": rules.to_dict(),
        "max_shard_size": max_bytes,
        "clamp_fp16": clamp_fp16,
        "extra": extra,
    }
    if any(t.decision.scheme is not None and t.decision.scheme.optimize for t in tensors):
        from .optimize import ALGORITHM_VERSION

        head["optimize_version"] = ALGORITHM_VERSION
    h.update(json.dumps(head, sort_keys=True).encode())
    for t in tensors:
        s = t.decision.scheme
        row = [
            t.ref.name,
            t.ref.file.name,
            dtype_name(t.ref.dtype),
            list(t.ref.shape),
            t.ref.nbytes,
            t.decision.action,
            s.name if s else None,
        ]
        h.update(json.dumps(row).encode())
    cfg = ckpt.root / "config.json" if ckpt.root.is_dir() else None
    if cfg is not None and cfg.exists():
        h.update(hashlib.sha256(cfg.read_bytes()).digest())
    return h.hexdigest()


def module_of(name: str) -> str:
    """Module path of a weight name: ``model.layers.0.q_proj.weight`` -> ``model.layers.0.q_proj``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
