#!/usr/bin/env bash
# gpuslice issue 19, part 2: sliced kernels next to a latency probe. Run from the repo root as
# `bash tests/gpu/ptxslice_probe.sh` on a machine with an NVIDIA GPU (sm_90) and nvcc, with the
# shim built (.gpu/libgpuslice.so); about 2 minutes (PTXSLICE_PROBE_SECONDS per phase), 4 with
# PTXSLICE_PROBE_MPS=both.
#
#   GPUSLICE_LIB, OUT, NVCC, PYTHON          as in every GPU script (common.sh)
#   PTXSLICE_PROBE_SECONDS                   seconds per measured phase (default 8)
#   PTXSLICE_PROBE_LENGTHS                   the neighbour's kernel lengths, µs (default "50 200 2000 10000")
#   PTXSLICE_PROBE_DRY_RUN=1                 no GPU: the simulated driver, cuclient for both
#                                            programs, the fixture PTX; the GPU rows say SKIP.
#   PTXSLICE_PROBE_NEIGHBOUR_LOG             GPUSLICE_LOG of the sliced neighbour beside the probe
#                                            (default info,gpuslice::hooks::launch=debug: the
#                                            shim's line every 2 s per kernel, launches, slices,
#                                            blocks per slice, wave, estimate and samples; the
#                                            row quotes the last one).
#   PTXSLICE_PROBE_MPS                       0 (default): time-slicing. 1: steps 1 and 2 over a
#                                            private MPS control daemon (`$MPS_CONTROL -d`,
#                                            default nvidia-cuda-mps-control; pipe and log folders
#                                            under the work folder, /tmp when its path is too
#                                            long for MPS's sockets; quit at the end and on every
#                                            way out), every program its client, no
#                                            CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; the shim maps the
#                                            classes onto MPS client priorities (probe high 0,
#                                            neighbour low 1). Rows probe-L-mps, probe-L-off-mps
#                                            (same checks) and mps-quit; a -mps row also FAILs
#                                            unless the shim's log of each program says MPS serves
#                                            it with its class's client priority (the device's
#                                            MPS_ENABLED attribute) and the daemon lists both pids
#                                            among its server's clients (get_server_list,
#                                            get_client_list). both: the time-sliced rows, then
#                                            the -mps rows, one probe calibration. In a dry run,
#                                            tests/gpu/dryrun's fake control program and the
#                                            simulated driver (SIMCUDA_MPS=pipe): rows mps-high and
#                                            mps-low (a cuclient at each class is served by MPS
#                                            with client priority 0 / 1) and mps-quit; the
#                                            probe-L-mps rows say SKIP.
#   GPUSLICE_PRIORITY_BUDGET_US              not the script's, but inherited by both programs:
#                                            the low neighbour keeps this much estimated device
#                                            time in flight while the probe lives, instead of one
#                                            launch (shim/src/policy/flight_cost.rs); noted in the
#                                            log and the table's title.
#   GPUSLICE_PRIORITY_ANTICIPATE             the same: on (the shim's default) or off; under a
#                                            budget the neighbour's work ends before the
#                                            probe's next request is due (its requests keep time).
#   GPUSLICE_PRIORITY_SWITCH_AHEAD           the same, for the probe: on (default) or off; on,
#                                            it launches an empty kernel as each window opens so
#                                            the GPU's switch to its context comes before the
#                                            request (shim/src/policy/switch_ahead.rs).
#
# 1. The probe (latprobe, high priority): 10 kernels of 200 µs per request, one request every
#    20 ms; alone under the shim: p99_alone.
# 2. For each kernel length L: the neighbour (ptxslice/neighbour.cu: spin.cu's PTX through
#    cuModuleLoadData, low priority; its kernel is made of ~20 µs waves of blocks, as many as
#    make L, since a slice cannot be shorter than a block) alone: its rate; then beside the
#    probe, both started by one go file and running for the probe's warm-up and phase, sliced
#    (GPUSLICE_SLICE=low, the default) and not (off). Row probe-L: p99 <= 1.05 x alone and the
#    neighbour's share of the time the probe leaves (rate / rate alone / (1 - probe busy
#    fraction)) >= 80 %; the unsliced pair is an INFO row. The neighbour checks its last
#    launch's output (every block saw its own index and the original grid).
# 3. First load of 1 MB of PTX (copies of the suite, bigptx.py) in a low process: the shim's
#    log line "transformed, X ms" per MB (<= 1000) and the second load from the cache.
# Prints the PASS/FAIL table last. Exit: 0 all PASS, 1 a FAIL, 2 setup problem.
set -u -o pipefail
DRY=${PTXSLICE_PROBE_DRY_RUN:-0}
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
SRC=$ROOT/$HERE/ptxslice
SECS=${PTXSLICE_PROBE_SECONDS:-8}
LENGTHS=${PTXSLICE_PROBE_LENGTHS:-"50 200 2000 10000"}
NEIGHBOUR_LOG=${PTXSLICE_PROBE_NEIGHBOUR_LOG:-info,gpuslice::hooks::launch=debug,gpuslice::policy::hold_summary=debug}

