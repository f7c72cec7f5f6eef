"""monoquant verify / inspect: structure checks, error measurement, exit codes."""

import json

import pytest
from click.testing import CliRunner

import monoquant
from monoquant.cli import main
from monoquant.inspection import inspect_checkpoint
from monoquant.verify import verify
from tests.helpers import tiny_llama_sd, write_sharded


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("v")
    src = write_sharded(root / "in", tiny_llama_sd(), shards=2)
    out = root / "out"
    report = monoquant.stream(src, out, "int4", max_shard_size="400KB", stats="exact")
    return src, out, report


def test_verify_measures_the_same_error_as_the_run(job):
    src, out, report = job
    r = verify(out, against=src)
    assert r.ok and r.compared == len(tiny_llama_sd())
    assert set(r.stats) == set(report.stats)
    for name, st in r.stats.items():
        assert st.sqnr_db == pytest.approx(report.stats[name].sqnr_db, abs=0.01)
        # verify decodes in the stored dtype (bf16 here), as loaders do; the run measures the
        # float32 decode: the two differ by bf16 rounding of the decoded values
        assert st.max_abs_err == pytest.approx(report.stats[name].max_abs_err, rel=5e-2)


def test_verify_threshold_is_a_ci_gate(job):
    src, out, report = job
    worst = min(s.sqnr_db for s in report.stats.values())
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(out), "--against", str(src), "--min-sqnr", str(worst - 0.5)])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(
        main, ["verify", str(out), "--against", str(src), "--min-sqnr", str(worst + 0.01), "--json"]
    )
    assert bad.exit_code == 3
    js = json.loads(bad.stdout)
    assert js["below_threshold"] and not js["ok"]
    usage = runner.invoke(main, ["verify", str(out), "--min-sqnr", "20"])
    assert usage.exit_code == 2


def test_verify_finds_structural_damage(job, tmp_path):
    _, out, _ = job
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["quantization_status"] = "frozen"
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    group["targets"] = group["targets"][1:]
    (bad / "config.json").write_text(json.dumps(cfg))
    r = verify(bad)
    assert not r.ok
    text = "\n".join(r.problems)
    assert "quantization_status" in text and "not targeted" in text
    res = CliRunner().invoke(main, ["verify", str(bad)])
    assert res.exit_code == 1


def test_verify_detects_a_changed_copied_tensor(job, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src, out, _ = job
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    fname = index["weight_map"]["model.norm.weight"]
    sd = load_file(str(bad / fname))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 2
    save_file(sd, str(bad / fname), metadata={"format": "pt"})
    r = verify(bad, against=src)
    assert any("model.norm.weight: copied tensor differs" in p for p in r.problems)


def test_verify_of_an_unfinished_job_is_a_clear_error(tmp_path):
    with pytest.raises(monoquant.MonoquantError, match=r"no model\.safetensors\.index\.json"):
        verify(tmp_path)


def test_inspect_input_and_output(job):
    src, out, report = job
    i = inspect_checkpoint(src)
    assert i["totals"]["quantized"] == 0 and i["totals"]["tensors"] == len(tiny_llama_sd())
    o = inspect_checkpoint(out)
    assert o["totals"]["quantized"] == report.plan["quantized"]
    assert o["totals"]["bits_per_weight"] == pytest.approx(report.plan["bits_per_weight"], abs=1e-3)
    q = next(t for t in o["tensors"] if t["name"] == "model.layers.0.mlp.up_proj.weight")
    assert q["scheme"] == "int4-g128" and q["shape"] == [512, 256] and q["format"] == "pack-quantized"
    assert o["quantization_config"]["quant_method"] == "compressed-tensors"
    res = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["totals"] == o["totals"]
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert "int4-g128" in res.stdout and "bits per quantized weight" in res.stdout


def test_verify_finds_a_dense_linear_the_class_target_would_claim(job, tmp_path):
    """With ``targets: ["Linear"]`` every Linear-like module left dense must be in ``ignore``:
    drop lm_head from it and verify reports it (the loaders would expect quantized tensors)."""
    import shutil

    _, out, _ = job
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]
    qc["ignore"] = [t for t in qc["ignore"] if "lm_head" not in t]
    (bad / "config.json").write_text(json.dumps(cfg))
    r = verify(bad)
    assert r.problems == [
        "config.json: dense module 'lm_head' is targeted and not in ignore "
        "(loaders would expect quantized tensors)"
    ]
