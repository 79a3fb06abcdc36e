#!/usr/bin/env bash
# Speed and memory of the tools on a benchmark family (a base and five
# fine-tunes of about 160M parameters each, bf16, two shards each),
# against floors measured in the same run:
#   read floor   cat of every input file to /dev/null (warm page cache)
#   write floor  dd of the output's size to a file, fsynced (as ta-merge does)
# Reports the median of RUNS runs (default 5) and the ratios to the floors.
# Each run also merges one full fine-tune alone and the family's rank-64
# LoRA adapter (chat-lora: every attention and MLP matrix) alone, and
# reports the adapter's merge time as a ratio to the full fine-tune's.
# With --method and further ta-merge flags after RUNS, each run also merges
# with those flags, reported beside the Task Arithmetic merge and as a ratio
# to it, e.g.  scripts/bench.sh 3 --method ties --density 0.2
# Usage: scripts/bench.sh [RUNS] [--method NAME [ta-merge flags...]]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
shift || true
method_args=("$@")
data=bench-data
fam=$data/family
scratch=$data/scratch

command -v /usr/bin/time >/dev/null || { echo "bench.sh needs GNU time (apt-get install time)" >&2; exit 1; }
cargo build --release --quiet --bins --examples
bin=target/release
[ -f "$fam/home-tune/model.safetensors.index.json" ] && [ -f "$fam/chat-lora/adapter_config.json" ] ||
  "$bin/examples/make-family" "$fam" --size bench --models 5 --adapter-rank 64 >/dev/null
models=("$fam/math-tune" "$fam/korean-tune" "$fam/instruct-copy" "$fam/dpo-tune" "$fam/home-tune")
inputs=$(find "$fam/base" "${models[@]}" -name '*.safetensors')
out_bytes=$(du -cb "$fam"/base/*.safetensors | tail -1 | cut -f1)
rm -rf "$scratch"; mkdir -p "$scratch"

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.4f", b - a }'; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }

# Warm the page cache once.
cat $inputs > /dev/null

read_t=(); write_t=(); merge_t=(); merge_rss=(); an_t=(); an_rss=(); method_t=(); method_rss=()
one_t=(); one_rss=(); lora_t=(); lora_rss=()
for _ in $(seq "$runs"); do
  t=$(now); cat $inputs > /dev/null; read_t+=("$(elapsed "$t")")
  t=$(now); dd if=/dev/zero of="$scratch/floor" bs=1M count=$((out_bytes / 1048576)) conv=fsync status=none
  write_t+=("$(elapsed "$t")"); rm -f "$scratch/floor"
  rm -rf "$scratch/merged"
  /usr/bin/time -f '%e %M' -o "$scratch/time" "$bin/ta-merge" --quiet \
      --base_model_path "$fam/base" --other_model_paths "${models[@]}" \
      --l2_norms 182.63449804 31.87331430 0.00000000 0.52867741 9.26351817 \
      --output_path "$scratch/merged" --mode exp --device cpu > /dev/null
  read -r wall rss < "$scratch/time"
  merge_t+=("$wall"); merge_rss+=("$rss")
  if [ ${#method_args[@]} -gt 0 ]; then
    rm -rf "$scratch/method"
    /usr/bin/time -f '%e %M' -o "$scratch/time" "$bin/ta-merge" --quiet \
        --base_model_path "$fam/base" --other_model_paths "${models[@]}" \
        --l2_norms 182.63449804 31.87331430 0.00000000 0.52867741 9.26351817 \
        --output_path "$scratch/method" --mode exp --device cpu "${method_args[@]}" > /dev/null
    read -r wall rss < "$scratch/time"
    method_t+=("$wall"); method_rss+=("$rss")
  fi
  for kind in one lora; do
    rm -rf "$scratch/$kind"
    model=$fam/math-tune; [ "$kind" = lora ] && model=$fam/chat-lora
    /usr/bin/time -f '%e %M' -o "$scratch/time" "$bin/ta-merge" --quiet \
        --base_model_path "$fam/base" --other_model_paths "$model" --lambdas 1 \
        --output_path "$scratch/$kind" --device cpu > /dev/null
    read -r wall rss < "$scratch/time"
    if [ "$kind" = lora ]; then lora_t+=("$wall"); lora_rss+=("$rss"); else one_t+=("$wall"); one_rss+=("$rss"); fi
    rm -rf "$scratch/$kind"
  done
  rm -rf "$scratch/stats"
  /usr/bin/time -f '%e %M' -o "$scratch/time" "$bin/ta-analyze" --quiet \
      --base "$fam/base" --models "${models[@]}" --outdir "$scratch/stats" > /dev/null
  read -r wall rss < "$scratch/time"
  an_t+=("$wall"); an_rss+=("$rss")
done

r=$(printf '%s\n' "${read_t[@]}" | median)
w=$(printf '%s\n' "${write_t[@]}" | median)
m=$(printf '%s\n' "${merge_t[@]}" | median)
mr=$(printf '%s\n' "${merge_rss[@]}" | median)
a=$(printf '%s\n' "${an_t[@]}" | median)
ar=$(printf '%s\n' "${an_rss[@]}" | median)
in_gb=$(du -cb $inputs | tail -1 | cut -f1 | awk '{printf "%.2f", $1/1e9}')
printf 'benchmark family: 6 x 162M parameters, bf16, %s GB of inputs, %d runs, %s cores\n' "$in_gb" "$runs" "$(nproc)"
printf '%-28s %10s %12s\n' "measure" "median s" "peak RSS MB"
printf '%-28s %10.3f %12s\n' "read floor (cat inputs)" "$r" "-"
printf '%-28s %10.3f %12s\n' "write floor (dd + fsync)" "$w" "-"
printf '%-28s %10.3f %12.0f\n' "ta-merge" "$m" "$(calc "$mr / 1024")"
printf '%-28s %10.3f %12.0f\n' "ta-analyze" "$a" "$(calc "$ar / 1024")"
printf 'ta-merge / (read + write floor) = %.2f   (runs: %s)\n' "$(calc "$m / ($r + $w)")" "${merge_t[*]}"
printf 'ta-analyze / read floor         = %.2f   (runs: %s)\n' "$(calc "$a / $r")" "${an_t[*]}"
o=$(printf '%s\n' "${one_t[@]}" | median); or=$(printf '%s\n' "${one_rss[@]}" | median)
l=$(printf '%s\n' "${lora_t[@]}" | median); lr=$(printf '%s\n' "${lora_rss[@]}" | median)
printf '%-28s %10.3f %12.0f\n' "ta-merge, 1 full fine-tune" "$o" "$(calc "$or / 1024")"
printf '%-28s %10.3f %12.0f\n' "ta-merge, rank-64 LoRA" "$l" "$(calc "$lr / 1024")"
printf 'LoRA merge / full fine-tune merge = %.2f   (runs: %s vs %s)\n' "$(calc "$l / $o")" "${lora_t[*]}" "${one_t[*]}"
if [ ${#method_args[@]} -gt 0 ]; then
  mm=$(printf '%s\n' "${method_t[@]}" | median)
  mmr=$(printf '%s\n' "${method_rss[@]}" | median)
  printf 'ta-merge %s: %.3f s median, %.0f MB peak RSS\n' "${method_args[*]}" "$mm" "$(calc "$mmr / 1024")"
  printf '  / task_arithmetic merge = %.2f   (runs: %s)\n' "$(calc "$mm / $m")" "${method_t[*]}"
fi
rm -rf "$scratch"