if [ "$DRY" = 1 ]; then
  dry_setup ptxslice_probe ptxslice_probe.log "gpuslice sliced kernels beside a probe"
else
  gpu_setup ptxslice_probe ptxslice_probe.log "gpuslice sliced kernels beside a probe"
  gpu_machine name,driver_version,compute_cap "python: $("$PY" --version 2>&1)"
fi
WORK=$OUTDIR/ptxslice_probe
rm -rf "$WORK"
mkdir -p "$WORK" || exit 2
case ${PTXSLICE_PROBE_MPS:-0} in
  0) PASSES=sliced ;;
  1) PASSES=mps ;;
  both) PASSES="sliced mps" ;;
  *) note "ptxslice_probe: PTXSLICE_PROBE_MPS=$PTXSLICE_PROBE_MPS: want 0, 1 or both"; exit 2 ;;
esac
[ "$PASSES" = sliced ] || mps_prepare ptxslice_probe "PTXSLICE_PROBE_MPS=$PTXSLICE_PROBE_MPS"
note "passes: $PASSES; GPUSLICE_PRIORITY_BUDGET_US=${GPUSLICE_PRIORITY_BUDGET_US:-unset} GPUSLICE_PRIORITY_ANTICIPATE=${GPUSLICE_PRIORITY_ANTICIPATE:-unset} GPUSLICE_PRIORITY_SWITCH_AHEAD=${GPUSLICE_PRIORITY_SWITCH_AHEAD:-unset} (both programs inherit them; the low neighbour applies the first two while the probe lives, the probe the third)"
# On every way out: the programs of the row under way, the MPS daemon (mps_quit, common.sh).
PIDS=()
clean_up_probe() {
  local p
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  mps_quit
  return 0
}
trap clean_up_probe EXIT
trap_signals # SIGINT/SIGTERM/SIGHUP: leave with 130/143 through the EXIT trap
# No controller: each process runs alone on its own limits; a private cache per run.
export GPUSLICE_ON_NO_CONTROLLER=alone GPUSLICE_CONTROLLER_WAIT=0 GPUSLICE_SOCKET=$WORK/no-controller.sock
export GPUSLICE_PTX_CACHE=$WORK/cache GPUSLICE_LOG=info

ROWS=()
FAILED=0
row() { # ID RESULT DETAIL
  ROWS+=("$(printf '%-19s %-5s %s' "$1" "$2" "$3")")
  note "row: $1 $2 $3"
  [ "$2" = FAIL ] && FAILED=1
  return 0
}
val() { sed -n "s/^$1=//p" "$2" | tail -n 1; } # KEY FILE: the last KEY=value line's value
shim_ms() { sed -n "s/.*, $2, \([0-9.]*\) ms).*/\1/p" "$1" | tail -n 1; } # LOG WHAT: the slicer's time
ready() { grep -q '^ready=1' "$1" 2>/dev/null; }
waitready() { # FILE...: until each printed ready=1 (60 s at most)
  local f deadline=$(($(date +%s) + 60))
  for f in "$@"; do
    until ready "$f"; do
      [ "$(date +%s)" -gt "$deadline" ] && return 1
      sleep 0.1
    done
  done
}

# ---- 3 (first: it needs no GPU program). The cost of slicing at load, in the shim.
big=$WORK/big.ptx
if [ "$DRY" = 1 ]; then
  suite=$ROOT/ptx/tests/fixtures/suite.ptx
else
  suite=$WORK/suite.ptx
  "$NVCC" -ptx -O3 -arch=sm_90 -o "$suite" "$SRC/suite.cu" >>"$LOG" 2>&1 || row load FAIL "nvcc -ptx suite.cu failed (log)"
