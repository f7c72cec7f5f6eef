"""The W8A8 gap of vLLM's CPU build, end to end (docs/loading.md, "Why W8A8 costs more in vLLM").

Writes SmolLM2's W8A8 output, a copy whose int8 weights are requantized to 7 bits ([-63, 63],
scale doubled: no int16 saturation in oneDNN's non-VNNI int8 GEMM), and prints both engines'
perplexity ratio to the bf16 source on the fixed text of tests_vllm/test_run.py.

Run in the vLLM virtualenv with the environment of scripts/vllm_env.sh, e.g.
    MONOQUANT_SMOLLM2=... VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \\
        .venv-vllm/bin/python scripts/w8a8_7bit_check.py /tmp/w8a8-check vllm transformers
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests_vllm"), str(ROOT / "scripts")]

from conftest import OUTPUTS, _stream, smollm2_path  # noqa: E402
from smollm2_checkpoint import fixed_text  # noqa: E402

from monoquant import deploy  # noqa: E402


def to_7_bit(src: Path, dst: Path) -> None:
    """Copy the W8A8 output ``src`` to ``dst`` with every int8 weight halved into [-63, 63]."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        sd = load_file(f)
        for k in [k for k in sd if k.endswith(".weight") and sd[k].dtype == torch.int8]:
            sd[k] = torch.clamp(torch.round(sd[k].float() / 2), -63, 63).to(torch.int8)
            sd[k[: -len("weight")] + "weight_scale"] *= 2
        save_file(sd, f, metadata={"format": "pt"})


def main(work: Path, engines: list[str]) -> None:
    src = smollm2_path()
    w8, w7 = work / "w8a8", work / "w8a8-7bit"
    if not w8.exists():
        _stream(src, w8, OUTPUTS["w8a8"])
    if not w7.exists():
        to_7_bit(w8, w7)
    text = fixed_text()
    ids = deploy.token_ids(src, [text[:4000], text[8000:12000]], 128)
    for engine in engines:
        ref = deploy.causal_scores(src, ids, engine)
        for out in (w8, w7):
            r = deploy.compare_causal(deploy.causal_scores(out, ids, engine), ref)
            print(
                f"{engine:12} {out.name:10} ppl {r['ppl']:.2f} ratio {r['ppl_ratio']:.3f} top-1 "
                f"{r['top1_agreement']:.3f}"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["vllm", "transformers"])
