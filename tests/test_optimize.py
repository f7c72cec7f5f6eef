"""--optimize (monoquant.optimize): same format as RTN, byte-stable, never worse, clearly better."""

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import monoquant
import monoquant.optimize as opt
from monoquant.jobs import torch_threads
from monoquant.kernels import ErrorStats, NonFiniteError, Workspace, get_kernel
from monoquant.packing import unpack_dim0, unpack_rows
from monoquant.schemes import get_scheme
from tests.helpers import det_weight, sqnr, tiny_llama_sd, write_sharded
from tests.test_kernels import chunked
from tests.test_stream import check_output

# every integer scheme the search handles (channel and group, symmetric and asymmetric, both
# formats), plus per-tensor, which falls back to round-to-nearest
OPT_SCHEMES = [
    "int4",
    "int4-g32",
    "int4-g64-asym",
    "int4-asym",
    "int4-channel",
    "int4-channel-asym",
    "int8",
    "int8-channel-asym",
    "int8-g128",
    "w8a8",
    "int8-tensor",
]


def scheme_of(name: str, optimize: bool = True):
    if name.endswith("-channel-asym"):
        return get_scheme(name[: -len("-channel-asym")], per_channel=True, asymmetric=True, optimize=optimize)
    return get_scheme(name, optimize=optimize)


