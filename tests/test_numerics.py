"""The numerics core: one accumulator and one SQNR agree with an independent float64 computation,
the code encoder agrees with the reference packer, and every example in the docstrings of the
numerics and format modules runs as written."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch

from monoquant.numerics import ErrorStats, Workspace, decode_cap, sqnr_db, stored_scale, tensor_sqnr_db
from monoquant.packing import encode_codes, pack_rows
from tests.helpers import sqnr

MODULES = [
    "monoquant.numerics",
    "monoquant.packing",
    "monoquant.optimize",
    "monoquant.exactstats",
    "monoquant.kernels",
    "monoquant.widerows",
    "monoquant.fusedscales",
    "monoquant.storedformats",
    "monoquant.formats",
    "monoquant.formats.base",
    "monoquant.formats.cast",
    "monoquant.formats.integer",
    "monoquant.formats.fp8",
    "monoquant.formats.fp8_block",
    "monoquant.formats.nvfp4",
    "monoquant.formats.mxfp",
    "monoquant.formats.common",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.failed == 0


def test_one_accumulator_three_ways_same_sums():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 96, generator=g)
    dq = x + 0.01 * torch.randn(64, 96, generator=g)
    whole, blocks, errs = ErrorStats(), ErrorStats(), ErrorStats()
    whole.add(x, dq)
    for a in range(0, 64, 16):
        blocks.add(x[a : a + 16], dq[a : a + 16])
        errs.add_error(x[a : a + 16], x[a : a + 16] - dq[a : a + 16])  # the sign does not matter
    assert blocks.numel == whole.numel == errs.numel == x.numel()
    assert blocks.err_sq == errs.err_sq and blocks.sum_sq == errs.sum_sq
    assert blocks.sqnr_db == pytest.approx(sqnr(x, dq), abs=1e-4)
    assert whole.max_abs_err == float((dq - x).abs().max())
    merged = ErrorStats()
    merged.merge(blocks)
    assert merged.sqnr_db == blocks.sqnr_db


def test_sqnr_edges():
    assert sqnr_db(1.0, 0.0) == math.inf  # exact
    assert sqnr_db(0.0, 1.0) == -math.inf  # all noise
    assert sqnr_db(1000.0, 1.0) == pytest.approx(30.0)
    x = torch.tensor([1.0, -2.0, 3.0])
    assert tensor_sqnr_db(x, x) == math.inf
    assert tensor_sqnr_db(x, x * 1.1) == pytest.approx(20.0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [8, 16, 10, 3])
def test_encode_codes_equals_the_reference_packer(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (5, cols), generator=g)
    got = encode_codes(q.float(), bits, True, Workspace())
    assert torch.equal(got, pack_rows(q, bits))
    i8 = encode_codes(q.float(), bits, False, Workspace())
    assert i8.dtype == torch.int8 and torch.equal(i8.long(), q)


TILED = [
    "int8",
    "int4-g32",
    "int4-g32-asym",
    "int8-tensor",
    "int4-channel",
    "w8a8",
    "fp8",
    "fp8-tensor",
    "fp16",
    "bf16",
]


def _run_blocks(scheme_name, w, stats_rows):
    from monoquant.kernels import absmax, get_kernel
    from monoquant.schemes import get_scheme

    k = get_kernel(get_scheme(scheme_name))
    ts = k.tensor_scale(absmax(w), w.dtype) if k.needs_absmax else None
    st, out = ErrorStats(), []
    ws = Workspace()
    for a in range(0, w.shape[0], 40):  # blocks of 40 rows (a multiple of 8: packed zero points)
        res = k.quantize_block(w[a : a + 40], tensor_scale=ts, ws=ws, stats=st, stats_rows=stats_rows)
        out.append({sfx: t.clone() for sfx, t in res.items()})
    return out, (st.numel, st.sum_sq, st.err_sq, st.max_abs_err, st.overflow, st.underflow)


@pytest.mark.parametrize("name", TILED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tiles_change_neither_bytes_nor_statistics(name, dtype, monkeypatch):
    """The kernels work in cache-sized tiles of rows; any tile size gives the bytes of one tile per
    block, and the same statistics: counts and the largest error exactly, the sums of squares to
    float32 rounding (exact statistics sum each tile's float32 terms, in float64 across tiles)."""
    import monoquant.formats.cast as cast_unit
    import monoquant.formats.fp8 as fp8_unit
    import monoquant.formats.integer as int_unit

    g = torch.Generator().manual_seed(7)
    w = (torch.randn(100, 96, generator=g) * 0.05).to(dtype)
    w[3, 5] = 2.0  # an outlier row
    want = {}
    for tile in (1 << 30, 96, 500, 96 * 7):
        for mod in (cast_unit, fp8_unit):
            monkeypatch.setattr(mod, "TILE_ELEMENTS", tile)
        monkeypatch.setattr(int_unit, "INT_TILE_ELEMENTS", tile)
        for stats_rows in (1, 3, 8):
            got = _run_blocks(name, w, stats_rows)
            if tile == 1 << 30:
                want[stats_rows] = got
                continue
            blocks, st = got
            ref = want[stats_rows][1]
            assert (st[0], st[3], st[4], st[5]) == (ref[0], ref[3], ref[4], ref[5]), (tile, stats_rows)
            assert st[1:3] == pytest.approx(ref[1:3], rel=1e-6), (tile, stats_rows)
            for b, wb in zip(blocks, want[stats_rows][0], strict=True):
                assert b.keys() == wb.keys()
                for sfx in b:
                    assert torch.equal(b[sfx].view(torch.uint8), wb[sfx].view(torch.uint8)), (tile, sfx)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("stats_rows", [1, 3])
def test_cast_counts_values_flushed_to_zero(dtype, stats_rows, monkeypatch):
    """The fp16 cast's statistics count exactly the non-zero inputs that become 0 (zeros of the
    input are not counted), on every measured row, whatever the tiling."""
    import monoquant.formats.cast as cast_unit
    from monoquant.kernels import get_kernel
    from monoquant.schemes import get_scheme

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(60, 64, generator=g) * 0.05).to(dtype)
    w[::2, 0] = 1e-9  # below half of fp16's smallest subnormal: flushed to 0
    w[::5, 1] = 0.0  # a zero stays zero: not an underflow
    w[::7, 2] = -3e-8  # rounds to -2^-24 (not flushed)
    k = get_kernel(get_scheme("fp16"))
    for tile in (1 << 30, 64 * 7):
        monkeypatch.setattr(cast_unit, "TILE_ELEMENTS", tile)
        st = ErrorStats()
        out = k.quantize_block(w, ws=Workspace(), stats=st, stats_rows=stats_rows)[""]
        rows = w[::stats_rows]
        want = int(((rows != 0) & (out[::stats_rows] == 0)).sum())
        assert want == len(range(0, 60, 2 * stats_rows)) if stats_rows == 1 else want > 0
        assert st.underflow == want, tile
        assert st.numel == rows.numel()


