#!/usr/bin/env bash
# gpuslice issue 13: module/library memory and the NVML cross-check, on the GPU. Run from the
# repo root as `bash tests/gpu/modules.sh` on a machine with an NVIDIA GPU, nvcc, a C compiler
# and python3 (standard library only). Never builds Rust; about 1 minute.
#
#   GPUSLICE_LIB   the prebuilt shim            (default: .gpu/libgpuslice.so)
#   GPUSLICE_BIN   the prebuilt gpuslice CLI    (default: .gpu/gpuslice)
#   OUT            where the log + outputs go   (default: .gpu/out)
#   NVCC, PYTHON, CC
#   MODULES_DRY_RUN=1  the same checks on the simulated driver and NVML of CI (no GPU, no nvcc):
#                  target/debug/{libgpuslice.so,gpuslice}, target/sim/ (run `cargo build
#                  --workspace` and any integration test first); the module is PTX text that
#                  declares the 256 MiB array, and the simulated driver takes 256 MiB per load.
#
# Builds the module (tests/gpu/modbig.cu -> cubin) and the driver-API client (tests/clients/
# cuclient.c, its dlsym route) into .gpu/build, then tests/gpu/modules.py runs the checks and
# prints the table last. Exit: 0 all PASS, 1 a FAIL, 2 setup problem.
set -u
set -o pipefail
DRY=${MODULES_DRY_RUN:-0}
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, BIN, OUTDIR, BUILD, PY, note, ...
CC=${CC:-cc}

TMPD=
LEDGER_DIR=/dev/shm/gpuslice-gpumod-$$
cleanup() {
  [ -n "$TMPD" ] && rm -rf "$TMPD"
  rm -rf "$LEDGER_DIR"
}
trap cleanup EXIT

if [ "$DRY" = 1 ]; then
  mkdir -p "$OUTDIR" "$BUILD" || exit 2
  LOG=$OUTDIR/modules.log
  : >"$LOG"
  note "gpuslice modules acceptance (DRY RUN on the simulated driver): $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  [ -f "$LIB" ] || { note "modules: no shim at $LIB (cargo build --workspace)"; exit 2; }
  [ -f "$ROOT/target/sim/libcuda.so.1" ] || { note "modules: no simulated driver in target/sim (run an integration test once)"; exit 2; }
else
  gpu_setup modules modules.log "gpuslice modules acceptance"
  gpu_machine name,driver_version,memory.total,memory.used "python: $("$PY" --version 2>&1)"
fi
[ -x "$BIN" ] || { note "modules: gpuslice binary not found at $BIN (.gpu/gpuslice or GPUSLICE_BIN)"; exit 2; }
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

TMPD=$(mktemp -d /tmp/gpuslice-mod.XXXXXX) || { note "modules: mktemp failed"; exit 2; }
rm -rf "$LEDGER_DIR"

# ---- the client (dlsym route: dlopen("libcuda.so.1"), no link-time driver needed)
client=$BUILD/cuclient-dlsym
if ! up_to_date "$client" "$ROOT/tests/clients/cuclient.c"; then
  if ! "$CC" -std=gnu11 -O1 -DROUTE_DLSYM -o "$client" "$ROOT/tests/clients/cuclient.c" -ldl -lpthread >>"$LOG" 2>&1; then
    note "modules: building cuclient failed (see $LOG)"
    exit 2
  fi
fi

# ---- the module
if [ "$DRY" = 1 ]; then
  image=$TMPD/modbig.ptx
  printf '.version 8.0\n.target sm_90\n.address_size 64\n\n.global .align 1 .b8 big[268435456];\n' >"$image"
  export LD_LIBRARY_PATH=$ROOT/target/sim
  export SIMCUDA_STATE=$TMPD/simcuda-state SIMCUDA_DEVICES=1 SIMCUDA_MEM=16GiB
  export SIMCUDA_CTX_RESERVE=512MiB SIMCUDA_MODULE_BYTES=256MiB
  dry=(--dry-run)
else
  image=$BUILD/modbig.cubin
  if ! up_to_date "$image" "$HERE/modbig.cu"; then
    if ! "$NVCC" -cubin -arch=sm_90 -o "$image" "$HERE/modbig.cu" >>"$LOG" 2>&1; then
      note "modules: nvcc -cubin of modbig.cu failed (see $LOG)"
      exit 2
    fi
  fi
  dry=()
fi
note "build done in $(( $(date +%s) - T0 ))s; module $image ($(stat -c %s "$image") bytes)"

timeout -k 10 300 "$PY" "$ROOT/$HERE/modules.py" --lib "$LIB" --bin "$BIN" --client "$client" --image "$image" \
  --out "$OUTDIR" --socket "$TMPD/gpuslice.sock" --ledger "$LEDGER_DIR/ledger" --tmp "$TMPD" "${dry[@]}"
rc=$?
[ $rc -eq 124 ] && { note "modules: modules.py ran past 300 s"; rc=1; }
exit $rc
