"""The end-of-run error summary is exact by default: its figures and its worst tensors are the ones
``monoquant verify --against`` measures, on the real MiniLM and SmolLM2 checkpoints.

(With the former default, rows sampled every 8th, MiniLM int8's summary named
``encoder.layer.1.output.dense.weight`` (37.7 dB) as the worst tensor while ``verify`` measured
``encoder.layer.0.output.dense.weight`` at 33.5 dB, absent from the summary.)
"""

from __future__ import annotations

import pytest

import monoquant
from monoquant.verify import verify

pytestmark = pytest.mark.slow


def _check(src, dst, scheme):
    report = monoquant.stream(src, dst, scheme)  # default statistics
    assert report.settings["stats"] == "exact"
    v = verify(dst, against=src)
    assert not v.problems
    mine = report.worst(5)
    theirs = v.worst(5)
    assert [n for n, _ in mine] == [n for n, _ in theirs]
    for (_, a), (_, b) in zip(mine, theirs, strict=True):
        # run statistics: float32 error terms summed in float64; verify: its own float32 blocks
        assert a.sqnr_db == pytest.approx(b.sqnr_db, abs=0.01)
        assert a.max_abs_err == pytest.approx(b.max_abs_err, rel=1e-3)
    assert set(report.stats) == {n for n, _ in v.worst(10**6)}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_summary_worst_tensors_equal_verify_on_minilm(minilm, tmp_path, scheme):
    _check(minilm, tmp_path / "out", scheme)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_summary_worst_tensors_equal_verify_on_smollm2(smollm2, tmp_path, scheme):
    _check(smollm2, tmp_path / "out", scheme)
