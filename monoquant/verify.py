"""Check an output directory, and measure its error against the input — streaming, bounded memory.

Structural checks (always): the index parses and agrees with every shard header (reader's
cross-checks), ``total_size`` matches, every quantized tensor has all its parts with consistent
shapes, and ``config.json``'s ``quantization_config`` (when present) targets exactly the
quantized modules with the right format (name and regex targets first, then class targets such as
``Linear``, which claim every Linear-like module not in ``ignore``).

With ``against``: every input tensor is found in the output; quantized/cast tensors are
dequantized block by block and compared with the input (SQNR, relative error, max abs error);
copied tensors must be byte-identical.

Example:
    >>> r = verify("out/", against="ckpt/", min_sqnr=20)      # doctest: +SKIP
    >>> r.ok, r.worst(3)                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, MonoquantError, VerifyError
from .exactstats import ExactStats
from .kernels import ErrorStats, Kernel, as_rows, get_kernel
from .outnames import INDEX_NAME
from .outreader import QuantizedEntry, open_output
from .plan import module_of
from .reader import Checkpoint, RowReader, TensorRef, open_checkpoint

BLOCK_BYTES = 2 * 1024 * 1024  # small blocks: dequantizing makes several float copies of a block


@dataclass
class VerifyReport:
    """Result of :func:`verify`."""

    path: str
    problems: list[str] = field(default_factory=list)
    stats: dict[str, ErrorStats] = field(default_factory=dict)
    below: list[str] = field(default_factory=list)
    #: tensors whose output is broken whatever the threshold: NaN/Inf or all zeros once decoded
    failed: dict[str, str] = field(default_factory=dict)
    min_sqnr: float | None = None
    tensors: int = 0
    quantized: int = 0
    compared: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.below and not self.failed

    def worst(self, n: int = 10) -> list[tuple[str, ErrorStats]]:
        """The ``n`` tensors with the lowest SQNR (exact ones left out; failed ones first)."""
        return sorted(((k, v) for k, v in self.stats.items() if not _exact(v)), key=lambda kv: kv[1].sqnr_db)[
            :n
        ]

    def to_json(self) -> dict[str, Any]:
        vals = [s.sqnr_db for s in self.stats.values() if not _exact(s) and math.isfinite(s.sqnr_db)]
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": self.problems,
            "tensors": self.tensors,
            "quantized": self.quantized,
            "compared": self.compared,
            "min_sqnr": self.min_sqnr,
            "below_threshold": self.below,
            "failed": self.failed,
            "mean_sqnr_db": round(sum(vals) / len(vals), 3) if vals else None,
            "worst": [{"name": n, **s.to_dict()} for n, s in self.worst(len(self.stats))],
        }


def _exact(st: ErrorStats) -> bool:
    return st.exact if isinstance(st, ExactStats) else not st.err_sq > 0


def _check_entry(e: QuantizedEntry) -> list[str]:
    """Shape consistency of one quantized tensor's parts."""
    probs = []
    specs = {sp.suffix: sp for sp in get_kernel(e.scheme).out_specs(e.shape, e.parts["_scale"].dtype)}
    for suffix, sp in specs.items():
        ref = e.parts.get(suffix)
        if ref is None:
            probs.append(f"{e.base}{suffix}: missing")
        elif ref.shape != sp.shape or ref.dtype != sp.dtype:
            probs.append(
                f"{e.base}{suffix}: {ref.dtype} {list(ref.shape)}, expected {sp.dtype} {list(sp.shape)}"
            )
    for s in sorted(set(e.parts) - set(specs)):
        probs.append(f"{e.base}{s}: unexpected for scheme {e.scheme.name}")
    return probs


