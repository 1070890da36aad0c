#!/usr/bin/env bash
# README.md's Quick start on the real GPU, its commands as written (issue 16): the block's lines
# after `make demo` (no Rust on the GPU machine: the .gpu/ bundle stands for target/release),
# each checked: quota-fill sees the 4 GiB quota as the card's size and is refused at it.
#
#   bash tests/gpu/quickstart.sh            # needs .gpu/gpuslice, .gpu/libgpuslice.so, .gpu/quota-fill
#   QUICKSTART_DRY_RUN=1 bash tests/gpu/quickstart.sh   # here, on the simulated driver (target/debug)
#
# Takes a few seconds. Logs under $OUT (or .gpu/out). The last lines are a PASS/FAIL table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
root=$(pwd)
if [[ ${QUICKSTART_DRY_RUN:-0} == 1 ]]; then
    bundle=target/debug
    export LD_LIBRARY_PATH=$root/target/sim
    [[ -e target/sim/libcuda.so.1 ]] || { echo "quickstart: dry run needs target/sim (run the integration tests once)" >&2; exit 2; }
    export SIMCUDA_STATE=${TMPDIR:-/tmp}/gpuslice-quickstart-$$.state SIMCUDA_CTX_RESERVE=500MiB
else
    bundle=.gpu
fi
for f in gpuslice libgpuslice.so quota-fill; do
    [[ -e $bundle/$f ]] || { echo "quickstart: $bundle/$f is missing (make gpu-bundle)" >&2; exit 2; }
done
out=${OUT:-$root/.gpu/out}
mkdir -p "$out" || exit 2
log=$out/quickstart.log
: >"$log"

# The Quick start block, as written, minus `make demo`; target/release is the bundle here.
block=$(awk '/^## Quick start$/ { q = 1; next } /^## / { q = 0 } q && /^```sh$/ { f = 1; next } f && /^```$/ { exit } f' README.md |
    grep -v '^make demo' | sed "s|target/release|$bundle|g")
echo "$block" >>"$log"
mapfile -t commands < <(printf '%s\n' "$block" | grep -v '^#' | grep -v '^export ')
eval "$(printf '%s\n' "$block" | grep '^export ')"

rows=()
fail=0
for cmd in "${commands[@]}"; do
    [[ -n $cmd ]] || continue
    run_log=$out/quickstart-$((${#rows[@]} + 1)).log
    start=$(date +%s%N)
    timeout 120 bash -c "$cmd" >"$run_log" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    total=$(grep -oE 'total [0-9]+ MiB' "$run_log" | head -1)
    held=$(grep -oE '^held [0-9]+ chunks' "$run_log" | head -1)
    refused=$(grep -c 'refused: .*OUT_OF_MEMORY' "$run_log")
    cat "$run_log" >>"$log"
    verdict=PASS
    if [[ $rc -ne 0 || $total != "total 4096 MiB" || $refused -lt 1 || -z $held ]]; then verdict=FAIL; fail=1; fi
    rows+=("$verdict  rc=$rc  ${total:-no total}  ${held:-nothing held}  refusals=$refused  ${ms} ms  $cmd")
done
[[ ${#rows[@]} -ge 2 ]] || { rows+=("FAIL  the Quick start block has fewer than two commands to run"); fail=1; }
[[ ${QUICKSTART_DRY_RUN:-0} == 1 ]] && rm -f "$SIMCUDA_STATE"
echo
echo "README Quick start on $( [[ $bundle == .gpu ]] && echo 'the GPU' || echo 'the simulated driver (dry run)' ) (log: $log)"
printf '%s\n' "${rows[@]}"
exit $fail