def llama_like(rows: int, cols: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Gaussian rows with log-normal gains and a few 10-30x outlier columns (torch RNG, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    w *= torch.exp(0.3 * torch.randn(rows, 1, generator=g))
    k = max(1, cols // 100)
    idx = torch.randperm(cols, generator=g)[:k]
    w[:, idx] *= 10 + 20 * torch.rand(k, generator=g)
    return w.to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(as_bytes(a[k]).equal(as_bytes(b[k])) for k in a)


@contextlib.contextmanager
def sub_block(elements: int):
    """Force the search to split a block into sub-blocks of ``elements`` (more edges to test)."""
    old = opt.SUB_BLOCK_ELEMENTS
    opt.SUB_BLOCK_ELEMENTS = elements
    try:
        yield
    finally:
        opt.SUB_BLOCK_ELEMENTS = old


def group_errors(w: torch.Tensor, dq: torch.Tensor, g: int) -> torch.Tensor:
    """Σ |w|·err² per group (float64): the objective --optimize minimises."""
    rows = w.shape[0]
    wd = w.double()
    return (wd.abs() * (wd - dq.double()).pow(2)).reshape(rows, -1, g).sum(-1)


# ---- format -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPT_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_outputs_have_the_rtn_specs(name, dtype):
    w = llama_like(24, 256, seed=3, dtype=dtype)
    k_opt, k_rtn = get_kernel(scheme_of(name)), get_kernel(scheme_of(name, optimize=False))
    a, b = k_opt.quantize_tensor(w), k_rtn.quantize_tensor(w)
    got = [(s, v.dtype, tuple(v.shape)) for s, v in a.items()]
    assert got == [(s, v.dtype, tuple(v.shape)) for s, v in b.items()]
    specs = k_opt.out_specs(tuple(w.shape), dtype)
    assert [(s.suffix, s.dtype, s.shape) for s in specs] == got
    if "_shape" in a:
        assert a["_shape"].tolist() == [24, 256]
    # the scale is stored in the weight's dtype, and positive
    assert a["_scale"].dtype == dtype
    assert bool((a["_scale"].float() > 0).all())


def test_per_tensor_falls_back_to_round_to_nearest_bytes():
    w = llama_like(40, 256, seed=1)
    for name in ("int8-tensor", "int4-tensor"):
        a = get_kernel(get_scheme(name, optimize=True)).quantize_tensor(w)
        b = get_kernel(get_scheme(name)).quantize_tensor(w)
        assert same_bytes(a, b), name


def test_asymmetric_codes_and_zero_points_are_in_range():
    w = llama_like(32, 256, seed=5) + 0.05  # shifted: zero points away from the middle
    k = get_kernel(get_scheme("int4", group_size=64, asymmetric=True, optimize=True))
    parts = k.quantize_tensor(w)
    zp = unpack_dim0(parts["_zero_point"], 4, 32)
    q = unpack_rows(parts["_packed"], 4, 256)
    assert int(zp.min()) >= -8 and int(zp.max()) <= 7
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    # the dequantized values are (q - zp) * scale with the stored scale
    dq = k.dequantize(parts, (32, 256), torch.float32)
    ref = (q.float().view(32, 4, 64) - zp.float().view(32, 4, 1)) * parts["_scale"].float().view(32, 4, 1)
    assert torch.equal(dq, ref.view(32, 256))


# ---- determinism and the block contract -----------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(OPT_SCHEMES),
    rows=st.integers(1, 50),
    cols=st.sampled_from([128, 256, 384]),
    block=st.sampled_from([8, 16, 24, 64]),
    sub=st.sampled_from([1 << 9, 1 << 12, 1 << 15]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 1000),
)
def test_chunked_is_byte_identical_to_whole(name, rows, cols, block, sub, dtype, seed):
    scheme = scheme_of(name)
    if scheme.strategy == "channel":
        cols += seed % 7  # odd row lengths: the pairwise sums fold an odd column
    w = llama_like(rows, cols, seed=seed, dtype=dtype)
    k = get_kernel(scheme)
    block = max(block // k.block_rows_multiple, 1) * k.block_rows_multiple
    with sub_block(sub):
        whole = k.quantize_tensor(w)
        parts = chunked(k, w, block)
    assert list(parts) == list(whole)
    for key in whole:
        assert as_bytes(whole[key]).equal(as_bytes(parts[key])), key


@pytest.mark.parametrize("name", ["int4", "int4-asym", "int8", "int4-channel-asym"])
def test_same_bytes_with_any_thread_count_and_on_every_run(name):
    w = llama_like(256, 4096, seed=11)  # large enough for torch to split elementwise ops across threads
    k = get_kernel(scheme_of(name))
    with torch_threads(1):
        a = k.quantize_tensor(w)
        b = k.quantize_tensor(w)
    with torch_threads(4):
        c = k.quantize_tensor(w)
    with torch_threads(3), sub_block(1 << 13):
        d = chunked(k, w, 64)
    assert same_bytes(a, b) and same_bytes(a, c) and same_bytes(a, d)


def test_group_sums_is_column_independent():
    t = torch.randn(128, 300, generator=torch.Generator().manual_seed(0))
    full = opt.group_sums(t.clone())
    part = opt.group_sums(t[:, 17:40].clone())
    assert torch.equal(full[17:40], part)  # bit-identical, whatever the number of columns
    assert torch.allclose(full, t.double().sum(0).float(), rtol=1e-5, atol=1e-5)
    odd = torch.arange(1.0, 8.0).unsqueeze(1)  # 7 rows: the odd row is folded in first
    assert opt.group_sums(odd).item() == 28.0


def test_stream_with_optimize_equals_in_memory(tmp_path):
    sd = tiny_llama_sd()
    src = write_sharded(tmp_path / "in", sd, shards=2)
    opts = {"max_shard_size": "400KB", "block_bytes": 20000, "jobs": 2}
    report = monoquant.stream(src, tmp_path / "out", "int4-g64-asym", optimize=True, **opts)
    assert report.complete
    index = check_output(tmp_path / "out", sd, "int4-g64-asym", optimize=True)
    assert index["metadata"]["monoquant"]["scheme"] == "int4-g64-asym-opt"


# ---- error ------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from([n for n in OPT_SCHEMES if n != "int8-tensor"]),
    rows=st.integers(9, 24),  # >= 9: packing.unpack_dim0 fails on a single packed zero-point row
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 1000),
    shape=st.sampled_from(["llama", "uniform", "sparse", "shifted"]),
)
def test_no_group_is_ever_worse_than_round_to_nearest(name, rows, dtype, seed, shape):
    g = torch.Generator().manual_seed(seed)
    if shape == "llama":
        w = llama_like(rows, 256, seed=seed, dtype=dtype)
    elif shape == "uniform":
        w = (torch.rand(rows, 256, generator=g) - 0.5).to(dtype)
    elif shape == "sparse":
        w = (torch.randn(rows, 256, generator=g) * (torch.rand(rows, 256, generator=g) < 0.05)).to(dtype)
    else:
        w = (torch.randn(rows, 256, generator=g) * 0.01 + 0.02).to(dtype)
    k_opt, k_rtn = get_kernel(scheme_of(name)), get_kernel(scheme_of(name, optimize=False))
    s_opt, s_rtn = ErrorStats(), ErrorStats()
    dq_opt = k_opt.dequantize(k_opt.quantize_tensor(w, stats=s_opt), tuple(w.shape), torch.float32)
    dq_rtn = k_rtn.dequantize(k_rtn.quantize_tensor(w, stats=s_rtn), tuple(w.shape), torch.float32)
    gs = k_opt.scheme.group_size if k_opt.scheme.strategy == "group" else 256
    e_opt, e_rtn = group_errors(w, dq_opt, gs), group_errors(w, dq_rtn, gs)
    assert bool((e_opt <= e_rtn * (1 + 1e-5) + 1e-30).all())
    assert float(e_opt.sum()) <= float(e_rtn.sum()) * (1 + 1e-5) + 1e-30


@pytest.mark.parametrize("name", ["int4", "int4-asym", "int8-channel-asym", "w8a8"])
def test_stats_match_a_float64_reference(name):
    w = llama_like(40, 384, seed=7)
    k = get_kernel(scheme_of(name))
    st_ = ErrorStats()
    with sub_block(1 << 11):
        parts = k.quantize_tensor(w, stats=st_)
    dq = k.dequantize(parts, (40, 384), torch.float64)
    err = dq - w.double()
    assert st_.numel == w.numel()
    assert st_.sum_sq == pytest.approx(float(w.double().pow(2).sum()), rel=1e-5)
    assert st_.err_sq == pytest.approx(float(err.pow(2).sum()), rel=1e-4)
    assert st_.max_abs_err == pytest.approx(float(err.abs().max()), rel=1e-5)


@pytest.mark.parametrize(("name", "bits"), [("int4-g64-asym", 4), ("int8-channel-asym", 8)])
def test_groups_that_rtn_represents_exactly_keep_the_rtn_bytes(name, bits):
    # every group spans the full code range on a power-of-two grid: RTN's error is zero, no
    # candidate can be strictly better, so the output is RTN's, byte for byte
    g = torch.Generator().manual_seed(0)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (16, 256), generator=g)
    q[:, ::64] = lo
    q[:, 1::64] = hi
    w = (q.float() * 2.0**-6).to(torch.bfloat16)
    a = get_kernel(scheme_of(name)).quantize_tensor(w)
    b = get_kernel(scheme_of(name, optimize=False)).quantize_tensor(w)
    assert same_bytes(a, b)
    assert torch.equal(get_kernel(scheme_of(name)).dequantize(a, (16, 256)), w)