def _check_config(
    root: Path, entries: dict[str, QuantizedEntry], plain: dict[str, TensorRef] | None = None
) -> list[str]:
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        return []
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as e:
        return [f"config.json: not valid JSON ({e})"]
    qc = cfg.get("quantization_config")
    if qc is None:
        return [] if not entries else ["config.json: quantized tensors but no quantization_config"]
    probs = []
    if qc.get("quant_method") != "compressed-tensors":
        probs.append("config.json: quant_method is not compressed-tensors")
    if qc.get("quantization_status") != "compressed":
        probs.append("config.json: quantization_status is not 'compressed' (loaders would give garbage)")
    if not qc.get("format"):
        probs.append("config.json: no top-level format")
    targets: dict[str, dict[str, Any]] = {}
    for gname, g in (qc.get("config_groups") or {}).items():
        if not g.get("format"):
            probs.append(f"config.json: group {gname} has no format")
        for t in g.get("targets") or []:
            targets[t] = g
    modules = {module_of(b): e for b, e in entries.items()}
    # Linear-like modules left dense: a class target (``Linear``) claims them unless ignored
    # (embeddings hold 2-D weights too but are not Linear; compressed-tensors' own writer does
    # not ignore them)
    plain = plain or {}
    dense = sorted(
        module_of(n)
        for n, r in plain.items()
        if n.endswith(".weight")
        and len(r.shape) == 2
        and r.dtype.is_floating_point
        and "embed" not in n.lower()
    )
    paths = set(modules) | {module_of(n) for n in plain}
    ignore: dict[str, dict[str, Any]] = {t: {} for t in qc.get("ignore") or []}
    # name and regex targets win over class targets, as in compressed-tensors and vLLM
    named = {t: g for t, g in targets.items() if t.startswith("re:") or t in paths}
    classes = {t: g for t, g in targets.items() if t not in named}
    for mod, entry in modules.items():
        g = _match(named, mod) or next(iter(classes.values()), None)
        if g is None:
            probs.append(f"config.json: quantized module {mod!r} is not targeted by any config group")
            continue
        w = g.get("weights") or {}
        if g.get("format") != entry.scheme.format or w.get("num_bits") != entry.scheme.bits:
            probs.append(
                f"config.json: module {mod!r} is {entry.scheme.name} but its group says "
                f"{g.get('format')}/{w.get('num_bits')} bits"
            )
    for t, g in named.items():
        if not any(_match({t: g}, mod) is not None for mod in modules):
            probs.append(f"config.json: target {t!r} names a module that is not quantized")
    for t in ignore:
        hit = [m for m in modules if _match({t: {}}, m) is not None]
        if hit:
            probs.append(f"config.json: ignore entry {t!r} matches the quantized module {hit[0]!r}")
    for mod in dense:
        if (classes or _match(named, mod) is not None) and _match(ignore, mod) is None:
            probs.append(
                f"config.json: dense module {mod!r} is targeted and not in ignore (loaders would expect "
                "quantized tensors)"
            )
    return probs


def _match(targets: dict[str, dict[str, Any]], module: str) -> dict[str, Any] | None:
    for t, g in targets.items():
        if t.startswith("re:"):
            if re.match(t[3:], module):
                return g
        elif t == module:
            return g
    return None


