#!/usr/bin/env bash
# Issue 19, the switch between contexts under time-slicing (no shim, ~60 s): a 2 ms request
# (10 x 200 us kernels every 20 ms) alone, and beside a neighbour that stops its 50 us kernels
# PRESWITCH_QUIET_US before each request (what anticipation makes a budgeted neighbour do), with
# and without an empty kernel launched PRESWITCH_LEADS (us) before each due time. If the empty
# kernel takes the ~0.12 ms switch off the request, the shim can launch one itself for requests
# that keep time. Prints a table last: p50/p90/p99 and the wait before the first kernel ran.
# Usage: bash tests/gpu/preswitch.sh   (OUT: where the log goes, default .gpu/out)
set -u
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2
gpu_setup preswitch preswitch.log "preswitch: the context switch a request pays"
gpu_machine name,driver_version,compute_mode "time-sliced, no MPS, no shim"
BINP=$BUILD/preswitch
build_cu preswitch "$BINP" || exit 2
SECONDS_ROW=${PRESWITCH_SECONDS:-4}
QUIET=${PRESWITCH_QUIET_US:-800}
LEADS=${PRESWITCH_LEADS:-150 300 600}
trap 'pkill -f "$BINP" 2>/dev/null' EXIT
key() { sed -n "s/^$2=//p" "$1" | tail -1; }
rows=()
one() { # NAME NEIGHBOUR_KERNEL_US(0: none) LEAD_US
  local name=$1 nk=$2 lead=$3 t0f=$BUILD/$1.t0 npid=
  rm -f "$t0f"
  if [ "$nk" != 0 ]; then
    "$BINP" neighbour --t0-file "$t0f" --seconds "$SECONDS_ROW" --kernel-us "$nk" --quiet-us "$QUIET" --after-us 2500 \
      >"$BUILD/$name.n.out" 2>"$BUILD/$name.n.err" &
    npid=$!
  fi
  "$BINP" probe --t0-file "$t0f" --seconds "$SECONDS_ROW" --kernels 10 --kernel-us 200 --prewarm-us "$lead" \
    >"$BUILD/$name.out" 2>"$BUILD/$name.err"
  local rc=$?
  [ -n "$npid" ] && wait "$npid"
  local f=$BUILD/$name.out
  rows+=("$(printf '%-22s rc %d  p50 %s  p90 %s  p99 %s  wait p50 %s  p99 %s  dev %s  neighbour kernels %s' \
    "$name" "$rc" "$(key "$f" p50_ms)" "$(key "$f" p90_ms)" "$(key "$f" p99_ms)" "$(key "$f" start_p50_ms)" \
    "$(key "$f" start_p99_ms)" "$(key "$f" dev_p50_ms)" "$( [ -n "$npid" ] && key "$BUILD/$name.n.out" kernels || echo -)")")
  echo "${rows[-1]}" >>"$LOG"
}
one alone 0 0
one alone-lead300 0 300
one idle-neighbour 10000000 0
one neighbour 50 0
for l in $LEADS; do one "neighbour-lead$l" 50 "$l"; done
one neighbour-again 50 0
echo
echo "== preswitch (ms; 'wait' = before the first kernel ran; quiet ${QUIET} us before each request) =="
printf '%s\n' "${rows[@]}" | tee -a "$LOG"
