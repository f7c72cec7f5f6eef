"""monoquant.quantize / dequantize on state dicts and modules."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import monoquant
from monoquant import SchemeError, TensorValueError
from tests.helpers import sqnr


def tiny_sd():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(100, 64, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g) * 0.05,
        "model.layers.0.self_attn.q_proj.bias": torch.randn(64, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 96, generator=g) * 0.05,  # 96 % 64 != 0
        "model.layers.0.input_layernorm.weight": torch.ones(64),
        "model.position_ids": torch.arange(16),
        "model.mask": torch.ones(4, 4, dtype=torch.bool),
        "lm_head.weight": torch.randn(100, 64, generator=g),
    }


def test_names_follow_the_on_disk_layout():
    q = monoquant.quantize(tiny_sd(), "int4", group_size=64)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in q
    assert q["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert q["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
    assert q["model.layers.0.self_attn.q_proj.weight_shape"].tolist() == [64, 64]
    # untouched tensors are passed through unchanged (same objects)
    sd = tiny_sd()
    q = monoquant.quantize(sd, "int8")
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.position_ids",
        "model.mask",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ):
        assert q[name] is sd[name]


def test_group_mismatch_falls_back_to_the_largest_halved_group_that_divides():
    sd = tiny_sd()
    sd["model.layers.0.mlp.down_proj.weight"] = (
        torch.randn(64, 576, generator=torch.Generator().manual_seed(1)) * 0.05
    )
    q = monoquant.quantize(sd, "int4")  # group size 128; 576 = 4.5 x 128 = 9 x 64
    name = "model.layers.0.mlp.down_proj.weight"
    d = q.decisions[name]
    assert d.action == "quantize" and d.warn and d.category == "group-fallback"
    assert d.scheme.name == "int4-g64" and q.schemes[name].name == "int4-g64"
    assert "576 input columns are not a multiple of the group size 128: groups of 64" in d.reason
    assert q[name + "_scale"].shape == (64, 9)
    back = monoquant.dequantize(q)[name]
    assert sqnr(sd[name], back) > 15  # int4 g64 on Gaussian weights: ~19.5 dB
    # the other tensors keep the run's scheme
    assert q.decisions["model.layers.0.self_attn.q_proj.weight"].scheme.name == "int4-g64"  # 64 columns


def test_strict_group_size_leaves_the_mismatch_dense_with_a_visible_reason():
    q = monoquant.quantize(tiny_sd(), "int4", group_size=64, strict_group_size=True)
    d = q.decisions["model.layers.0.mlp.down_proj.weight"]
    assert d.action == "copy" and d.warn and d.category == "group-mismatch"
    assert "not a multiple of the group size 64" in d.reason
    assert "model.layers.0.mlp.down_proj.weight" in q
    # without it, 96 columns take groups of 32 (the floor)
    d = monoquant.quantize(tiny_sd(), "int4", group_size=64).decisions["model.layers.0.mlp.down_proj.weight"]
    assert d.action == "quantize" and d.scheme.group_size == 32
    # below the floor of 32 there is no fallback: 100 columns stay dense
    sd = {"a.weight": torch.randn(8, 100)}
    d = monoquant.quantize(sd, "int4").decisions["a.weight"]
    assert d.action == "copy" and d.category == "group-mismatch"


def test_integer_and_bool_tensors_are_never_quantized_even_when_included():
    q = monoquant.quantize(tiny_sd(), "int8", include="*")
    assert q.decisions["model.position_ids"].action == "copy"
    assert q.decisions["model.mask"].action == "copy"
    assert q["model.mask"].dtype == torch.bool


def test_include_and_exclude_override_defaults():
    q = monoquant.quantize(tiny_sd(), "int8", include="*embed_tokens*", exclude=["*q_proj*"])
    assert q.decisions["model.embed_tokens.weight"].action == "quantize"
    assert q.decisions["model.layers.0.self_attn.q_proj.weight"].action == "copy"
    assert "excluded" in q.decisions["model.layers.0.self_attn.q_proj.weight"].reason
    # exclude wins over include
    q = monoquant.quantize(tiny_sd(), "int8", include="*embed*", exclude="*embed*")
    assert q.decisions["model.embed_tokens.weight"].action == "copy"


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8", "w8a8", "fp8-dynamic", "int8-tensor", "int4-asym"])
def test_dequantize_restores_names_shapes_and_loads_into_the_module(scheme, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 256))
    q = monoquant.quantize(model, scheme)
    assert q.schemes  # something was quantized
    # saving with safetensors gives a valid file that reads back identically
    save_file(dict(q), tmp_path / "q.safetensors")
    back = load_file(tmp_path / "q.safetensors")
    for k in q:
        assert torch.equal(back[k].view(torch.uint8), q[k].contiguous().view(torch.uint8))
    # dequantize works from the loaded plain dict too (scheme inferred from names and shapes)
    for source in (q, back):
        dense = monoquant.dequantize(source)
        if source is q:  # the input order is kept
            assert list(dense) == list(model.state_dict())
        assert sorted(dense) == sorted(model.state_dict())
        model2 = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 256))
        model2.load_state_dict(dense)
        for name, w in model.state_dict().items():
            assert dense[name].shape == w.shape
            if w.dim() == 2:
                assert sqnr(w, dense[name]) > (14 if "int4" in scheme else 25)


def test_dequantize_dtype_argument():
    q = monoquant.quantize({"a.weight": torch.randn(8, 128).to(torch.bfloat16)}, "int8")
    assert monoquant.dequantize(q)["a.weight"].dtype == torch.bfloat16
    assert monoquant.dequantize(q, dtype=torch.float32)["a.weight"].dtype == torch.float32


def test_nan_is_an_error_naming_the_tensor_and_count():
    sd = tiny_sd()
    sd["model.layers.0.self_attn.q_proj.weight"][0, :3] = float("nan")
    sd["model.layers.0.self_attn.q_proj.weight"][1, 0] = float("inf")
    with pytest.raises(TensorValueError, match=r"'model.layers.0.self_attn.q_proj.weight' holds 4 NaN/Inf"):
        monoquant.quantize(sd, "int8")


def test_fp16_overflow_error_names_tensor_and_clamp_option():
    sd = {"big.weight": torch.full((4, 4), 1e5)}
    with pytest.raises(TensorValueError, match=r"'big\.weight' does not fit float16"):
        monoquant.quantize(sd, "fp16")
    q = monoquant.quantize(sd, "fp16", clamp_fp16=True, stats=True)
    assert q["big.weight"].dtype == torch.float16 and float(q["big.weight"].max()) == 65504.0
    assert q.stats["big.weight"].overflow == 16


def test_fp16_cast_converts_every_float_tensor():
    q = monoquant.quantize(tiny_sd(), "fp16")
    assert q["model.embed_tokens.weight"].dtype == torch.float16
    assert q["model.layers.0.input_layernorm.weight"].dtype == torch.float16
    assert q["model.position_ids"].dtype == torch.int64


def test_all_errors_derive_from_monoquant_error():
    with pytest.raises(monoquant.MonoquantError):
        monoquant.quantize(tiny_sd(), "int5")
    assert issubclass(SchemeError, monoquant.MonoquantError)
    assert issubclass(TensorValueError, monoquant.MonoquantError)


def test_input_is_not_modified():
    sd = tiny_sd()
    before = {k: v.clone() for k, v in sd.items()}
    monoquant.quantize(sd, "int4", group_size=64)
    for k in sd:
        assert torch.equal(sd[k], before[k])
