#!/usr/bin/env bash
# Issue 22: the real driver's checkpoint API in the cases the suspension policy relies on
# (tests/gpu/ckpt_semantics.cu's head). About 40 s; no shim, no controller. Prints one line per
# case and a short table last. Run from the repo root: bash tests/gpu/ckpt_semantics.sh
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${BUILD:-.gpu/build}
mkdir -p "$BUILD"
NVCC=${NVCC:-nvcc}
"$NVCC" -O1 -o "$BUILD/ckpt_semantics" "$HERE/ckpt_semantics.cu" -lcuda || { echo "ckpt_semantics: nvcc failed"; exit 2; }
P=$BUILD/ckpt_semantics
start_target() {  # MODE SECONDS -> sets TPID once the target printed "ready"
  local f; f=$(mktemp)
  "$P" target "$1" "$2" >"$f" 2>&1 &
  TPID=$!
  for _ in $(seq 1 200); do grep -q ready "$f" && break; sleep 0.05; done
  sleep 0.3
}
out=()
for mode in none init ctx; do
  start_target "$mode" 8
  out+=("$mode: $("$P" state "$TPID")")
  if [ "$mode" = ctx ]; then
    out+=("ctx lock 1000: $("$P" lock "$TPID" 1000 | tr '\n' ' ')")
  fi
  kill "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null
done
start_target spin 20
out+=("spin: $("$P" state "$TPID")")
out+=("spin lock 500: $("$P" lock "$TPID" 500 | tr '\n' ' ')")
out+=("spin lock 0 (docs: no timeout) not tried; spin after: $("$P" state "$TPID")")
kill "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null
# 5. legacy IPC: the exporter checkpointed under a live importer.
ipc=$BUILD/ckpt_ipc.handle
rm -f "$ipc"
exp_log=$(mktemp); imp_log=$(mktemp)
timeout -k 2 40 "$P" exporter "$ipc" 12 >"$exp_log" 2>&1 &
EPID=$!
for _ in $(seq 1 200); do grep -q ready "$exp_log" && break; sleep 0.05; done
timeout -k 2 30 "$P" importer "$ipc" 8 >"$imp_log" 2>&1 &
IPID=$!
for _ in $(seq 1 200); do grep -q ready "$imp_log" && break; sleep 0.05; done
sleep 0.5
EXP=$(pgrep -P "$EPID" | head -n 1)  # the exporter itself, under timeout
out+=("ipc exporter state: $("$P" state "${EXP:-0}")")
out+=("ipc cycle: $(timeout -k 2 30 "$P" cycle "${EXP:-0}" | tr '\n' ' ')")
wait "$IPID" 2>/dev/null
wait "$EPID" 2>/dev/null
out+=("ipc importer: $(tr '\n' ' ' <"$imp_log")")
out+=("ipc exporter: $(tr '\n' ' ' <"$exp_log")")
rm -f "$exp_log" "$imp_log"
echo "== ckpt_semantics (codes: 0 ok, 1 invalid value, 3 not initialized, 401 illegal state, 801 not supported, 909 timeout; states 0 running 1 locked 2 checkpointed 3 failed) =="
printf '%s\n' "${out[@]}"
