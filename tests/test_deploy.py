"""The deployability gate, ``monoquant verify OUT --against IN --engine ENGINE``, with the engine the
main test environment has (transformers); tests_vllm/ runs it with vLLM.

A good output passes (exit 0); an output whose tensors are consistent but wrong (scales of every
layer reversed: what a misread looks like) fails with exit 3; an engine that is not installed is
one line and exit 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import monoquant
from monoquant import deploy
from monoquant.cli import main
from monoquant.verify import verify

pytestmark = pytest.mark.clients


def scramble_scales(out: Path, dst: Path) -> Path:
    """A copy of ``out`` whose every ``weight_scale`` has its rows reversed: shapes, dtypes, index
    and config stay consistent (structural checks pass), the model is garbage."""
    shutil.copytree(out, dst)
    for shard in dst.glob("*.safetensors"):
        sd = load_file(shard)
        sd = {n: t.flip(0).contiguous() if n.endswith("weight_scale") else t for n, t in sd.items()}
        save_file(sd, shard, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def minilm_int8(minilm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "minilm-int8"
    assert monoquant.stream(minilm, out, "int8").complete
    return out


def test_gate_passes_a_good_embedding_model(minilm, minilm_int8):
    r = CliRunner().invoke(
        main, ["verify", str(minilm_int8), "--against", str(minilm), "--engine", "transformers", "--json"]
    )
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout)
    assert js["ok"] and js["engine"]["task"] == "embedding"
    assert js["engine"]["metrics"]["min_cosine"] > 0.999  # int8 per channel on MiniLM


def test_gate_fails_a_misread_model_with_exit_3(minilm, minilm_int8, tmp_path):
    bad = scramble_scales(minilm_int8, tmp_path / "bad")
    assert verify(bad).ok  # structurally fine: only running it shows the damage
    r = CliRunner().invoke(main, ["verify", str(bad), "--against", str(minilm), "--engine", "transformers"])
    assert r.exit_code == 3, r.output
    assert "below threshold: embedding cosine" in r.stderr
    # the threshold is the user's: a low enough one lets it through
    cos = deploy.min_cosine(
        deploy.embeddings(bad, deploy.TEXTS, "transformers"),
        deploy.embeddings(minilm, deploy.TEXTS, "transformers"),
    )
    assert cos < 0.9
    ok = CliRunner().invoke(
        main,
        [
            "verify",
            str(bad),
            "--against",
            str(minilm),
            "--engine",
            "transformers",
            "--min-cosine",
            str(cos - 0.01),
        ],
    )
    assert ok.exit_code == 0, ok.output


def test_engine_not_installed_is_one_line_exit_1(minilm, minilm_int8, monkeypatch):
    real = deploy.importlib.util.find_spec
    monkeypatch.setattr(
        deploy.importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a)
    )
    r = CliRunner().invoke(main, ["verify", str(minilm_int8), "--against", str(minilm), "--engine", "vllm"])
    assert r.exit_code == 1
    assert r.stderr.strip().count("\n") == 0 and "engine vllm is not installed" in r.stderr


def test_gate_options_need_their_partners(minilm_int8):
    r = CliRunner().invoke(main, ["verify", str(minilm_int8), "--engine", "transformers"])
    assert r.exit_code == 2 and "--engine needs --against" in r.output
    r = CliRunner().invoke(main, ["verify", str(minilm_int8), "--min-top1", "0.5"])
    assert r.exit_code == 2


@pytest.mark.slow
def test_gate_on_a_real_llm(smollm2, tmp_path):
    """SmolLM2-135M: int8 passes the default thresholds; scrambled scales fail them by far."""
    out = tmp_path / "int8"
    assert monoquant.stream(smollm2, out, "int8").complete
    good = deploy.check_deploy(out, smollm2, engine="transformers")
    assert good.ok and good.task == "causal-lm", good.to_json()
    assert good.metrics["ppl_ratio"] < 1.05 and good.metrics["top1_agreement"] > 0.9
    bad = deploy.check_deploy(scramble_scales(out, tmp_path / "bad"), smollm2, engine="transformers")
    assert not bad.ok and bad.metrics["ppl_ratio"] > 10, bad.to_json()
    assert torch.isfinite(torch.tensor(bad.metrics["ppl"]))
