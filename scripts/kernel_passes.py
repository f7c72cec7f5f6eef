#!/usr/bin/env python3
"""Kernel throughput per scheme and statistics mode, in memory, one torch thread.

    python scripts/kernel_passes.py [--repeats 5] [--schemes int8,int4,fp8,fp16,int4-asym] [--procs N]

A 128 MiB bf16 [32768, 2048] tensor of N(0, 0.02) values is quantized in 4 MiB blocks (the
default block size), with statistics off, sampled (every 8th row: the default ``--stats sample``)
and exact; the best of ``--repeats`` runs is kept (the least disturbed by other load). Prints one
JSON line: ``{"<scheme>/<mode>": GB/s of bf16 input}``. Run it against two checkouts (``PYTHONPATH``)
in alternation to compare them on a shared machine (docs/benchmarks.md, "Kernel passes").

``--procs N`` runs the same measurement in N processes at once (each with its own copy of the
tensor, every repeat started together behind a barrier) and prints their aggregate GB/s: how far
the kernel scales over the machine's cores when nothing else is shared (no GIL, no pipeline).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from typing import Any

import torch

from monoquant.kernels import ErrorStats, Workspace, get_kernel
from monoquant.schemes import get_scheme


def measure(schemes: list[str], repeats: int, barrier: Any = None) -> dict[str, list[float]]:
    """Seconds per repeat of every ``<scheme>/<mode>`` over the 128 MiB tensor."""
    torch.set_num_threads(1)
    rows, cols = 32768, 2048
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    br = 4 * 1024 * 1024 // (cols * 2)
    res: dict[str, list[float]] = {}
    for scheme in schemes:
        k = get_kernel(get_scheme(scheme))
        for mode, every in (("off", 0), ("sample", 8), ("exact", 1)):
            ws = Workspace()

            def run(k=k, every=every, ws=ws) -> None:
                st = ErrorStats() if every else None
                for a in range(0, rows, br):
                    k.quantize_block(x[a : a + br], ws=ws, stats=st, stats_rows=max(every, 1))

            run()  # warm-up: workspaces allocated, pages touched
            times = []
            for _ in range(max(repeats, 1)):
                if barrier is not None:
                    barrier.wait()
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            res[f"{scheme}/{mode}"] = times
    return res


def _child(schemes: list[str], repeats: int, barrier: Any, out: Any) -> None:
    out.put(measure(schemes, repeats, barrier))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--schemes", default="int8,int4,fp8,fp16,int4-asym")
    ap.add_argument("--procs", type=int, default=1, help="processes measuring at once (aggregate GB/s)")
    args = ap.parse_args()
    schemes = args.schemes.split(",")
    nbytes = 32768 * 2048 * 2
    if args.procs <= 1:
        res = {key: round(nbytes / min(t) / 1e9, 2) for key, t in measure(schemes, args.repeats).items()}
        print(json.dumps(res))
        return
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.procs), ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(schemes, args.repeats, barrier, out)) for _ in range(args.procs)
    ]
    for p in procs:
        p.start()
    got = [out.get() for _ in procs]
    for p in procs:
        p.join()
    # each repeat ran in all processes at once: its aggregate is all their bytes over the slowest
    agg = {
        key: round(
            max(args.procs * nbytes / max(g[key][i] for g in got) for i in range(args.repeats)) / 1e9, 2
        )
        for key in got[0]
    }
    print(json.dumps({"procs": args.procs, **agg}))


if __name__ == "__main__":
    main()
