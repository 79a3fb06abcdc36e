#!/usr/bin/env bash
# Runs the toolkit end to end on a generated model family (nothing is
# downloaded): a tiny Llama-shaped base and five fine-tunes, then the merge.
# Usage: scripts/demo.sh [WORKDIR]   (default: ./demo)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-demo}
cargo build --release --quiet --bins --examples
bin=target/release

rm -rf "$work"
"$bin/examples/make-family" "$work/family" --size tiny --models 5 >/dev/null
fam=$work/family
models=("$fam/math-tune" "$fam/korean-tune" "$fam/instruct-copy" "$fam/dpo-tune" "$fam/home-tune")

# The original tool's command, binary name swapped; the norms are the seed
# example's, so the printed λ table matches the original's.
"$bin/ta-merge" --base_model_path "$fam/base" \
    --other_model_paths "${models[@]}" \
    --l2_norms 182.63449804 31.87331430 0.00000000 0.52867741 9.26351817 \
    --output_path "$work/merged" --mode exp --device cpu

echo
ls -l "$work/merged"
