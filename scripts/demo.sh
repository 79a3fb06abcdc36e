#!/usr/bin/env bash
# Runs the toolkit end to end on a generated model family (nothing is
# downloaded): a tiny Llama-shaped base, five fine-tunes and a LoRA adapter
# (chat-lora, a PEFT adapter folder), analysed with ta-analyze, then merged
# with ta-merge using the analysis' norms.
# Usage: scripts/demo.sh [WORKDIR]   (default: ./demo)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-demo}
cargo build --release --quiet --bins --examples
bin=target/release

rm -rf "$work"
"$bin/examples/make-family" "$work/family" --size tiny --models 5 >/dev/null
fam=$work/family
models=("$fam/math-tune" "$fam/korean-tune" "$fam/instruct-copy" "$fam/dpo-tune" "$fam/home-tune" "$fam/chat-lora")

echo "== ta-analyze: task-vector statistics of each fine-tune (chat-lora is a LoRA adapter)"
"$bin/ta-analyze" --base "$fam/base" --models "${models[@]}" --outdir "$work/tv_stats"

echo
echo "== ta-merge: weights from the analysis' global L2 norms (exp mode)"
"$bin/ta-merge" --base-model-path "$fam/base" --other-model-paths "${models[@]}" \
    --from-analysis "$work/tv_stats" --output-path "$work/merged" --mode exp --device cpu

echo
echo "== outputs"
ls "$work/tv_stats" "$work/tv_stats/math-tune" "$work/merged"
echo
echo "== the adapter in merge_record.json"
grep -A 40 '"name": "chat-lora"' "$work/merged/merge_record.json" | grep -E '^ {6,}"(name|rank|alpha|lora_tensors)"'
