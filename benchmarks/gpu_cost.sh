#!/usr/bin/env bash
# Load decisions on a GPU machine (issue 19), one command for the lead's batch, within 8 minutes:
# install what the bare machine lacks, build native/, run benchmarks/ttft_gpu.py (every ratio
# against HF's full prefill measured in the same run), then the GPU tests of the cost path, the
# engine and the transformers integration:
#   - run 2 from the cpu tier (goal: unchanged, 7.5x before);
#   - run 2 from a disk-only tier with a cold page cache, load_policy always (the behaviour
#     before: 0.51x) and cost (goal >= 1.0x);
#   - run 2 from the disk tier with a warm page cache, cost (goal: unchanged, 2.6x before);
#   - half of each prompt's chunks in RAM and half on the cold disk, always and cost.
# Each disk pass is a fresh cache warmed up by one miss and one hit of another prompt (its
# engine knows its prefill speed, as a running server does).
#
# Here, before the run (git-ignored folders the run must carry), once:
#   ../shared/device/fetch-wheels.sh .device-wheels pydantic pytest-asyncio cramjam
# On the device (carry .device-wheels; cramjam is optional, extra wheels there are ignored):
#   bash benchmarks/gpu_cost.sh [--prompts N]       # N: prompts per pass (default 8)
# Dry run of the CPU path (no GPU, nothing installed): bash benchmarks/gpu_cost.sh --tiny
# Results in $OUT (default /tmp/lmt-cost): gpu.txt, pip.log, build.log, ttft.txt (the table),
# ttft.json (every figure, written after each phase), ttft.err, pytest.log. The table prints last.
set -uo pipefail
OUT="${OUT:-/tmp/lmt-cost}"
mkdir -p "$OUT"
prompts=8 tiny=0 budget=470  # seconds for the whole script (the device allows 600 a command)
while [[ $# -gt 0 ]]; do
  case $1 in
    --prompts) prompts=$2; shift 2 ;;
    --tiny) tiny=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
source benchmarks/_gpu_setup.sh
begin=$SECONDS
left() { echo $((budget - (SECONDS - begin))); }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ((tiny)); then
  echo "dry run (--tiny): the CPU path; nothing installed, no native build"
else
  gpu_setup pydantic pytest-asyncio --optional cramjam || exit 1  # cramjam: lossless codecs, no pass uses them
  df -h "${TMPDIR:-/tmp}" | tail -1
fi
bench=(--prompts "$prompts" --disk-prompts "$prompts" --mixed-prompts "$prompts" --reps 5 --suffix-reps 2
       --split-ref-prompts 2 --out "$OUT/run")
((tiny)) && bench+=(--tiny)
start=$SECONDS
# leave a minute for the tests (and 20 s for a cut to finish); a run cut short keeps the phases it finished (ttft.json)
LMTIER_REQUIRE_NATIVE=$((1 - tiny)) timeout --signal=INT --kill-after=20 $(($(left) - 80)) \
  python3 benchmarks/ttft_gpu.py "${bench[@]}" >"$OUT/ttft.txt" 2>"$OUT/ttft.err"
rc=$?
echo "ttft rc=$rc ($((SECONDS - start)) s)"
cp "$OUT/run/ttft_gpu.json" "$OUT/ttft.json" 2>/dev/null
rm -rf "$OUT/run"
if ((rc)) && [[ -s "$OUT/ttft.json" ]]; then  # cut short or failed: the table of what finished
  python3 benchmarks/ttft_gpu.py --report "$OUT/ttft.json" >>"$OUT/ttft.txt" 2>>"$OUT/ttft.err"
fi
grep -iE "error|traceback" "$OUT/ttft.err" | tail -5
start=$SECONDS
LMTIER_REQUIRE_NATIVE=$((1 - tiny)) timeout --kill-after=5 "$(left)" python3 -m pytest "${GPU_PYTEST_ARGS[@]}" \
  tests/integration/test_cost_gpu.py tests/integration/test_engine_gpu.py tests/integration/test_transformers_gpu.py \
  tests/unit/test_memory.py tests/unit/test_cost_prefill.py \
  >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
echo "total: $((SECONDS - begin)) s"
echo
sed -n '/^device \/ torch/,$p' "$OUT/ttft.txt"
exit 0
