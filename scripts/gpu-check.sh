#!/usr/bin/env bash
# The device checks of the CUDA build, for a GPU machine without a Rust
# toolchain. It compares every device path with the CPU path on one
# generated family and times both:
#   1. Task Arithmetic merge, --device cuda and --device auto against
#      --device cpu: shards byte-identical;
#   2. a rank-64 LoRA adapter merged on each device: ΔW is an f64 product on
#      both, summed in another order on the GPU, so elements may differ by
#      one unit in the last place; reports how many do (expect a handful);
#   3. ta-analyze with 5 models and the adapter, and with --spectral, on
#      each device: every number of analysis.json within 1e-9 relative
#      (the spectral sketches within 1e-6);
#   4. that --device auto said which device it took.
# Needs, in $BIN (default gpu-bin/): ta-merge and ta-analyze from
# scripts/build-cuda.sh (stripped they are about 46 MB each: carry them
# xz-compressed to fit the 64 MiB that travels, and unpack first) and
# make-family from a CPU build (`cargo build --release
# --examples`). The CUDA runtime comes from the machine's PyTorch install.
# Writes its log and timings to $OUT (default /tmp) as gpu-check.log.
# Usage: BIN=gpu-bin bash scripts/gpu-check.sh
# (DEVICE=cpu SIZE=tiny runs the script itself on a CPU build.)
set -euo pipefail
bin=${BIN:-gpu-bin}
dev=${DEVICE:-cuda}
out=${OUT:-/tmp}
work=$(mktemp -d)
log=$out/gpu-check.log
: > "$log"
say() { echo "$*" | tee -a "$log"; }
if cu=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null); then
  export LD_LIBRARY_PATH=$cu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"

"$bin/make-family" "$work/fam" --size "${SIZE:-bench}" --models 5 --adapter-rank 64 > /dev/null
fam=$work/fam
models=("$fam/math-tune" "$fam/korean-tune" "$fam/instruct-copy" "$fam/dpo-tune" "$fam/home-tune")
timed() { local t0; t0=$(date +%s.%N); "$@" > "$work/stdout" 2> "$work/stderr"; awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

# 1. Task Arithmetic merge.
for d in cpu "$dev" auto; do
  s=$(timed "$bin/ta-merge" --base-model-path "$fam/base" --other-model-paths "${models[@]}" \
      --lambdas 0.3 0.2 0.2 0.2 0.1 --output-path "$work/ta-$d" --device "$d")
  say "merge --device $d: $s s $(grep -h 'auto' "$work/stderr" || true)"
done
for d in "$dev" auto; do
  for f in "$work/ta-cpu"/*.safetensors; do
    cmp "$f" "$work/ta-$d/$(basename "$f")" || { say "FAIL: merge on $d differs from the CPU's in $(basename "$f")"; exit 1; }
  done
done
say "ok: merges on $dev and auto are byte-identical to the CPU's"

# 2. LoRA adapter merge.
for d in cpu "$dev"; do
  s=$(timed "$bin/ta-merge" --base-model-path "$fam/base" --other-model-paths "$fam/chat-lora" \
      --lambdas 1 --output-path "$work/lora-$d" --device "$d")
  say "LoRA merge --device $d: $s s"
done
python3 - "$work/lora-cpu" "$work/lora-$dev" <<'PY' | tee -a "$log"
import json, struct, sys, glob, os
def tensors(folder):
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        data = open(path, "rb").read()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        for name, t in header.items():
            if name != "__metadata__":
                a, b = t["data_offsets"]
                out[name] = (t["dtype"], data[8 + n + a:8 + n + b])
    return out
cpu, gpu = tensors(sys.argv[1]), tensors(sys.argv[2])
assert cpu.keys() == gpu.keys(), "different tensors"
total = differ = worst = 0
for name, (dtype, a) in cpu.items():
    b = gpu[name][1]
    size = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    fmt = {2: "H", 4: "I"}[size]
    xa = struct.unpack(f"<{len(a) // size}{fmt}", a)
    xb = struct.unpack(f"<{len(b) // size}{fmt}", b)
    for u, v in zip(xa, xb):
        total += 1
        if u != v:
            differ += 1
            worst = max(worst, abs(u - v))  # same sign: units in the last place
if worst > 1:
    print(f"FAIL: LoRA merges differ by up to {worst} units in the last place")
    sys.exit(1)
print(f"ok: LoRA merge on the GPU: {differ} of {total} elements differ from the CPU's, by one unit in the last place at most")
PY

# 3. Analysis, with and without --spectral.
for spectral in "" "--spectral"; do
  for d in cpu "$dev"; do
    s=$(timed "$bin/ta-analyze" --base "$fam/base" --models "${models[@]}" "$fam/chat-lora" \
        --outdir "$work/an-$d$spectral" --device "$d" $spectral)
    say "analysis $spectral --device $d: $s s"
  done
  python3 - "$work/an-cpu$spectral/analysis.json" "$work/an-$dev$spectral/analysis.json" <<'PY' | tee -a "$log"
import json, math, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
worst = [0.0, ""]
def walk(x, y, path):
    if isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for k in x: walk(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)): walk(u, v, f"{path}[{i}]")
    elif isinstance(x, float) and isinstance(y, float) and math.isfinite(x):
        tol = 1e-6 if "spectral" in path else 1e-9
        rel = abs(x - y) / max(abs(x), abs(y), 1e-300)
        if rel > worst[0]: worst[:] = [rel, path]
        assert rel <= tol, f"FAIL: {path}: {x} vs {y}"
    elif not isinstance(x, float):
        assert x == y, f"FAIL: {path}: {x} vs {y}"
walk(a, b, "")
print(f"ok: analysis.json agrees; largest relative difference {worst[0]:.2e} at {worst[1] or '-'}")
PY
done
say "gpu-check passed"
rm -rf "$work"
