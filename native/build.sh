#!/usr/bin/env bash
# Build native/build/liblmtier_transfer.so with nvcc: SASS for sm_90 plus compute_90 PTX (the
# driver JIT-compiles the PTX for newer GPUs). Needs nvcc only, no GPU.
#   NVCC=/path/to/nvcc  CUDA_ARCHS="90"  (space-separated, e.g. "80 90")  LMT_NVCC_FLAGS=...
#   LMT_BUILD_DIR=dir   (default native/build)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then nvcc=nvcc
  elif [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  else echo "build.sh: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 1
  fi
fi
archs="${CUDA_ARCHS:-90}"
gencode=()
for a in $archs; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done
last="${archs##* }"
gencode+=(-gencode "arch=compute_${last},code=compute_${last}")
outdir="${LMT_BUILD_DIR:-$here/build}"
mkdir -p "$outdir"
out="$outdir/liblmtier_transfer.so"
# Static cudart: the library needs only the driver (libcuda) at run time, whatever cudart the
# host process (torch) ships; both runtimes share the device's primary context.
"$nvcc" -O3 -std=c++17 -shared -cudart static -lineinfo "${gencode[@]}" \
  -Xcompiler -fPIC,-fvisibility=hidden -Xptxas -warn-spills \
  -I"$here/include" ${LMT_NVCC_FLAGS:-} \
  "$here"/src/*.cu -o "$out.tmp.$$"
mv "$out.tmp.$$" "$out"
echo "built $out"
