"""Kernels: specs match outputs, error bounds, chunked == whole, golden bytes, bad values."""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monoquant.kernels import (
    ErrorStats,
    Fp16OverflowError,
    NonFiniteError,
    Workspace,
    absmax,
    as_rows,
    get_kernel,
)
from monoquant.packing import unpack_dim0, unpack_rows
from monoquant.schemes import PRESETS, get_scheme
from tests.helpers import det_weight

GOLDEN = Path(__file__).parent / "golden" / "kernels.json"
QUANT = [n for n, s in PRESETS.items() if s.kind != "cast"]
ALL = list(PRESETS)


def chunked(kernel, x: torch.Tensor, block_rows: int) -> dict[str, torch.Tensor]:
    """Quantize ``x`` block by block, as the streaming pipeline does, and reassemble."""
    shape = tuple(x.shape)
    rows, cols = as_rows(shape)
    x2 = x.reshape(rows, cols)
    tscale = None
    if kernel.needs_absmax:
        amax = 0.0
        for i in range(0, rows, block_rows):
            amax = max(amax, absmax(x2[i : i + block_rows]))
        tscale = kernel.tensor_scale(amax, x.dtype)
    ws = Workspace()  # one workspace reused across blocks, like the pipeline
    pieces: dict[str, list[torch.Tensor]] = {}
    for i in range(0, rows, block_rows):
        for k, v in kernel.quantize_block(x2[i : i + block_rows], tensor_scale=tscale, ws=ws).items():
            pieces.setdefault(k, []).append(v.clone())
    out = {k: torch.cat(v) for k, v in pieces.items()}
    out.update(kernel.constants(shape, tscale))
    return {s.suffix: out[s.suffix].reshape(s.shape) for s in kernel.out_specs(shape, x.dtype)}


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(ALL),
    rows=st.integers(1, 40),
    groups=st.integers(1, 4),
    group=st.sampled_from([32, 64]),
    extra=st.sampled_from([0, 0, 3, 5]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 1000),
)
def test_out_specs_equal_real_outputs(name, rows, groups, group, extra, dtype, seed):
    scheme = get_scheme(name)
    if scheme.strategy == "group":
        scheme = get_scheme(name, group_size=group)
        extra = 0
    cols = groups * group + extra
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).to(dtype)
    k = get_kernel(scheme)
    parts = k.quantize_tensor(w)
    specs = k.out_specs((rows, cols), dtype)
    assert [s.suffix for s in specs] == list(parts)
    for s in specs:
        assert parts[s.suffix].dtype == s.dtype
        assert tuple(parts[s.suffix].shape) == s.shape
        assert parts[s.suffix].numel() * parts[s.suffix].element_size() == s.nbytes


INT_SCHEMES = [n for n in QUANT if PRESETS[n].kind == "int"] + [
    "int8-g64",
    "int4-g64-asym",
    "int8-channel-asym",
]


