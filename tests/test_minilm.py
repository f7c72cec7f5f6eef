"""Quantize -> dequantize the real all-MiniLM-L6-v2 weights; SQNR per scheme (docs/fidelity.md)."""

import pytest
from safetensors.torch import load_file

import monoquant
from tests.helpers import sqnr

# mean SQNR (dB) over the 37 Linear weights; measured figures are in docs/fidelity.md and the
# thresholds sit a little below them so a numerics regression fails.
EXPECTED_MIN = {
    "int8": 41.0,
    "int8-tensor": 32.5,
    "int4": 18.2,
    "int4-g64": 18.7,
    "int4-asym": 19.3,
    "fp8": 30.0,
}


@pytest.mark.parametrize("scheme", sorted(EXPECTED_MIN))
def test_minilm_sqnr(minilm, scheme):
    sd = load_file(minilm / "model.safetensors")
    q = monoquant.quantize(sd, scheme)
    assert len(q.schemes) == 37, sorted(q.schemes)
    dense = monoquant.dequantize(q)
    values = [sqnr(sd[n], dense[n]) for n in q.schemes]
    mean = sum(values) / len(values)
    assert mean >= EXPECTED_MIN[scheme], mean