def _row_slice(ref: TensorRef, reader: RowReader, a: int, b: int, div: int | None) -> torch.Tensor:
    if div is None:
        return reader.rows(ref, 0, as_rows(ref.shape)[0]).reshape(ref.shape)
    return reader.rows(ref, a // div, -(-b // div))


def _compare_quantized(
    e: QuantizedEntry, src: TensorRef, out_reader: RowReader, in_reader: RowReader, ws_rows: int
) -> ErrorStats:
    k: Kernel = get_kernel(e.scheme)
    rows, cols = as_rows(e.shape)
    st = ExactStats()
    specs = {sp.suffix: sp for sp in k.out_specs(e.shape, e.parts["_scale"].dtype)}
    mult = k.block_rows_multiple
    br = max(ws_rows // mult, 1) * mult
    for a in range(0, rows, br):
        b = min(a + br, rows)
        parts = {
            s: _row_slice(e.parts[s], out_reader, a, b, specs[s].row_div).clone()
            for s in specs
            if s != "_shape"
        }
        block_shape = (b - a, cols)
        # decoded in the stored dtype (the scale's), as the loaders do: an fp16 weight whose
        # code * scale overflows fp16 is inf there, and must be inf here
        dq = k.dequantize(parts, block_shape)
        st.add(in_reader.rows(src, a, b), dq)
    return st


def _check_scales(e: QuantizedEntry, reader: RowReader, block_bytes: int) -> list[str]:
    """Every stored scale, NVFP4's global scale included, is finite and positive (a NaN scale
    decodes every value to NaN; a negative global scale flips every sign)."""
    return [
        p
        for sfx in ("_scale", "_global_scale")
        for p in _check_scale_part(e.parts.get(sfx), reader, block_bytes)
    ]


def _check_scale_part(ref: TensorRef | None, reader: RowReader, block_bytes: int) -> list[str]:
    e8m0 = ref is not None and ref.dtype == torch.uint8  # MX power-of-two scales: 255 encodes NaN
    if ref is None or not (ref.dtype.is_floating_point or e8m0):
        return []
    rows, cols = as_rows(ref.shape)
    br = max(block_bytes // max(cols * ref.dtype.itemsize, 1), 1)
    bad = 0
    for a in range(0, rows, br):
        sc = reader.rows(ref, a, min(a + br, rows))
        if e8m0:
            bad += int((sc == 255).sum())
            continue
        sc = sc.float()  # float8 scales (NVFP4): isfinite is not defined on float8 dtypes
        bad += int((~(torch.isfinite(sc) & (sc > 0))).sum())
    return [f"{ref.name}: {bad} scale(s) are NaN, Inf, zero or negative"] if bad else []


def verify(
    path: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    min_sqnr: float | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> VerifyReport:
    """Check an output directory; with ``against``, measure per-tensor error versus the input.

    Raises:
        VerifyError: the output cannot be opened at all (no index, corrupt headers).
    """
    if min_sqnr is not None and not math.isfinite(min_sqnr):
        from .errors import OptionError

        raise OptionError(f"min_sqnr={min_sqnr}: must be a finite number of dB")
    root = Path(path)
    report = VerifyReport(str(root), min_sqnr=min_sqnr)
    if root.is_dir() and not (root / INDEX_NAME).exists():
        raise VerifyError(
            f"{root}: no {INDEX_NAME}; the job is unfinished (rerun it) or this is not a monoquant output"
        )
    try:
        out = open_output(root)
    except CheckpointError as e:
        raise VerifyError(str(e)) from None
    total = out.metadata.get("total_size") if isinstance(out.metadata, dict) else None
    if total is not None and total != out.ckpt.nbytes:
        report.problems.append(f"index total_size {total} != {out.ckpt.nbytes} bytes of tensor data")
    with RowReader("pread") as oreader:  # pread: nothing stays mapped (bounded memory)
        entries = out.entries(oreader)
        for entry in entries.values():
            report.problems.extend(_check_entry(entry))
            report.problems.extend(_check_scales(entry, oreader, block_bytes))
        plain = out.plain()
        if root.is_dir():
            report.problems.extend(_check_config(root, entries, plain))
        report.tensors = len(entries) + len(plain)
        report.quantized = len(entries)
        if against is not None:
            _compare(report, open_checkpoint(against), entries, plain, oreader, block_bytes)
    report.failed = {
        n: why for n, s in report.stats.items() if isinstance(s, ExactStats) and (why := s.failure())
    }
    if min_sqnr is not None:
        report.below = [n for n, s in report.stats.items() if not _exact(s) and not s.sqnr_db >= min_sqnr]
    return report


def _compare(
    report: VerifyReport,
    src: Checkpoint,
    entries: dict[str, QuantizedEntry],
    plain: dict[str, TensorRef],
    oreader: RowReader,
    block_bytes: int,
) -> None:
    names = {r.name for r in src.tensors}
    for extra in sorted(n for n in [*entries, *plain] if n not in names):  # nothing may be added silently
        report.problems.append(f"{extra}: in the output but not in the input")
    with RowReader("pread") as ireader:
        for ref in src.tensors:
            rows, cols = as_rows(ref.shape)
            br = max(block_bytes // max(cols * ref.dtype.itemsize, 1), 1)
            try:
                if ref.name in entries:
                    e = entries[ref.name]
                    if tuple(e.shape) != tuple(ref.shape):
                        report.problems.append(
                            f"{ref.name}: output shape {list(e.shape)} != input {list(ref.shape)}"
                        )
                        continue
                    report.stats[ref.name] = _compare_quantized(e, ref, oreader, ireader, br)
                elif ref.name in plain:
                    o = plain[ref.name]
                    if o.shape != ref.shape:
                        report.problems.append(
                            f"{ref.name}: output shape {list(o.shape)} != input {list(ref.shape)}"
                        )
                        continue
                    if o.dtype == ref.dtype:
                        if not _same_bytes(ref, o, ireader, oreader, block_bytes):
                            report.problems.append(f"{ref.name}: copied tensor differs from the input")
                    else:  # a cast
                        st = ExactStats()
                        for a in range(0, rows, br):
                            b = min(a + br, rows)
                            st.add(ireader.rows(ref, a, b), oreader.rows(o, a, b))
                        report.stats[ref.name] = st
                else:
                    report.problems.append(f"{ref.name}: input tensor missing from the output")
                    continue
            except MonoquantError as err:
                report.problems.append(f"{ref.name}: {err}")
                continue
            report.compared += 1


def _same_bytes(a: TensorRef, b: TensorRef, ra: RowReader, rb: RowReader, step: int) -> bool:
    if a.nbytes != b.nbytes:
        return False
    for off in range(0, a.nbytes, step):
        n = min(step, a.nbytes - off)
        if not torch.equal(ra.raw(a, off, n), rb.raw(b, off, n)):
            return False
    return True
