#!/usr/bin/env bash
# Edit the paths, output and mode below, then run this script. It analyses
# the fine-tunes (ta-analyze) and merges them with weights derived from each
# task vector's global L2 norm (ta-merge --from-analysis): no norms to copy
# by hand. To merge with norms you already have, set NORMS instead.
set -euo pipefail

BASE="meta-llama/Llama-3.2-3B-Instruct"

MODELS=(
  "models/Llama-3.2-3B_MATH_lisa"
  "models/llama-3.2-Korean-Bllossom-3B"
  "models/Llama-3.2-3B-Instruct-tuned"
  "models/EZO-Llama-3.2-3B-Instruct-dpoE"
  "models/Home-Llama-3.2-3B"
)

# Optional: each model's norm, in MODELS order (skips the analysis), e.g.
# NORMS=(182.63449804 31.87331430 0.00000000 0.52867741 9.26351817)
NORMS=()

STATS="tv_stats"
OUTPUT="merged/Llama-3.2-3B-ta-merge"
MODE="exp"          # linear | power | exp
DEVICE="auto"       # auto | cpu | cuda | cuda:N

TA_ANALYZE=${TA_ANALYZE:-ta-analyze}
TA_MERGE=${TA_MERGE:-ta-merge}

if [ "${#NORMS[@]}" -gt 0 ]; then
  if [ "${#MODELS[@]}" -ne "${#NORMS[@]}" ]; then
    echo "error: ${#MODELS[@]} models but ${#NORMS[@]} norms in $0" >&2
    exit 1
  fi
  weights=(--l2-norms "${NORMS[@]}")
else
  "$TA_ANALYZE" --base "$BASE" --models "${MODELS[@]}" --outdir "$STATS" --device "$DEVICE"
  weights=(--from-analysis "$STATS")
fi

"$TA_MERGE" \
  --base-model-path "$BASE" \
  --other-model-paths "${MODELS[@]}" \
  "${weights[@]}" \
  --output-path "$OUTPUT" \
  --mode "$MODE" \
  --device "$DEVICE" "$@"
