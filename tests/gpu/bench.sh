#!/usr/bin/env bash
# gpuslice SM-share benchmark (`make gpu-bench`). Run from anywhere on a machine with an NVIDIA
# GPU, nvcc, and Python with torch (pynvml optional). Never builds Rust.
#
#   GPUSLICE_LIB   the prebuilt shim            (default: .gpu/libgpuslice.so in the repo root)
#   OUT            where the log + results go   (default: .gpu/out)
#   NVCC, PYTHON   tools                        (default: nvcc or /usr/local/cuda/bin/nvcc, python3)
#   BENCH_SECONDS  timed seconds per run        (default 2.5)
#   BENCH_SHIM_LOG GPUSLICE_LOG for shimmed runs (default info)
#   BENCH_ONLY     shares | priority: run only that part (default: both, shares first)
#   BENCH_BUDGET_S seconds after which the shares part starts no new run (default 450)
#   BENCH_PRIO_SECONDS  timed seconds of each latency-probe run (default 6)
#   BENCH_PRIO_QUEUE    GPUSLICE_PRIORITY_QUEUE for the low-priority processes (default: unset)
#   BENCH_PRIO_TORCH    graph | eager: how the ResNet-50 probe runs (default graph)
#
# Builds sharebench and latprobe into .gpu/build, then tests/gpu/shares.py runs the SM-share
# checks and tests/gpu/priority.py the priority checks (issue 5); each prints its results
# table last. Writes $OUT/bench.log, $OUT/bench.tsv and $OUT/priority.tsv only. The priority
# part starts MPS daemons of its own (pipes and logs in a temporary folder); they are told to
# quit on every way out, also when this script is interrupted, and whatever carries this run's
# GPUTEST_PRIO_TOKEN afterwards is killed by pid.
# Exit: 0 = every program behaved (read the tables for PASS/FAIL), 1 = a program crashed
# (signal, timeout, unexpected exit status), 2 = setup problem (no shim, no compiler, build failed).
set -u
set -o pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
SECONDS_PER_RUN=${BENCH_SECONDS:-2.5}
SHIM_LOG=${BENCH_SHIM_LOG:-info}
ONLY=${BENCH_ONLY:-}
PRIO_SECONDS=${BENCH_PRIO_SECONDS:-6}
PRIO_QUEUE=${BENCH_PRIO_QUEUE:-}
PRIO_TORCH=${BENCH_PRIO_TORCH:-graph}
PRIO_LIMIT_S=420   # hard stop for priority.py (its own budget ends earlier, 360 s after it starts)
case "$ONLY" in
  ""|shares|priority) ;;
  *) echo "bench: BENCH_ONLY must be shares or priority (or unset), not '$ONLY'" >&2; exit 2 ;;
esac
case "$PRIO_TORCH" in
  graph|eager) ;;
  *) echo "bench: BENCH_PRIO_TORCH must be graph or eager, not '$PRIO_TORCH'" >&2; exit 2 ;;
esac
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
gpu_setup bench bench.log "gpuslice SM-share bench${ONLY:+ (only $ONLY)}"

gpu_machine name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit \
  "python: $("$PY" --version 2>&1); seconds per run: $SECONDS_PER_RUN; shim log: $SHIM_LOG; parts: ${ONLY:-shares priority}; probe seconds: $PRIO_SECONDS; priority queue: ${PRIO_QUEUE:-shim default}; torch probe: $PRIO_TORCH"

# ---- build (skipped when the binary is newer than its source, the shared header and this script)
build() { # NAME: .gpu/build/NAME from tests/gpu/NAME.cu; 0 when built or up to date
  build_cu "$1" "$BUILD/$1" "$HERE/bench.sh"
}
build sharebench || exit 2
if want priority; then
  build latprobe || note "bench: the priority part runs without latprobe (its CUDA checks FAIL; exit 2)"
fi
note "build done in $(( $(date +%s) - T0 ))s"

# ---- the SM-share checks; shares.py prints the results table last
rc_shares=0
if want shares; then
  "$PY" "$ROOT/$HERE/shares.py" --lib "$LIB" --build "$BUILD" --out "$OUTDIR" --t0 "$T0" \
    --seconds "$SECONDS_PER_RUN" --shim-log "$SHIM_LOG" ${BENCH_BUDGET_S:+--budget-s "$BENCH_BUDGET_S"}
  rc_shares=$?
fi
if ! want priority; then
  exit $rc_shares
fi

# ---- the priority checks; priority.py prints its tables last
# Like controller.sh: in the background so that a signal reaches the trap at once, every child
# carries the token, and on the way out the MPS daemons are told to quit and whatever still
# carries the token is killed by pid.
TOKEN="prio-$$-$(date +%s%N)"
MPS_DIR=
PYPID=
tokened_left() { # is any process other than this shell still carrying the token?
  local d
  for d in /proc/[0-9]*; do
    [ "${d#/proc/}" = "$$" ] && continue
    grep -qzx "GPUTEST_PRIO_TOKEN=$TOKEN" "$d/environ" 2>/dev/null && return 0
  done
  return 1
}
prio_cleanup() {
  local p
  if [ -n "$MPS_DIR" ] && [ -d "$MPS_DIR" ]; then
    # priority.py removes a session's folder after quitting it: what is left may still run
    for p in "$MPS_DIR"/*/pipe; do
      [ -d "$p" ] || continue
      echo "bench.sh: telling the MPS daemon of $p to quit" >&2
      echo quit | CUDA_MPS_PIPE_DIRECTORY=$p CUDA_MPS_LOG_DIRECTORY=${p%/pipe}/log \
        timeout 15 nvidia-cuda-mps-control >/dev/null 2>&1
    done
    for _ in $(seq 1 50); do tokened_left || break; sleep 0.2; done
  fi
  kill_tokened GPUTEST_PRIO_TOKEN
  [ -n "$MPS_DIR" ] && rm -rf "$MPS_DIR"
}
trap prio_cleanup EXIT
trap_signals

MPS_DIR=$(mktemp -d /tmp/gpuslice-mps.XXXXXX) || { note "bench: mktemp failed"; exit 2; }
args=(--lib "$LIB" --build "$BUILD" --out "$OUTDIR" --t0 "$(date +%s)" --seconds "$PRIO_SECONDS"
      --base-seconds "$SECONDS_PER_RUN" --shim-log "$SHIM_LOG" --queue "$PRIO_QUEUE"
      --mps-dir "$MPS_DIR" --torch-mode "$PRIO_TORCH")
start_python GPUTEST_PRIO_TOKEN "$PRIO_LIMIT_S" 10 priority.py "${args[@]}"
wait_python "bench: priority.py" "$PRIO_LIMIT_S"
rc_prio=$?

# 1 (a crash) before 2 (something missing) before 0, as in each part
if [ $rc_shares -eq 1 ] || [ $rc_prio -eq 1 ]; then exit 1; fi
if [ $rc_shares -eq 2 ] || [ $rc_prio -eq 2 ]; then exit 2; fi
if [ $rc_shares -ne 0 ] || [ $rc_prio -ne 0 ]; then exit 1; fi
exit 0
