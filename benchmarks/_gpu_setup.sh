# Sourced (not run) by the GPU scripts — benchmarks/gpu_datapath.sh, benchmarks/gpu_cost.sh,
# benchmarks/codecs_gpu.sh, tests/server/gpu_check.sh — so a bare device machine is set up one way:
#
#   source benchmarks/_gpu_setup.sh
#   gpu_setup pydantic pytest-asyncio --optional cramjam || exit 1
#   python3 -m pytest "${GPU_PYTEST_ARGS[@]}" tests/...
#
# gpu_setup, from the repository root with $OUT set: writes the GPU's name, driver and PCIe link to
# $OUT/gpu.txt (and prints it); installs the named wheels from .device-wheels when that folder was
# carried (fetched here once with ../shared/device/fetch-wheels.sh .device-wheels WHEEL...; those
# after --optional may be missing: a line says so) and the package's metadata (its entry points:
# the backends, codecs, the `lmtier` command, the pytest plugin's markers), logged to $OUT/pip.log;
# builds native/ into $OUT/build.log and prints how long it took. A step that fails prints its
# log's tail and returns 1.
# GPU_PYTEST_ARGS: pytest's options there. No ini file: the device lacks pytest-timeout, whose ini
# option would warn (an error under -W error).

GPU_PYTEST_ARGS=(-c /dev/null --rootdir . -W error -p no:cacheprovider -q -o "markers=gpu: needs a CUDA GPU"
                 -o asyncio_default_fixture_loop_scope=function)

gpu_setup() {
  local required=() optional=() arg into=required start
  for arg in "$@"; do
    if [[ $arg == --optional ]]; then into=optional
    elif [[ $into == required ]]; then required+=("$arg")
    else optional+=("$arg"); fi
  done
  nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv >"$OUT/gpu.txt" 2>&1
  cat "$OUT/gpu.txt"
  : >"$OUT/pip.log"
  if [[ -d .device-wheels ]]; then
    if ((${#required[@]})); then
      python3 -m pip install -q --no-index --find-links .device-wheels "${required[@]}" >>"$OUT/pip.log" 2>&1 \
        || { tail -5 "$OUT/pip.log"; return 1; }
    fi
    for arg in "${optional[@]}"; do
      python3 -m pip install -q --no-index --find-links .device-wheels "$arg" >>"$OUT/pip.log" 2>&1 \
        || echo "$arg not carried (optional here)"
    done
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/pip.log" 2>&1 \
    || { tail -5 "$OUT/pip.log"; return 1; }
  start=$SECONDS
  bash native/build.sh >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; return 1; }
  echo "build: $((SECONDS - start)) s"
}
