#!/usr/bin/env bash
# gpuslice issue 19, managed spatial mode: `gpuslice serve --mps auto` runs one MPS control
# daemon per GPU and chooses per GPU between MPS and time-slicing. This checks the daemon and
# the choice, and measures whether the choice is the faster one for a high-priority latency
# probe beside a best-effort neighbour. Run as `bash tests/gpu/mps_managed.sh` on a machine
# with an NVIDIA GPU (sm_90), nvcc and nvidia-cuda-mps-control, with .gpu/libgpuslice.so and
# .gpu/gpuslice (make gpu-bundle); about 2 minutes.
#
#   GPUSLICE_LIB, GPUSLICE_BIN, OUT, NVCC, PYTHON  as in every GPU script (common.sh)
#   MPS_MANAGED_SECONDS    seconds per measured phase (default 8; 2 in a dry run)
#   MPS_MANAGED_LENGTHS    the neighbour's kernel lengths, µs (default "200 50": NOTES' pairs)
#   MPS_MANAGED_GPU        the GPU (nvidia-smi index, default 0), named to programs by UUID
#   MPS_MANAGED_DRY_RUN=1  no GPU: the simulated driver and NVML, a fake control program and
#                          the stand-ins of tests/gpu/dryrun; the daemon and decision rows are
#                          checked, the timings mean nothing (their rows say INFO)
#
# 1. decide: `serve --mps auto` with a config that has a high-priority group and no SM share
#    must publish the GPU `spatial` in its MPS table (row decide-high) and start the GPU's
#    daemon with CUDA_VISIBLE_DEVICES=<its UUID> and pipe directory <root>/<UUID> (row daemon);
#    without the high group, `time-sliced` (row decide-none). Killed with SIGKILL, the
#    controller leaves its daemon running; the next one adopts it: its first table says spatial
#    and `ls --json` names the same daemon, adopted (row adopt); a stopped controller leaves no
#    daemon and no table (row quit).
# 2. references, no shim, no MPS: the probe (latprobe: 10 kernels, 2 ms a request, one every
#    10 ms) alone, and each neighbour (sharebench, L µs kernels) alone.
# 3. each mode, time-sliced (`serve --mps off`) and managed MPS (`serve --mps auto`, the config
#    of decide-high), each L: the neighbour (group batch, priority low) and the probe (group
#    probe, high) under the shim, started together by one go file: the probe's p99 as a
#    multiple of alone, the neighbour's rate as % of its rate alone. Under MPS both programs'
#    logs must say they were sent to the GPU's daemon and that MPS serves them (row pointed).
# 4. row auto-L: the faster mode by p99 (the neighbour's rate beside), and whether auto chose it.
# Prints the table last. Exit: 0 all PASS, 1 a FAIL, 2 setup problem.
set -u -o pipefail
DRY=${MPS_MANAGED_DRY_RUN:-0}
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, BIN, OUTDIR, BUILD, PY, note, ...
LENGTHS=${MPS_MANAGED_LENGTHS:-"200 50"}
if [ "$DRY" = 1 ]; then
  SECS=${MPS_MANAGED_SECONDS:-2}
  dry_setup mps_managed mps_managed.log "gpuslice managed MPS"
else
  SECS=${MPS_MANAGED_SECONDS:-8}
  gpu_setup mps_managed mps_managed.log "gpuslice managed MPS"
  command -v nvidia-cuda-mps-control >/dev/null 2>&1 || { note "mps_managed: nvidia-cuda-mps-control not found"; exit 2; }
  gpu_machine index,name,uuid,driver_version,compute_mode "mps control: $(command -v nvidia-cuda-mps-control)"
fi
check_cli

