"""Model-level fidelity: perplexity of a real decoder LLM with fake-quantized weights (JSON lines).

Per-tensor SQNR does not rank methods the way the model does (a scale rounded up by 0.2 % in
every group costs 0.01 dB and +6 % perplexity on SmolLM2), so methods are compared here on the
model: SmolLM2-135M-Instruct (``scripts/smollm2_checkpoint.py``, bf16) or any causal LM checkpoint
directory, on a fixed text (the GPL-3 licence, ``fixed_text()``), ``--windows`` x ``--tokens``
tokens, non-overlapping windows, float32 compute.

Each variant replaces the weights the monoquant rules quantize (for SmolLM2: the 210 Linear
weights) by their dequantized values, exactly as stored (float32 ``q · scale`` from the stored
scale and zero point), and measures perplexity:

* ``source``: the checkpoint as is;
* ``ref-rtn``: the reference round-to-nearest rule, independent of monoquant's kernels:
  symmetric scale = absmax / 7.5 (int4) or / 127.5 (int8) in **float32** (not rounded to any
  storage dtype), codes = clamp(round(x / scale), qmin, qmax); asymmetric scale =
  (max(x.max, 0) - min(x.min, 0)) / (qmax - qmin), zero point = clamp(round(qmin - min / scale));
* ``monoquant``: ``monoquant.quantize(state_dict, scheme, **options)`` -> ``monoquant.dequantize``
  (the bytes ``monoquant stream`` writes; ``tests/test_inmemory.py`` pins that they are equal).

Usage::

    python scripts/perplexity.py              # the default table (SmolLM2, 12 x 512 tokens)
    python scripts/perplexity.py --windows 2 --tokens 256 --variant ref-rtn:int4-g64 --variant int4-g64
    python scripts/perplexity.py --model path/to/ckpt --variant int8

A variant is ``source``, ``ref-rtn:<scheme>`` or a monoquant scheme name with options after
``+``: ``int4-g64-asym``, ``int4+optimize``, ``int4+target_bpw=4.5`` (mixed precision, planned on
the checkpoint), ``int4-g64+strict_group_size``.

Output: one JSON object per variant on stdout: variant, ppl, increase over the source (``rel``),
bits per weight of the quantized tensors (all output bytes), tensors quantized, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_checkpoint import fixed_text, smollm2_checkpoint

import monoquant
from monoquant.schemes import get_scheme

DEFAULT_VARIANTS = [
    "source",
    "int8",
    "ref-rtn:int4-g128",
    "int4",
    "int4+optimize",
    "ref-rtn:int4-g64",
    "int4-g64",
    "int4-g64+optimize",
    "ref-rtn:int4-g64-asym",
    "int4-g64-asym",
    "int4-g64-asym+optimize",
    "ref-rtn:int4-g32-asym",
    "int4-g32-asym",
    "int4-g32-asym+optimize",
    "int4-g32+optimize",
    "int4-asym+optimize",
    "int4-asym+optimize+target_bpw=6",
]


# ---- the model and the text ----------------------------------------------------------------------
def load_model(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def token_windows(tok: Any, windows: int, tokens: int) -> torch.Tensor:
    ids = tok(fixed_text(), return_tensors="pt").input_ids[0]
    need = windows * tokens
    if ids.numel() < need:
        raise SystemExit(f"perplexity: the text has {ids.numel()} tokens, fewer than {windows} x {tokens}")
    return ids[:need].view(windows, tokens)


@torch.no_grad()
def perplexity(model: Any, batches: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every window (each scored on its own, no context carried)."""
    total, count = 0.0, 0
    for w in batches:
        logits = model(w.unsqueeze(0)).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum")
        total += float(nll)
        count += w.numel() - 1
    return math.exp(total / count)


