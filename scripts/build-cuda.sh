#!/usr/bin/env bash
# Builds ta-merge and ta-analyze with the CUDA device path (--features cuda)
# on a machine without a GPU or a system CUDA toolkit, reproducibly:
#   - pinned NVIDIA wheels from PyPI (nvcc, its CRT headers, NVVM, the CUDA
#     runtime headers, CCCL) in a venv under target/cuda-toolchain; a newer
#     nvcc emits PTX that driver 580 may reject;
#   - a CUDA_ROOT with those headers and a lib/ of stub libraries (every
#     CUDA symbol the compiled libraries reference, as an empty function)
#     carrying the SONAMEs the binaries link against (libcuda, libnvrtc, libcublas, libcublasLt,
#     libcurand, libcudart): the real ones come from the driver and the CUDA
#     runtime on the machine that runs the binaries;
#   - CUDA_COMPUTE_CAP (default 90, an H100/H200).
# The binaries land in target/cuda/release/. Kept out of .ci/run and the
# default build. Usage: scripts/build-cuda.sh  (about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
cap=${CUDA_COMPUTE_CAP:-90}
tool=target/cuda-toolchain
mkdir -p "$tool"
[ -x "$tool/venv/bin/pip" ] || python3 -m venv "$tool/venv"
"$tool/venv/bin/pip" install --quiet --no-deps \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
cu=$("$tool/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

# CUDA_ROOT: the wheels' headers and binaries, plus stub libraries to link.
root=$(pwd)/$tool/root
rm -rf "$root"; mkdir -p "$root/lib"
ln -s "$cu/include" "$root/include"
ln -s "$cu/bin" "$root/bin"
ln -s "$cu/nvvm" "$root/nvvm"
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_COMPUTE_CAP=$cap PATH=$root/bin:$PATH
export LIBRARY_PATH=$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc --version | tail -2
# The libraries first; then stubs that define every CUDA symbol they
# reference, under each SONAME; then the binaries.
cargo build --release --features cuda --target-dir target/cuda -p tv-core
out=target/cuda/release
nm -u --format=just-symbols "$out"/build/candle-kernels-*/out/*.a "$out"/deps/lib{cudarc,candle_kernels,candle_core}-*.rlib 2>/dev/null |
  grep -E '^(cu|__cuda|nvrtc|curand|cublas)' | sort -u | sed 's/.*/void &(void) {}/' > "$root/stub.c"
for lib in cuda:1 nvrtc:13 cublas:13 cublasLt:13 curand:10 cudart:13; do
  name=${lib%%:*}; major=${lib##*:}
  cc -shared -fPIC -o "$root/lib/lib$name.so.$major" -Wl,-soname,"lib$name.so.$major" "$root/stub.c"
  ln -sf "lib$name.so.$major" "$root/lib/lib$name.so"
done
cargo build --release --features cuda --bins --target-dir target/cuda
ls -la target/cuda/release/ta-merge target/cuda/release/ta-analyze