def test_zero_and_constant_groups():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w[2] = 0
    w[5, :128] = 0.25
    for name in ("int4", "int4-asym", "int8"):
        k_opt, k_rtn = get_kernel(get_scheme(name, optimize=True)), get_kernel(get_scheme(name))
        a, b = k_opt.quantize_tensor(w), k_rtn.quantize_tensor(w)
        assert torch.equal(a["_scale"][2], b["_scale"][2])  # all-zero groups: RTN's eps scale
        dq = k_opt.dequantize(a, (16, 256), torch.float32)
        assert bool((dq[2] == 0).all())
        assert bool(((dq[5, :128] - 0.25).abs() <= 0.25 / 7).all())


def test_nonfinite_values_are_an_error():
    w = torch.randn(8, 128)
    w[3, 5] = math.nan
    for name in ("int4", "int4-asym"):
        with pytest.raises(NonFiniteError):
            get_kernel(get_scheme(name, optimize=True)).quantize_block(w, ws=Workspace())
    with pytest.raises(monoquant.TensorValueError, match="NaN"):
        monoquant.quantize({"l.weight": w}, "int4", optimize=True)


def weighted_gain_db(w: torch.Tensor, rtn: torch.Tensor, opt: torch.Tensor) -> float:
    """How much smaller --optimize's objective Σ|w|·err² is than round-to-nearest's, in dB."""
    cols = w.shape[-1]
    return 10 * math.log10(float(group_errors(w, rtn, cols).sum()) / float(group_errors(w, opt, cols).sum()))


