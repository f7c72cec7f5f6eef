#!/usr/bin/env python3
"""The naive baseline: what users write today to quantize a sharded checkpoint.

    python scripts/naive_quant.py SRC DST --scheme int8|int4|fp16 [--threads N] [--whole]
        [--kernel mq|textbook]

Per shard: ``safetensors.torch.load_file`` (the whole shard in RAM) -> ``monoquant.quantize``
on the shard's dict (the same numerics and tensor rules as ``monoquant stream``, so the outputs
hold the same tensors) -> ``save_file``; then ``model.safetensors.index.json``, a copy of
``config.json`` and the other side files (unchanged: a naive script adds no quantization
config), and an fsync of every output file and the directory at the end (``monoquant stream`` fsyncs every
shard, so the comparison is fair). ``--whole`` loads every shard first, quantizes the whole
state dict, and saves it shard by shard (the "load the model" variant: memory grows with the
model). torch keeps its default thread count unless ``--threads`` is given.

``--kernel textbook`` replaces ``monoquant.quantize`` with the per-tensor code people write from a
tutorial (whole tensor to float32, ``abs().amax``, divide, round, clamp, pack with shifts; the same
compressed-tensors names and the same tensor rules): the baseline of the project's performance
goals. ``--kernel mq`` (default) is the best case of the naive approach: whole shards in memory,
but monoquant's optimized in-memory kernel.

Prints one JSON line: seconds (in-process), bytes in/out, peak RSS (getrusage), peak RssAnon.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import monoquant


class AnonPeak:
    """Samples RssAnon from /proc/self/status every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
                        break
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> AnonPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


def textbook_quantize(sd: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """Tutorial-style per-tensor quantization of a state dict (whole tensors, fresh temporaries)."""
    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        low = name.lower()
        quantize = (
            w.dim() == 2
            and name.endswith("weight")
            and w.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not any(p in low for p in ("embed", "lm_head", "norm"))
        )
        if scheme == "fp16":
            out[name] = w.to(torch.float16) if w.is_floating_point() else w
            continue
        if not quantize or (scheme == "int4" and w.shape[1] % 128):
            out[name] = w
            continue
        x = w.float()
        if scheme == "int8":
            scale = (x.abs().amax(dim=1, keepdim=True) / 127.5).to(w.dtype)
            q = torch.clamp(torch.round(x / scale.float()), -128, 127).to(torch.int32) + 128
            words = q[:, 0::4] | (q[:, 1::4] << 8) | (q[:, 2::4] << 16) | (q[:, 3::4] << 24)
        else:  # int4, groups of 128
            g = x.view(x.shape[0], -1, 128)
            scale = (g.abs().amax(dim=2) / 7.5).to(w.dtype)
            q = (
                torch.clamp(torch.round(g / scale.float().unsqueeze(2)), -8, 7).to(torch.int32).view(x.shape)
                + 8
            )
            words = q[:, 0::8]
            for j in range(1, 8):
                words = words | (q[:, j::8] << (4 * j))
        out[name + "_packed"] = words.contiguous()
        out[name + "_scale"] = scale.contiguous()
        out[name + "_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    return out


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--scheme", default="int8", help="int8, int4 or fp16 (any monoquant preset)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--whole", action="store_true", help="load every shard first, then quantize and save")
    ap.add_argument(
        "--kernel",
        choices=["mq", "textbook"],
        default="mq",
        help="monoquant.quantize (default) or tutorial-style per-tensor torch code",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quantize = textbook_quantize if args.kernel == "textbook" else monoquant.quantize
    t0 = time.perf_counter()
    src, dst = args.src, args.dst
    index_path = src / "model.safetensors.index.json"
    if index_path.exists():
        wmap = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(wmap.values()))
    else:
        shards = sorted(p.name for p in src.glob("*.safetensors"))
    dst.mkdir(parents=True, exist_ok=False)
    bytes_in = sum((src / s).stat().st_size for s in shards)
    new_map: dict[str, str] = {}
    total = 0
    written: list[Path] = []

    def save(qsd: dict[str, torch.Tensor], name: str) -> None:
        nonlocal total
        out = dst / name
        save_file(dict(qsd), str(out), metadata={"format": "pt"})
        written.append(out)
        for k, v in qsd.items():
            new_map[k] = name
            total += v.numel() * v.element_size()

    with AnonPeak() as anon:
        if args.whole:
            sd_all: dict[str, torch.Tensor] = {}
            owner: dict[str, str] = {}
            for s in shards:
                sd = load_file(str(src / s))
                sd_all.update(sd)
                owner.update({k: s for k in sd})
            q = quantize(sd_all, args.scheme)
            for s in shards:
                part = {k: v for k, v in q.items() if owner.get(_base(k, q)) == s}
                save(part, s)
            del sd_all, q
        else:
            for s in shards:
                sd = load_file(str(src / s))
                q = quantize(sd, args.scheme)
                del sd
                save(q, s)
                del q
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append(dst / "model.safetensors.index.json")
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name not in shards and p.name != index_path.name:
                shutil.copy2(p, dst / p.name)
                written.append(dst / p.name)
        for p in written:
            fsync_path(p)
        fsync_path(dst)
    secs = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "tool": "naive",
                "mode": "whole" if args.whole else "shard",
                "scheme": args.scheme,
                "threads": torch.get_num_threads(),
                "seconds": round(secs, 3),
                "bytes_in": bytes_in,
                "bytes_out": sum(p.stat().st_size for p in written),
                "gb_per_s": round(bytes_in / secs / 1e9, 4),
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_anon": anon.peak,
            }
        )
    )
    return 0


def _base(out_name: str, q: monoquant.QuantizedStateDict) -> str:
    """The input tensor an output tensor came from (``x.weight_packed`` -> ``x.weight``)."""
    if out_name in q.decisions:
        return out_name
    for suf in ("_packed", "_scale", "_shape", "_zero_point"):
        if out_name.endswith(suf) and out_name[: -len(suf)] in q.decisions:
            return out_name[: -len(suf)]
    return out_name


if __name__ == "__main__":
    sys.exit(main())
