#!/usr/bin/env python3
"""What the kernels and the garbage collector cost inside a run, against the kernel alone.

    python scripts/in_run_costs.py CKPT [--scheme int8] [--freeze] [--alone-blocks 200]

Runs ``monoquant.stream`` in this process (kernel threads, no kernel process: the Python API
default) with every ``quantize_block`` call timed on its own thread (``time.thread_time``, so
waits for the GIL are not counted) and every garbage collection timed (``gc.callbacks``); with
``--freeze`` the collector's view is frozen after the imports, as the ``monoquant`` command does.
Then times the same kernel alone on a ``[1024, 2048]`` bf16 block (one torch thread, best of
``--alone-blocks`` calls). Prints one JSON line: the run's wall seconds, the kernels' CPU
nanoseconds per element in the run and alone, and the collections per generation with their
seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import monoquant
from monoquant.kernels import get_kernel
from monoquant.numerics import ErrorStats, Workspace
from monoquant.schemes import get_scheme


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--freeze", action="store_true", help="gc.freeze() before the run, as the command does")
    ap.add_argument("--alone-blocks", type=int, default=200)
    args = ap.parse_args()
    kernel = get_kernel(get_scheme(args.scheme))
    cls = type(kernel)
    real = cls.quantize_block
    lock = threading.Lock()
    acc = {"cpu": 0.0, "elements": 0}

    def timed(self: Any, x: torch.Tensor, **kw: Any) -> Any:
        t0 = time.thread_time()
        out = real(self, x, **kw)
        with lock:
            acc["cpu"] += time.thread_time() - t0
            acc["elements"] += x.numel()
        return out

    gcs: Counter[str] = Counter()
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            gcs[f"gen{info['generation']}"] += 1
            gcs[f"gen{info['generation']}_s"] += time.perf_counter() - started[0]  # type: ignore[assignment]

    cls.quantize_block = timed  # type: ignore[method-assign]
    dst = Path(tempfile.mkdtemp(prefix="in_run_costs_")) / "out"
    try:
        if args.freeze:
            gc.freeze()
        gc.callbacks.append(on_gc)
        t0 = time.perf_counter()
        monoquant.stream(args.ckpt, str(dst), scheme=args.scheme)
        wall = time.perf_counter() - t0
        gc.callbacks.remove(on_gc)
    finally:
        cls.quantize_block = real  # type: ignore[method-assign]
        shutil.rmtree(dst.parent, ignore_errors=True)
    torch.set_num_threads(1)
    x = (torch.randn(1024, 2048, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    ws = Workspace()
    best = float("inf")
    for _ in range(args.alone_blocks):
        t = time.thread_time()
        kernel.quantize_block(x, ws=ws, stats=ErrorStats())
        best = min(best, time.thread_time() - t)
    print(
        json.dumps(
            {
                "scheme": args.scheme,
                "freeze": args.freeze,
                "wall_s": round(wall, 3),
                "kernel_cpu_s": round(acc["cpu"], 3),
                "elements": acc["elements"],
                "in_run_ns_per_element": round(acc["cpu"] / max(acc["elements"], 1) * 1e9, 3),
                "alone_ns_per_element": round(best / x.numel() * 1e9, 3),
                "collections": {k: round(v, 4) for k, v in sorted(gcs.items())},
            }
        )
    )


if __name__ == "__main__":
    main()
