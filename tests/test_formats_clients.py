"""The formats of monoquant.formats in transformers: every preset loads with no missing or
unexpected keys, holds exactly monoquant's dequantized weights (weight-only presets), and gives
logits close to the original model; FP8 block on SmolLM2 (width 576, not a multiple of 128).

Thresholds: measured cosine similarity of fp32 logits against the original tiny Llama (16
tokens) — fp8-block 0.9972, mxfp8a16 0.9988, mxfp8 0.9981, nvfp4a16 0.9853, mxfp4a16 0.9775,
nvfp4 (W4A4, activations fake-quantized by compressed-tensors) 0.9719, mxfp4 0.9530 — with
margins of 3-4x in 1-cos. A layout error (swapped nibbles, transposed scales) gives cos < 0.3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

import monoquant

pytestmark = [
    pytest.mark.clients,
    # transformers warns that a passed CompressedTensorsConfig only sets the loading attributes
    pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning"),
]

IDS = torch.tensor([[1, 15, 27, 300, 999, 42, 7, 512, 128, 64, 3, 88, 901, 450, 11, 2]])
COS = {
    "fp8-block": 0.99,
    "mxfp8a16": 0.995,
    "mxfp8": 0.993,
    "nvfp4a16": 0.95,
    "mxfp4a16": 0.93,
    "nvfp4": 0.9,
    "mxfp4": 0.85,
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    d = tmp_path_factory.mktemp("llama") / "orig"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, max_shard_size="1MB")
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(IDS).logits.float()
    return d, ref


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.mark.parametrize("name", list(COS))
def test_transformers_loads_every_format(llama, tmp_path, name):
    src, ref = llama
    out = tmp_path / name
    assert monoquant.stream(src, out, name, max_shard_size="1MB").complete
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    dense = monoquant.load(out)
    quantized = [m for m, _ in model.named_modules() if m.endswith("_proj")]
    assert len(quantized) == 14
    with torch.no_grad():  # the default path decompresses on the first forward
        logits = model(IDS).logits.float()
    assert cos(logits, ref) > COS[name]
    # the client holds exactly monoquant's dequantized weights (activations, where declared
    # dynamic, are fake-quantized on the fly)
    for m in quantized:
        w = model.get_submodule(m).weight.detach()
        assert w.dtype == torch.bfloat16 and torch.equal(w, dense[m + ".weight"].to(w.dtype)), m


@pytest.mark.slow
def test_fp8_block_on_smollm2_width_576(smollm2, tmp_path):
    """llm-compressor 0.14 fails here at save time ("non contiguous tensor"): the partial last
    block of a 576-wide weight. monoquant streams it and transformers loads it exactly. (Its
    default path then fails on the first forward: compressed-tensors' dynamic activation groups
    of 128 cannot split a 576-wide input; ``dequantize=True`` runs dense weights, see
    docs/loading.md. The plan says so in each such tensor's reason.)"""
    out = tmp_path / "out"
    report = monoquant.stream(smollm2, out, "fp8-block")
    assert report.complete
    raw = monoquant.load(out, dequantize=False, lazy=True)
    assert tuple(raw["model.layers.0.self_attn.q_proj.weight_scale"].shape) == (5, 5)  # 576 = 4*128 + 64
    assert tuple(raw["model.layers.0.mlp.down_proj.weight_scale"].shape) == (5, 12)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["block_structure"] == [128, 128]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    model, info = AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert {k: v for k, v in info.items() if v} == {}
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3, 4]])).logits.shape == (1, 4, 49152)
    dense = monoquant.load(out)
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert w.dtype == torch.bfloat16 and torch.equal(w, dense["model.layers.0.self_attn.q_proj.weight"])
    assert min(s.sqnr_db for s in report.stats.values()) > 28
    reasons = {t["name"]: t["reason"] for t in monoquant.plan(smollm2, "fp8-block").to_json()["tensors"]}
    assert "576 input columns: partial last 128-block" in reasons["model.layers.0.self_attn.q_proj.weight"]
    assert "partial" not in reasons["model.layers.0.mlp.down_proj.weight"]
