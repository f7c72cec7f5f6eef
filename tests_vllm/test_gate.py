"""``monoquant verify OUT --against IN --engine vllm``: the deployability gate with vLLM itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from monoquant.cli import main


def scramble_scales(out: Path, dst: Path) -> Path:
    """Every ``weight_scale`` with its rows reversed: consistent on disk, garbage when run."""
    shutil.copytree(out, dst)
    for shard in dst.glob("*.safetensors"):
        sd = load_file(shard)
        save_file(
            {n: t.flip(0).contiguous() if n.endswith("weight_scale") else t for n, t in sd.items()},
            shard,
            metadata={"format": "pt"},
        )
    return dst


def test_vllm_gate_passes_a_good_output_and_fails_a_misread_one(output, minilm, tmp_path):
    good = output("minilm", "w8a8")
    r = CliRunner().invoke(
        main, ["verify", str(good), "--against", str(minilm), "--engine", "vllm", "--json"]
    )
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout[r.stdout.rindex('{\n "path"') :])  # vLLM itself may log to stdout
    print("gate, vLLM, MiniLM w8a8:", js["engine"])
    assert js["engine"]["task"] == "embedding" and js["engine"]["metrics"]["min_cosine"] > 0.99

    bad = scramble_scales(good, tmp_path / "bad")
    r = CliRunner().invoke(main, ["verify", str(bad), "--against", str(minilm), "--engine", "vllm"])
    print("gate, vLLM, scrambled scales:", r.output)
    assert r.exit_code == 3, r.output
    assert "below threshold: embedding cosine" in r.stderr
