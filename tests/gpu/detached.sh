#!/usr/bin/env bash
# A GPU script longer than one device call (each is cut at 600 s): started in its own process
# session, which the device tool leaves running after the call returns (until the machine goes
# back, 30 s after the last call), and waited for by the next calls.
#
#   bash tests/gpu/detached.sh start NAME COMMAND   # returns at once; logs in /tmp/gpuslice-detached/NAME
#   bash tests/gpu/detached.sh wait NAME SECONDS    # waits up to SECONDS; prints the tail; copies the logs to $OUT
#
# The logs live outside the repository on purpose: a later call's carry replaces .gpu/ there.
# Example (issue 22's 10-minute alternation, two calls back to back):
#   bash tests/gpu/detached.sh start alt "SUSPEND_ONLY=alternation SUSPEND_ALTERNATE_S=600 bash tests/gpu/suspend.sh"
#   bash tests/gpu/detached.sh wait alt 560      # call 1 ends here, still running
#   bash tests/gpu/detached.sh wait alt 300      # call 2: the rest, then the table
set -u
dir=/tmp/gpuslice-detached/${2:?a name}
case "${1:-}" in
start)
    cmd=${3:?a command}
    mkdir -p "$dir"
    rm -f "$dir/rc"
    # The script's own $OUT is the log folder (it outlives this call's $OUT).
    # Its CUDA programs are built outside .gpu/ too: a later call that carries .gpu/ replaces the
    # folder there, and took a program built a second earlier with it (stop 18: ckpt_abi gone).
    GPU_BUILD_DIR=$dir/build OUT=$dir/out setsid nohup bash -c "( $cmd ); echo \$? >'$dir/rc'" >"$dir/log" 2>&1 </dev/null &
    echo "detached: $2 started (pid $!) at $(date -u +%H:%M:%S): $cmd"
    ;;
wait)
    limit=${3:?seconds}
    [ -d "$dir" ] || { echo "detached: no run named $2 on this machine (it went back?)"; exit 2; }
    end=$(( $(date +%s) + limit ))
    while [ ! -f "$dir/rc" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    if [ -n "${OUT:-}" ]; then tar czf "$OUT/$2-logs.tgz" -C "$dir" . 2>/dev/null; fi
    tail -n "${DETACHED_TAIL:-30}" "$dir/log"
    if [ -f "$dir/rc" ]; then
        echo "detached: $2 finished, rc $(cat "$dir/rc")"
        exit "$(cat "$dir/rc")"
    fi
    echo "detached: $2 still running at $(date -u +%H:%M:%S)"
    exit 3
    ;;
*)
    echo "usage: $0 start NAME COMMAND | wait NAME SECONDS" >&2
    exit 2
    ;;
esac