fi
load_once() { # OUTFILE: one low-priority load of $big under the shim
  if [ "$DRY" = 1 ]; then
    LD_LIBRARY_PATH=$ROOT/target/sim SIMCUDA_STATE=$WORK/simstate GPUSLICE_PRIORITY=low LD_PRELOAD=$LIB \
      "$ROOT/target/clients/cuclient-link" init ctx 0 modimage "$big" >"$1" 2>&1
  else
    GPUSLICE_PRIORITY=low LD_PRELOAD=$LIB "$NEIGHBOUR" "$big" --load-only >"$1" 2>&1
  fi
}
if [ -f "$suite" ] && "$PY" "$SRC/bigptx.py" "$suite" "$big" 1 >>"$LOG" 2>&1; then
  if [ "$DRY" != 1 ]; then
    NEIGHBOUR=$BUILD/ptxslice_neighbour
    up_to_date "$NEIGHBOUR" "$SRC/neighbour.cu" || "$NVCC" -O2 -arch=sm_90 -o "$NEIGHBOUR" "$SRC/neighbour.cu" -lcuda >>"$LOG" 2>&1 ||
      { row build FAIL "nvcc neighbour.cu failed (log)"; NEIGHBOUR=; }
  fi
  if [ "$DRY" = 1 ] || [ -n "${NEIGHBOUR:-}" ]; then
    load_once "$WORK/load1.out"
    load_once "$WORK/load2.out"
    cat "$WORK/load1.out" "$WORK/load2.out" >>"$LOG"
    mb=$(awk -v b="$(wc -c <"$big")" 'BEGIN { printf "%.3f", b / 1e6 }')
    first=$(shim_ms "$WORK/load1.out" transformed)
    hit=$(shim_ms "$WORK/load2.out" "from the cache")
    # A dry run uses the debug build (the sha2 crate is optimised there, the parser is not):
    # its time per MB is for information.
    limit=1000
    [ "$DRY" = 1 ] && limit=1000000
    if [ -n "$first" ] && [ -n "$hit" ] && awk -v f="$first" -v m="$mb" -v l="$limit" 'BEGIN { exit !(f / m <= l) }'; then
      row load PASS "first load of $mb MB of PTX: slicing $first ms ($(awk -v f="$first" -v m="$mb" 'BEGIN { printf "%.0f", f / m }') ms per MB, limit $limit); cache hit $hit ms${NEIGHBOUR:+; cuModuleLoadData in all $(val load_ms "$WORK/load1.out") / $(val load_ms "$WORK/load2.out") ms}"
    else
      row load FAIL "no slicer timing in the shim's log, or over 1000 ms per MB (first ${first:-?} ms, hit ${hit:-?} ms; log)"
    fi
  fi
else
  row load FAIL "could not make the 1 MB module (bigptx.py; log)"
fi
rm -f "$big"

