#!/usr/bin/env python3
"""Time single torch operations on one kernel tile (1 M elements, [512, 2048]), one thread.

    python scripts/tile_ops.py [--repeats 300]

Prints one JSON line ``{"<op>": microseconds}`` (mean over ``--repeats`` calls, after one warm-up)
for the operations docs/benchmarks.md compares: the casts of the fp16 path (bfloat16 -> float32
-> float16 against a direct bfloat16 -> float16 copy) and the int4 packing (the float add over
strided pairs it replaced, against ``monoquant.packing.encode_codes`` as it is now).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from monoquant.numerics import Workspace
from monoquant.packing import code_buffer, encode_codes


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
    print(json.dumps(res))


if __name__ == "__main__":
    main()
