"""Per-tensor overhead: the same bytes as a few large tensors or as many small ones (JSON lines).

MoE checkpoints hold tens of thousands of small 2-D tensors (every expert's three projections in
every layer). This benchmark writes two bf16 checkpoints of the same size, with the same weight
statistics: ``large`` (a few ``[rows, cols]`` matrices) and ``many`` (``--tensors`` small
``[r, c]`` matrices named like MoE experts), quantizes each with ``monoquant.stream`` (fresh output
directory every repeat, one thread) and reports the wall time, the process CPU time (the figure
compared: it does not depend on what else runs on a shared machine), the throughput per CPU
second and the overhead per tensor ``(cpu_many - cpu_large) / (n_many - n_large)``.

Usage::

    python scripts/bench_many.py                          # 16384 tensors of [128, 256] vs 8 of [8192, 512]
    python scripts/bench_many.py --tensors 32768 --small 64x256 --scheme int8 --repeat 3

One JSON object per (layout, scheme, repeat), then one summary line per scheme.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import monoquant


def make(
    dst: Path, names_shapes: list[tuple[str, tuple[int, int]]], seed: int = 0, per_file: int = 1 << 28
) -> None:
    """Write bf16 N(0, 0.02) tensors into shards of about ``per_file`` bytes (bounded memory)."""
    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size = idx = 0
    for name, shape in names_shapes:
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        if size >= per_file:
            save_file(shard, str(dst / f"part-{idx:03d}.safetensors"))
            shard, size, idx = {}, 0, idx + 1
    if shard:
        save_file(shard, str(dst / f"part-{idx:03d}.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=16384, help="small tensors in the 'many' layout")
    ap.add_argument("--small", default="128x256", help="shape of each small tensor, RxC")
    ap.add_argument(
        "--large-rows", type=int, default=8192, help="rows of each large tensor (same columns as --small x 2)"
    )
    ap.add_argument("--scheme", action="append", default=None, help="repeatable (default: int8 and int4)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)
    r, c = (int(x) for x in args.small.lower().split("x"))
    total = args.tensors * r * c
    lc = c * 2
    n_large = max(1, total // (args.large_rows * lc))
    many = [
        (
            f"model.layers.{i // 384}.mlp.experts.{(i // 3) % 128}."
            f"{('gate_proj', 'up_proj', 'down_proj')[i % 3]}.weight",
            (r, c),
        )
        for i in range(args.tensors)
    ]
    large = [(f"model.layers.{i}.mlp.up_proj.weight", (args.large_rows, lc)) for i in range(n_large)]
    work = args.dir or Path(tempfile.mkdtemp(prefix="monoquant-many-"))
    try:
        make(work / "many", many)
        make(work / "large", large)
        results: dict[tuple[str, str], list[float]] = {}
        for scheme in args.scheme or ["int8", "int4"]:
            for rep in range(args.repeat):
                for layout, n in (("large", n_large), ("many", args.tensors)):
                    out = work / f"out-{layout}"
                    shutil.rmtree(out, ignore_errors=True)
                    t0, c0 = time.perf_counter(), time.process_time()
                    rp = monoquant.stream(work / layout, out, scheme, threads=1, overlap=False)
                    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                    results.setdefault((scheme, layout), []).append(cpu)
                    print(
                        json.dumps(
                            {
                                "layout": layout,
                                "scheme": scheme,
                                "repeat": rep,
                                "tensors": n,
                                "bytes_in": rp.bytes_in,
                                "seconds": round(dt, 3),
                                "cpu_s": round(cpu, 3),
                                "mb_per_cpu_s": round(rp.bytes_in / cpu / 1e6, 1),
                                "quantized": rp.plan["quantized"],
                            }
                        ),
                        flush=True,
                    )
            tl, tm = min(results[(scheme, "large")]), min(results[(scheme, "many")])
            print(
                json.dumps(
                    {
                        "summary": scheme,
                        "best_large_cpu_s": round(tl, 3),
                        "best_many_cpu_s": round(tm, 3),
                        "many_over_large": round(tm / tl, 3),
                        "overhead_ms_per_tensor": round(1000 * (tm - tl) / (args.tensors - n_large), 4),
                        "median_many_cpu_s": round(statistics.median(results[(scheme, "many")]), 3),
                    }
                ),
                flush=True,
            )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
