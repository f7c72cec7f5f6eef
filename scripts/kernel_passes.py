#!/usr/bin/env python3
"""Kernel throughput per scheme and statistics mode, in memory, one torch thread.

    python scripts/kernel_passes.py [--repeats 5] [--schemes int8,int4,fp8,fp16,int4-asym]

A 128 MiB bf16 [32768, 2048] tensor of N(0, 0.02) values is quantized in 4 MiB blocks (the
default block size), with statistics off, sampled (every 8th row: the default ``--stats sample``)
and exact; the best of ``--repeats`` runs is kept (the least disturbed by other load). Prints one
JSON line: ``{"<scheme>/<mode>": GB/s of bf16 input}``. Run it against two checkouts (``PYTHONPATH``)
in alternation to compare them on a shared machine (docs/benchmarks.md, "Kernel passes").
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from monoquant.kernels import ErrorStats, Workspace, get_kernel
from monoquant.schemes import get_scheme


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--schemes", default="int8,int4,fp8,fp16,int4-asym")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, cols = 32768, 2048
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    br = 4 * 1024 * 1024 // (cols * 2)
    res = {}
    for scheme in args.schemes.split(","):
        k = get_kernel(get_scheme(scheme))
        for mode, every in (("off", 0), ("sample", 8), ("exact", 1)):
            ws = Workspace()

            def run(k=k, every=every, ws=ws) -> None:
                st = ErrorStats() if every else None
                for a in range(0, rows, br):
                    k.quantize_block(x[a : a + br], ws=ws, stats=st, stats_rows=max(every, 1))

            run()  # warm-up: workspaces allocated, pages touched
            best = float("inf")
            for _ in range(max(args.repeats, 1)):
                t0 = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t0)
            res[f"{scheme}/{mode}"] = round(x.numel() * 2 / best / 1e9, 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
