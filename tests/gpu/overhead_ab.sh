#!/usr/bin/env bash
# A/B of the shim's per-call cost in one run: tests/gpu/bench.cu (empty launches, 64 MiB
# malloc+free pairs) without a shim, with the shim before a change (GPUSLICE_LIB_BEFORE) and with
# the shim after it (GPUSLICE_LIB), interleaved round by round so that the card's drift lands on
# all three alike. Prints one line per configuration: the median and the lowest of the per-round
# medians (host ns per empty launch; µs per malloc+free pair).
#   GPUSLICE_LIB_BEFORE=.gpu-base/libgpuslice.so bash tests/gpu/overhead_ab.sh [ROUNDS]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROUNDS=${1:-6}
AFTER=$(realpath "${GPUSLICE_LIB:-.gpu/libgpuslice.so}")
BEFORE=$(realpath "${GPUSLICE_LIB_BEFORE:?name the shim before the change}")
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
work=$(mktemp -d)
"$NVCC" -O2 -arch=sm_90 -o "$work/bench" tests/gpu/bench.cu -ldl || exit 2
for r in $(seq "$ROUNDS"); do
    for cfg in none before after; do
        case $cfg in
            none) pre= ;;
            before) pre=$BEFORE ;;
            after) pre=$AFTER ;;
        esac
        env ${pre:+LD_PRELOAD=$pre} "$work/bench" 3 100000 100 >"$work/$cfg.$r" 2>&1 || echo "round $r $cfg failed" >&2
    done
done
for cfg in none before after; do
    launch=$(cat "$work"/$cfg.* | sed -n 's/^launch_ns_median=//p' | sort -n)
    pair=$(cat "$work"/$cfg.* | sed -n 's/^malloc_pair_us_median=//p' | sort -n)
    med() { awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
    printf '%-7s launch ns median %7.1f lowest %7.1f | malloc+free us median %6.2f lowest %6.2f\n' "$cfg" \
        "$(echo "$launch" | med)" "$(echo "$launch" | head -1)" "$(echo "$pair" | med)" "$(echo "$pair" | head -1)"
done