# ---- the reference rule --------------------------------------------------------------------------
def ref_rtn(w: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    """The reference round-to-nearest rule with float32 scales (see the module docstring)."""
    x = w.float()
    rows, cols = x.shape
    g = cols if group is None else group
    v = x.view(rows, cols // g, g)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        s = v.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(v / s), qmin, qmax)
        return (q * s).view(rows, cols)
    mx = v.amax(-1, keepdim=True).clamp(min=0)
    mn = v.amin(-1, keepdim=True).clamp(max=0)
    s = (mx - mn) / (qmax - qmin)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.clamp(torch.round(qmin - mn / s), qmin, qmax)
    q = torch.clamp(torch.round(v / s) + z, qmin, qmax)
    return ((q - z) * s).view(rows, cols)


# ---- variants ------------------------------------------------------------------------------------
def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"int4-g64+optimize+target_bpw=4.5"`` -> (kind, scheme, options)."""
    if text == "source":
        return "source", "", {}
    kind = "monoquant"
    if text.startswith("ref-rtn:"):
        kind, text = "ref-rtn", text[len("ref-rtn:") :]
    name, *opts = text.split("+")
    options: dict[str, Any] = {}
    for o in opts:
        k, eq, v = o.partition("=")
        options[k] = float(v) if eq else True
    return kind, name, options


def fake_quantized(
    kind: str, scheme: str, options: dict[str, Any], sd: dict[str, torch.Tensor], ckpt: Path
) -> tuple[dict[str, torch.Tensor], float | None, int]:
    """The state dict with the rules' tensors replaced; bits/weight and the count of tensors."""
    if kind == "source":
        return sd, None, 0
    if kind == "ref-rtn":
        sch = get_scheme(scheme)
        q = monoquant.quantize(sd, sch, strict_group_size=True)  # only for the decisions
        out = dict(sd)
        n = 0
        for name, d in q.decisions.items():
            if d.action == "quantize":
                out[name] = ref_rtn(sd[name], sch.bits, sch.group_size, sch.symmetric).to(sd[name].dtype)
                n += 1
        return out, None, n
    target = options.pop("target_bpw", None)
    if target is not None:  # mixed precision: the plan's choice per tensor, then each in memory
        plan = monoquant.plan(ckpt, scheme, target_bpw=target, **options)
        out = dict(sd)
        q_bits = q_numel = n = 0
        for t in plan.tensors:
            if t.decision.action == "quantize":
                one = monoquant.quantize({t.ref.name: sd[t.ref.name]}, t.decision.scheme, include="*")
                out[t.ref.name] = monoquant.dequantize(one, torch.float32)[t.ref.name].to(
                    sd[t.ref.name].dtype
                )
                n += 1
            if t.decision.action == "quantize" or t.decision.eligible:
                q_bits += 8 * t.out_bytes
                q_numel += t.ref.numel
        return out, q_bits / q_numel, n
    q = monoquant.quantize(sd, scheme, **options)
    deq = monoquant.dequantize(q, torch.float32)
    out = dict(sd)
    bits = numel = n = 0
    for name, d in q.decisions.items():
        if d.action == "quantize":
            out[name] = deq[name].to(sd[name].dtype)
            numel += sd[name].numel()
            bits += 8 * sum(
                v.numel() * v.element_size() for k, v in q.items() if k.startswith(name) and k != name
            )
            n += 1
    return out, (bits / numel if numel else None), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="causal LM checkpoint dir (default: SmolLM2-135M-Instruct bf16)",
    )
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument(
        "--variant", action="append", default=None, help="repeatable; default: the table of docs/fidelity.md"
    )
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or smollm2_checkpoint()
    model, tok = load_model(path)
    batches = token_windows(tok, args.windows, args.tokens)
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    base = None
    for v in args.variant or DEFAULT_VARIANTS:
        t0 = time.perf_counter()
        kind, scheme, options = parse_variant(v)
        qsd, bpw, n = fake_quantized(kind, scheme, dict(options), sd, Path(path))
        model.load_state_dict({k: t.float() for k, t in qsd.items()}, strict=False)
        ppl = perplexity(model, batches)
        if kind == "source":
            base = ppl
        row = {
            "variant": v,
            "ppl": round(ppl, 4),
            "rel": round(ppl / base - 1, 5) if base else None,
            "bits_per_weight": round(bpw, 4) if bpw else None,
            "tensors": n,
            "windows": args.windows,
            "tokens": args.tokens,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
