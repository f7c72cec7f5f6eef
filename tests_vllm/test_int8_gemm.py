"""Why W8A8 costs SmolLM2 more perplexity in vLLM's CPU build than in transformers (docs/loading.md):
vLLM's CPU W8A8 linear (``CompressedTensorsW8A8Int8`` -> oneDNN ``onednn_scaled_mm``, symmetric
per-token int8 activations) is not an exact int8 GEMM on a CPU without VNNI. oneDNN's AVX2 int8
kernels multiply with ``vpmaddubsw``, whose pairwise sums saturate at int16; full-range int8
weights overflow it, weights within 7 bits ([-63, 63]) do not. monoquant writes full-range int8
weights (as compressed-tensors' own W8A8 presets do), so on such a CPU the engine, not the
checkpoint, adds the error.
"""

from __future__ import annotations

from pathlib import Path

import torch


def has_vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def onednn_vs_exact(wmax: int) -> float:
    """Relative error of vLLM's oneDNN W8A8 GEMM against the exact int32 GEMM of the same int8
    codes, for random weights in [-wmax, wmax] and activations with outlier channels."""
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    g = torch.Generator().manual_seed(0)
    m, k, n = 64, 576, 1536  # SmolLM2's hidden size and intermediate size
    x = torch.randn(m, k, generator=g)
    x[:, :4] *= 30
    w = torch.randint(-wmax, wmax + 1, (n, k), dtype=torch.int8, generator=g)
    ws = torch.full((n, 1), 0.01)
    handler = ops.create_onednn_scaled_mm(w.t(), ws, torch.float32, True, False, 32)
    xq, xs, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
    out = torch.empty(m, n)
    ops.onednn_scaled_mm(handler, xq, out, xs, None, None, None)
    exact = (xq.double() @ w.double().t()) * xs.double() * ws.double().t()
    return ((out.double() - exact).norm() / exact.norm()).item()


def test_onednn_int8_gemm_is_exact_on_7_bit_weights():
    assert onednn_vs_exact(63) < 1e-5


def test_onednn_int8_gemm_saturates_full_range_weights_without_vnni():
    err = onednn_vs_exact(127)
    print(f"oneDNN W8A8 GEMM, full-range int8 weights: relative error {err:.3g} (VNNI: {has_vnni()})")
    if has_vnni():
        assert err < 1e-5  # VNNI's vpdpbusd accumulates in int32: no saturation
    else:
        assert err > 1e-2  # measured 0.146 on the AVX2-only reference machine
