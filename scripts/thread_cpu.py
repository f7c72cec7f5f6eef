#!/usr/bin/env python3
"""CPU use of each thread of a ``monoquant stream`` run over time (Linux ``/proc``).

    python scripts/thread_cpu.py CKPT [--interval 0.5] -- --int8 [more stream options]

Starts ``python -m monoquant stream CKPT <tmp out> ...``, samples ``/proc/<pid>/task/*/stat``
every ``--interval`` seconds and prints one JSON line per sample: ``{"t": seconds, "threads":
{"<tid>": cores}}`` (cores: CPU seconds of that thread over the interval / interval), then a
summary line with each thread's total CPU seconds. The lowest tid is the main thread; the others
are the memory watch, read-ahead, writer, kernel helper and copy lane threads (Python does not
name its threads for the OS: their CPU shares and the moments they run tell them apart). This is
how docs/benchmarks.md found the writer copying kept tensors alone while both kernel threads sat
idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _cpu(pid: int) -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--interval", type=float, default=0.5)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after "--": monoquant stream options
    a = ap.parse_args(argv[:cut])
    extra = argv[cut + 1 :]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "monoquant", "stream", a.ckpt, os.path.join(tmp, "out"), *extra]
        p = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0, last, total = time.perf_counter(), {}, {}
        while p.poll() is None:
            try:
                cur = _cpu(p.pid)
            except OSError:
                break
            d = {tid: v - last.get(tid, 0.0) for tid, v in cur.items()}
            last.update(cur)
            total.update(cur)
            busy = {str(tid): round(v / a.interval, 2) for tid, v in sorted(d.items()) if v > 0}
            print(json.dumps({"t": round(time.perf_counter() - t0, 2), "threads": busy}), flush=True)
            time.sleep(a.interval)
        print(
            json.dumps(
                {
                    "summary": True,
                    "rc": p.wait(),
                    "wall_s": round(time.perf_counter() - t0, 2),
                    "cpu_s": {str(k): round(v, 2) for k, v in sorted(total.items())},
                }
            )
        )


if __name__ == "__main__":
    main()