# ---- 1 and 2, on the GPU; per pass: time-sliced (row ids as they are) and over a private MPS
# daemon (ids ending in -mps; mps_begin, mps_end, mps_clients and mps_served: common.sh).
probe_run() { # OUT GO: the probe at high priority for $SECS seconds, in the background
  # (PROBE_PID: the program itself); its stderr into OUT.err
  env GPUSLICE_PRIORITY=high LD_PRELOAD="$LIB" "$PROBE" run --iters "$iters" --kernels 10 --period-ms 20 --seconds "$SECS" \
    --go-file "$2" >"$1" 2>"$1.err" &
  PROBE_PID=$!
}
probe_rows() { # SUFFIX ("" time-sliced, -mps over the daemon): the probe alone, then each L
  local sfx=$1 l mode go npid alone rate_alone cycles grid p99 busy rate check detail verdict sliced slicing where over served
  touch "$WORK/go-alone$sfx"
  probe_run "$WORK/alone$sfx.out" "$WORK/go-alone$sfx"
  PIDS=("$PROBE_PID")
  wait "$PROBE_PID"
  cat "$WORK/alone$sfx.out.err" >>"$LOG"
  alone=$(val p99_ms "$WORK/alone$sfx.out")
  where=
  [ -n "$sfx" ] && where=", over MPS: $(mps_says "$WORK/alone$sfx.out.err" 0)"
  note "probe alone$sfx: p99 $alone ms, busy $(val busy_frac "$WORK/alone$sfx.out")$where"
  for l in $LENGTHS; do
    # The neighbour alone (nothing high lives: whole launches), which also fixes its cycles.
    touch "$WORK/go-n$l$sfx"
    GPUSLICE_PRIORITY=low LD_PRELOAD=$LIB "$NEIGHBOUR" "$WORK/spin.ptx" "$l" "$SECS" --go-file "$WORK/go-n$l$sfx" \
      >"$WORK/n$l$sfx.alone.out" 2>"$WORK/n$l$sfx.alone.err" &
    PIDS=("$!")
    wait "${PIDS[0]}"
    cat "$WORK/n$l$sfx.alone.err" >>"$LOG"
    cycles=$(val cycles "$WORK/n$l$sfx.alone.out")
    grid=$(val grid "$WORK/n$l$sfx.alone.out")
    where=
    [ -n "$sfx" ] && where="over MPS: $(mps_says "$WORK/n$l$sfx.alone.err" 1); "
    note "neighbour $l µs$sfx: $where$(tr '\n' ' ' <"$WORK/n$l$sfx.alone.out")"
    rate_alone=$(val rate "$WORK/n$l$sfx.alone.out")
    for mode in low off; do
      go=$WORK/go-$l-$mode$sfx
      GPUSLICE_LOG=$NEIGHBOUR_LOG GPUSLICE_SLICE=$mode GPUSLICE_PRIORITY=low LD_PRELOAD=$LIB "$NEIGHBOUR" "$WORK/spin.ptx" "$l" "$SECS.5" \
        --cycles "$cycles" --grid "$grid" --go-file "$go" >"$WORK/n$l.$mode$sfx.out" 2>"$WORK/n$l.$mode$sfx.err" &
      npid=$!
      probe_run "$WORK/p$l.$mode$sfx.out" "$go"
      PIDS=("$npid" "$PROBE_PID")
      over=
      if waitready "$WORK/n$l.$mode$sfx.out" "$WORK/p$l.$mode$sfx.out"; then
        # Both have their contexts: the daemon's view before the measured phase starts.
        [ -n "$sfx" ] && over=$(mps_clients)
        touch "$go"
      fi
      wait "$PROBE_PID"
      wait "$npid"
      cat "$WORK/n$l.$mode$sfx.err" "$WORK/p$l.$mode$sfx.out.err" >>"$LOG"
      p99=$(val p99_ms "$WORK/p$l.$mode$sfx.out")
      busy=$(val busy_frac "$WORK/p$l.$mode$sfx.out")
      rate=$(val rate "$WORK/n$l.$mode$sfx.out")
      check=$(val check "$WORK/n$l.$mode$sfx.out")
      detail=$(awk -v p="$p99" -v a="$alone" -v r="$rate" -v ra="$rate_alone" -v b="$busy" 'BEGIN {
        if (a <= 0 || ra <= 0 || b >= 1) { print "?"; exit }
        printf "p99 %.3f ms = x%.3f alone; neighbour %.1f%% of its rate = %.1f%% of the time the probe leaves", p, p / a, 100 * r / ra, 100 * (r / ra) / (1 - b) }')
      verdict=$(awk -v p="$p99" -v a="$alone" -v r="$rate" -v ra="$rate_alone" -v b="$busy" 'BEGIN {
        ok = a > 0 && ra > 0 && b < 1 && p / a <= 1.05 && (r / ra) / (1 - b) >= 0.8; print ok ? "PASS" : "FAIL" }')
      [ "$check" = ok ] || { verdict=FAIL; detail="$detail; the neighbour's output check: ${check:-missing}"; }
      # A probe thread that wakes late is the host's doing (no CUDA call is on that path): say so
      # beside the verdict, which still counts it, so a reader does not hunt for it in the GPU.
      detail="$detail$(awk -v w="$(val wake_late_max_ms "$WORK/p$l.$mode$sfx.out")" \
        -v n="$(val late_releases "$WORK/p$l.$mode$sfx.out")" 'BEGIN {
        if (w + 0 > 1) printf "; HOST STALL: the probe woke up to %.1f ms late (%d late releases)", w, n }')"
      sliced=$(grep -c 'kernels sliced' "$WORK/n$l.$mode$sfx.err")
      # The shim's last summary of the kernel's slices: "kernel spin: N launches in T s, S in
      # slices: M slices of B blocks on average (wave W); estimate ..." (debug).
      slicing=$(grep -o 'kernel spin: .*' "$WORK/n$l.$mode$sfx.err" | tail -n 1 | sed -n 's/^kernel spin: \([0-9]*\) launches in [0-9.]* s, [0-9]* in slices: \([0-9]*\) slices of \([0-9]*\) blocks.*(wave \([0-9]*\)); estimate \([a-z0-9]*\) ps.*/\1 \2 \3 \4 \5/p')
      if [ -n "$slicing" ]; then
        detail="$detail; $(echo "$slicing" | awk '{ printf "last 2 s: %.1f slices per launch of %d blocks (%.1f waves), %s ps per block", ($1 ? $2 / $1 : 0), $3, ($4 ? $3 / $4 : 0), $5 }')"
      fi
      if [ -n "$sfx" ]; then
        # Over MPS for real: the shim saw MPS serve each program (the device's MPS_ENABLED
        # attribute) with the client priority of its class, and the daemon lists both.
        served=$(mps_served "$over" probe "$PROBE_PID" "$WORK/p$l.$mode$sfx.out.err" 0 \
          neighbour "$npid" "$WORK/n$l.$mode$sfx.err" 1) || verdict=FAIL
        detail="$detail; $served"
      elif [ -n "$(mps_client "$WORK/n$l.$mode$sfx.err")$(mps_client "$WORK/p$l.$mode$sfx.out.err")" ]; then
        detail="$detail; NOTE: a program says MPS serves it (another daemon in CUDA_MPS_PIPE_DIRECTORY or /tmp/nvidia-mps?)"
      fi
      if [ "$mode" = low ]; then
        row "probe-$l$sfx" "$verdict" "$l µs neighbour, sliced ($sliced slicing lines): $detail"
      else
        row "probe-$l-off$sfx" INFO "$l µs neighbour, not sliced: $detail"
      fi
      PIDS=()
    done
  done
}

