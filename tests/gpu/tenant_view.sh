#!/usr/bin/env bash
# The tenant's own view (issue 15): nvidia-smi (plain, --query-gpu, --query-compute-apps) and a
# pynvml script under the shim show the slice, not the card. Run from anywhere on the GPU machine:
#
#   bash tests/gpu/tenant_view.sh        (about 1-2 minutes; never builds anything)
#
#   GPUSLICE_LIB   the prebuilt shim          (default: .gpu/libgpuslice.so in the repo root)
#   GPUSLICE_BIN   the prebuilt gpuslice CLI  (default: .gpu/gpuslice in the repo root)
#   OUT            where the log goes         (default: .gpu/out): tenant_view.log, *.out
#   PYTHON         python with torch and nvidia-ml-py (default python3)
#   TENANT_DRY_RUN=1  no GPU: the same script on CI's simulated driver and NVML (target/sim,
#                  after `cargo build --workspace` and one integration test run), the shim and
#                  CLI of target/debug, tests/gpu/dryrun's torch and nvidia-smi stand-ins.
#
# Cases and checks: tests/gpu/tenant_view.py. The results table is the last output.
# Exit: 0 all PASS, 1 a FAIL or a crash, 2 setup problem.
set -u
T0=$(date +%s)
CALLER_PWD=$(pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$(pwd)
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$CALLER_PWD/$1" ;; esac; }
DRY=${TENANT_DRY_RUN:-0}
PY=${PYTHON:-python3}
if [ -n "${OUT:-}" ]; then OUTDIR=$(abspath "$OUT"); else OUTDIR=$ROOT/.gpu/out; fi
TMPD=$(mktemp -d /tmp/gpuslice-tenant.XXXXXX) || exit 2
LEDGER_DIR=/dev/shm/gpuslice-tenant-$$
PYPID=
cleanup() {
  [ -n "$PYPID" ] && kill "$PYPID" 2>/dev/null
  rm -rf "$TMPD" "$LEDGER_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
mkdir -p "$OUTDIR" || exit 2
: >"$OUTDIR/tenant_view.log"

extra=()
if [ "$DRY" = 1 ]; then
  LIB=${GPUSLICE_LIB:-$ROOT/target/debug/libgpuslice.so}
  BIN=${GPUSLICE_BIN:-$ROOT/target/debug/gpuslice}
  SIM=$ROOT/target/sim
  if [ ! -e "$SIM/libcuda.so.1" ] || [ ! -e "$SIM/libnvidia-ml.so.1" ]; then
    echo "tenant_view: dry run needs $SIM/libcuda.so.1 and libnvidia-ml.so.1 (cargo build --workspace, then any integration test)" >&2
    exit 2
  fi
  export LD_LIBRARY_PATH=$SIM SIMCUDA_STATE=$TMPD/simcuda-state SIMCUDA_DEVICES=1 SIMCUDA_MEM=24G SIMCUDA_CTX_RESERVE=500M
  extra=(--smi "$PY $ROOT/tests/gpu/dryrun/nvidia_smi_stub.py" --pythonpath "$ROOT/tests/gpu/dryrun")
else
  if [ -n "${GPUSLICE_LIB:-}" ]; then LIB=$(abspath "$GPUSLICE_LIB"); else LIB=$ROOT/.gpu/libgpuslice.so; fi
  if [ -n "${GPUSLICE_BIN:-}" ]; then BIN=$(abspath "$GPUSLICE_BIN"); else BIN=$ROOT/.gpu/gpuslice; fi
  command -v nvidia-smi >/dev/null || { echo "tenant_view: nvidia-smi not found" >&2; exit 2; }
  if ! "$PY" -c 'import torch, pynvml' 2>/dev/null; then
    echo "tenant_view: $PY cannot import torch and pynvml (nvidia-ml-py)" >&2
    exit 2
  fi
  { echo "nvidia-smi: $(command -v nvidia-smi)"; ldd "$(command -v nvidia-smi)" 2>&1; } >>"$OUTDIR/tenant_view.log"
fi
for f in "$LIB" "$BIN"; do
  [ -e "$f" ] || { echo "tenant_view: $f not found (set GPUSLICE_LIB / GPUSLICE_BIN)" >&2; exit 2; }
done
echo "tenant view: shim $LIB, cli $BIN, dry run $DRY, log $OUTDIR/tenant_view.log" | tee -a "$OUTDIR/tenant_view.log"

# In the background, so that a signal reaches the trap at once; 280 s at most.
timeout -k 10 280 "$PY" "$ROOT/tests/gpu/tenant_view.py" --lib "$LIB" --bin "$BIN" --out "$OUTDIR" \
  --tmp "$TMPD" --ledger "$LEDGER_DIR/ledger" "${extra[@]}" &
PYPID=$!
wait "$PYPID"
rc=$?
PYPID=
[ $rc -eq 124 ] && echo "tenant_view: ran past 280 s ($(( $(date +%s) - T0 )) s)"
exit $rc
