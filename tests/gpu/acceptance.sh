#!/usr/bin/env bash
# gpuslice GPU acceptance harness (`make gpu-test`). Run from anywhere on a machine with an
# NVIDIA GPU, nvcc, and Python with torch, torchvision and nvidia-ml-py. Never builds Rust.
#
#   GPUSLICE_LIB   the prebuilt shim            (default: .gpu/libgpuslice.so in the repo root)
#   OUT            where the log + results go   (default: .gpu/out)
#   NVCC, PYTHON   tools                        (default: nvcc or /usr/local/cuda/bin/nvcc, python3)
#
# Builds the CUDA programs into .gpu/build, then tests/gpu/harness.py runs the checks and prints
# the results table last. Writes $OUT/acceptance.log and $OUT/results.tsv only.
# Exit: 0 = every program behaved (read the table for PASS/FAIL), 1 = a program crashed
# (signal, timeout, unexpected exit status), 2 = setup problem (no shim, no compiler, build failed).
set -u
set -o pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
gpu_setup acceptance acceptance.log "gpuslice GPU acceptance"
HOSTCC=
for c in gcc cc; do command -v "$c" >/dev/null 2>&1 && { HOSTCC=$c; break; }; done

gpu_machine name,driver_version,memory.total,memory.used \
  "python: $("$PY" --version 2>&1); host cc: ${HOSTCC:-none}"

# ---- build (in parallel; skipped when the binary is newer than its source, the shared header
# and this script)
build_one() { # name source libs compiler-command...   (libs go after the source)
  local name=$1 src=$2 libs=$3
  shift 3
  local bin=$BUILD/$name
  if up_to_date "$bin" "$HERE/$src" "$HERE/gpucommon.cuh" "$HERE/acceptance.sh"; then
    echo "up to date"
    return 0
  fi
  rm -f "$bin"
  # shellcheck disable=SC2086  # libs is a word list
  "$@" -o "$bin" "$HERE/$src" $libs
}
NVFLAGS=(-O2 -arch=sm_90)
build_one memfill memfill.cu "" "$NVCC" "${NVFLAGS[@]}" >"$BUILD/memfill.build.log" 2>&1 &
p1=$!
build_one bench bench.cu "-ldl" "$NVCC" "${NVFLAGS[@]}" >"$BUILD/bench.build.log" 2>&1 &
p2=$!
# The probe must not link cudart or libcuda: it reaches the driver only through dlopen.
if [ -n "$HOSTCC" ]; then
  build_one procaddr_probe procaddr_probe.c "-ldl" "$HOSTCC" -O2 -std=gnu11 -Wall >"$BUILD/procaddr_probe.build.log" 2>&1 &
else
  build_one procaddr_probe procaddr_probe.c "-ldl" "$NVCC" -O2 --cudart none >"$BUILD/procaddr_probe.build.log" 2>&1 &
fi
p3=$!
build_failed=0
for pair in "memfill:$p1" "bench:$p2" "procaddr_probe:$p3"; do
  name=${pair%%:*}
  if wait "${pair##*:}"; then
    echo "--- build $name: ok" >>"$LOG"
  else
    build_failed=1
    note "acceptance: build of $name FAILED (log follows in $LOG)"
  fi
  cat "$BUILD/$name.build.log" >>"$LOG" 2>/dev/null
done
note "build done in $(( $(date +%s) - T0 ))s$([ $build_failed = 1 ] && echo ', with failures')"

# ---- the checks; harness.py prints the results table last
"$PY" "$ROOT/$HERE/harness.py" --lib "$LIB" --build "$BUILD" --out "$OUTDIR" --t0 "$T0" ${GPU_TEST_BUDGET_S:+--budget-s "$GPU_TEST_BUDGET_S"}
rc=$?
if [ $rc -eq 0 ] && [ $build_failed = 1 ]; then rc=2; fi
exit $rc
