#!/usr/bin/env bash
# On a GPU machine, from the repository root: build native/, run tests/native (GPU tests
# included, native required), the benchmark with its variant sweep, and one compute-sanitizer
# memcheck run. Everything lands in $OUT (default /tmp/lmt-gpu); the benchmark table prints last.
#   bash native/gpu_check.sh [--no-sweep] [--no-memcheck]
set -uo pipefail
OUT="${OUT:-/tmp/lmt-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
sweep=--sweep memcheck=1
for a in "$@"; do
  case $a in --no-sweep) sweep= ;; --no-memcheck) memcheck= ;; esac
done
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
start=$SECONDS
if ! bash native/build.sh >"$OUT/build.log" 2>&1; then cat "$OUT/build.log"; exit 1; fi
echo "build: $((SECONDS - start)) s"
# No ini file: the device lacks pytest-timeout, whose option would warn (= error); pytest-asyncio
# (which tests/conftest.py needs) is carried as a wheel (see docs/native.md).
pytest_args=(-c /dev/null --rootdir . -W error -o "markers=gpu: needs a CUDA GPU"
             -o asyncio_default_fixture_loop_scope=function -p no:cacheprovider -q)
start=$SECONDS
LMTIER_REQUIRE_NATIVE=1 python3 -m pytest "${pytest_args[@]}" tests/native >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
start=$SECONDS
python3 benchmarks/transfer.py $sweep --out "$OUT" 2>"$OUT/bench.err" >/dev/null
echo "bench rc=$? ($((SECONDS - start)) s)"; tail -3 "$OUT/bench.err"
if [[ -n "$memcheck" ]]; then
  cs="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  if [[ -n "$cs" ]]; then
    start=$SECONDS
    # Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees
    # any access past a cache or chunk, not just past a pooled segment.
    # Every copy mode (mapped, staged, staged with small slots) of the layout and edge-case tests.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 LMTIER_REQUIRE_NATIVE=1 timeout 300 "$cs" --tool memcheck \
      --error-exitcode 9 --print-limit 20 python3 -m pytest "${pytest_args[@]}" tests/native/test_native_gpu.py \
      -k "every_layout or unaligned or wide_accesses or per_layer or both_directions" >"$OUT/memcheck.log" 2>&1
    echo "memcheck rc=$? ($((SECONDS - start)) s): $(grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -2 | tr '\n' ' ')"
  else
    echo "memcheck: compute-sanitizer not found" | tee "$OUT/memcheck.log"
  fi
fi
cat "$OUT/transfer.txt" 2>/dev/null || tail -20 "$OUT/bench.err"
