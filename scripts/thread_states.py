#!/usr/bin/env python
"""Where each thread of a ``stream`` run spends its time, from Python stack samples.

    python scripts/thread_states.py CKPT [--scheme int8] [--interval 0.005] [--process]

Runs ``monoquant.stream(CKPT, <tmp out>, scheme, overlap=True)`` in this process while a
sampling thread reads every thread's Python stack (``sys._current_frames``) every ``--interval``
seconds and files each sample under a state: ``wait:`` (innermost frame a wait, with the three
innermost frames: ``wait<get<acquire`` is the reading thread waiting for a free workspace),
``busy:`` (inside a kernel, a write, a read; with the innermost frame), or ``other:``. Prints one
JSON line: the run's seconds and, per thread, its samples and the most frequent states with their
share.

``--process`` sets ``MONOQUANT_KERNEL_PROCESS=1`` (the Python API's kernel helper is a thread
otherwise) and also times reads of the kernel process's ``/proc/PID/smaps_rollup`` while it runs
(what ``monoquant.memwatch`` reads for the report's peak memory): their median milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import threading
import time
from types import FrameType

BUSY = (
    "rtn_block",
    "cast",
    "quantize_block",
    "write",
    "raw",
    "rows",
    "_flush",
    "finish",
    "update",
    "_words",
    "_pwrite",
)


def _state(frame: FrameType) -> str:
    names: list[str] = []
    f: FrameType | None = frame
    while f is not None:  # (no source lines looked up: that would read files at every sample)
        names.append(f.f_code.co_name)
        f = f.f_back
    names.reverse()
    if names[-1] in ("wait", "_worker", "get", "acquire"):
        return "wait:" + "<".join(names[-3:][::-1])
    for key in BUSY:
        if key in names:
            return f"busy:{key}:{names[-1]}"
    return "other:" + "<".join(names[-3:][::-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--interval", type=float, default=0.005)
    ap.add_argument("--top", type=int, default=7)
    ap.add_argument("--process", action="store_true")
    a = ap.parse_args()
    if a.process:
        os.environ["MONOQUANT_KERNEL_PROCESS"] = "1"
    from stack_samples import run_sampled  # imports monoquant: after the setting above

    from monoquant import memwatch

    states: dict[str, collections.Counter[str]] = {}
    smaps_ms: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(a.interval):
            frames = sys._current_frames()
            for t in threading.enumerate():
                if t.name != "sampler" and t.ident in frames:
                    states.setdefault(t.name, collections.Counter())[_state(frames[t.ident])] += 1
            for pid in list(getattr(memwatch, "HELPERS", ())):  # (exports older than it: none)
                t0 = time.perf_counter()
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        f.read()
                except OSError:
                    continue
                smaps_ms.append((time.perf_counter() - t0) * 1e3)

    seconds = run_sampled(a.ckpt, a.scheme, sample, stop)  # (stack_samples.py, beside this file)
    threads = {}
    for name, c in states.items():
        n = sum(c.values())
        threads[name] = {"samples": n, "states": {k: round(v / n, 3) for k, v in c.most_common(a.top)}}
    line: dict[str, object] = {"seconds": round(seconds, 3), "threads": threads}
    if a.process:
        line["smaps_rollup_ms"] = round(statistics.median(smaps_ms), 2) if smaps_ms else None
    print(json.dumps(line))


if __name__ == "__main__":
    main()