@pytest.mark.parametrize("name", INT_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_error_is_at_most_half_a_step_plus_the_scale_rounding(name, dtype):
    scheme = get_scheme(
        name.replace("-channel-asym", ""), asymmetric=name.endswith("asym") and "g" not in name.split("-")[1]
    )
    w = (torch.randn(48, 256, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    w[3, 17] = 0.9  # an outlier
    k = get_kernel(scheme)
    parts = k.quantize_tensor(w)
    dq = k.dequantize(parts, tuple(w.shape), torch.float32)
    scale = parts["_scale"].float()
    if scheme.strategy == "tensor":
        step = scale.expand(48, 256)
    else:
        step = scale.repeat_interleave(256 // scale.shape[1], dim=1)
    err = (dq - w.float()).abs()
    # half a step, plus float32 rounding of x/scale and q*scale (a few ulps of |w|), plus what the
    # scale's round-to-nearest into the weight dtype can push the extreme codes past the range:
    # |x/scale| <= span * (1 + u), u = half an ulp (relative) of the scale dtype, span = (qmax - qmin) / 2
    # (symmetric) or qmax - qmin (asymmetric: the codes run from the zero point over the whole range)
    u = torch.finfo(dtype).eps / 2
    span = (scheme.qmax - scheme.qmin) / (2 if scheme.symmetric else 1)
    bound = step * (0.5 + span * u) + 4 * torch.finfo(torch.float32).eps * w.float().abs()
    assert bool((err <= bound).all()), float((err / step).max())


def test_fp8_error_is_within_three_mantissa_bits():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    k = get_kernel(get_scheme("fp8"))
    parts = k.quantize_tensor(w)
    dq = k.dequantize(parts, (32, 128), torch.float32)
    scale = parts["_scale"].float()
    # e4m3: relative error <= 2^-4 for normals, absolute <= 2^-10 * scale for subnormals
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)
    assert bool(((dq - w).abs() <= bound).all())


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from([*QUANT, "int8-g64", "int4-g64-asym", "int4-g32-asym", "fp16", "bf16"]),
    rows=st.integers(1, 70),
    block=st.sampled_from([8, 16, 24, 64]),
    seed=st.integers(0, 1000),
)
def test_chunked_is_byte_identical_to_whole(name, rows, block, seed):
    scheme = get_scheme(name)
    w = torch.randn(rows, 128, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    k = get_kernel(scheme)
    block = max(block // k.block_rows_multiple, 1) * k.block_rows_multiple
    whole = k.quantize_tensor(w)
    parts = chunked(k, w, block)
    assert list(parts) == list(whole)
    for key in whole:
        assert whole[key].reshape(-1).view(torch.uint8).equal(parts[key].reshape(-1).view(torch.uint8)), key


def test_rank3_is_flattened_and_shape_kept():
    w = torch.randn(8, 4, 64)
    k = get_kernel(get_scheme("int4", group_size=32))
    parts = k.quantize_tensor(w)
    assert parts["_shape"].tolist() == [8, 4, 64]
    assert tuple(parts["_packed"].shape) == (8, 32)
    assert k.dequantize(parts, (8, 4, 64)).shape == (8, 4, 64)


def test_asymmetric_codes_and_zero_points_decode():
    w = torch.rand(16, 64) + 0.5  # all positive: zero point at qmin
    k = get_kernel(get_scheme("int4", group_size=32, asymmetric=True))
    parts = k.quantize_tensor(w)
    zp = unpack_dim0(parts["_zero_point"], 4, 16)
    assert bool((zp == -8).all())
    q = unpack_rows(parts["_packed"], 4, 64)
    assert int(q.min()) >= -8 and int(q.max()) <= 7


def test_zero_rows_get_eps_scale_and_zero_codes():
    w = torch.zeros(4, 64)
    k = get_kernel(get_scheme("int8"))
    parts = k.quantize_tensor(w)
    assert bool((parts["_scale"] > 0).all())
    assert bool((k.dequantize(parts, (4, 64)) == 0).all())


@pytest.mark.parametrize("name", [*QUANT, "fp16", "bf16"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_values_are_an_error(name, bad):
    w = torch.randn(8, 128)
    w[5, 3] = bad
    with pytest.raises(NonFiniteError):
        k = get_kernel(get_scheme(name))
        k.quantize_tensor(w)


def test_fp16_overflow_error_and_clamp():
    w = torch.ones(2, 8, dtype=torch.float32)
    w[1, 2] = 1e6
    k = get_kernel(get_scheme("fp16"))
    with pytest.raises(Fp16OverflowError):
        k.quantize_tensor(w)
    st = ErrorStats()
    out = k.quantize_tensor(w, clamp_fp16=True, stats=st)[""]
    assert out.dtype == torch.float16 and float(out[1, 2]) == 65504.0
    assert st.overflow == 1


def test_stats_match_a_float64_reference():
    w = det_weight(64, 256)
    k = get_kernel(get_scheme("int4"))
    st = ErrorStats()
    parts = k.quantize_tensor(w, stats=st)
    dq = k.dequantize(parts, (64, 256), torch.float32)
    ref = 10 * math.log10(float((w.double() ** 2).sum() / ((w.double() - dq.double()) ** 2).sum()))
    assert st.sqnr_db == pytest.approx(ref, abs=0.01)
    assert st.max_abs_err == pytest.approx(float((w - dq).abs().max()), rel=1e-4)


# ---- golden bytes --------------------------------------------------------------------------
GOLDEN_SCHEMES = [*PRESETS, "int4-g32-asym", "int8-g64"]


def golden_outputs() -> dict[str, dict[str, str]]:
    w = det_weight(8, 64, torch.bfloat16, outliers=True)
    res = {}
    for name in GOLDEN_SCHEMES:
        scheme = get_scheme(name)
        if scheme.strategy == "group" and scheme.group_size > 64:
            scheme = get_scheme(name, group_size=32)
        parts = get_kernel(scheme).quantize_tensor(w)
        res[scheme.name] = {
            k or "weight": v.reshape(-1).view(torch.uint8).numpy().tobytes().hex() for k, v in parts.items()
        }
    return res


def test_golden_bytes(request):
    got = golden_outputs()
    if request.config.getoption("--update-golden"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)
    for name in want:
        for key in want[name]:
            assert got[name][key] == want[name][key], (
                f"{name} {key}: bytes changed (bump FORMAT_VERSION if intended)"
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 4), (12,)])
def test_fp16_clamp_of_16_bit_inputs_gives_65504_not_inf(dtype, shape):
    """``clamp_fp16`` on a bf16 weight: 65504 is not a bfloat16 (it rounds to 65536), so a clamp in
    the input dtype wrote inf into the fp16 output; it is clamped in float32 now. Both the tiled
    (2-D) and the whole-block (1-D) paths."""
    w = torch.ones(shape, dtype=torch.float32)
    w.view(-1)[1], w.view(-1)[5] = 7e4, -6.6e4
    w = w.to(dtype) if dtype != torch.float16 else w.clamp(-65504, 65504).to(dtype)
    k = get_kernel(get_scheme("fp16"))
    st = ErrorStats()
    out = k.quantize_block(w, ws=Workspace(), stats=st, clamp_fp16=True)[""]
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    if dtype != torch.float16:
        assert float(out.view(-1)[1]) == 65504.0 and float(out.view(-1)[5]) == -65504.0
        assert st.overflow == 2 and math.isfinite(st.max_abs_err)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("optimize", [False, True])
def test_block_outputs_do_not_live_in_the_kernel_scratch(name, optimize):
    """A block waiting for the writer keeps only its workspace's block buffers: the kernel
    thread's scratch is reused by its next block as soon as ``quantize_block`` returns. So every
    output of every scheme must be unchanged when that scratch is overwritten afterwards."""
    scheme = get_scheme(name)
    if optimize:
        if scheme.kind != "int":
            pytest.skip("--optimize is for the integer schemes")
        scheme = get_scheme(name, optimize=True)
    k = get_kernel(scheme)
    x = det_weight(128, 256, seed=3).to(torch.bfloat16)
    ts = k.tensor_scale(float(x.float().abs().max()), x.dtype) if k.needs_absmax else None
    ref = {n: t.clone() for n, t in k.quantize_block(x, tensor_scale=ts, ws=Workspace()).items()}
    scratch = Workspace()
    got = k.quantize_block(x, tensor_scale=ts, ws=Workspace().with_scratch(scratch))
    assert scratch.buffers  # the kernel did use the thread's scratch
    for buf in scratch.buffers.values():
        buf.view(torch.uint8).fill_(0xA5)
    assert sorted(got) == sorted(ref)
    for n, t in got.items():
        assert torch.equal(t.contiguous().view(torch.uint8), ref[n].contiguous().view(torch.uint8)), n