def test_clear_gain_on_outlier_weights():
    ws = {f"l{i}.weight": llama_like(256, 1024, seed=100 + i) for i in range(4)}
    # measured: objective gains of at least 3.2 / 0.93 / 0.91 dB; plain SQNR gains of at least
    # 0.22 / 0.069 / 0.094 dB (the objective weights the large weights, which SQNR does not)
    for opts, gain, sqnr_gain in (
        ({}, 3.0, 0.15),
        ({"asymmetric": True}, 0.8, 0.05),
        ({"per_channel": True}, 0.8, 0.07),
    ):
        rtn = monoquant.quantize(ws, "int4", stats=True, **opts)
        got = monoquant.quantize(ws, "int4", stats=True, optimize=True, **opts)
        a, b = monoquant.dequantize(rtn, torch.float32), monoquant.dequantize(got, torch.float32)
        d = [weighted_gain_db(w, a[n], b[n]) for n, w in ws.items()]
        assert min(d) > gain, (opts, d)
        d = [got.stats[n].sqnr_db - rtn.stats[n].sqnr_db for n in ws]
        assert min(d) > sqnr_gain, (opts, d)


def test_det_weight_is_not_made_worse():
    # a smooth trig pattern (tests.helpers) with outlier columns, in every storage dtype
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = det_weight(64, 512, dtype, outliers=True)
        for name in ("int4", "int4-asym", "int8"):
            a = monoquant.dequantize(monoquant.quantize({"l.weight": w}, name), torch.float32)
            b = monoquant.dequantize(monoquant.quantize({"l.weight": w}, name, optimize=True), torch.float32)
            assert weighted_gain_db(w, a["l.weight"], b["l.weight"]) >= -1e-6, (dtype, name)


# ---- real weights -------------------------------------------------------------------------------
def mean_sqnr(sd, scheme, **opts) -> float:
    q = monoquant.quantize(sd, scheme, **opts)
    assert len(q.schemes) == 37
    dense = monoquant.dequantize(q)
    values = [sqnr(sd[n], dense[n]) for n in q.schemes]
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def minilm_sd(minilm):
    return load_file(minilm / "model.safetensors")


def test_minilm_symmetric_gain(minilm_sd):
    rtn = mean_sqnr(minilm_sd, "int4", group_size=128)
    got = mean_sqnr(minilm_sd, "int4", group_size=128, optimize=True)
    assert rtn == pytest.approx(18.43, abs=0.01)
    assert got >= rtn + 0.4  # measured 18.91 (+0.48 dB); the model-level gain is in docs/fidelity.md


def test_minilm_asymmetric_gain(minilm_sd):
    rtn = mean_sqnr(minilm_sd, "int4", group_size=128, asymmetric=True)
    got = mean_sqnr(minilm_sd, "int4", group_size=128, asymmetric=True, optimize=True)
    assert rtn == pytest.approx(19.45, abs=0.01)
    assert got >= rtn + 0.25  # measured 19.74 (+0.29 dB; the hqq package, float zero points: 19.77)


# ---- compressed-tensors reads it back ----------------------------------------------------------------
@pytest.mark.clients
@pytest.mark.parametrize("name", ["int4", "int4-g64-asym", "int8", "int8-channel-asym", "w8a8"])
def test_compressed_tensors_decompresses_identically(minilm_sd, name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = scheme_of(name)
    sd = {k: v.to(torch.bfloat16) for k, v in minilm_sd.items() if k.startswith("encoder.layer.0.")}
    q = monoquant.quantize(sd, scheme)
    ours = monoquant.dequantize(q)
    assert len(q.schemes) == 6
    qs = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**scheme.ct_weights_args()),
        input_activations=QuantizationArgs(**scheme.ct_input_args()) if scheme.dynamic else None,
        format=scheme.format,
    )
    comp = BaseCompressor.get_value_from_registry(scheme.format)
    root = "weight_packed" if scheme.packed else "weight"
    assert comp.compression_param_names(qs)[0] == root
    for name_ in q.schemes:
        base = name_[: -len("weight")]
        local = {k[len(base) :]: v for k, v in q.items() if k.startswith(base + "weight")}
        dense = comp.decompress(local, qs)["weight"]
        assert dense.dtype == ours[name_].dtype == torch.bfloat16
        assert torch.equal(dense, ours[name_]), name_
