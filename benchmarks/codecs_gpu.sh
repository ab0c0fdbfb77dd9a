#!/usr/bin/env bash
# On a GPU machine, from the repository root (issue 17, item 6: quantize on the GPU before the
# device->host copy, dequantize after host->device): build native/ (the raw path's kernels, the
# fair baseline), run the coded-transfer and device-codec tests (the GPU's encoding is the CPU
# codec's byte for byte; a CUDA engine loads what a CPU engine stored and back), then
# benchmarks/codecs.py on a Qwen3-8B-shaped model with random weights built on the GPU: offload and
# onload GB/s of fp8 / int8 chunks quantized on the GPU vs raw chunks vs the link (pinned cudaMemcpy),
# all in the same run, the lossy codecs' quality on that model (|dlogprob|, greedy agreement over
# 64 tokens, K/V error), and each codec's ratio and CPU speed on that model's KV (4 chunks, 151 MB:
# issue 17 item 2's "on the device a transformers model's" ratio).
# Results under $OUT (default /tmp/lmt-codecs-gpu); the tables print last.
#   ../shared/device/fetch-wheels.sh .device-wheels pydantic pytest-asyncio cramjam   # here, once
#   bash benchmarks/codecs_gpu.sh                                             # there (carry .device-wheels)
set -uo pipefail
OUT="${OUT:-/tmp/lmt-codecs-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
source benchmarks/_gpu_setup.sh
gpu_setup pydantic pytest-asyncio cramjam || exit 1
start=$SECONDS
python3 -m pytest "${GPU_PYTEST_ARGS[@]}" tests/native/test_coded_gpu.py tests/unit/test_coded_transfer.py \
  tests/unit/test_engine_device_codec.py >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR|E )" "$OUT/pytest.log" | head -20
start=$SECONDS
python3 benchmarks/codecs.py --model qwen3-8b --device cuda --tokens 4096 --tiers '' --table-chunks 4 --quality \
  --repeats 5 >"$OUT/bench.txt" 2>"$OUT/bench.err"
echo "bench rc=$? ($((SECONDS - start)) s)"; tail -3 "$OUT/bench.err"
cat "$OUT/bench.txt"
