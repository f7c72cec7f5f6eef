#!/usr/bin/env python3
"""Time single torch operations on one kernel tile (1 M elements, [512, 2048]), one thread.

    python scripts/tile_ops.py [--repeats 300]

Prints one JSON line ``{"<op>": microseconds}`` (mean over ``--repeats`` calls, after one warm-up)
for the operations docs/benchmarks.md compares: the casts of the fp16 path (bfloat16 -> float32
-> float16 against a direct bfloat16 -> float16 copy), the int4 packing (the float add over
strided pairs it replaced, against ``monoquant.packing.encode_codes`` as it is now), the int8
kernel on one tile with and without its exact statistics, what each extra tile costs in torch
calls alone (a small block cut into one-row tiles), three ways to get the bf16 decode
``bf16(q * scale)`` those statistics need (checked equal), a tile's group range in two
reductions or one ``aminmax`` over the dimension, and the checks of a tile's stored scales.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

import monoquant.formats.integer as integer_unit
from monoquant.kernels import get_kernel
from monoquant.numerics import INT_TILE_ELEMENTS, ErrorStats, Workspace
from monoquant.packing import code_buffer, encode_codes
from monoquant.schemes import get_scheme


def _us(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t0) / n * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=300)
    n = ap.parse_args().repeats
    torch.set_num_threads(1)
    r, c = 512, 2048
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(r, c, generator=g) * 0.02).to(torch.bfloat16)
    f = torch.empty(r, c)
    h = torch.empty(r, c, dtype=torch.float16)
    y = torch.randint(-8, 8, (r, c), generator=g).float()  # int4 codes, as the kernel leaves them
    half = torch.empty(r, c // 2)
    u8 = torch.empty(r, c // 2, dtype=torch.uint8)
    ws = Workspace()
    codes = code_buffer(r, c, 4, True, ws)

    def strided_float_pack() -> None:  # the int4 packing before code 882bef0
        pair = y.view(r, c // 2, 2)
        torch.add(pair[..., 0], pair[..., 1], alpha=16, out=half)
        half.add_(8 + 16 * 8)
        u8.copy_(half)

    strided_float_pack()
    encode_codes(y, 4, True, ws, out=codes)
    assert torch.equal(codes.view(r, -1), u8), "the two packings disagree"
    res = {
        "copy bf16->f32": _us(lambda: f.copy_(x), n),
        "copy f32->f16": _us(lambda: h.copy_(f), n),
        "copy bf16->f16 direct": _us(lambda: h.copy_(x), n),
        "int4 pack, float add over strided pairs": _us(strided_float_pack, n),
        "int4 pack, encode_codes": _us(lambda: encode_codes(y, 4, True, ws, out=codes), n),
    }
    # int8 (per channel) on one tile, as the stream runs it: exact statistics on or off
    k8 = get_kernel(get_scheme("int8"))
    ws8 = Workspace()
    res["int8 tile, no statistics"] = _us(lambda: k8.quantize_block(x, ws=ws8), n)
    res["int8 tile, exact statistics"] = _us(lambda: k8.quantize_block(x, ws=ws8, stats=ErrorStats()), n)
    # the Python side of a tile (torch calls, each holding the GIL): a [64, 256] block in 64
    # one-row tiles against one tile, per extra tile
    small = x[:64, :256].contiguous()
    for label, st in (("no statistics", False), ("exact statistics", True)):
        one, many = [], []

        def run(st: bool = st) -> object:
            return k8.quantize_block(small, ws=ws8, stats=ErrorStats() if st else None)

        for tile, got in ((1 << 30, one), (256, many)):
            integer_unit.INT_TILE_ELEMENTS = tile
            got.append(_us(run, n))
        integer_unit.INT_TILE_ELEMENTS = INT_TILE_ELEMENTS
        res[f"int8 per extra tile, {label} (calls only)"] = round((many[0] - one[0]) / 63, 1)
    # the decode the statistics measure, three ways
    xf = x.float()
    sb = (xf.abs().amax(1, keepdim=True) / 127.5).to(torch.bfloat16)
    q = (xf / sb.float()).round().clamp(-128, 127)
    q8, qb = q.to(torch.int8), torch.empty(r, c, dtype=torch.bfloat16)
    e, dec = torch.empty(r, c), torch.empty(r, c, dtype=torch.bfloat16)
    ref = (q * sb.float()).to(torch.bfloat16)
    torch.mul(q8, sb, out=dec)
    assert torch.equal(dec, ref), "int8 x bf16 decode differs"
    qb.copy_(q)
    torch.mul(qb, sb, out=dec)
    assert torch.equal(dec, ref), "bf16 x bf16 decode differs"
    res["bf16 decode: float32 multiply, then round to bf16 (as now)"] = _us(
        lambda: (torch.mul(q, sb.float(), out=e), dec.copy_(e)), n
    )
    res["bf16 decode: int8 codes x bf16 scale"] = _us(lambda: torch.mul(q8, sb, out=dec), n)
    res["bf16 decode: codes to bf16 (the cast alone)"] = _us(lambda: qb.copy_(q), n)
    res["bf16 decode: bf16 codes x bf16 scale"] = _us(lambda: torch.mul(qb, sb, out=dec), n)
    # a tile's range over its groups: two reductions against one aminmax over the dimension
    v = xf.view(r, 16, c // 16)
    res["group range: amax + amin (as now)"] = _us(lambda: (v.amax(-1), v.amin(-1)), n)
    res["group range: aminmax over the dimension"] = _us(lambda: torch.aminmax(v, dim=-1), n)
    # the checks of a tile's stored scales ([512] bf16): zero and cap, as before and as now
    sc = sb.view(-1)
    cap = torch.tensor(3.0, dtype=torch.bfloat16)
    res["scale checks: == 0, any, max (as before)"] = _us(
        lambda: (bool((sc == 0).any()), float(sc.max()) > float(cap)), n
    )
    res["scale checks: one aminmax and one conversion (as now)"] = _us(
        lambda: torch.stack(torch.aminmax(sc)).tolist(), n
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
