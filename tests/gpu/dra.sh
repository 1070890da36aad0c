#!/usr/bin/env bash
# gpuslice-dra on the GPU machine: the ResourceSlice it publishes for this node agrees with NVML
# (tests/gpu/dra_slice.py). Needs .gpu/gpuslice-dra (make gpu-bundle) and Python 3; no CUDA
# compiler, no cluster. About 5 seconds.
#   bash tests/gpu/dra.sh                 # on the GPU machine
#   DRA_DRY_RUN=1 bash tests/gpu/dra.sh   # here: target/debug/gpuslice-dra on the simulated NVML
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2
mkdir -p "$OUTDIR" || exit 2
PLUGIN=$ROOT/.gpu/gpuslice-dra
if [ "${DRA_DRY_RUN:-0}" = 1 ]; then
  PLUGIN=$ROOT/target/debug/gpuslice-dra
  export LD_LIBRARY_PATH=$ROOT/target/sim SIMCUDA_DEVICES=2 SIMCUDA_MEM=85899345920
  SIMCUDA_STATE=$(mktemp -u /tmp/gpuslice-dra-sim.XXXXXX)
  export SIMCUDA_STATE
  trap 'rm -f "$SIMCUDA_STATE"' EXIT
fi
if [ ! -x "$PLUGIN" ]; then
  echo "dra: $PLUGIN is missing (make gpu-bundle, or cargo build -p gpuslice-dra for the dry run)" >&2
  exit 2
fi
timeout 120 "$PY" "$HERE/dra_slice.py" "$PLUGIN" "$OUTDIR"
