#!/usr/bin/env bash
# gpuslice issue 19, part 2: sliced kernels next to a latency probe. Run from the repo root as
# `bash tests/gpu/ptxslice_probe.sh` on a machine with an NVIDIA GPU (sm_90) and nvcc, with the
# shim built (.gpu/libgpuslice.so); about 2 minutes (PTXSLICE_PROBE_SECONDS per phase).
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
NEIGHBOUR_LOG=${PTXSLICE_PROBE_NEIGHBOUR_LOG:-info,gpuslice::hooks::launch=debug}

if [ "$DRY" = 1 ]; then
  dry_setup ptxslice_probe ptxslice_probe.log "gpuslice sliced kernels beside a probe"
else
  gpu_setup ptxslice_probe ptxslice_probe.log "gpuslice sliced kernels beside a probe"
  gpu_machine name,driver_version,compute_cap "python: $("$PY" --version 2>&1)"
fi
WORK=$OUTDIR/ptxslice_probe
rm -rf "$WORK"
mkdir -p "$WORK" || exit 2
# No controller: each process runs alone on its own limits; a private cache per run.
export GPUSLICE_ON_NO_CONTROLLER=alone GPUSLICE_CONTROLLER_WAIT=0 GPUSLICE_SOCKET=$WORK/no-controller.sock
export GPUSLICE_PTX_CACHE=$WORK/cache GPUSLICE_LOG=info

ROWS=()
FAILED=0
row() { # ID RESULT DETAIL
  ROWS+=("$(printf '%-14s %-5s %s' "$1" "$2" "$3")")
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

# ---- 1 and 2, on the GPU
if [ "$DRY" = 1 ]; then
  for l in $LENGTHS; do row "probe-$l" SKIP "dry run: latprobe and the PTX neighbour need the GPU"; done
else
  PROBE=$BUILD/latprobe
  build_cu latprobe "$PROBE" || row build FAIL "latprobe (log)"
  "$NVCC" -ptx -O3 -arch=sm_90 -o "$WORK/spin.ptx" "$SRC/spin.cu" >>"$LOG" 2>&1 || row build FAIL "nvcc -ptx spin.cu (log)"
  if [ -x "$PROBE" ] && [ -n "${NEIGHBOUR:-}" ] && [ -f "$WORK/spin.ptx" ]; then
    "$PROBE" calibrate --request-us 2000 --kernels 10 >"$WORK/calibrate.out" 2>>"$LOG"
    iters=$(val iters "$WORK/calibrate.out")
    note "probe: $(tr '\n' ' ' <"$WORK/calibrate.out")"
    probe_run() { # OUT GO: the probe at high priority for $SECS seconds
      GPUSLICE_PRIORITY=high LD_PRELOAD=$LIB "$PROBE" run --iters "$iters" --kernels 10 --period-ms 20 --seconds "$SECS" \
        --go-file "$2" >"$1" 2>>"$LOG"
    }
    touch "$WORK/go-alone"
    probe_run "$WORK/alone.out" "$WORK/go-alone"
    alone=$(val p99_ms "$WORK/alone.out")
    note "probe alone: p99 $alone ms, busy $(val busy_frac "$WORK/alone.out")"
    for l in $LENGTHS; do
      # The neighbour alone (nothing high lives: whole launches), which also fixes its cycles.
      touch "$WORK/go-n$l"
      GPUSLICE_PRIORITY=low LD_PRELOAD=$LIB "$NEIGHBOUR" "$WORK/spin.ptx" "$l" "$SECS" --go-file "$WORK/go-n$l" \
        >"$WORK/n$l.alone.out" 2>>"$LOG"
      cycles=$(val cycles "$WORK/n$l.alone.out")
      grid=$(val grid "$WORK/n$l.alone.out")
      note "neighbour $l µs: $(tr '\n' ' ' <"$WORK/n$l.alone.out")"
      rate_alone=$(val rate "$WORK/n$l.alone.out")
      for mode in low off; do
        go=$WORK/go-$l-$mode
        GPUSLICE_LOG=$NEIGHBOUR_LOG GPUSLICE_SLICE=$mode GPUSLICE_PRIORITY=low LD_PRELOAD=$LIB "$NEIGHBOUR" "$WORK/spin.ptx" "$l" "$SECS.5" \
          --cycles "$cycles" --grid "$grid" --go-file "$go" >"$WORK/n$l.$mode.out" 2>"$WORK/n$l.$mode.err" &
        npid=$!
        probe_run "$WORK/p$l.$mode.out" "$go" &
        ppid=$!
        if waitready "$WORK/n$l.$mode.out" "$WORK/p$l.$mode.out"; then touch "$go"; fi
        wait "$ppid"
        wait "$npid"
        cat "$WORK/n$l.$mode.err" >>"$LOG"
        p99=$(val p99_ms "$WORK/p$l.$mode.out")
        busy=$(val busy_frac "$WORK/p$l.$mode.out")
        rate=$(val rate "$WORK/n$l.$mode.out")
        check=$(val check "$WORK/n$l.$mode.out")
        detail=$(awk -v p="$p99" -v a="$alone" -v r="$rate" -v ra="$rate_alone" -v b="$busy" 'BEGIN {
          if (a <= 0 || ra <= 0 || b >= 1) { print "?"; exit }
          printf "p99 %.3f ms = x%.3f alone; neighbour %.1f%% of its rate = %.1f%% of the time the probe leaves", p, p / a, 100 * r / ra, 100 * (r / ra) / (1 - b) }')
        verdict=$(awk -v p="$p99" -v a="$alone" -v r="$rate" -v ra="$rate_alone" -v b="$busy" 'BEGIN {
          ok = a > 0 && ra > 0 && b < 1 && p / a <= 1.05 && (r / ra) / (1 - b) >= 0.8; print ok ? "PASS" : "FAIL" }')
        [ "$check" = ok ] || { verdict=FAIL; detail="$detail; the neighbour's output check: ${check:-missing}"; }
        sliced=$(grep -c 'kernels sliced' "$WORK/n$l.$mode.err")
        # The shim's last summary of the kernel's slices: "kernel spin: N launches in T s, S in
        # slices: M slices of B blocks on average (wave W); estimate ..." (debug).
        slicing=$(grep -o 'kernel spin: .*' "$WORK/n$l.$mode.err" | tail -n 1 | sed -n 's/^kernel spin: \([0-9]*\) launches in [0-9.]* s, [0-9]* in slices: \([0-9]*\) slices of \([0-9]*\) blocks.*(wave \([0-9]*\)); estimate \([a-z0-9]*\) ps.*/\1 \2 \3 \4 \5/p')
        if [ -n "$slicing" ]; then
          detail="$detail; $(echo "$slicing" | awk '{ printf "last 2 s: %.1f slices per launch of %d blocks (%.1f waves), %s ps per block", ($1 ? $2 / $1 : 0), $3, ($4 ? $3 / $4 : 0), $5 }')"
        fi
        if [ "$mode" = low ]; then
          row "probe-$l" "$verdict" "$l µs neighbour, sliced ($sliced slicing lines): $detail"
        else
          row "probe-$l-off" INFO "$l µs neighbour, not sliced: $detail"
        fi
      done
    done
  else
    row probe FAIL "a build failed (log)"
  fi
fi

note "elapsed: $(($(date +%s) - T0)) s; log: $LOG"
echo
echo "== ptxslice_probe results =="
printf '%s\n' "${ROWS[@]}"
exit $FAILED
