#!/usr/bin/env bash
# The data path on a GPU machine (issue 12), one command for the lead's batch, within the device's
# 10 minutes: install what the bare machine lacks (and the package's metadata: the backends are
# found through its entry points), build native/, time benchmarks/ttft_gpu.py (run 2 from the
# cpu tier and from the disk tier, cold then warm, each a ratio against HF's full prefill in the
# same run), run the GPU tests of the engine and the transformers integration
# (LMTIER_REQUIRE_NATIVE=1), then, with --before, the same benchmark on the checkout this issue
# started from, in the same call, so both ratios come from one machine. Every step has a share of
# the time left; a step cut short keeps what it wrote.
#
# Here, before the run (git-ignored folders that the run must carry):
#   ../shared/device/fetch-wheels.sh .device-wheels pydantic pytest-asyncio cramjam   # once
#   mkdir -p .gpu-before && git archive 9a0a879 lmtier lmtier_backends native benchmarks | tar -x -C .gpu-before
# On the device (carry .device-wheels and, for the comparison, .gpu-before):
#   OUT=$OUT bash benchmarks/gpu_datapath.sh [--before .gpu-before] [--prompts N]
# Dry run of the CPU path here (nothing installed or built; the GPU tests skip):
#   bash benchmarks/gpu_datapath.sh --tiny [--before DIR]
# Results in $OUT: gpu.txt, pip.log, build.log, ttft_after.txt / .json / .err, pytest.log,
# build_before.log, ttft_before.txt / .json / .err. The run-2 lines print last.
set -uo pipefail
OUT="${OUT:-/tmp/lmt-datapath}"
mkdir -p "$OUT"
before="" prompts=8 tiny=0 budget=560  # seconds for the whole script (the device allows 600)
while [[ $# -gt 0 ]]; do
  case $1 in
    --before) before=$(cd "$2" && pwd); shift 2 ;;
    --prompts) prompts=$2; shift 2 ;;
    --tiny) tiny=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
source benchmarks/_gpu_setup.sh
begin=$SECONDS
left() { echo $((budget - (SECONDS - begin))); }
native=$((1 - tiny))
if ((tiny)); then
  echo "dry run (--tiny): the CPU path; nothing installed, no native build"
else
  # the --before run uses the same package metadata (its modules come first on PYTHONPATH; an
  # entry point it lacks, e.g. codecs, is a logged warning there)
  gpu_setup pydantic pytest-asyncio --optional cramjam || exit 1
fi
bench=(--prompts "$prompts" --disk-prompts "$prompts" --reps 5 --suffix-reps 2 --split-ref-prompts 2)
((tiny)) && bench+=(--tiny)
# the time left, shared: this run, the tests (90 s), and the before build + run when asked for
share=$(( $(left) - 90 )); [[ -n "$before" ]] && share=$(( share / 2 ))
start=$SECONDS
# --mixed-prompts 0: the half-RAM / half-disk passes (issue 19's) are not part of this comparison,
# and the older script has no such passes (nor the option)
PYTHONPATH="$PWD" LMTIER_REQUIRE_NATIVE=$native timeout --signal=INT --kill-after=20 $((share - 20)) \
  python3 benchmarks/ttft_gpu.py "${bench[@]}" --mixed-prompts 0 --out "$OUT/after" >"$OUT/ttft_after.txt" 2>"$OUT/ttft_after.err"
rc=$?
echo "ttft after rc=$rc ($((SECONDS - start)) s)"
cp "$OUT/after/ttft_gpu.json" "$OUT/ttft_after.json" 2>/dev/null
if ((rc)) && [[ -s "$OUT/ttft_after.json" ]]; then  # cut short: the table of the phases it finished
  PYTHONPATH="$PWD" python3 benchmarks/ttft_gpu.py --report "$OUT/ttft_after.json" >>"$OUT/ttft_after.txt" 2>>"$OUT/ttft_after.err"
fi
start=$SECONDS
tests_s=90; [[ -z "$before" ]] && tests_s=$(left)
PYTHONPATH="$PWD" LMTIER_REQUIRE_NATIVE=$native timeout --kill-after=5 "$tests_s" python3 -m pytest "${GPU_PYTEST_ARGS[@]}" \
  tests/integration/test_engine_gpu.py tests/integration/test_transformers_gpu.py >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
if [[ -n "$before" ]]; then
  start=$SECONDS
  if ((tiny)) || (cd "$before" && bash native/build.sh >"$OUT/build_before.log" 2>&1); then
    (cd "$before" && PYTHONPATH="$PWD" LMTIER_REQUIRE_NATIVE=$native timeout --signal=INT --kill-after=20 \
      $(( $(left) - 25 )) python3 benchmarks/ttft_gpu.py "${bench[@]}" --out "$OUT/before" \
      >"$OUT/ttft_before.txt" 2>"$OUT/ttft_before.err")
    echo "ttft before rc=$? ($((SECONDS - start)) s)"
    cp "$OUT/before/ttft_gpu.json" "$OUT/ttft_before.json" 2>/dev/null
  else
    echo "before: build failed"; tail -5 "$OUT/build_before.log"
  fi
fi
rm -rf "$OUT/after" "$OUT/before"
echo "total: $((SECONDS - begin)) s"
for f in ttft_before.txt ttft_after.txt; do
  [[ -s "$OUT/$f" ]] && { echo "== $f"; grep -E "run 2|bound|disk run|speedup|retrieval inside" "$OUT/$f"; }
done
tail -3 "$OUT/ttft_after.err"
exit 0
