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
T0=$(date +%s)
CALLER_PWD=$(pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$(pwd)
HERE=tests/gpu

abspath() { # path relative to the caller's directory -> absolute
  case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$CALLER_PWD/$1" ;; esac
}

if [ -n "${GPUSLICE_LIB:-}" ]; then LIB=$(abspath "$GPUSLICE_LIB"); else LIB=$ROOT/.gpu/libgpuslice.so; fi
if [ -n "${OUT:-}" ]; then OUTDIR=$(abspath "$OUT"); else OUTDIR=$ROOT/.gpu/out; fi
BUILD=$ROOT/.gpu/build
PY=${PYTHON:-python3}
SECONDS_PER_RUN=${BENCH_SECONDS:-2.5}
SHIM_LOG=${BENCH_SHIM_LOG:-info}
mkdir -p "$OUTDIR" "$BUILD" || { echo "bench: cannot create $OUTDIR or $BUILD" >&2; exit 2; }
LOG=$OUTDIR/bench.log
: >"$LOG"
note() { printf '%s\n' "$*" | tee -a "$LOG"; }

note "gpuslice SM-share bench: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
note "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"

if [ ! -f "$LIB" ]; then
  note "bench: shim not found at $LIB: put the prebuilt library at .gpu/libgpuslice.so or set GPUSLICE_LIB"
  exit 2
fi
LIB=$(cd "$(dirname "$LIB")" && pwd)/$(basename "$LIB")
note "shim: $LIB ($(stat -c %s "$LIB" 2>/dev/null) bytes, sha256 $(sha256sum "$LIB" 2>/dev/null | cut -c1-16))"

if ! command -v "$PY" >/dev/null 2>&1; then
  note "bench: python not found ($PY); set PYTHON"
  exit 2
fi

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=nvcc
  elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [ -z "$NVCC" ]; then
  note "bench: nvcc not found (PATH or /usr/local/cuda/bin); set NVCC"
  exit 2
fi

{
  echo "--- machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit --format=csv,noheader 2>&1
  echo "compute processes before the run (pid, used):"
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>&1
  "$NVCC" --version 2>&1 | tail -n 2
  echo "python: $("$PY" --version 2>&1); seconds per run: $SECONDS_PER_RUN; shim log: $SHIM_LOG"
} >>"$LOG" 2>&1

# ---- build (skipped when the binary is newer than its source and this script)
bin=$BUILD/sharebench
if [ -x "$bin" ] && [ "$bin" -nt "$HERE/sharebench.cu" ] && [ "$bin" -nt "$HERE/bench.sh" ]; then
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
