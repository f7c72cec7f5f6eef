import pytest
import torch

from monoquant import SchemeError, get_scheme
from monoquant.schemes import PRESETS, Scheme


def test_presets_have_the_documented_defaults():
    assert get_scheme("int8") == Scheme("int", 8, "channel")
    assert get_scheme("int4") == Scheme("int", 4, "group", 128)
    fp8 = get_scheme("fp8")
    assert (fp8.kind, fp8.dtype, fp8.strategy) == ("float", torch.float8_e4m3fn, "channel")
    assert get_scheme("fp16").dtype == torch.float16
    assert get_scheme("bf16").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("int8", {"per_tensor": True}, "int8-tensor"),
        ("int8", {"group_size": 64}, "int8-g64"),
        ("int4", {"group_size": 32}, "int4-g32"),
        ("int4", {"per_channel": True}, "int4-channel"),
        ("int4", {"asymmetric": True}, "int4-g128-asym"),
        ("fp8", {"per_tensor": True}, "fp8-tensor"),
        ("int8", {"dynamic": True}, "int8-dynamic"),
        ("int8", {"dynamic": True, "act_strategy": "tensor"}, "int8-dynamic-tensor"),
        ("fp8", {"dynamic": True}, "fp8-dynamic"),
    ],
)
def test_options_make_variants(name, options, expected):
    s = get_scheme(name, **options)
    assert s.name == expected
    # the canonical name resolves back to the same value
    assert get_scheme(expected) == s


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("int8", "pack-quantized"),
        ("int4", "pack-quantized"),
        ("w8a8", "int-quantized"),
        ("fp8", "naive-quantized"),
        ("fp8-dynamic", "float-quantized"),
        ("fp16", None),
    ],
)
def test_formats(name, fmt):
    assert get_scheme(name).format == fmt


def test_unknown_name_lists_known_ones():
    with pytest.raises(SchemeError) as e:
        get_scheme("int3")
    for known in PRESETS:
        assert known in str(e.value)


@pytest.mark.parametrize(
    "name, options",
    [
        ("int4", {"dynamic": True}),
        ("fp8", {"asymmetric": True}),
        ("int8", {"per_tensor": True, "asymmetric": True}),
        ("fp16", {"group_size": 64}),
        ("int4", {"group_size": 33}),
        ("int4", {"group_size": 64, "per_tensor": True}),
        ("fp8", {"group_size": 128}),
        ("int8", {"act_strategy": "token"}),
    ],
)
def test_impossible_combinations_fail(name, options):
    with pytest.raises(SchemeError):
        get_scheme(name, **options)


def test_schemes_are_frozen_values_and_round_trip_json():
    s = get_scheme("int4", group_size=64, asymmetric=True)
    with pytest.raises(AttributeError):
        s.bits = 8  # type: ignore[misc]
    assert Scheme.from_dict(s.to_dict()) == s
    assert hash(s) == hash(get_scheme("int4-g64-asym"))


def test_bits_per_weight():
    assert get_scheme("int4").bits_per_weight((4096, 4096)) == pytest.approx(4 + 16 / 128, abs=1e-3)
    assert get_scheme("int8").bits_per_weight((4096, 4096)) == pytest.approx(8 + 16 / 4096, abs=1e-3)
