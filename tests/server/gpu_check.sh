#!/usr/bin/env bash
# On a GPU machine, from the repository root: a GPU worker and an lmtier serve process, the
# worker's KV in GPU memory, pages round-tripped through the server's slab (registered with
# cudaHostRegister in the worker) by the native kernel — bytes checked equal (pytest, native
# required) — then the copy rate vs pinned cudaMemcpy in the same run (benchmarks/server.py
# --part gpu). Results under $OUT (default /tmp/lmt-server-gpu); the table prints last.
#   ../shared/device/fetch-wheels.sh .device-wheels pydantic msgspec aiohttp pytest-asyncio   # here, once
#   bash tests/server/gpu_check.sh                                                          # there (carry .device-wheels)
set -uo pipefail
OUT="${OUT:-/tmp/lmt-server-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
source benchmarks/_gpu_setup.sh
gpu_setup pydantic msgspec aiohttp pytest-asyncio || exit 1
start=$SECONDS
LMTIER_REQUIRE_NATIVE=1 python3 -m pytest "${GPU_PYTEST_ARGS[@]}" tests/server/test_server_gpu.py >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR|E )" "$OUT/pytest.log" | head -20
start=$SECONDS
python3 benchmarks/server.py --part gpu --out "$OUT" >"$OUT/bench.txt" 2>&1
echo "bench rc=$? ($((SECONDS - start)) s)"
cat "$OUT/bench.txt"
