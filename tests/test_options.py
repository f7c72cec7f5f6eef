"""Options are resolved once, into values: a Scheme and frozen option values; the plan is not
changed after it is fingerprinted; the report carries the schemes the output holds."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import monoquant
from monoquant.cli import main
from monoquant.errors import OptionError, OutputError, SchemeError
from monoquant.options import JobOptions, PlanOptions, job_options, resolve
from monoquant.plan import fingerprint
from monoquant.reader import open_checkpoint


def _ckpt(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {
        f"model.layers.{i}.mlp.down_proj.weight": torch.randn(128, 256, generator=g).to(torch.bfloat16)
        for i in range(2)
    }
    sd["model.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    d = tmp_path / "in"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    return d


def test_resolved_options_are_frozen_values() -> None:
    scheme, opts = resolve("int4", {"group_size": 64}, max_shard_size="1MB", include="*.norm.*")
    assert scheme.name == "int4-g64" and opts.max_shard_size == 1_000_000
    assert opts.rules.include == ("*.norm.*",) and not opts.mixed
    job = job_options(worker=(1, 2), stats="off", overlap=False)
    assert (job.worker, job.stats_every, job.overlap) == ((1, 2), 0, False)
    for value, field in ((opts, "clamp_fp16"), (job, "jobs")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, 2)
    assert isinstance(opts, PlanOptions) and isinstance(job, JobOptions)


def test_bad_options_are_reported_before_any_file_is_opened(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(OutputError, match="stats="):
        monoquant.stream(missing, tmp_path / "out", "int8", stats="often")
    with pytest.raises(OptionError, match=r"max shard size|cannot read size"):
        monoquant.stream(missing, tmp_path / "out", "int8", max_shard_size="lots")
    with pytest.raises(SchemeError, match="unknown scheme"):
        monoquant.plan(missing, "int3")
    with pytest.raises(SchemeError, match="needs an int scheme"):
        monoquant.plan(missing, "fp16", target_bpw=4.5)
    assert not (tmp_path / "out").exists()


def test_the_plan_is_not_changed_after_its_fingerprint(tmp_path: Path) -> None:
    """Mixed precision: the target is fingerprinted, the chooser's summary rides beside it; the
    fingerprint recomputed from the finished plan is the one it carries."""
    src = _ckpt(tmp_path)
    p = monoquant.plan(src, "int4", target_bpw=6.0)
    assert p.extra == {"mixed": {"target_bpw": 6.0, "candidates": p.mixed_summary["options"]["candidates"]}}
    assert p.totals()["mixed"] is p.mixed_summary and "mixed_summary" not in p.extra
    again = fingerprint(
        open_checkpoint(src), p.scheme, p.rules, p.max_shard_size, p.clamp_fp16, p.tensors, p.extra
    )
    assert again == p.fingerprint


def test_a_mixed_run_reports_the_notes_of_every_scheme_it_holds(tmp_path: Path) -> None:
    """Asked for nvfp4 with an SQNR floor that only fp8-block reaches: the output holds only
    fp8-block, and its vLLM note is printed (the notes of the requested scheme alone are none)."""
    src = _ckpt(tmp_path)
    r = monoquant.stream(src, tmp_path / "lib", "nvfp4a16", min_sqnr=25)
    assert r.scheme == "nvfp4a16" and list(r.schemes) == ["fp8-block"]
    assert not monoquant.get_scheme("nvfp4a16").compat_notes()
    assert r.compat_notes() == r.schemes["fp8-block"].compat_notes() != []
    res = CliRunner().invoke(main, ["stream", str(src), str(tmp_path / "cli"), "--nvfp4", "--min-sqnr", "25"])
    assert res.exit_code == 0, res.output
    assert "note: fp8-block: vLLM needs the output size of each fused partition" in res.output
    assert (tmp_path / "cli" / "model-00001-of-00001.safetensors").read_bytes() == (
        tmp_path / "lib" / "model-00001-of-00001.safetensors"
    ).read_bytes()


def test_a_cast_run_still_reports_its_scheme(tmp_path: Path) -> None:
    r = monoquant.stream(_ckpt(tmp_path), tmp_path / "out", "fp16")
    assert list(r.schemes) == ["fp16"] and r.compat_notes() == []


@pytest.mark.parametrize(
    "module",
    [
        "monoquant.options",
        "monoquant.outnames",
        "monoquant.outreader",
        "monoquant.convert",
        "monoquant.report",
        "monoquant.layout",
        "monoquant.containment",
        "monoquant.ownership",
    ],
)
def test_module_examples_run(module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples in the docstrings of the modules of this layer run as written."""
    monkeypatch.chdir(tmp_path)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted > 0, res
