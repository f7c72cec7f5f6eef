#!/usr/bin/env python3
"""A/B of the block kernels of two monoquant trees in one process, interleaved call by call.

    git archive <commit> monoquant | tar -x -C /tmp/old
    python scripts/kernel_ab.py --old /tmp/old [--schemes int8,int4] [--repeats 300]

Whole runs on a shared machine drift by tens of percent between rounds; two kernels timed in one
process, call after call on the same block, see the same machine. The old tree's ``monoquant``
package is copied to a temporary directory as ``monoquant_old`` (its imports are relative, so it
runs whole, with its own kernel registry) and both quantize the same bf16 blocks (``[1024,
2048]`` and ``[256, 8192]``, 4 MiB), one torch thread, with exact statistics and without. Prints
one JSON line per case: the best ns per element of each and the median of the per-pair ratios
new / old (below 1: the new kernel is faster), after checking that both give the same bytes and
the same statistics.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _load_old(tree: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="kernel_ab_"))
    shutil.copytree(tree / "monoquant", tmp / "monoquant_old")
    sys.path.insert(0, str(tmp))
    return tmp


def _kernel(pkg: str, scheme: str) -> tuple[Any, Any]:
    """The kernel of ``scheme`` in package ``pkg`` and that package's numerics module."""
    kernels = importlib.import_module(f"{pkg}.kernels")
    schemes = importlib.import_module(f"{pkg}.schemes")
    return kernels.get_kernel(schemes.get_scheme(scheme)), importlib.import_module(f"{pkg}.numerics")


def _run(pkg: str, scheme: str, x: torch.Tensor, exact: bool) -> tuple[dict[str, bytes], Any]:
    k, numerics = _kernel(pkg, scheme)
    st = numerics.ErrorStats() if exact else None
    out = k.quantize_block(x, ws=numerics.Workspace(), stats=st)
    got = {k: bytes(v.contiguous().view(torch.uint8).reshape(-1).tolist()) for k, v in out.items()}
    return got, None if st is None else (st.numel, st.sum_sq, st.err_sq, st.max_abs_err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="a directory holding the old tree's monoquant/")
    ap.add_argument("--schemes", default="int8,int4,int4-asym")
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = _load_old(Path(args.old))
    try:
        g = torch.Generator().manual_seed(0)
        for scheme in args.schemes.split(","):
            for shape in ((1024, 2048), (256, 8192)):
                x = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
                for exact in (True, False):
                    if _run("monoquant_old", scheme, x, exact) != _run("monoquant", scheme, x, exact):
                        raise SystemExit(f"{scheme} {shape}: the two trees give different outputs")
                    fns = [_timer(pkg, scheme, x, exact) for pkg in ("monoquant_old", "monoquant")]
                    times: list[list[float]] = [[], []]
                    for i in range(args.repeats):
                        order = (0, 1) if i % 2 else (1, 0)
                        for j in order:
                            t0 = time.perf_counter()
                            fns[j]()
                            times[j].append(time.perf_counter() - t0)
                    ratio = statistics.median(n / o for o, n in zip(times[0], times[1], strict=True))
                    print(
                        json.dumps(
                            {
                                "scheme": scheme,
                                "shape": list(shape),
                                "stats": "exact" if exact else "off",
                                "old_ns_per_elem": round(min(times[0]) / x.numel() * 1e9, 3),
                                "new_ns_per_elem": round(min(times[1]) / x.numel() * 1e9, 3),
                                "new_over_old_median": round(ratio, 3),
                            }
                        ),
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _timer(pkg: str, scheme: str, x: torch.Tensor, exact: bool) -> Any:
    k, numerics = _kernel(pkg, scheme)
    ws = numerics.Workspace()

    def call() -> None:
        k.quantize_block(x, ws=ws, stats=numerics.ErrorStats() if exact else None)

    call()  # the workspace's buffers are made here, not in the timed calls
    return call


if __name__ == "__main__":
    main()
