#!/usr/bin/env python3
"""How often the kernel helper thread sits idle during a ``stream`` run, and where the main thread is then.

    python scripts/stack_samples.py CKPT [--scheme int8] [--interval 0.003]

Runs ``monoquant.stream(CKPT, <tmp out>, scheme, overlap=True)`` in this process while a
sampling thread looks at every thread's Python stack (``sys._current_frames``) every
``--interval`` seconds. A sample counts the helper as idle when its innermost frame is a wait
(for a block, in ``BlockQueue.serve``; or for work, in the executor). Prints one JSON line:
the run's seconds, the samples taken, the share of them with the helper idle, and the main
thread's most frequent stacks (innermost three frames) at those moments. Run it with
``PYTHONPATH=<export>`` to measure another version of monoquant.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable

import monoquant


def run_sampled(ckpt: str, scheme: str, sample: Callable[[], None], stop: threading.Event) -> float:
    """Seconds of ``monoquant.stream(ckpt, <tmp out>, scheme, overlap=True)`` while ``sample``
    runs on a thread named ``sampler`` (it returns once ``stop`` is set, after the run)."""
    out = tempfile.mkdtemp(prefix="mq-stacks-")
    try:
        sampler = threading.Thread(target=sample, name="sampler", daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        monoquant.stream(ckpt, f"{out}/out", scheme, overlap=True)
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--interval", type=float, default=0.003)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    idle_at: collections.Counter[str] = collections.Counter()
    samples = [0]
    stop = threading.Event()
    main_id = threading.main_thread().ident

    def sample() -> None:
        while not stop.wait(a.interval):
            frames = sys._current_frames()
            helpers = [t.ident for t in threading.enumerate() if t.name.startswith("monoquant-kernel")]
            if not helpers or helpers[0] not in frames:
                continue
            samples[0] += 1
            inner = traceback.extract_stack(frames[helpers[0]])[-1]
            if inner.name in ("wait", "_worker") and main_id in frames:
                stack = traceback.extract_stack(frames[main_id])[-3:][::-1]
                idle_at[" < ".join(f"{f.name}:{f.lineno}" for f in stack)] += 1

    seconds = run_sampled(a.ckpt, a.scheme, sample, stop)
    n = max(samples[0], 1)
    print(
        json.dumps(
            {
                "seconds": round(seconds, 3),
                "samples": samples[0],
                "helper_idle": round(sum(idle_at.values()) / n, 3),
                "main_while_helper_idle": {k: round(v / n, 3) for k, v in idle_at.most_common(a.top)},
            }
        )
    )


if __name__ == "__main__":
    main()
