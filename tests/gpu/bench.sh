#!/usr/bin/env bash
# gpuslice SM-share benchmark (`make gpu-bench`). Run from anywhere on a machine with an NVIDIA
# GPU, nvcc, and Python with torch (pynvml optional). Never builds Rust.
#
#   GPUSLICE_LIB   the prebuilt shim            (default: .gpu/libgpuslice.so in the repo root)
#   OUT            where the log + results go   (default: .gpu/out)
#   NVCC, PYTHON   tools                        (default: nvcc or /usr/local/cuda/bin/nvcc, python3)
#   BENCH_SECONDS  timed seconds per run        (default 2.5)
#   BENCH_SHIM_LOG GPUSLICE_LOG for shimmed runs (default info)
#
# Builds sharebench into .gpu/build, then tests/gpu/shares.py runs the checks and prints the
# results table last. Writes $OUT/bench.log and $OUT/bench.tsv only.
# Exit: 0 = every program behaved (read the table for PASS/FAIL), 1 = a program crashed
# (signal, timeout, unexpected exit status), 2 = setup problem (no shim, no compiler, build failed).
set -u
set -o pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
SECONDS_PER_RUN=${BENCH_SECONDS:-2.5}
SHIM_LOG=${BENCH_SHIM_LOG:-info}
gpu_setup bench bench.log "gpuslice SM-share bench"

gpu_machine name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit \
  "python: $("$PY" --version 2>&1); seconds per run: $SECONDS_PER_RUN; shim log: $SHIM_LOG"

# ---- build (skipped when the binary is newer than its source, the shared header and this script)
bin=$BUILD/sharebench
if up_to_date "$bin" "$HERE/sharebench.cu" "$HERE/gpucommon.cuh" "$HERE/bench.sh"; then
  echo "--- build sharebench: up to date" >>"$LOG"
else
  rm -f "$bin"
  if "$NVCC" -O2 -arch=sm_90 -o "$bin" "$HERE/sharebench.cu" >"$BUILD/sharebench.build.log" 2>&1; then
    echo "--- build sharebench: ok" >>"$LOG"
    cat "$BUILD/sharebench.build.log" >>"$LOG"
  else
    note "bench: build of sharebench FAILED (log follows in $LOG)"
    cat "$BUILD/sharebench.build.log" >>"$LOG"
    exit 2
  fi
fi
note "build done in $(( $(date +%s) - T0 ))s"

# ---- the checks; shares.py prints the results table last
"$PY" "$ROOT/$HERE/shares.py" --lib "$LIB" --build "$BUILD" --out "$OUTDIR" --t0 "$T0" \
  --seconds "$SECONDS_PER_RUN" --shim-log "$SHIM_LOG"
exit $?
