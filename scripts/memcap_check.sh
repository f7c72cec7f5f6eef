#!/usr/bin/env bash
# Memory-cap acceptance (DESIGN §8): under a hard 512 MiB cgroup cap, monoquant int8 and int4
# quantize a synthetic 6.1 GB bf16 checkpoint whose embed_tokens and lm_head are 2.2 GB
# (> 2 GiB) each, warm and cold, with the big lm_head copied (default rules) and quantized
# (--include lm_head.weight). One JSON line per run (max_usage, ok) and a summary per group.
#
# Usage (root, cgroup v1): scripts/memcap_check.sh [WORKDIR] [LIMIT]
#   WORKDIR defaults to /tmp/mqbench (the checkpoint is kept there as big6; delete it after),
#   LIMIT to 512M. Needs ~6 GB free for the input plus ~5 GB for one output.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${1:-/tmp/mqbench}"
LIMIT="${2:-512M}"
PY="${PYTHON:-python}"
CKPT="$WORK/big6"
mkdir -p "$WORK"
if [ ! -f "$CKPT/model.safetensors.index.json" ]; then
    rm -rf "$CKPT"
    "$PY" "$HERE/make_checkpoint.py" "$CKPT" --size-gb 6.1 --big-tensor-gb 2.2 --shard-size-gb 1
fi
LOG="$WORK/memcap_check.jsonl"
for cache in "" "--cold"; do
    "$PY" "$HERE/bench.py" --ckpt "$CKPT" --tools mq --schemes int8,int4 --repeats 1 $cache \
        --memcap "$LIMIT" --variant "lmhead=--include lm_head.weight" --workdir "$WORK/work" --log "$LOG"
done
# exit non-zero if any capped run failed
"$PY" - "$LOG" <<'EOF'
import json, sys
bad = [r for r in map(json.loads, open(sys.argv[1])) if r.get("tool") and "memcap" in r and not r.get("ok")]
for r in bad:
    print("FAILED:", r["tool"], r["scheme"], r["variant"], r["cache"], r["memcap"], file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
