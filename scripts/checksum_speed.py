#!/usr/bin/env python
"""Speed of the journal's checksum (``monoquant.sum64.Sum64``) against ``zlib.crc32`` (the one
before it), on the writer's buffer sizes. JSON lines out, one per (checksum, buffer, case), then
a summary with each case's ratio.

Two cases: ``cached`` sums the same buffer again and again (it stays in the CPU cache, as a
block's outputs do right after the kernel wrote them); ``streamed`` walks through a 512 MiB
array buffer by buffer, so every buffer comes from memory. Each checksum runs in turn, round
after round (``--rounds``), and the figure is the best round's GB/s (the least disturbed by other
jobs on a shared machine), with the median beside it.

    python scripts/checksum_speed.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import zlib
from collections.abc import Callable

import torch

from monoquant.sum64 import Sum64


def _crc(mv: memoryview) -> None:
    zlib.crc32(mv)


def _sum64(mv: memoryview) -> None:
    Sum64().update(mv)


CHECKSUMS: dict[str, Callable[[memoryview], None]] = {"crc32": _crc, "sum64": _sum64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="2097152,4194304", help="buffer bytes, comma-separated")
    ap.add_argument("--stream-mib", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a run: one thread per kernel or writer
    big = bytearray(os.urandom(1 << 20)) * args.stream_mib
    big_mv = memoryview(big)
    results: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(args.rounds):
        for size in (int(s) for s in args.sizes.split(",")):
            for case in ("cached", "streamed"):
                for name, fn in CHECKSUMS.items():
                    if case == "cached":
                        mv = big_mv[:size]
                        reps = max(1, (256 << 20) // size)
                        t = time.perf_counter()
                        for _ in range(reps):
                            fn(mv)
                        gbs = reps * size / (time.perf_counter() - t) / 1e9
                    else:
                        n = len(big) // size
                        t = time.perf_counter()
                        for i in range(n):
                            fn(big_mv[i * size : (i + 1) * size])
                        gbs = n * size / (time.perf_counter() - t) / 1e9
                    results.setdefault((name, size, case), []).append(gbs)
    summary: dict[str, object] = {"summary": True, "rounds": args.rounds}
    for (name, size, case), v in results.items():
        line = {
            "checksum": name,
            "buffer_bytes": size,
            "case": case,
            "gb_per_s_best": round(max(v), 2),
            "gb_per_s_median": round(statistics.median(v), 2),
        }
        print(json.dumps(line))
        if name == "sum64":
            crc = results[("crc32", size, case)]
            summary[f"sum64_vs_crc32/{size}/{case}"] = {
                "best": round(max(v) / max(crc), 2),
                "median": round(statistics.median(v) / statistics.median(crc), 2),
            }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
