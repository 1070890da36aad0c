#!/usr/bin/env bash
# One device call, several GPU scripts: each runs with its own time limit and its own output
# folder, every log is packed into one archive under $OUT (the device tool brings back at most
# eight files), and the tail of each script's output (its table) is printed last, in order.
#
#   bash tests/gpu/session.sh NAME:SECONDS:COMMAND [NAME:SECONDS:COMMAND ...]
#   e.g. bash tests/gpu/session.sh "test:300:make gpu-test" "bench:240:BENCH_ONLY=shares make gpu-bench"
set -u
final=${OUT:-.gpu/session}
mkdir -p "$final"
work=$(mktemp -d /tmp/gpusession.XXXXXX)
names=()
for spec in "$@"; do
    name=${spec%%:*}; rest=${spec#*:}
    limit=${rest%%:*}; cmd=${rest#*:}
    names+=("$name")
    mkdir -p "$work/$name"
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $cmd" | tee -a "$work/session.log"
    OUT="$work/$name" timeout --kill-after=10 "$limit" bash -c "$cmd" >"$work/$name.log" 2>&1
    rc=$?
    echo "== $name rc=$rc after $(( $(date +%s) - start ))s" | tee -a "$work/session.log"
    echo "$rc" >"$work/$name.rc"
done
tar czf "$final/logs.tgz" -C "$work" . 2>/dev/null
for name in "${names[@]}"; do
    echo
    echo "######## $name (rc $(cat "$work/$name.rc"))"
    tail -n "${SESSION_TAIL:-30}" "$work/$name.log"
done
