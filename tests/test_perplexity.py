"""Model-level fidelity on a real LLM (SmolLM2-135M-Instruct), on a small slice of the fixed text:
monoquant's round-to-nearest is at least as good as the reference rule (float32 scale =
absmax / 7.5, or min/max / 15 with a zero point), within a tolerance.

The tolerance (5 % of the perplexity) covers what storing the scale in bf16 at all costs against a
float32 reference: round-to-nearest into bf16 moves each group's scale by up to 0.4 %, randomly.
Measured on this slice (2 x 256 tokens, source 22.20): symmetric g64 reference 27.07, monoquant
27.99 (+3.4 %); asymmetric g64 reference 26.19, monoquant 26.48 (+1.1 %); on 4 x 512 tokens the
symmetric gap is +1.1 % and asymmetric -0.1 % (docs/fidelity.md). The bias this guards against is
larger: scales rounded *up* (format version 2) give 29.68 for symmetric g64 here (+9.6 %). Leaving
the 576-wide layers dense is caught by the tensor count.

``scripts/perplexity.py`` is the full harness (12 x 512 tokens, every method).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import perplexity as ppl  # noqa: E402

sys.path.pop(0)

pytest.importorskip("transformers")

WINDOWS, TOKENS = 2, 256
TOLERANCE = 1.05


@pytest.fixture(scope="module")
def harness(smollm2):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model, tok = ppl.load_model(smollm2)
    batches = ppl.token_windows(tok, WINDOWS, TOKENS)
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(smollm2).glob("*.safetensors")):
        sd.update(load_file(str(f)))

    def measure(variant: str) -> tuple[float, int]:
        kind, scheme, options = ppl.parse_variant(variant)
        qsd, _bpw, n = ppl.fake_quantized(kind, scheme, dict(options), sd, Path(smollm2))
        model.load_state_dict({k: t.float() for k, t in qsd.items()}, strict=False)
        return ppl.perplexity(model, batches), n

    return measure


@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g64-asym"])
def test_round_to_nearest_is_at_least_the_reference_rule(harness, scheme):
    source, _ = harness("source")
    ref, n_ref = harness(f"ref-rtn:{scheme}")
    mine, n = harness(scheme)
    assert n == n_ref == 210  # every Linear weight of SmolLM2
    assert source < ref  # the slice does tell the methods apart
    assert mine <= ref * TOLERANCE, (mine, ref)


def test_default_int4_quantizes_every_linear_and_stays_close_to_g64(harness):
    # 180 of the 210 Linear weights are 576 columns wide: with the fallback they take groups of
    # 64 (the other 30, 1536 wide, keep 128), so the default is within a few % of uniform g64
    g64, _ = harness("int4-g64")
    default, n = harness("int4")
    assert n == 210
    assert default <= g64 * 1.10, (default, g64)


@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g64-asym", "int4"])
def test_optimize_is_at_least_round_to_nearest_on_the_model(harness, scheme):
    # measured on this slice: symmetric g64 RTN 27.99 -> 27.02 (reference 27.07); asymmetric g64
    # 26.48 -> 26.47; default int4 30.60 -> 26.64. The former unweighted search scored 28.15
    # asymmetric (worse than RTN): the margin of 1 % catches a return of that.
    rtn, _ = harness(scheme)
    opt, n = harness(f"{scheme}+optimize")
    assert n == 210
    assert opt <= rtn * 1.01, (opt, rtn)
    if scheme == "int4-g64":
        ref, _ = harness(f"ref-rtn:{scheme}")
        assert opt <= ref * 1.01, (opt, ref)
