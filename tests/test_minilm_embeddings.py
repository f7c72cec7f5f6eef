"""Model-level fidelity on real trained weights that did not come from a 4-bit grid: the sentence
embeddings of all-MiniLM-L6-v2 (mean pooling, as sentence-transformers does) with its 37 Linear
weights fake-quantized. ``--optimize`` must not make the model worse than round-to-nearest, in the
mean or the worst sentence's cosine to the original embedding.

docs/fidelity.md has the measured table (200 sentences of the fixed text; this test takes 64).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import monoquant

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import perplexity as ppl  # noqa: E402  (the fixed text)

sys.path.pop(0)


@pytest.fixture(scope="module")
def embed(minilm):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm).eval()
    lines = [line.strip() for line in ppl.fixed_text().split("\n") if len(line.strip()) > 40][:64]
    enc = tok(lines, padding=True, truncation=True, max_length=128, return_tensors="pt")
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

    def cosines(scheme: str, **opts) -> torch.Tensor:
        q = monoquant.quantize(sd, scheme, **opts)
        assert len(q.schemes) == 37
        dense = monoquant.dequantize(q, torch.float32)
        return (run({n: dense[n] for n in q.schemes}) * ref).sum(-1)

    return cosines


@pytest.mark.parametrize(("group_size", "asymmetric"), [(128, False), (64, False), (128, True), (64, True)])
def test_optimize_does_not_make_minilm_worse(embed, group_size, asymmetric):
    rtn = embed("int4", group_size=group_size, asymmetric=asymmetric)
    opt = embed("int4", group_size=group_size, asymmetric=asymmetric, optimize=True)
    assert float(rtn.min()) < 0.99  # the slice does tell the methods apart
    # asymmetric g64 is neutral in the mean (0.9649 vs 0.9652 measured) and better at the worst
    assert float(opt.mean()) >= float(rtn.mean()) - 1e-3, (float(opt.mean()), float(rtn.mean()))
    assert float(opt.min()) >= float(rtn.min()) - 1e-4, (float(opt.min()), float(rtn.min()))
