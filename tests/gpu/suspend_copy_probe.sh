#!/usr/bin/env bash
# gpuslice issue 22: what a suspend path of our own (copy-out to pinned host memory, release of
# the physical memory with the virtual ranges kept, re-map at the same addresses, copy-in) costs
# on this card, against the host link, and whether VMM-backed allocations cost anything at run
# time. Run from the repo root as `bash tests/gpu/suspend_copy_probe.sh [GiB]` (default 24) on
# the GPU machine; no shim, no controller, no Python: nvcc and the driver only. Under 2 minutes
# (about 30-40 s expected at 24 GiB: the pinning of the host copy and the copies dominate).
#
#   GiB                          data moved in parts b and c (default 24; the card needs about
#                                GiB + 9 GiB free, the host GiB + 9 GiB of RAM)
#   OUT                          where suspend_copy_probe.log goes (default .gpu/out)
#   NVCC                         (default nvcc, else /usr/local/cuda/bin/nvcc)
#   SUSPEND_COPY_PROBE_BUDGET_S  the probe stops starting parts after this (default 100); the
#                                script kills it at budget + 20 s
#   SUSPEND_COPY_PROBE_DRY_RUN=1 no GPU: g++ builds the probe against tests/gpu/dryrun/cuda_host.h
#                                (the driver API emulated on host memory, kernels on the CPU) and
#                                runs it at 0.25 GiB: the bookkeeping, never the figures
#   SUSPEND_COPY_PROBE_CUDA_INCLUDE=DIR  (dry run) also g++ -fsyntax-only the probe against
#                                DIR/cuda.h, a real CUDA header: its driver calls as NVIDIA
#                                declares them
#
# Builds tests/gpu/suspend_copy_probe.cu (nvcc -O2 -arch=sm_90 -lcuda) into .gpu/build, runs it,
# and prints its table last (ids a1-a4, link, b1-b9, c1-c5, d1-d4, e1-e2; README "A suspend path
# of our own: the probe"). Exit: 0 data bit-identical and both goals (>= 20 GB/s each way) met,
# 1 a FAIL row or a CUDA error, 2 setup problem.
set -u
set -o pipefail
DRY=${SUSPEND_COPY_PROBE_DRY_RUN:-0}
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, HERE, OUTDIR, BUILD, note, up_to_date
BUDGET=${SUSPEND_COPY_PROBE_BUDGET_S:-100}
if [ "$DRY" = 1 ]; then GIB=${1:-0.25}; else GIB=${1:-24}; fi
case "$GIB" in '' | *[!0-9.]* | .*) echo "suspend_copy_probe: GiB must be a number, not '$GIB'" >&2; exit 2 ;; esac
mkdir -p "$OUTDIR" "$BUILD" || { echo "suspend_copy_probe: cannot create $OUTDIR or $BUILD" >&2; exit 2; }
LOG=$OUTDIR/suspend_copy_probe.log
: >"$LOG"
note "suspend_copy_probe ($GIB GiB$([ "$DRY" = 1 ] && echo ', DRY RUN: host emulation')): $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
note "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"

SRC=$HERE/suspend_copy_probe.cu
if [ "$DRY" = 1 ]; then
  PROBE=$BUILD/suspend_copy_probe_dry
  CXX=${CXX:-g++}
  if ! up_to_date "$PROBE" "$SRC" "$HERE/dryrun/cuda_host.h"; then
    "$CXX" -std=c++17 -O2 -Wall -Wextra -x c++ -o "$PROBE" "$SRC" >>"$LOG" 2>&1 || { note "suspend_copy_probe: $CXX build FAILED (see $LOG)"; exit 2; }
  fi
  if [ -n "${SUSPEND_COPY_PROBE_CUDA_INCLUDE:-}" ]; then
    if "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -x c++ -DSUSPEND_COPY_PROBE_REAL_CUDA_H -I"$SUSPEND_COPY_PROBE_CUDA_INCLUDE" "$SRC" >>"$LOG" 2>&1; then
      note "suspend_copy_probe: the driver calls compile against $SUSPEND_COPY_PROBE_CUDA_INCLUDE/cuda.h"
    else
      note "suspend_copy_probe: the driver calls do NOT compile against $SUSPEND_COPY_PROBE_CUDA_INCLUDE/cuda.h (see $LOG)"; exit 2
    fi
  fi
else
  NVCC=${NVCC:-}
  if [ -z "$NVCC" ]; then
    if command -v nvcc >/dev/null 2>&1; then NVCC=nvcc
    elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
    fi
  fi
  [ -n "$NVCC" ] || { note "suspend_copy_probe: nvcc not found (PATH or /usr/local/cuda/bin); set NVCC"; exit 2; }
  PROBE=$BUILD/suspend_copy_probe
  if ! up_to_date "$PROBE" "$SRC"; then
    "$NVCC" -O2 -arch=sm_90 -o "$PROBE" "$SRC" -lcuda >>"$LOG" 2>&1 || { note "suspend_copy_probe: nvcc build FAILED (see $LOG)"; exit 2; }
  fi
  {
    echo "--- machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1
    echo "compute processes before the run (pid, used): they count in row e1"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>&1
    "$NVCC" --version 2>&1 | tail -n 2
    free -g 2>&1 | head -n 2
  } >>"$LOG" 2>&1
fi

note "--- $PROBE $GIB $BUDGET"
if command -v timeout >/dev/null 2>&1; then
  timeout -k 5 "$((BUDGET + 20))" "$PROBE" "$GIB" "$BUDGET" 2>&1 | tee -a "$LOG"
else
  "$PROBE" "$GIB" "$BUDGET" 2>&1 | tee -a "$LOG"
fi
rc=$?
case $rc in
  0) ;;
  1) ;;
  124 | 137) echo "suspend_copy_probe: ran past $((BUDGET + 20)) s and was killed (rc=$rc); see $LOG" | tee -a "$LOG"; rc=1 ;;
  *) echo "suspend_copy_probe: the probe stopped with rc=$rc (4: a CUDA error, the table above shows where); see $LOG" | tee -a "$LOG"; rc=1 ;;
esac
exit $rc
