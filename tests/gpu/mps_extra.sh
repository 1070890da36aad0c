#!/usr/bin/env bash
# Three measurements behind the notes on priorities (docs/NOTES.md, "Priorities"), ~3 minutes:
#   E1 the context-switch floor: the 2 ms latency probe alone, then next to a neighbour that is
#      idle 98% of the time (one ~20 us kernel every 1 ms, no shim). What the probe loses there
#      is the GPU's switch between the two contexts, not waiting for neighbour work.
#   E2 over MPS, what the client priority adds to the launch gating: probe `high` + 200 us
#      sharebench `low` under the shim, with GPUSLICE_MPS=off (gating only) and auto.
#   E3 the active-thread mapping: sharebench under MPS with GPUSLICE_SM_SHARE=30 sees a grid
#      for 30% of the SMs (MPS applied the percentage the shim wrote) and runs unthrottled.
# Needs .gpu/libgpuslice.so (make gpu-bundle), nvcc, an MPS control daemon binary. Prints a
# table last. Usage: bash tests/gpu/mps_extra.sh   (OUT: where the log goes, default .gpu/out)
set -u
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2
gpu_setup mps_extra mps_extra.log "gpuslice MPS extras"
for p in latprobe sharebench; do
  "$NVCC" -O2 -arch=sm_90 -o "$BUILD/$p" "$ROOT/$HERE/$p.cu" >>"$LOG" 2>&1 || { note "build $p failed"; exit 2; }
done
LAT=$BUILD/latprobe
SB=$BUILD/sharebench
MPSD=$(mktemp -d /tmp/gpuslice-mpsx.XXXXXX)
# mps_quit (common.sh): the daemon of E2/E3, if it was started.
trap 'mps_quit; rm -rf "$MPSD"; pkill -f "$BUILD/(latprobe|sharebench)" 2>/dev/null' EXIT
key() { sed -n "s/^$2=//p" "$1" | tail -1; }
run() { # NAME ENV... -- ARGV: output into $BUILD/NAME.out, stderr .err
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" "$@" >"$BUILD/$name.out" 2>"$BUILD/$name.err"
}
rows=()
row() { rows+=("$(printf '%-48s %s' "$1" "$2")"); echo "$1: $2" >>"$LOG"; }

# calibrations
"$LAT" calibrate --request-us 2000 >"$BUILD/cal_probe.out" 2>>"$LOG"
PI=$(key "$BUILD/cal_probe.out" iters)
"$LAT" calibrate --request-us 20 --kernels 1 >"$BUILD/cal_tiny.out" 2>>"$LOG"
TI=$(key "$BUILD/cal_tiny.out" iters); TI=${TI:-400}
"$SB" calibrate 200 >"$BUILD/cal_sb.out" 2>>"$LOG"
SI=$(key "$BUILD/cal_sb.out" iters)
echo "iters: probe $PI tiny $TI sharebench200 $SI" >>"$LOG"
PROBE=("$LAT" run --iters "$PI" --seconds 5 --kernels 10 --period-ms 10 --warmup-s 0.5)
lat_row() { row "$1" "p50 $(key "$2" p50_ms) p99 $(key "$2" p99_ms) min $(key "$2" min_ms) ms"; }

# E1
run e1_alone -- "${PROBE[@]}"
lat_row "E1 probe alone" "$BUILD/e1_alone.out"
"$LAT" run --iters "$TI" --seconds 8 --kernels 1 --period-ms 1 --warmup-s 0.2 >"$BUILD/e1_tiny.out" 2>&1 &
TP=$!
sleep 1
run e1_pair -- "${PROBE[@]}"
wait $TP
lat_row "E1 probe + idle-ish neighbour (20us/1ms)" "$BUILD/e1_pair.out"
row "E1 the neighbour's own requests" "p50 $(key "$BUILD/e1_tiny.out" p50_ms) ms, busy $(key "$BUILD/e1_tiny.out" busy_frac)"

# E2 and E3 under a daemon of our own
mps_start "$MPSD/pipe" "$MPSD/log" || { note "MPS daemon did not start"; exit 2; }
# Alone on purpose: a socket in the environment means "a controller is wanted" (issue 13), so
# say that running alone, at once, is what is meant here.
SHIM=(LD_PRELOAD="$LIB" GPUSLICE_LOG=info GPUSLICE_SOCKET=/nonexistent/gpuslice.sock GPUSLICE_ON_NO_CONTROLLER=alone GPUSLICE_CONTROLLER_WAIT=0)
run e2_sb_alone "${SHIM[@]}" -- "$SB" run --iters "$SI" --seconds 3
R0=$(key "$BUILD/e2_sb_alone.out" rate)
for mode in off auto; do
  run "e2_probe_alone_$mode" "${SHIM[@]}" GPUSLICE_MPS=$mode GPUSLICE_PRIORITY=high -- "${PROBE[@]}"
  lat_row "E2 MPS, probe alone under the shim, MPS=$mode" "$BUILD/e2_probe_alone_$mode.out"
  env "${SHIM[@]}" GPUSLICE_MPS=$mode GPUSLICE_PRIORITY=low "$SB" run --iters "$SI" --seconds 7.5 \
    >"$BUILD/e2_sb_$mode.out" 2>"$BUILD/e2_sb_$mode.err" &
  SP=$!
  sleep 1
  run "e2_pair_$mode" "${SHIM[@]}" GPUSLICE_MPS=$mode GPUSLICE_PRIORITY=high -- "${PROBE[@]}"
  wait $SP
  lat_row "E2 MPS, probe high + sb200 low, MPS=$mode" "$BUILD/e2_pair_$mode.out"
  row "E2 MPS=$mode neighbour rate vs alone under MPS" "$(key "$BUILD/e2_sb_$mode.out" rate) / $R0 per s"
  grep -h "served by MPS" "$BUILD/e2_pair_$mode.err" "$BUILD/e2_sb_$mode.err" >>"$LOG"
done

# E3
run e3_plain "${SHIM[@]}" -- "$SB" run --iters "$SI" --seconds 2
run e3_share "${SHIM[@]}" GPUSLICE_SM_SHARE=30 -- "$SB" run --iters "$SI" --seconds 2
row "E3 MPS, sharebench grid without / with share 30" "$(key "$BUILD/e3_plain.out" grid) / $(key "$BUILD/e3_share.out" grid) blocks (sms $(key "$BUILD/e3_plain.out" sms) / $(key "$BUILD/e3_share.out" sms))"
row "E3 rate without / with share 30" "$(key "$BUILD/e3_plain.out" rate) / $(key "$BUILD/e3_share.out" rate) kernels/s"
row "E3 the shim's line" "$(grep -h "served by MPS" "$BUILD/e3_share.err" | sed 's/.*served by MPS: //' | head -1)"

echo
echo "mps_extra $(date -u '+%F %T') UTC"
printf '%s\n' "${rows[@]}"
