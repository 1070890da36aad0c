#!/usr/bin/env bash
# Many throttled tenants on one GPU (issue 14): `bash tests/gpu/tenants.sh` from the repo root on a
# machine with an NVIDIA GPU, nvcc and Python 3 (no Rust, no network). About 3 minutes.
#
#   GPUSLICE_LIB      the prebuilt shim        (default .gpu/libgpuslice.so; dry run: target/debug)
#   OUT               log and table            (default .gpu/out): tenants.log, tenants.tsv
#   TENANTS_SECONDS   timed phase per group    (default 6)
#   TENANTS_COUNTS    group sizes              (default 4,8,16,32)
#   TENANTS_DRY_RUN=1 no GPU: the same orchestration on the simulated driver (tests/simcuda,
#                     `cargo build -p gpuslice-shim -p gpuslice-simcuda` first) with the
#                     stand-in tests/gpu/dryrun/sharebench_stub.py; figures judge the simulator.
#
# N processes at 96/N % each (200 us kernels, started together): each within +-10 % of its share,
# the sum >= 95 % of the shares' sum, CPU s per process <= issue 14's table (2.0/1.3/0.9/0.7);
# N = 16 again with SHAREBENCH_BLOCKING_SYNC=1 (the program's waits sleep: T16b, CPU beside T16's);
# one process from 16 threads on 16 streams at 30 %: within a point, CPU per launch <= 2x
# unthrottled. Builds sharebench into .gpu/build. The results table is printed last.
# Exit: 0 all PASS, 1 some FAIL, 2 setup problem.
set -u
set -o pipefail
DRY=${TENANTS_DRY_RUN:-0}
if [ "$DRY" = 1 ] && [ -z "${GPUSLICE_LIB:-}" ]; then
  GPUSLICE_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/debug/libgpuslice.so
  export GPUSLICE_LIB
fi
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
PY_LIMIT_S=400
clean_up_on_exit GPUTEST_TENANTS_TOKEN tenants

if [ "$DRY" = 1 ]; then
  mkdir -p "$OUTDIR" || exit 2
  LOG=$OUTDIR/tenants.log
  : >"$LOG"
  note "gpuslice tenants (DRY RUN: simulated driver, stand-in sharebench): $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  [ -f "$LIB" ] || { note "tenants: no shim at $LIB"; exit 2; }
  SIM=$ROOT/target/sim
  [ -f "$SIM/libcuda.so.1" ] || { note "tenants: dry run needs $SIM/libcuda.so.1: cargo build -p gpuslice-simcuda"; exit 2; }
  TMPD=$(mktemp -d /tmp/gpuslice-tenants.XXXXXX) || exit 2
  export LD_LIBRARY_PATH=$SIM SIMCUDA_STATE=$TMPD/simcuda-state SIMCUDA_DEVICES=1
  export GPUSLICE_SOCKET=$TMPD/no-controller.sock
  BENCH="$PY $ROOT/$HERE/dryrun/sharebench_stub.py"
  dry=(--dry)
else
  gpu_setup tenants tenants.log "gpuslice tenants (issue 14)"
  gpu_machine name,driver_version,memory.total,clocks.max.sm "python: $("$PY" --version 2>&1)"
  bin=$BUILD/sharebench
  build_cu sharebench "$bin" || exit 2
  # No controller: each tenant runs on its own environment's share, as in the issue's table.
  TMPD=$(mktemp -d /tmp/gpuslice-tenants.XXXXXX) || exit 2
  export GPUSLICE_SOCKET=$TMPD/no-controller.sock
  BENCH=$bin
  dry=()
fi

args=(--bench "$BENCH" --lib "$LIB" --out "$OUTDIR" --seconds "${TENANTS_SECONDS:-6}"
      --counts "${TENANTS_COUNTS:-4,8,16,32}" --budget-s 380 "${dry[@]}")
start_python GPUTEST_TENANTS_TOKEN "$PY_LIMIT_S" 10 tenants.py "${args[@]}"
wait_python "tenants: tenants.py" "$PY_LIMIT_S"
rc=$?
exit $rc