@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 0.02])
@pytest.mark.parametrize(
    ("scheme", "opts"), [("int4", {}), ("int8", {}), ("int4", {"optimize": True}), ("fp8", {})]
)
def test_run_statistics_survive_huge_and_tiny_values(magnitude, scheme, opts):
    """The kernels' float32 sums of squares overflow beyond ~1e19 and underflow below ~1e-12; the
    run's figures are then redone in float64 and equal verify's exact ones (before: nan dB for
    huge weights, inf dB, i.e. "exact", for tiny ones)."""
    import monoquant
    from monoquant.exactstats import ExactStats

    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(5)) * magnitude
    q = monoquant.quantize({"l.weight": w}, scheme, stats=True, **opts)
    exact = ExactStats()
    exact.add(w, monoquant.dequantize(q)["l.weight"])
    assert math.isfinite(exact.sqnr_db)
    assert q.stats["l.weight"].sqnr_db == pytest.approx(exact.sqnr_db, abs=0.01)


@pytest.mark.parametrize(
    ("src", "dst"), sorted(__import__("monoquant.formats.cast").formats.cast.EXACT_ABOVE, key=str)
)
def test_casts_are_exact_above_their_gate(src, dst):
    """Every finite 16-bit pattern whose magnitude bits reach the gate casts exactly (the claim the
    gated statistics rest on), checked over all 65536 patterns; and the gate is tight enough to be
    worth having: bf16 -> fp16 changes values just below it."""
    from monoquant.formats.cast import EXACT_ABOVE

    gate = EXACT_ABOVE[(src, dst)]
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(src)
    mag = x.view(torch.int16).to(torch.int32) & 0x7FFF
    xf = x.float()
    keep = torch.isfinite(xf) & (xf.abs() <= torch.finfo(dst).max) & (mag >= gate)
    back = xf[keep].to(dst).float()
    assert torch.equal(back, xf[keep])
    if gate:
        below = torch.isfinite(xf) & (mag < gate)
        assert not torch.equal(xf[below].to(dst).float(), xf[below])


