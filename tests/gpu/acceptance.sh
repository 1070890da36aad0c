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
mkdir -p "$OUTDIR" "$BUILD" || { echo "acceptance: cannot create $OUTDIR or $BUILD" >&2; exit 2; }
LOG=$OUTDIR/acceptance.log
: >"$LOG"
note() { printf '%s\n' "$*" | tee -a "$LOG"; }

note "gpuslice GPU acceptance: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
note "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"

if [ ! -f "$LIB" ]; then
  note "acceptance: shim not found at $LIB: put the prebuilt library at .gpu/libgpuslice.so or set GPUSLICE_LIB"
  exit 2
fi
LIB=$(cd "$(dirname "$LIB")" && pwd)/$(basename "$LIB")
note "shim: $LIB ($(stat -c %s "$LIB" 2>/dev/null) bytes, sha256 $(sha256sum "$LIB" 2>/dev/null | cut -c1-16))"

if ! command -v "$PY" >/dev/null 2>&1; then
  note "acceptance: python not found ($PY); set PYTHON"
  exit 2
fi

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=nvcc
  elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [ -z "$NVCC" ]; then
  note "acceptance: nvcc not found (PATH or /usr/local/cuda/bin); set NVCC"
  exit 2
fi
HOSTCC=
for c in gcc cc; do command -v "$c" >/dev/null 2>&1 && { HOSTCC=$c; break; }; done

{
  echo "--- machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1
  echo "compute processes before the run (pid, used):"
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>&1
  "$NVCC" --version 2>&1 | tail -n 2
  echo "python: $("$PY" --version 2>&1); host cc: ${HOSTCC:-none}"
} >>"$LOG" 2>&1

# ---- build (in parallel; skipped when the binary is newer than its source and this script)
build_one() { # name source libs compiler-command...   (libs go after the source)
  local name=$1 src=$2 libs=$3
  shift 3
  local bin=$BUILD/$name
  if [ -x "$bin" ] && [ "$bin" -nt "$HERE/$src" ] && [ "$bin" -nt "$HERE/acceptance.sh" ]; then
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
"$PY" "$ROOT/$HERE/harness.py" --lib "$LIB" --build "$BUILD" --out "$OUTDIR" --t0 "$T0"
rc=$?
if [ $rc -eq 0 ] && [ $build_failed = 1 ]; then rc=2; fi
exit $rc
