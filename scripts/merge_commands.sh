#!/usr/bin/env bash
# Edit the paths, norms, output and mode below, then run this script.
# Each model's L2 norm is the "global_l2" of its task vector, as ta-analyze
# reports it; the order of NORMS follows the order of MODELS.
set -euo pipefail

BASE="meta-llama/Llama-3.2-3B-Instruct"

MODELS=(
  "models/Llama-3.2-3B_MATH_lisa"
  "models/llama-3.2-Korean-Bllossom-3B"
  "models/Llama-3.2-3B-Instruct-tuned"
  "models/EZO-Llama-3.2-3B-Instruct-dpoE"
  "models/Home-Llama-3.2-3B"
)

NORMS=(
  182.63449804
  31.87331430
  0.00000000
  0.52867741
  9.26351817
)

OUTPUT="merged/Llama-3.2-3B-ta-merge"
MODE="exp"          # linear | power | exp
DEVICE="auto"       # auto | cpu | cuda | cuda:N

if [ "${#MODELS[@]}" -ne "${#NORMS[@]}" ]; then
  echo "error: ${#MODELS[@]} models but ${#NORMS[@]} norms in $0" >&2
  exit 1
fi

TA_MERGE=${TA_MERGE:-ta-merge}
"$TA_MERGE" \
  --base-model-path "$BASE" \
  --other-model-paths "${MODELS[@]}" \
  --l2-norms "${NORMS[@]}" \
  --output-path "$OUTPUT" \
  --mode "$MODE" \
  --device "$DEVICE" "$@"