# A short folder: each GPU's pipe directory is <W>/mps/<UUID>, and MPS fails past ~87 bytes.
W=$(mktemp -d /tmp/gpuslice-mpsm.XXXXXX) || exit 2
SERVE=
stop_serve() { # SIGTERM to the controller, waited for (15 s, then SIGKILL)
  [ -n "$SERVE" ] || return 0
  kill -TERM "$SERVE" 2>/dev/null
  local i
  for i in $(seq 150); do kill -0 "$SERVE" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVE" 2>/dev/null
  wait "$SERVE" 2>/dev/null
  SERVE=
}
PIDS=()
clean() {
  local p
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  stop_serve
  cat "$W/serve.log" >>"$LOG" 2>/dev/null
  rm -rf "$W"
}
trap clean EXIT

if [ "$DRY" = 1 ]; then
  export LD_LIBRARY_PATH=$ROOT/target/sim SIMCUDA_STATE=$W/simstate SIMCUDA_DEVICES=1 SIMCUDA_MPS=pipe
  # The fake control program of the dry runs (after tests/integration's FAKE_MPS_CONTROL):
  # makes `control` and the pid file, refuses a pipe directory a running daemon holds, quits on
  # `quit`.
  CONTROL=$ROOT/$HERE/dryrun/nvidia-cuda-mps-control
  PROBE=("$PY" "$ROOT/$HERE/dryrun/latprobe_stub.py")
  NB=("$PY" "$ROOT/$HERE/dryrun/sharebench_stub.py")
else
  CONTROL=$(command -v nvidia-cuda-mps-control)
  build_cu latprobe "$BUILD/latprobe" || exit 2
  build_cu sharebench "$BUILD/sharebench" || exit 2
  PROBE=("$BUILD/latprobe")
  NB=("$BUILD/sharebench")
fi

ROWS=()
FAILED=0
row() { # ID RESULT DETAIL
  ROWS+=("$(printf '%-12s %-5s %s' "$1" "$2" "$3")")
  note "row: $1 $2 $3"
  [ "$2" = FAIL ] && FAILED=1
  return 0
}
val() { sed -n "s/^$1=//p" "$2" | tail -n 1; } # KEY FILE: the last KEY=value line's value
waitready() { # FILE...: until each printed ready=1 (60 s at most)
  local f deadline=$(($(date +%s) + 60))
  for f in "$@"; do
    until grep -q '^ready=1' "$f" 2>/dev/null; do
      [ "$(date +%s)" -gt "$deadline" ] && return 1
      sleep 0.05
    done
  done
}

