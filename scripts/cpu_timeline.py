#!/usr/bin/env python3
"""How busy the machine's cores are through one ``monoquant stream`` run: where a run is on one
core (the import of torch) and where on all of them.

    python scripts/cpu_timeline.py CKPT [--scheme int8] [--interval 0.2] [--runs 3]

Samples ``/proc/stat`` every ``--interval`` seconds while the command runs (the whole machine:
on a shared machine other jobs count too, so compare runs, not single samples) and prints one
JSON line per run: the busy share of all cores per interval, and a summary: the wall time, the
run's own figure of its time (``seconds`` of ``--json``: from the plan to the last rename), the
start-up (the wall time before it: the interpreter, ``import torch``, the command's set-up) and
the mean busy share of the cores in the start-up and in the run. A last line gives the medians
over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle and iowait
    return sum(v) - idle, sum(v)


def run_once(src: str, scheme: str, interval: float) -> dict[str, object]:
    dst = Path(tempfile.mkdtemp(prefix="cpu_timeline_")) / "out"
    cmd = [sys.executable, "-m", "monoquant", "stream", src, str(dst), f"--{scheme}", "--json"]
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        prev, samples = _busy(), []
        while p.poll() is None:
            time.sleep(interval)
            cur = _busy()
            total = cur[1] - prev[1]
            samples.append((round(time.perf_counter() - t0, 2), (cur[0] - prev[0]) / total if total else 0.0))
            prev = cur
        wall = time.perf_counter() - t0
        out = p.stdout.read() if p.stdout else b""
        if p.returncode != 0:
            raise SystemExit(f"cpu_timeline.py: {' '.join(cmd)} failed with {p.returncode}")
        own = json.loads(out).get("seconds")
    finally:
        shutil.rmtree(dst.parent, ignore_errors=True)
    # the start-up: the process's time before the run's own clock starts (the interpreter, the
    # imports, the command's set-up); the run: the intervals after it (the last one is cut short
    # by the exit, and left out)
    startup = wall - float(own)
    head = [b for t, b in samples if t <= startup]
    tail = [b for t, b in samples[:-1] if t - interval >= startup]
    return {
        "scheme": scheme,
        "wall_s": round(wall, 3),
        "run_seconds": own,
        "startup_s": round(startup, 3),
        "busy_startup": round(statistics.mean(head), 3) if head else None,
        "busy_run": round(statistics.mean(tail), 3) if tail else None,
        "cores": os.cpu_count(),
        "timeline": [[t, round(b, 2)] for t, b in samples],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    got = []
    for _ in range(args.runs):
        r = run_once(args.ckpt, args.scheme, args.interval)
        got.append(r)
        print(json.dumps(r), flush=True)
    keys = ("wall_s", "run_seconds", "startup_s", "busy_startup", "busy_run")
    print(
        json.dumps(
            {
                "summary": True,
                "scheme": args.scheme,
                "runs": len(got),
                **{k: statistics.median(float(r[k]) for r in got if r[k] is not None) for k in keys},  # type: ignore[arg-type]
            }
        )
    )


if __name__ == "__main__":
    main()
