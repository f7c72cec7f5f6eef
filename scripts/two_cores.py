#!/usr/bin/env python3
"""What a second core gives a tiled kernel: one thread, two threads, two processes.

    python scripts/two_cores.py [--scheme int8] [--blocks 60] [--tiles 1048576,262144] [--rounds 5]

Quantizes the same bf16 block ([1024, 2048], 2 M elements, as the stream's 4 MiB blocks) with
``monoquant``'s kernel of ``--scheme`` (int8, int4, fp8, fp16: the tiled ones) and exact
statistics, ``--blocks`` times per worker, at each tile size (``numerics.INT_TILE_ELEMENTS`` for
the integer kernels, ``numerics.TILE_ELEMENTS`` for the others, as the kernel's unit reads it):
in one thread, in two threads of one process (as the stream's two kernel threads, which share
the GIL between torch calls), and in two forked processes (no shared GIL, the same cores, caches
and memory). Prints one JSON line per run: ``{"scheme", "tile", "mode", "ms_per_block"}`` (wall
time over all blocks done), then a summary line with each mode's figure per tile (the median
over the rounds: the machine's speed drifts, and every round runs all modes and tiles in turn)
and the speed-ups over one thread. No I/O: only the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch

import monoquant.formats.cast as cast_unit
import monoquant.formats.fp8 as fp8_unit
import monoquant.formats.integer as integer_unit
from monoquant.kernels import get_kernel
from monoquant.numerics import ErrorStats, Workspace
from monoquant.schemes import get_scheme

UNITS = {"int8": integer_unit, "int4": integer_unit, "fp8": fp8_unit, "fp16": cast_unit}
TILE_NAME = {s: "INT_TILE_ELEMENTS" if UNITS[s] is integer_unit else "TILE_ELEMENTS" for s in UNITS}


def _work(x: torch.Tensor, n: int, scheme: str) -> None:
    k = get_kernel(get_scheme(scheme))
    ws = Workspace()
    for _ in range(n):
        k.quantize_block(x, ws=ws, stats=ErrorStats())


def _timed(mode: str, x: torch.Tensor, n: int, scheme: str) -> float:
    """Milliseconds per block over every block done in ``mode`` (1, 2t or 2p)."""
    t0 = time.perf_counter()
    if mode == "1":
        _work(x, n, scheme)
    elif mode == "2t":
        threads = [threading.Thread(target=_work, args=(x, n, scheme)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        pids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    _work(x, n, scheme)
                finally:
                    os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
    done = n * (1 if mode == "1" else 2)
    return round((time.perf_counter() - t0) / done * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", choices=sorted(UNITS), default="int8")
    ap.add_argument("--blocks", type=int, default=60)
    ap.add_argument("--tiles", default="1048576,262144")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    x = (torch.randn(1024, 2048, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    seen: dict[str, dict[str, list[float]]] = {}
    for _ in range(a.rounds):
        for tile in (int(v) for v in a.tiles.split(",")):
            setattr(UNITS[a.scheme], TILE_NAME[a.scheme], tile)  # the kernel reads it at each call
            _work(x, 2, a.scheme)  # warm-up: buffers allocated, pages faulted
            for mode in ("1", "2t", "2p"):
                ms = _timed(mode, x, a.blocks, a.scheme)
                line = {"scheme": a.scheme, "tile": tile, "mode": mode, "ms_per_block": ms}
                print(json.dumps(line), flush=True)
                seen.setdefault(str(tile), {}).setdefault(mode, []).append(ms)
    med = {tile: {mode: statistics.median(v) for mode, v in m.items()} for tile, m in seen.items()}
    summary = {
        tile: {**m, "speedup_2t": round(m["1"] / m["2t"], 2), "speedup_2p": round(m["1"] / m["2p"], 2)}
        for tile, m in med.items()
    }
    out = {"summary": True, "scheme": a.scheme, "rounds": a.rounds, "median_ms_per_block": summary}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
