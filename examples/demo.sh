#!/usr/bin/env bash
# `make demo`: a program fills device memory in 256 MiB chunks under a 4 GiB quota, once without
# gpuslice and once with it. Uses the real GPU when nvidia-smi sees one, else the simulated
# device that CI tests against (tests/simcuda).
set -euo pipefail
cd "$(dirname "$0")/.."
rel=target/release
limit=${GPUSLICE_DEMO_LIMIT:-4GiB}

if nvidia-smi -L >/dev/null 2>&1; then
    echo "== a real GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
    # Without the shim the program could take the whole card; cap it at 16 chunks.
    cap=16
else
    echo "== no GPU here: using the simulated device (16 GiB, 300 MiB context reserve)"
    # The same links `gpuslice run --simulate` makes (and finds) next to the binary.
    sim=$rel/sim
    mkdir -p "$sim"
    ln -sfn ../libsimcuda.so "$sim/libcuda.so.1"
    ln -sfn libcuda.so.1 "$sim/libcuda.so"
    ln -sfn ../libsimnvml.so "$sim/libnvidia-ml.so.1"
    export LD_LIBRARY_PATH="$PWD/$sim${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SIMCUDA_STATE="${TMPDIR:-/tmp}/gpuslice-demo-$$.state"
    trap 'rm -f "$SIMCUDA_STATE"' EXIT
    cap=1000
fi

echo
echo "== without gpuslice (at most $cap chunks)"
$rel/quota-fill 256 $cap
echo
echo "== with gpuslice: gpuslice run --memory $limit -- quota-fill 256"
GPUSLICE_LOG=${GPUSLICE_LOG:-info} $rel/gpuslice run --memory "$limit" -- $rel/quota-fill 256