cat >"$W/high.toml" <<'EOF'
[groups.probe]
priority = "high"
[groups.batch]
priority = "low"
EOF
cat >"$W/none.toml" <<'EOF'
[groups.batch]
priority = "low"
EOF
TABLE=$W/sock.mps
serve_start() { # MPS_POLICY CONFIG [LEDGER]: gpuslice serve in the background, until `status` answers
  GPUSLICE_LOG=info "$BIN" serve --socket "$W/sock" --ledger "${3:-$W/ledger}" --config "$2" --mps "$1" \
    --mps-control "$CONTROL" --mps-log-dir "$W/mpslog" >>"$W/serve.log" 2>&1 &
  SERVE=$!
  local i
  for i in $(seq 100); do
    "$BIN" status --socket "$W/sock" >/dev/null 2>&1 && return 0
    kill -0 "$SERVE" 2>/dev/null || break
    sleep 0.1
  done
  note "mps_managed: gpuslice serve --mps $1 did not answer (its log is in $LOG)"
  return 1
}
mode_of() { awk -v u="$1" '$1 == u { print $2 }' "$TABLE" 2>/dev/null; } # UUID: its mode in the table
wait_mode() { # UUID MODE: until the table says so (10 s)
  local i
  for i in $(seq 100); do
    [ "$(mode_of "$1")" = "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

# ---- 1. the daemon and the decisions
serve_start auto "$W/high.toml" || exit 2
for _ in $(seq 100); do [ -s "$TABLE" ] && break; sleep 0.1; done
if [ "$DRY" = 1 ]; then
  GPU_UUID=$(awk '!/^#/ { print $1; exit }' "$TABLE" 2>/dev/null)
else
  GPU_UUID=$(nvidia-smi -i "${MPS_MANAGED_GPU:-0}" --query-gpu=uuid --format=csv,noheader 2>>"$LOG" | tr -d ' ')
fi
[ -n "$GPU_UUID" ] || { note "mps_managed: no GPU UUID (nvidia-smi, or the controller's table $TABLE)"; exit 2; }
note "GPU: $GPU_UUID; table: $(grep -v '^#' "$TABLE" 2>/dev/null | tr '\n' ';')"
PIPE=$W/mps/$GPU_UUID
if wait_mode "$GPU_UUID" spatial; then
  AUTO=spatial
  row decide-high PASS "a high-priority group, no share: auto publishes $GPU_UUID spatial"
else
  AUTO=$(mode_of "$GPU_UUID")
  row decide-high FAIL "auto with a high-priority group and no share: the table says ${AUTO:-nothing} for $GPU_UUID (log)"
fi
DAEMON=
for p in $(ps -o pid= --ppid "$SERVE" 2>/dev/null); do
  envs=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null)
  if grep -qx "CUDA_MPS_PIPE_DIRECTORY=$PIPE" <<<"$envs"; then
    DAEMON=$p
    VISIBLE=$(sed -n 's/^CUDA_VISIBLE_DEVICES=//p' <<<"$envs")
  fi
done
if [ -n "$DAEMON" ] && [ "${VISIBLE:-}" = "$GPU_UUID" ] && [ -e "$PIPE/control" ]; then
  row daemon PASS "pid $DAEMON, a child of serve: CUDA_VISIBLE_DEVICES=$VISIBLE, listening in $PIPE"
else
  row daemon FAIL "no daemon child of serve for $PIPE seeing $GPU_UUID (pid ${DAEMON:-none}, CUDA_VISIBLE_DEVICES=${VISIBLE:-?}, control $([ -e "$PIPE/control" ] && echo present || echo missing))"
fi
# The trap of stop 16: a controller killed with SIGKILL leaves its daemon; the next one must
# adopt it (its first table spatial, `ls --json` naming the same pid, adopted), and quit it.
note "the daemon's pipe directory: $(ls -la "$PIPE" 2>&1 | tr '\n' ';')"
kill -KILL "$SERVE" 2>/dev/null
wait "$SERVE" 2>/dev/null
SERVE=
sleep 0.2
if [ -n "$DAEMON" ] && alive "$DAEMON"; then
  serve_start auto "$W/high.toml" || exit 2
  FIRST=$(mode_of "$GPU_UUID")
  SEEN=$("$BIN" ls --json --socket "$W/sock" 2>>"$LOG" | "$PY" -c 'import json, sys; r = [g for g in json.load(sys.stdin).get("mps", []) if g["uuid"] == sys.argv[1]]; d = r[0]["daemon"] if r else {}; print(d.get("pid"), d.get("adopted"), r[0]["mode"] if r else None)' "$GPU_UUID" 2>>"$LOG")
  if [ "$FIRST" = spatial ] && [ "$SEEN" = "$DAEMON True spatial" ]; then
    row adopt PASS "after SIGKILL to serve, daemon $DAEMON lived on; the next serve adopted it: first table spatial, ls --json pid $DAEMON adopted"
  else
    row adopt FAIL "after SIGKILL to serve: the next serve's first table says ${FIRST:-nothing}; ls --json: pid, adopted, mode = ${SEEN:-?} (want $DAEMON True spatial; log)"
  fi
else
  row adopt FAIL "daemon ${DAEMON:-?} did not outlive a controller killed with SIGKILL"
fi
stop_serve
sleep 0.2
if [ -n "$DAEMON" ] && ! alive "$DAEMON" && [ ! -e "$TABLE" ]; then
  row quit PASS "after SIGTERM to serve: daemon $DAEMON gone, table removed"
else
  row quit FAIL "after SIGTERM to serve: daemon ${DAEMON:-?} $(alive "${DAEMON:-0}" && echo alive || echo gone), table $([ -e "$TABLE" ] && echo left || echo removed)"
fi
# A ledger file of its own: a controller keeps the pinned groups the ledger file it starts on
# kept (a restart must not undo live edits). The config's `probe` (high), which none.toml drops,
# is unpinned at a restart since branch cfgorigin, but goes only once no process runs in it.
serve_start auto "$W/none.toml" "$W/ledger-none" || exit 2
if wait_mode "$GPU_UUID" time-sliced; then
  row decide-none PASS "no high-priority group: auto publishes time-sliced ($(awk -v u="$GPU_UUID" '$1 == u { $1 = $2 = $3 = $4 = ""; print }' "$TABLE" | sed 's/^ *//'))"
else
  row decide-none FAIL "no high-priority group: the table says $(mode_of "$GPU_UUID") for $GPU_UUID"
fi
stop_serve

# ---- 2. references, no shim, no MPS
SHIM=(LD_PRELOAD="$LIB" GPUSLICE_SOCKET="$W/sock" GPUSLICE_LOG=info CUDA_VISIBLE_DEVICES="$GPU_UUID")
"${PROBE[@]}" calibrate --request-us 2000 --kernels 10 >"$W/cal_probe.out" 2>>"$LOG"
PI=$(val iters "$W/cal_probe.out")
declare -A NI RATE0
for l in $LENGTHS; do
  if [ "$DRY" = 1 ]; then
    NI[$l]=$((l * 1000))
  else
    "${NB[@]}" calibrate "$l" >"$W/cal_nb$l.out" 2>>"$LOG"
    NI[$l]=$(val iters "$W/cal_nb$l.out")
  fi
done
note "iters: probe ${PI:-?}; neighbours $(for l in $LENGTHS; do printf '%s us: %s ' "$l" "${NI[$l]:-?}"; done)"
[ -n "$PI" ] || { note "mps_managed: the probe's calibration failed (log)"; exit 2; }
PROBE_RUN=(run --iters "$PI" --kernels 10 --period-ms 10 --seconds "$SECS" --warmup-s 0.5)
"${PROBE[@]}" "${PROBE_RUN[@]}" >"$W/alone.out" 2>>"$LOG"
ALONE=$(val p99_ms "$W/alone.out")
note "probe alone: p50 $(val p50_ms "$W/alone.out") p99 $ALONE ms, busy $(val busy_frac "$W/alone.out")"
for l in $LENGTHS; do
  "${NB[@]}" run --iters "${NI[$l]}" --seconds "$SECS" --warmup-s 0.5 >"$W/nb$l.alone.out" 2>>"$LOG"
  RATE0[$l]=$(val rate "$W/nb$l.alone.out")
  note "neighbour $l us alone: ${RATE0[$l]} kernels/s"
done

# ---- 3. the pairs, time-sliced and over the managed MPS daemon
declare -A P99 NBPCT
for mode in time-sliced spatial; do
  if [ "$mode" = spatial ]; then serve_start auto "$W/high.toml" || exit 2; else serve_start off "$W/high.toml" || exit 2; fi
  if [ "$mode" = spatial ] && ! wait_mode "$GPU_UUID" spatial; then
    row pointed FAIL "serve --mps auto did not make $GPU_UUID spatial again"
  fi
  for l in $LENGTHS; do
    tag=$mode-$l
    go=$W/go-$tag
    env "${SHIM[@]}" GPUSLICE_GROUP=batch "${NB[@]}" run --iters "${NI[$l]}" --seconds "$SECS" --warmup-s 0.5 --go-file "$go" \
      >"$W/$tag.nb.out" 2>"$W/$tag.nb.err" &
    npid=$!
    env "${SHIM[@]}" GPUSLICE_GROUP=probe "${PROBE[@]}" "${PROBE_RUN[@]}" --go-file "$go" >"$W/$tag.probe.out" 2>"$W/$tag.probe.err" &
    ppid=$!
    PIDS=("$npid" "$ppid")
    waitready "$W/$tag.nb.out" "$W/$tag.probe.out" || note "$tag: not both ready within 60 s; go anyway"
    touch "$go"
    wait "$ppid"
    wait "$npid"
    PIDS=()
    { echo "--- $tag probe stderr"; cat "$W/$tag.probe.err"; echo "--- $tag neighbour stderr"; cat "$W/$tag.nb.err"; } >>"$LOG"
    P99[$tag]=$(val p99_ms "$W/$tag.probe.out")
    NBPCT[$tag]=$(awk -v r="$(val rate "$W/$tag.nb.out")" -v r0="${RATE0[$l]}" 'BEGIN { if (r0 > 0 && r != "") printf "%.1f", 100 * r / r0 }')
    note "$tag: probe p99 ${P99[$tag]:-?} ms, neighbour ${NBPCT[$tag]:-?}% of its rate alone"
  done
  if [ "$mode" = spatial ]; then
    l=${LENGTHS%% *}
    sent=$(cat "$W/spatial-$l.probe.err" "$W/spatial-$l.nb.err" | grep -c "is spatial.*over its MPS daemon")
    served=$(cat "$W/spatial-$l.probe.err" "$W/spatial-$l.nb.err" | grep -c "served by MPS")
    if [ "$sent" -ge 2 ] && [ "$served" -ge 2 ]; then
      row pointed PASS "under serve --mps auto, probe and neighbour were sent to $PIPE and MPS serves them (${sent} + ${served} log lines)"
    else
      row pointed FAIL "under serve --mps auto: $sent 'sent to the daemon' and $served 'served by MPS' lines of 2 each (log)"
    fi
  else
    l=${LENGTHS%% *}
    if grep -q "served by MPS" "$W/time-sliced-$l.probe.err" "$W/time-sliced-$l.nb.err"; then
      row sliced FAIL "under serve --mps off a program says MPS serves it (is another MPS daemon running on this machine?)"
    fi
  fi
  stop_serve
done

# ---- 4. did auto choose the faster mode?
for l in $LENGTHS; do
  ts=${P99[time-sliced-$l]:-}
  mp=${P99[spatial-$l]:-}
  if [ -z "$ts" ] || [ -z "$mp" ] || [ -z "$ALONE" ]; then
    row "auto-$l" FAIL "a run gave no p99 (time-sliced ${ts:-?}, MPS ${mp:-?}, alone ${ALONE:-?}; log)"
    continue
  fi
  faster=$(awk -v t="$ts" -v m="$mp" 'BEGIN { print (m < t) ? "spatial" : "time-sliced" }')
  detail=$(awk -v l="$l" -v t="$ts" -v m="$mp" -v a="$ALONE" -v nt="${NBPCT[time-sliced-$l]:-?}" -v nm="${NBPCT[spatial-$l]:-?}" 'BEGIN {
    printf "%s us neighbour: time-sliced p99 %.3f ms = x%.3f alone, neighbour %s%%; MPS p99 %.3f ms = x%.3f, neighbour %s%%", l, t, t / a, nt, m, m / a, nm }')
  verdict=FAIL
  [ "$faster" = "$AUTO" ] && verdict=PASS
  [ "$DRY" = 1 ] && verdict=INFO
  row "auto-$l" "$verdict" "$detail; faster by p99: $faster; auto chose ${AUTO:-?}"
done

note "elapsed: $(($(date +%s) - T0)) s; log: $LOG"
echo
echo "== mps_managed results =="
printf '%s\n' "${ROWS[@]}"
exit $FAILED
