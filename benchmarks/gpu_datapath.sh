#!/usr/bin/env bash
# The data path on a GPU machine (issue 12), one command for the lead's batch: build native/, run the
# GPU tests of the engine and the transformers integration (LMTIER_REQUIRE_NATIVE=1), then
# benchmarks/ttft_gpu.py: run 2 from the cpu tier and from the disk tier (cold, then warm), with
# the speedup / bound ratio of the same run. Optionally the same benchmark on an older checkout
# ("before"), in the same call, so both ratios come from one machine.
#
# Here, before the run (git-ignored folders that the run must carry):
#   ../shared/device/fetch-wheels.sh .device-wheels pydantic pytest-asyncio   # once; the GPU image lacks them
#   mkdir -p .gpu-before && git archive 9a0a879 lmtier lmtier_backends native benchmarks | tar -x -C .gpu-before
# On the device (carry .device-wheels and, for the comparison, .gpu-before):
#   OUT=$OUT bash benchmarks/gpu_datapath.sh [--before .gpu-before] [--prompts N]
# Results in $OUT: gpu.txt, build.log, pytest.log, ttft_after.txt / .json, ttft_before.txt / .json.
set -uo pipefail
OUT="${OUT:-/tmp/lmt-datapath}"
mkdir -p "$OUT"
before="" prompts=8
while [[ $# -gt 0 ]]; do
  case $1 in
    --before) before=$2; shift 2 ;;
    --prompts) prompts=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ -d .device-wheels ]]; then
  python3 -m pip install -q --no-index --find-links .device-wheels pydantic pytest-asyncio >"$OUT/pip.log" 2>&1 \
    || { cat "$OUT/pip.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
start=$SECONDS
if ! bash native/build.sh >"$OUT/build.log" 2>&1; then cat "$OUT/build.log"; exit 1; fi
echo "build: $((SECONDS - start)) s"
# no ini file: the device lacks pytest-timeout, whose ini option would warn (= error)
pytest_args=(-c /dev/null --rootdir . -W error -o "markers=gpu: needs a CUDA GPU"
             -o asyncio_default_fixture_loop_scope=function -p no:cacheprovider -q)
start=$SECONDS
PYTHONPATH="$PWD" LMTIER_REQUIRE_NATIVE=1 python3 -m pytest "${pytest_args[@]}" \
  tests/integration/test_engine_gpu.py tests/integration/test_transformers_gpu.py >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
bench=(--prompts "$prompts" --disk-prompts "$prompts")
start=$SECONDS
# --mixed-prompts 0: the half-RAM / half-disk passes (issue 19's) are not part of this comparison,
# and the older script has no such passes (nor the option)
PYTHONPATH="$PWD" python3 benchmarks/ttft_gpu.py "${bench[@]}" --mixed-prompts 0 --out "$OUT/after" >"$OUT/ttft_after.txt" 2>"$OUT/ttft_after.err"
echo "ttft after rc=$? ($((SECONDS - start)) s)"
cp "$OUT/after/ttft_gpu.json" "$OUT/ttft_after.json" 2>/dev/null
if [[ -n "$before" ]]; then
  start=$SECONDS
  if (cd "$before" && bash native/build.sh >"$OUT/build_before.log" 2>&1); then
    (cd "$before" && PYTHONPATH="$PWD" python3 benchmarks/ttft_gpu.py "${bench[@]}" --out "$OUT/before" \
      >"$OUT/ttft_before.txt" 2>"$OUT/ttft_before.err")
    echo "ttft before rc=$? ($((SECONDS - start)) s)"
    cp "$OUT/before/ttft_gpu.json" "$OUT/ttft_before.json" 2>/dev/null
  else
    echo "before: build failed"; tail -5 "$OUT/build_before.log"
  fi
fi
rm -rf "$OUT/after" "$OUT/before"
for f in ttft_before.txt ttft_after.txt; do
  [[ -s "$OUT/$f" ]] && { echo "== $f"; grep -E "run 2|bound|disk run|speedup|retrieval inside" "$OUT/$f"; }
done
tail -3 "$OUT/ttft_after.err"
