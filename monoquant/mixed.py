"""Mixed precision by budget: pick each tensor's scheme to meet a size (or quality) target.

Given an opened checkpoint and the base scheme and rules, :func:`budget_chooser` estimates, for
every tensor the base rules would quantize, the error of each candidate storage:

* int4 with groups of 32, 64 and 128 input columns (symmetric or asymmetric, optimized or not:
  as the base scheme says);
* int8 per output channel (same symmetry and optimization as the base);
* keeping the original dtype (no error, ``dtype`` bits per weight),

and returns a *chooser* ``(TensorRef, Decision) -> Decision`` for
:func:`monoquant.plan.make_plan` that applies the chosen storage to each tensor.

**Size of a candidate.** Exact, from the kernels' output specs: every output byte (codes, scales
in the weight's dtype, zero points) per weight, the figure ``Plan.totals()["bits_per_weight"]``
reports.

**Error of a candidate.** Estimated on sampled rows, read with
:class:`monoquant.reader.RowReader` and quantized with the very kernel the run will use: up to
:data:`SAMPLE_ELEMENTS` elements per tensor, in :data:`SAMPLE_CHUNKS` runs of whole rows spread
evenly over the tensor, so memory stays bounded whatever the tensor's size. A tensor's cost is
its noise-to-signal ratio ``Σ(w-ŵ)² / Σw²`` (the ``10^(-SQNR/10)`` of the sample) times its
number of weights: the total cost is the size-weighted mean NSR of the model. Relative error is
used because weight scales differ between layers and no calibration data says which absolute
error matters more.

**Choice.**

* ``target_bpw``: the least total cost whose bits, summed over the eligible tensors (those the
  base rules quantize; kept ones count their dtype's bits), stay within ``target_bpw`` times
  their number of weights. It is a multiple-choice knapsack, solved greedily on each tensor's
  lower convex hull of (bits, cost): start every tensor at its smallest storage, then take the
  upgrades with the best error reduction per added bit while they fit. A budget below the
  smallest storage leaves every tensor at its smallest storage (``summary["feasible"]`` is
  ``False``).
* ``min_sqnr``: every eligible tensor gets the smallest storage whose estimated SQNR reaches
  ``min_sqnr`` dB (keeping the original dtype when none does).

Deterministic: fixed sample rows, deterministic kernels, exact sums (the pairwise tree of
:func:`monoquant.numerics.group_sums`), ties broken by candidate and tensor order.

Wiring: :func:`monoquant.plan.build_plan` does this when the resolved
:class:`~monoquant.options.PlanOptions` carry a target::

    chooser = budget_chooser(ckpt, scheme, opts.rules, target_bpw=4.5)      # or min_sqnr=25
    plan = _assemble(ckpt, scheme, opts, chooser, extra={"mixed": chooser.summary["options"]},
                     mixed_summary=chooser.summary)

Example:
    >>> import torch
    >>> from pathlib import Path
    >>> from tempfile import mkdtemp
    >>> from safetensors.torch import save_file
    >>> from monoquant.reader import open_checkpoint
    >>> from monoquant.plan import make_plan
    >>> g = torch.Generator().manual_seed(0)
    >>> sd = {f"l{i}.weight": (torch.randn(64, 256, generator=g) * (1 + 9 * (i == 0))).to(torch.bfloat16)
    ...       for i in range(3)}
    >>> d = Path(mkdtemp()); save_file(sd, str(d / "model.safetensors"))
    >>> ckpt = open_checkpoint(d)
    >>> ch = budget_chooser(ckpt, "int4", target_bpw=4.5)
    >>> plan = make_plan(ckpt, "int4", chooser=ch)
    >>> plan.totals()["bits_per_weight"] <= 4.5
    True
    >>> sorted({t.decision.scheme.name for t in plan.tensors})
    ['int4-g32', 'int4-g64']
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .dtypes import dtype_name
from .errors import SchemeError
from .kernels import Workspace, absmax, as_rows, get_kernel, scale_dtype_for
from .numerics import exact_sum
from .options import resolve_scheme
from .reader import Backend, Checkpoint, RowReader, TensorRef
from .rules import Decision, Rules, decide
from .schemes import MICROSCALE_KINDS, Scheme, get_scheme

#: Elements read per tensor to estimate its errors (whole rows; at least one row).
SAMPLE_ELEMENTS = 1 << 20
#: Runs of consecutive rows the sample is split into, spread evenly over the tensor.
SAMPLE_CHUNKS = 8

KEEP = "keep"


@dataclass(frozen=True)
class Option:
    """One candidate storage of one tensor.

    Attributes:
        label: a scheme name (``int4-g64``) or ``"keep"``.
        scheme: the scheme (``None`` when kept in the original dtype).
        bits: total bits of the tensor's outputs.
        nsr: estimated noise-to-signal ratio ``Σ(w-ŵ)²/Σw²`` (0 when kept).
    """

    label: str
    scheme: Scheme | None
    bits: int
    nsr: float

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.nsr <= 0 else -10.0 * math.log10(self.nsr)


class MixedChooser:
    """The chooser returned by :func:`budget_chooser`: ``chooser(ref, decision) -> decision``.

    Attributes:
        choices: tensor name -> chosen :class:`Option`.
        options: tensor name -> every candidate :class:`Option` considered.
        summary: JSON-ready description: the options (target), the resulting bits per weight of
            the eligible tensors, the estimated mean SQNR, counts per choice, feasibility.
    """

    def __init__(self, choices: dict[str, Option], options: dict[str, list[Option]], summary: dict[str, Any]):
        self.choices = choices
        self.options = options
        self.summary = summary
        self._target = summary["options"]

    def __call__(self, ref: TensorRef, decision: Decision) -> Decision:
        opt = self.choices.get(ref.name)
        if opt is None or decision.action != "quantize":
            return decision
        what = ", ".join(f"{k} {v}" for k, v in self._target.items() if k in ("target_bpw", "min_sqnr"))
        if opt.scheme is None:
            return Decision(
                "copy", f"mixed precision ({what}): kept in {dtype_name(ref.dtype)}", eligible=True
            )
        est = f"est. {opt.sqnr_db:.1f} dB"
        return Decision(
            "quantize", f"mixed precision ({what}): {opt.label}, {est}", opt.scheme, eligible=True
        )


def candidate_schemes(base: Scheme) -> list[Scheme]:
    """int4 g32/g64/g128 and int8 per channel, with the base's symmetry and ``optimize`` flag.

    Example:
        >>> [s.name for s in candidate_schemes(get_scheme("int4", asymmetric=True))]
        ['int4-g32-asym', 'int4-g64-asym', 'int4-g128-asym', 'int8-asym']
    """
    if base.kind in MICROSCALE_KINDS or base.strategy == "block":
        return format_candidates(base)
    asym = not base.symmetric
    opt = base.optimize
    out = [get_scheme("int4", group_size=g, asymmetric=asym, optimize=opt) for g in (32, 64, 128)]
    out.append(get_scheme("int8", per_channel=True, asymmetric=asym, optimize=opt))
    return out


def format_candidates(base: Scheme) -> list[Scheme]:
    """The candidates when the base is one of the formats of :mod:`monoquant.formats`: mxfp4,
    nvfp4, mxfp8 (W4A4/W8A8 when the base declares dynamic activations; ``--optimize`` for the
    4-bit ones) and fp8-block.

    Example:
        >>> [s.name for s in candidate_schemes(get_scheme("nvfp4a16"))]
        ['mxfp4a16', 'nvfp4a16', 'mxfp8a16', 'fp8-block']
    """
    dyn, opt = base.dynamic, base.optimize
    out = [get_scheme(n, dynamic=dyn, optimize=opt) for n in ("mxfp4a16", "nvfp4a16")]
    return [*out, get_scheme("mxfp8a16", dynamic=dyn), get_scheme("fp8-block")]


def sample_ranges(
    rows: int, cols: int, elements: int = SAMPLE_ELEMENTS, chunks: int = SAMPLE_CHUNKS
) -> list[tuple[int, int]]:
    """Row ranges of the sample: ``chunks`` runs of whole rows spread evenly (all rows if small).

    Example:
        >>> sample_ranges(1000, 1024, elements=64 * 1024, chunks=4)
        [(0, 16), (328, 344), (656, 672), (984, 1000)]
    """
    want = max(1, min(rows, elements // max(cols, 1)))
    if want >= rows:
        return [(0, rows)]
    chunks = max(1, min(chunks, want))
    per = want // chunks
    extra = want - per * chunks
    out = []
    for i in range(chunks):
        n = per + (1 if i < extra else 0)
        start = (rows - n) * i // max(chunks - 1, 1) if chunks > 1 else 0
        out.append((start, start + n))
    return out


def estimate_nsr(
    reader: RowReader, ref: TensorRef, schemes: Sequence[Scheme], ws: Workspace | None = None
) -> list[float]:
    """Noise-to-signal ratio of each scheme on ``ref``'s sampled rows (``nan``: not applicable).

    Example:
        >>> import torch
        >>> from pathlib import Path
        >>> from tempfile import mkdtemp
        >>> from safetensors.torch import save_file
        >>> from monoquant.reader import open_checkpoint
        >>> d = Path(mkdtemp()); save_file({"w": torch.randn(32, 128)}, str(d / "m.safetensors"))
        >>> ref = open_checkpoint(d).tensors[0]
        >>> with RowReader() as rd:
        ...     a, b = estimate_nsr(rd, ref, [get_scheme("int4"), get_scheme("int8")])
        >>> 0.005 < a < 0.03 and b < a / 100   # int4 g128 about 18 dB, int8 about 41 dB
        True
    """
    ws = ws or Workspace()
    rows, cols = as_rows(ref.shape)
    ranges = sample_ranges(rows, cols, SAMPLE_ELEMENTS, SAMPLE_CHUNKS)
    blocks = [reader.rows(ref, a, b).clone() for a, b in ranges]
    signal = sum(exact_sum(x.double().pow_(2)) for x in blocks)
    out: list[float] = []
    for sch in schemes:
        k = get_kernel(sch)
        if k.check_shape(tuple(ref.shape)) is not None:
            out.append(math.nan)
            continue
        tscale = None
        if k.needs_absmax:  # per-tensor scale: its absmax from the sample (an estimate)
            tscale = k.tensor_scale(max(absmax(x) for x in blocks), ref.dtype)
        noise = 0.0
        for x in blocks:
            parts = k.quantize_block(x, tensor_scale=tscale, ws=ws)
            if tscale is not None:
                parts = {**parts, **k.constants(tuple(x.shape), tscale)}
            # decoded in the stored dtype, as the loaders (and the run statistics, and verify) do
            dq = k.dequantize(parts, tuple(x.shape), scale_dtype_for(x.dtype)).double()
            noise += exact_sum((dq - x.double()).pow_(2))
        out.append(noise / signal if signal > 0 else 0.0)
    return out


def _bits(scheme: Scheme | None, ref: TensorRef) -> int:
    if scheme is None:
        return 8 * ref.nbytes
    return 8 * sum(s.nbytes for s in get_kernel(scheme).out_specs(tuple(ref.shape), ref.dtype))


def _hull(opts: list[Option]) -> list[Option]:
    """The lower convex hull of (bits, cost) from the cheapest storage up (dominated ones dropped)."""
    pts = sorted(opts, key=lambda o: (o.bits, o.nsr))
    front: list[Option] = []
    for o in pts:  # Pareto front: strictly less error for more bits
        if not front or o.nsr < front[-1].nsr:
            if front and o.bits == front[-1].bits:
                front[-1] = o
            else:
                front.append(o)
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> o
            if (b.nsr - a.nsr) * (o.bits - a.bits) >= (o.nsr - a.nsr) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def budget_chooser(
    ckpt: Checkpoint,
    base: Scheme | str,
    rules: Rules | None = None,
    *,
    target_bpw: float | None = None,
    min_sqnr: float | None = None,
    schemes: Sequence[Scheme] | None = None,
    allow_keep: bool = True,
    backend: Backend = "mmap",
) -> MixedChooser:
    """Estimate every eligible tensor's errors and choose its storage (see the module doc).

    Args:
        ckpt: the opened checkpoint (:func:`monoquant.reader.open_checkpoint`).
        base: the run's scheme (its symmetry and ``optimize`` flag carry over to the
            candidates); tensors its rules do not quantize are left alone.
        rules: the run's include/exclude rules.
        target_bpw: bits per weight of the eligible tensors (all output bytes) not to exceed.
        min_sqnr: per-tensor SQNR floor in dB (exactly one of ``target_bpw``/``min_sqnr``).
        schemes: candidate schemes (default :func:`candidate_schemes` of ``base``).
        allow_keep: whether keeping the original dtype is a candidate.
        backend: how sampled rows are read (``mmap`` or ``pread``).

    Returns:
        A :class:`MixedChooser` for ``make_plan(..., chooser=...)``.

    Raises:
        SchemeError: neither or both targets, or a target out of range.
    """
    if (target_bpw is None) == (min_sqnr is None):
        raise SchemeError("mixed precision needs exactly one of --target-bpw and --min-sqnr")
    if min_sqnr is not None and not math.isfinite(min_sqnr):
        raise SchemeError(f"--min-sqnr must be a finite number of dB, not {min_sqnr}")
    if target_bpw is not None and not (0 < target_bpw < 64):
        raise SchemeError(f"--target-bpw must be a number of bits per weight, not {target_bpw}")
    base_s = resolve_scheme(base)  # a Scheme (from the run's options) as it is; a name resolved
    rules = rules or Rules()
    cands = list(schemes) if schemes is not None else candidate_schemes(base_s)
    options: dict[str, list[Option]] = {}
    eligible: list[TensorRef] = []
    ws = Workspace()
    with RowReader(backend) as rd:
        for ref in ckpt.tensors:
            if decide(ref.name, ref.dtype, ref.shape, base_s, rules).action != "quantize":
                continue
            eligible.append(ref)
            nsr = estimate_nsr(rd, ref, cands, ws)
            opts = [
                Option(s.name, s, _bits(s, ref), e)
                for s, e in zip(cands, nsr, strict=True)
                if not math.isnan(e)
            ]
            if allow_keep or not opts:
                opts.append(Option(KEEP, None, _bits(None, ref), 0.0))
            options[ref.name] = opts
    numel = sum(r.numel for r in eligible)
    target: dict[str, Any] = {"target_bpw": target_bpw} if target_bpw is not None else {"min_sqnr": min_sqnr}
    target["candidates"] = [s.name for s in cands] + ([KEEP] if allow_keep else [])
    feasible = True
    items, item_opts = _fused_items(eligible, options, worst=min_sqnr is not None)
    if min_sqnr is not None:
        picked = {}
        for ref in items:
            ok = [o for o in item_opts[ref.name] if o.sqnr_db >= min_sqnr]
            pool = ok or [o for o in item_opts[ref.name] if o.scheme is None] or item_opts[ref.name]
            feasible &= bool(ok)
            picked[ref.name] = min(pool, key=lambda o: (o.bits, o.nsr))
    else:
        assert target_bpw is not None  # exactly one of the two, checked above
        budget = math.floor(target_bpw * numel)
        picked, feasible = _knapsack(items, item_opts, budget)
    choices = {}
    for ref in items:
        for name in getattr(ref, "members", (ref.name,)):
            choices[name] = next(o for o in options[name] if o.label == picked[ref.name].label)
    bits = sum(choices[r.name].bits for r in eligible)
    cost = sum(choices[r.name].nsr * r.numel for r in eligible)
    counts: dict[str, int] = {}
    for r in eligible:
        counts[choices[r.name].label] = counts.get(choices[r.name].label, 0) + 1
    summary = {
        "options": target,
        "tensors": len(eligible),
        "bits_per_weight": round(bits / numel, 4) if numel else None,
        "est_mean_nsr": cost / numel if numel else None,
        "est_sqnr_db": round(-10 * math.log10(cost / numel), 3) if numel and cost > 0 else None,
        "choices": dict(sorted(counts.items())),
        "feasible": feasible,
    }
    return MixedChooser(choices, options, summary)


@dataclass(frozen=True)
class _FusedItem:
    """The tensors an engine fuses into one layer (q/k/v, gate/up: :data:`monoquant.formats.FUSED_SETS`),
    chosen as one: vLLM refuses a fused layer whose parts have different schemes."""

    name: str
    numel: int
    members: tuple[str, ...]


def _fused_items(
    eligible: list[TensorRef], options: dict[str, list[Option]], *, worst: bool
) -> tuple[list[Any], dict[str, list[Option]]]:
    """``eligible`` with each fused set replaced by one item whose options are the labels every
    member has: bits summed, nsr the numel-weighted mean (``worst``: the largest, for --min-sqnr)."""
    from .fusedscales import shared_scale_groups

    groups = shared_scale_groups(r.name for r in eligible)
    by_name = {r.name: r for r in eligible}
    items: list[Any] = []
    item_opts = dict(options)
    seen: set[str] = set()
    for r in eligible:
        members = groups.get(r.name)
        if not members:
            items.append(r)
            continue
        if r.name in seen:
            continue
        seen.update(members)
        refs = [by_name[m] for m in members]
        numel = sum(x.numel for x in refs)
        labels = [
            o.label
            for o in options[members[0]]
            if all(any(p.label == o.label for p in options[m]) for m in members)
        ]
        opts = []
        for label in labels:
            parts = [next(p for p in options[x.name] if p.label == label) for x in refs]
            nsr = (
                max(p.nsr for p in parts)
                if worst
                else sum(p.nsr * x.numel for p, x in zip(parts, refs, strict=True)) / numel
            )
            opts.append(Option(label, parts[0].scheme, sum(p.bits for p in parts), nsr))
        if not opts:  # no storage all of them have: chosen one by one
            items.extend(refs)
            continue
        item = _FusedItem("\0".join(members), numel, members)
        item_opts[item.name] = opts
        items.append(item)
    return items, item_opts


def _knapsack(
    refs: list[TensorRef], options: dict[str, list[Option]], budget: int
) -> tuple[dict[str, Option], bool]:
    """Greedy multiple-choice knapsack on convex hulls: least Σ numel·nsr with Σ bits <= budget."""
    hulls = [_hull(options[r.name]) for r in refs]
    pos = [0] * len(refs)
    used = sum(h[0].bits for h in hulls)
    feasible = used <= budget

    def push(heap: list[tuple[float, int]], i: int) -> None:
        h, p = hulls[i], pos[i]
        if p + 1 < len(h):  # error removed per added bit by the next step up the hull
            rate = (h[p].nsr - h[p + 1].nsr) * refs[i].numel / (h[p + 1].bits - h[p].bits)
            heapq.heappush(heap, (-rate, i))  # ties: the earlier tensor first

    heap: list[tuple[float, int]] = []
    if feasible:
        for i in range(len(refs)):
            push(heap, i)
    while heap:
        _, i = heapq.heappop(heap)
        step = hulls[i][pos[i] + 1].bits - hulls[i][pos[i]].bits
        if used + step <= budget:  # else: later steps of this tensor need this one first
            used += step
            pos[i] += 1
            push(heap, i)
    return {r.name: hulls[i][pos[i]] for i, r in enumerate(refs)}, feasible


__all__ = [
    "KEEP",
    "MixedChooser",
    "Option",
    "budget_chooser",
    "candidate_schemes",
    "estimate_nsr",
    "sample_ranges",
]
