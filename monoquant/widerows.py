"""Rows wider than a block: processed in column chunks, so memory stays bounded by the block size
and not by the widest row (one 256 MiB row used to take 1.2 GiB).

The kernels work on blocks of whole rows. A row far wider than ``block_bytes`` is cut into
column chunks of about ``block_bytes`` of input, on boundaries that keep every output exact:

* casts: any boundary;
* per-tensor scales: any boundary where packed codes fill whole int32 words;
* groups: group boundaries (and whole words);
* per-channel (symmetric, not ``--optimize``): a first pass over the row's chunks finds its
  absmax, then each chunk is quantized with the row's scale, computed exactly as the kernel
  computes it (:meth:`~monoquant.kernels.Kernel.tensor_scale` on the same float32 absmax).

The bytes are those of the whole-row path (pinned by ``tests/test_wide_rows.py``). Asymmetric
schemes (zero points packed along rows) and ``--optimize`` per channel (a search over the whole
row) keep the whole-row path.

Example:
    >>> from monoquant.schemes import get_scheme
    >>> chunkable(get_scheme("int8")), chunkable(get_scheme("int4", asymmetric=True))
    (True, False)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from .dtypes import itemsize
from .kernels import ErrorStats, Workspace, absmax, as_rows, get_kernel
from .packing import codes_per_word
from .schemes import Scheme


def chunkable(s: Scheme) -> bool:
    """Whether rows of scheme ``s`` may be cut into column chunks (see the module doc)."""
    if s.kind == "cast":
        return True
    if s.kind not in ("int", "float") or s.strategy == "block":
        return False  # NVFP4/MX groups and FP8 128x128 blocks: whole rows (of 128-row blocks)
    if not s.symmetric:
        return False
    return not (s.optimize and s.strategy == "channel")


def chunk_unit(s: Scheme) -> int:
    """Columns a chunk boundary must be a multiple of."""
    unit = 1
    if s.kind != "cast" and s.format == "pack-quantized":
        unit = codes_per_word(s.bits)
    if s.strategy == "group":
        unit = math.lcm(unit, int(s.group_size or 1))
    return unit


def process_wide_rows(
    pt: Any,
    reader: Any,
    pool: Any,
    sink: Any,
    *,
    block_bytes: int,
    clamp_fp16: bool,
    stats: ErrorStats | None,
    stats_every: int,
    done: Callable[[Workspace, int, int], Callable[[], None]],
    scratch: Workspace | None = None,
) -> None:
    """Quantize ``pt`` row by row, each row in column chunks of about ``block_bytes`` (kernel
    scratch from ``scratch``, as :func:`monoquant.convert.process_tensor`)."""
    ref, s = pt.ref, pt.decision.scheme
    kernel = get_kernel(s)
    rows, cols = as_rows(ref.shape)
    isz = itemsize(ref.dtype)
    row_bytes = cols * isz
    unit = chunk_unit(s)
    width = max(block_bytes // isz // unit, 1) * unit
    outs = {o.spec.suffix: o for o in pt.outputs}

    def chunk(a: int, c0: int, c1: int, ws: Workspace | None = None) -> Any:
        return (
            reader.raw(ref, a * row_bytes + c0 * isz, (c1 - c0) * isz, ws=ws).view(ref.dtype).view(1, c1 - c0)
        )

    def row_absmax(a: int) -> float:
        m = 0.0
        for c0 in range(0, cols, width):
            m = max(m, absmax(chunk(a, c0, min(c0 + width, cols))))
        return m

    tscale = None
    if s.kind != "cast" and s.strategy == "tensor":
        tscale = kernel.tensor_scale(max((row_absmax(a) for a in range(rows)), default=0.0), ref.dtype)
    # per channel: each chunk is quantized as "per tensor" with its row's scale (same division)
    ck = kernel
    if s.kind != "cast" and s.strategy == "channel":
        ck = get_kernel(dataclasses.replace(s, strategy="tensor", group_size=None))
    for a in range(rows):
        rscale = tscale
        if s.kind != "cast" and s.strategy == "channel":
            rscale = kernel.tensor_scale(row_absmax(a), ref.dtype)
            sink.submit([(outs["_scale"], a * outs["_scale"].spec.row_bytes, rscale)], None)
        measure = stats if (stats is not None and stats_every and a % stats_every == 0) else None
        for c0 in range(0, cols, width):
            c1 = min(c0 + width, cols)
            ws = pool.acquire()
            try:
                x = chunk(a, c0, c1, ws)
                res = ck.quantize_block(
                    x, tensor_scale=rscale, ws=ws.with_scratch(scratch), stats=measure, clamp_fp16=clamp_fp16
                )
            except BaseException:
                pool.release(ws)
                raise
            del x
            items = [
                (outs[k], a * outs[k].spec.row_bytes + c0 * t.numel() * t.element_size() // (c1 - c0), t)
                for k, t in res.items()
            ]
            sink.submit(items, done(ws, a * row_bytes + c0 * isz, a * row_bytes + c1 * isz))
    consts = kernel.constants(ref.shape, tscale)
    sink.submit([(outs[k], 0, t) for k, t in consts.items()], None)
