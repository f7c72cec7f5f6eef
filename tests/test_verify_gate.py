"""The verify gate never passes a broken output (issue 15): NaN/Inf or all-zero decodes fail,
sums are exact for huge and tiny values, decoding happens in the stored dtype as the loaders do;
and stream never writes an output that decodes to inf in the first place."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import monoquant
from monoquant.cli import main
from monoquant.exactstats import ExactStats
from monoquant.kernels import decode_cap
from monoquant.plan import INDEX_NAME
from monoquant.verify import verify


def _one(root: Path, sd: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


def _edit(out: Path, name: str, fn) -> None:
    """Rewrite tensor ``name`` of the output in place (same dtype and shape)."""
    shard = out / json.loads((out / INDEX_NAME).read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    new = fn(tensors[name].clone())
    assert new.dtype == tensors[name].dtype and new.shape == tensors[name].shape
    tensors[name] = new
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _gate(out: Path, src: Path, *extra: str):
    return CliRunner().invoke(main, ["verify", str(out), "--against", str(src), "--min-sqnr", "30", *extra])


def _w(rows: int = 64, cols: int = 256, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture()
def fp8_job(tmp_path: Path) -> tuple[Path, Path]:
    src = _one(tmp_path / "in", {"l.weight": _w(dtype=torch.bfloat16), "l.bias": torch.zeros(64)})
    out = tmp_path / "out"
    monoquant.stream(src, out, "fp8")
    assert _gate(out, src).exit_code == 0
    return src, out


def test_nan_scales_fail_the_gate(fp8_job: tuple[Path, Path]) -> None:
    src, out = fp8_job
    _edit(out, "l.weight_scale", lambda t: torch.full_like(t, float("nan")))
    r = verify(out, against=src, min_sqnr=30)
    assert not r.ok
    assert any("l.weight_scale" in p and "NaN" in p for p in r.problems), r.problems
    assert r.failed["l.weight"].startswith("16384 value(s) decode to NaN/Inf")
    res = _gate(out, src)
    assert res.exit_code == 1 and "FAILED  l.weight" in res.output, res.output


def test_nan_codes_fail_the_gate_with_exit_3(fp8_job: tuple[Path, Path]) -> None:
    """One NaN code (fp8 0x7f) among 16384: the structure is fine, the gate must still fail."""
    src, out = fp8_job

    def poison(t: torch.Tensor) -> torch.Tensor:
        u = t.view(torch.uint8)
        u[3, 7] = 0x7F
        return t

    _edit(out, "l.weight", poison)
    r = verify(out, against=src, min_sqnr=30)
    assert not r.problems and r.failed == {"l.weight": "1 value(s) decode to NaN/Inf"}
    assert "l.weight" in r.below and r.stats["l.weight"].sqnr_db == -math.inf
    res = _gate(out, src, "--json")
    assert res.exit_code == 3, res.output
    js = json.loads(res.stdout)
    assert js["ok"] is False and js["failed"] == {"l.weight": "1 value(s) decode to NaN/Inf"}
    # even without a threshold: a NaN decode is never "fine"
    assert CliRunner().invoke(main, ["verify", str(out), "--against", str(src)]).exit_code == 3


def test_all_zero_decode_fails(fp8_job: tuple[Path, Path]) -> None:
    src, out = fp8_job
    _edit(out, "l.weight", torch.zeros_like)
    r = verify(out, against=src)
    assert r.failed == {"l.weight": "decodes to all zeros but the input is not zero"}
    res = CliRunner().invoke(main, ["verify", str(out), "--against", str(src)])
    assert res.exit_code == 3 and "FAILED  l.weight" in res.output


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_sums_neither_overflow_nor_underflow(tmp_path: Path, magnitude: float) -> None:
    """float32 weights of 1e30 (squares overflow float32) or 1e-30 (squares underflow): the
    SQNR is the same as for unit weights, never nan."""
    w = _w()
    ref = _one(tmp_path / "ref", {"l.weight": w})
    big = _one(tmp_path / "big", {"l.weight": w * magnitude})
    monoquant.stream(ref, tmp_path / "o1", "int8")
    monoquant.stream(big, tmp_path / "o2", "int8")
    a = verify(tmp_path / "o1", against=ref).stats["l.weight"].sqnr_db
    b = verify(tmp_path / "o2", against=big).stats["l.weight"].sqnr_db
    assert math.isfinite(b) and b == pytest.approx(a, abs=0.05)
    assert _gate(tmp_path / "o2", big).exit_code == 0


def test_exact_stats_scaled_sums_match_float64() -> None:
    x = _w(8, 100, torch.float64)
    dq = x + 1e-3 * _w(8, 100, torch.float64, seed=1)
    st = ExactStats()
    for a in range(0, 8, 3):
        st.add(x[a : a + 3] * 1e200, dq[a : a + 3] * 1e200)
    want = 10 * math.log10(float((x * x).sum()) / float(((dq - x) ** 2).sum()))
    assert st.sqnr_db == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize(
    ("scheme", "opts"),
    [
        ("fp8", {}),
        ("fp8", {"per_tensor": True}),
        ("int4", {"optimize": True}),
        ("int4", {}),
        ("int8", {}),
        ("int8", {"per_tensor": True}),
        ("int8", {"optimize": True}),
        ("fp8-block", {}),
        ("nvfp4a16", {}),
    ],
)
def test_fp16_weight_at_the_fp16_max_decodes_finite(tmp_path: Path, scheme: str, opts: dict) -> None:
    """An fp16 weight at ±65504: the scale is capped so that code * scale stays finite in fp16
    (where loaders decode); verify decodes in fp16 too and agrees."""
    w = _w(32, 256, torch.float16)
    w[0, 0], w[1, 5], w[2, 9] = 65504.0, -65504.0, 60000.0
    src = _one(tmp_path / "in", {"l.weight": w})
    out = tmp_path / "out"
    monoquant.stream(src, out, scheme, **opts)
    dense = monoquant.load(out, dtype=torch.float16)["l.weight"]
    assert dense.dtype == torch.float16 and bool(torch.isfinite(dense).all())
    r = verify(out, against=src)
    assert r.ok and not r.failed, (r.problems, r.failed)
    assert r.stats["l.weight"].sqnr_db > 5


def test_verify_sees_what_the_loader_sees(tmp_path: Path) -> None:
    """An fp16 fp8 output whose scale (rounded up, uncapped) makes 448 * scale overflow fp16:
    loaders decode inf, so verify must fail it (it used to report 31.7 dB)."""
    w = _w(4, 64, torch.float16)
    w[0, 0] = 65504.0
    src = _one(tmp_path / "in", {"l.weight": w})
    out = tmp_path / "out"
    monoquant.stream(src, out, "fp8")
    uncapped = torch.nextafter(decode_cap(torch.float16, 448), torch.tensor(math.inf, dtype=torch.float16))
    _edit(out, "l.weight_scale", lambda t: torch.where(t == t.max(), uncapped, t))
    assert not bool(torch.isfinite(monoquant.load(out)["l.weight"]).all())
    r = verify(out, against=src, min_sqnr=30)
    assert "l.weight" in r.failed and not r.ok
    assert _gate(out, src).exit_code == 3


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_asymmetric_overflow_is_refused_with_one_line(tmp_path: Path, scheme: str) -> None:
    """Asymmetric codes cannot be capped without large clipping: a group whose (code - zp) *
    scale exceeds fp16 (found by search: 65504 and -65393) is refused, naming the tensor."""
    w = torch.zeros(4, 128, dtype=torch.float16)
    w[0, 0], w[0, 1] = 65504.0, -65393.0
    with pytest.raises(
        monoquant.TensorValueError, match=r"'l\.weight' cannot be stored safely.*beyond float16"
    ):
        monoquant.quantize({"l.weight": w}, scheme, asymmetric=True, group_size=128)
    src = _one(tmp_path / "in", {"l.weight": w})
    with pytest.raises(monoquant.TensorValueError, match=r"model\.safetensors: tensor 'l\.weight'"):
        monoquant.stream(src, tmp_path / "out", scheme, asymmetric=True, group_size=128)
    assert not list((tmp_path / "out").glob("*.partial")) and not (tmp_path / "out" / INDEX_NAME).exists()


def test_bf16_cast_overflow_is_refused(tmp_path: Path) -> None:
    w = torch.full((4, 4), 3.4e38)
    with pytest.raises(monoquant.TensorValueError, match="rounds to inf in bfloat16"):
        monoquant.quantize({"l.weight": w}, "bf16")


@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
def test_zero_element_tensor_casts(tmp_path: Path, scheme: str) -> None:
    out = monoquant.quantize({"e.weight": torch.empty(0, 8), "l.weight": _w(4, 8)}, scheme)
    assert out["e.weight"].shape == (0, 8) and out["e.weight"].dtype == getattr(
        torch, {"fp16": "float16"}.get(scheme, "bfloat16")
    )
    src = _one(tmp_path / "in", {"e.weight": torch.empty(0, 8), "l.weight": _w(4, 8)})
    rep = monoquant.stream(src, tmp_path / "out", scheme)
    assert rep.complete and verify(tmp_path / "out", against=src).ok


def test_a_tensor_added_to_the_output_is_a_problem(fp8_job: tuple[Path, Path]) -> None:
    src, out = fp8_job
    _edit(out, "l.bias", lambda t: t)  # rewrite the shard with one more tensor, index updated
    shard = out / json.loads((out / INDEX_NAME).read_text())["weight_map"]["l.bias"]
    tensors = load_file(str(shard))
    tensors["evil.bias"] = torch.ones(3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((out / INDEX_NAME).read_text())
    index["weight_map"]["evil.bias"] = shard.name
    index["metadata"]["total_size"] += 12
    (out / INDEX_NAME).write_text(json.dumps(index))
    r = verify(out, against=src)
    assert r.problems == ["evil.bias: in the output but not in the input"], r.problems
    assert _gate(out, src).exit_code == 1


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan")])
def test_bad_nvfp4_global_scale_fails_verify(tmp_path: Path, value: float) -> None:
    """A negative global scale decodes every value with its sign flipped (-79 dB, and verify
    without --min-sqnr used to pass it); zero and NaN too: a structure problem, even without --against."""
    src = _one(tmp_path / "in", {"l.weight": _w(64, 256, torch.bfloat16)})
    out = tmp_path / "out"
    monoquant.stream(src, out, "nvfp4a16")
    assert verify(out, against=src).ok
    _edit(out, "l.weight_global_scale", lambda t: torch.full_like(t, value))
    r = verify(out)
    assert not r.ok and any("l.weight_global_scale" in p for p in r.problems), r.problems
    res = CliRunner().invoke(main, ["verify", str(out), "--against", str(src)])
    assert res.exit_code != 0 and "l.weight_global_scale" in res.output and "Traceback" not in res.output