@pytest.mark.parametrize("shape", [(300, 1000), (7, 77), (1, 1 << 12), (2000, 300)])
def test_gated_cast_statistics_equal_measuring_everything(shape, monkeypatch):
    """bf16 -> fp16's exact statistics, measured only in the chunks that hold a value the cast
    changes, equal those of measuring every element: tiny and flushed values at chunk edges and in
    the tail, zeros, whole tiny rows; the bytes do not change."""
    import monoquant.formats.cast as cast_unit
    from monoquant.kernels import get_kernel
    from monoquant.schemes import get_scheme

    g = torch.Generator().manual_seed(11)
    w = torch.randn(*shape, generator=g) * 0.02
    flat = w.view(-1)
    n = flat.numel()
    for i in (0, 255, 256, 511, n - 1, n // 2):
        flat[i % n] = 1e-9  # flushed to 0
    flat[3 % n] = 0.0
    flat[(n - 5) % n] = -3e-6  # rounded, not flushed
    w[-1] = torch.randn(shape[1], generator=g) * 1e-6  # a row of values the cast rounds
    w = w.to(torch.bfloat16)
    k = get_kernel(get_scheme("fp16"))
    got = []
    for table in (cast_unit.EXACT_ABOVE, {}):
        monkeypatch.setattr(cast_unit, "EXACT_ABOVE", table)
        for tile in (1 << 30, 1000):
            monkeypatch.setattr(cast_unit, "TILE_ELEMENTS", tile)
            st = ErrorStats()
            out = k.quantize_block(w, ws=Workspace(), stats=st)[""]
            got.append((out, st))
    ref_out, ref = got[-2]  # every element measured, one tile
    assert ref.underflow > 0 and ref.err_sq > 0
    for out, st in got:
        assert torch.equal(out.view(torch.int16), ref_out.view(torch.int16))
        assert (st.numel, st.max_abs_err, st.underflow, st.overflow) == (
            ref.numel,
            ref.max_abs_err,
            ref.underflow,
            ref.overflow,
        )
        assert (st.sum_sq, st.err_sq) == pytest.approx((ref.sum_sq, ref.err_sq), rel=1e-4)  # float32 sums


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_scale_fixes_zeros_and_caps_as_an_elementwise_rule(dtype: torch.dtype) -> None:
    """stored_scale checks a block's scales with one reduction; the result must be the
    elementwise rule: zeros -> eps, values above the decode cap -> the cap, the rest rounded."""
    mag = 127.0
    cap = float(decode_cap(dtype, mag))
    eps = torch.finfo(dtype).eps
    cases = [
        [0.0, 0.5, 1e-3],
        [0.5, 1e-3],  # no zero
        [-0.0, 0.25],  # a negative zero is a zero
        [0.0, float("nan")],  # a NaN does not hide the zero (nor is it capped)
        [-1.0, 0.0],  # a negative scale (no caller makes one) does not hide it either
        [cap * 4, 0.0, 0.5],
        [],
    ]
    for vals in cases:
        x = torch.tensor(vals, dtype=torch.float32)
        got = stored_scale(x, dtype, mag)
        want = x.to(dtype)
        want = torch.where(want == 0, torch.tensor(eps, dtype=dtype), want)
        want = torch.where(want > cap, torch.tensor(cap, dtype=dtype), want)
        assert got.dtype == dtype
        assert torch.equal(got.isnan(), want.isnan()), vals
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), vals


def test_fp8_to_float_matches_torch_on_every_code():
    """All 256 float8_e4m3fn codes (±0, subnormals, ±448, the two NaN codes) widen to exactly what
    ``Tensor.float()`` gives, sign of zero included, also through a strided view and into ``out``."""
    from monoquant.numerics import fp8_to_float

    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    want, got = q.float().tolist(), fp8_to_float(q).tolist()
    assert sum(math.isnan(v) for v in got) == 2
    for w, g in zip(want, got, strict=True):
        assert (math.isnan(w) and math.isnan(g)) or (w == g and math.copysign(1, w) == math.copysign(1, g))
    view = q.view(16, 16)[1::3, ::2]  # no NaN code in these rows and columns
    out = torch.full(view.shape, -1.0)
    assert fp8_to_float(view, out=out, ws=Workspace()) is out
    assert torch.equal(out, view.float())
    assert fp8_to_float(q[:0]).numel() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_symmetric_tile_scale_is_the_stored_scale_of_the_range(dtype):
    """The kernels' in-place tile scales equal ``stored_scale(max(max, -min) / half)`` of each
    group (zero groups get eps, fp16 groups near 65504 the decode cap), in the stored buffer and
    as float32; NaN or ±Inf anywhere in the tile raise NonFiniteError."""
    from monoquant.numerics import NonFiniteError, symmetric_tile_scale

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 32, generator=g) * 0.02
    x[1] = 0.0  # all-zero groups
    x[2, 0, 3] = 65504.0 if dtype == torch.float16 else 1e4  # fp16: 65504 / 127.5 > the cap
    x[3, 1, :] = -7.0  # a negative extreme
    x = x.to(dtype).float()
    for half, mag in ((127.5, 128.0), (7.5, 8.0), (448.0, 448.0)):
        stored, sc = torch.empty(6, 4, dtype=dtype), torch.empty(6, 4)
        sf = symmetric_tile_scale(x.clone(), half, stored, sc, mag)
        want = stored_scale(torch.maximum(x.amax(-1), -x.amin(-1)) / half, dtype, mag)
        assert torch.equal(stored, want), half
        assert torch.equal(sf.squeeze(-1), want.float())
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[4, 2, 7] = bad
        with pytest.raises(NonFiniteError):
            symmetric_tile_scale(y, 127.5, torch.empty(6, 4, dtype=dtype), torch.empty(6, 4), 128.0)