if [ "$DRY" = 1 ]; then
  for pass in $PASSES; do
    sfx=
    if [ "$pass" = mps ]; then
      sfx=-mps
      if mps_begin "$WORK/mps/pipe" "$WORK/mps/log"; then
        # The simulated driver answers MPS_ENABLED when the pipe folder holds `control`: the
        # shim's view of a client at each class, as the GPU rows check it.
        for c in high:0 low:1; do
          LD_LIBRARY_PATH=$ROOT/target/sim SIMCUDA_STATE=$WORK/simstate SIMCUDA_MPS=pipe GPUSLICE_PRIORITY=${c%:*} LD_PRELOAD=$LIB \
            "$ROOT/target/clients/cuclient-link" init ctx 0 >"$WORK/mps-${c%:*}.out" 2>&1
          cat "$WORK/mps-${c%:*}.out" >>"$LOG"
          said=$(mps_says "$WORK/mps-${c%:*}.out" "${c#*:}")
          if [ "$said" = "client priority ${c#*:}" ]; then
            row "mps-${c%:*}" PASS "dry run: cuclient at ${c%:*} over the fake daemon ($MPS_CONTROL), simulated driver: the shim says $said"
          else
            row "mps-${c%:*}" FAIL "dry run: cuclient at ${c%:*} over the fake daemon: $said (log)"
          fi
        done
        mps_end
      fi
    fi
    for l in $LENGTHS; do row "probe-$l$sfx" SKIP "dry run: latprobe and the PTX neighbour need the GPU"; done
  done
else
  PROBE=$BUILD/latprobe
  build_cu latprobe "$PROBE" || row build FAIL "latprobe (log)"
  "$NVCC" -ptx -O3 -arch=sm_90 -o "$WORK/spin.ptx" "$SRC/spin.cu" >>"$LOG" 2>&1 || row build FAIL "nvcc -ptx spin.cu (log)"
  if [ -x "$PROBE" ] && [ -n "${NEIGHBOUR:-}" ] && [ -f "$WORK/spin.ptx" ]; then
    "$PROBE" calibrate --request-us 2000 --kernels 10 >"$WORK/calibrate.out" 2>>"$LOG"
    iters=$(val iters "$WORK/calibrate.out")
    note "probe: $(tr '\n' ' ' <"$WORK/calibrate.out")"
    for pass in $PASSES; do
      if [ "$pass" = mps ]; then
        mps_begin "$WORK/mps/pipe" "$WORK/mps/log" && { probe_rows -mps; mps_end; }
      else
        probe_rows ""
      fi
    done
  else
    row probe FAIL "a build failed (log)"
  fi
fi

note "elapsed: $(($(date +%s) - T0)) s; log: $LOG"
echo
echo "== ptxslice_probe results ==${GPUSLICE_PRIORITY_BUDGET_US:+ (GPUSLICE_PRIORITY_BUDGET_US=$GPUSLICE_PRIORITY_BUDGET_US)}${GPUSLICE_PRIORITY_ANTICIPATE:+ (GPUSLICE_PRIORITY_ANTICIPATE=$GPUSLICE_PRIORITY_ANTICIPATE)}${GPUSLICE_PRIORITY_SWITCH_AHEAD:+ (GPUSLICE_PRIORITY_SWITCH_AHEAD=$GPUSLICE_PRIORITY_SWITCH_AHEAD)}"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
