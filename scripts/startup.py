#!/usr/bin/env python
"""Start-up cost of ``monoquant stream``: whole processes on a one-tensor checkpoint, where the
imports are nearly all of the time. JSON lines out, one per run, then a summary.

Each round runs every variant once, in turn (alternating, so a busy moment of a shared machine
hits all of them), and the summary gives each variant's median wall and CPU seconds (user + sys
of the process, from ``os.wait4``) with their range, and its ratio to the first variant round by
round.

    python scripts/startup.py --rounds 10 \
        --variant "now=" --variant "before=PYTHONPATH=/tmp/prev"

A variant is ``label=ENV`` (space-separated ``NAME=value`` settings for that variant's
processes); ``label=`` runs this checkout as installed.
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


def _tiny_checkpoint(d: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    src = d / "tiny"
    src.mkdir()
    t = torch.ones(64, 64, dtype=torch.bfloat16)
    save_file({"model.layers.0.mlp.up_proj.weight": t}, str(src / "model.safetensors"))
    return src


def _run(env: dict[str, str], src: Path, dst: Path, scheme: str) -> dict[str, float]:
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "monoquant", "stream", str(src), str(dst), f"--{scheme}"]
    t = time.perf_counter()
    # cwd: never a checkout, whose monoquant `python -m` would import whatever PYTHONPATH says
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=src.parent)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode() if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"startup.py: {' '.join(cmd)} failed with {rc}: {err.strip()[-500:]}")
    cpu = ru.ru_utime + ru.ru_stime
    return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "user_s": round(ru.ru_utime, 4)}


def _spread(v: list[float]) -> dict[str, float]:
    med = statistics.median(v)
    return {"median": round(med, 4), "min": round(min(v), 4), "max": round(max(v), 4), "n": len(v)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--variant", action="append", default=[], help="label=ENV (repeatable); default: now=")
    args = ap.parse_args()
    variants: list[tuple[str, dict[str, str]]] = []
    for v in args.variant or ["now="]:
        label, _, settings = v.partition("=")
        env = dict(os.environ)
        for kv in settings.split():
            k, _, val = kv.partition("=")
            env[k] = val
        variants.append((label, env))
    with tempfile.TemporaryDirectory(prefix="mq-startup-") as tmp:
        d = Path(tmp)
        src = _tiny_checkpoint(d)
        for _label, env in variants:  # one unrecorded run each: the files are in the page cache
            _run(env, src, d / "out", args.scheme)
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in variants}
        for r in range(args.rounds):
            for label, env in variants:
                got = _run(env, src, d / "out", args.scheme)
                runs[label].append(got)
                print(json.dumps({"round": r, "variant": label, **got}), flush=True)
    first = variants[0][0]
    summary: dict[str, object] = {"summary": True, "rounds": args.rounds, "scheme": args.scheme}
    for label, _ in variants:
        rs = runs[label]
        entry: dict[str, object] = {
            "wall_s": _spread([x["wall_s"] for x in rs]),
            "cpu_s": _spread([x["cpu_s"] for x in rs]),
        }
        if label != first:
            base = runs[first]
            pairs = list(zip(rs, base, strict=True))
            entry[f"wall_vs_{first}"] = _spread([x["wall_s"] / b["wall_s"] for x, b in pairs])
            entry[f"cpu_vs_{first}"] = _spread([x["cpu_s"] / b["cpu_s"] for x, b in pairs])
        summary[label] = entry
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
