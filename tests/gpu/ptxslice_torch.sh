#!/usr/bin/env bash
# gpuslice issue 19: the ResNet-50 probe (CUDA graph and eager, high priority) next to PyTorch
# training at low priority — fp32 matmul, a training step eager and torch.compile'd — with the
# PTX slicer on and off, time-sliced and/or over a private MPS daemon; what the slicer saw in
# those processes; and what it costs a process it never slices (launch ns, start-up). Run from
# the repo root as `bash tests/gpu/ptxslice_torch.sh` on a machine with an NVIDIA GPU (sm_90),
# nvcc, torch and torchvision, with the shim built (.gpu/libgpuslice.so); at most 4 minutes,
# 560 s with PTXSLICE_TORCH_MPS=both (a budget guard fits the probe's rounds to the budget);
# with 0 or 1, one more minute for each neighbour copy beyond "on" and "off" (-bud, -sm,
# -smfree), so that the probe keeps its 3 rounds: 360 s for the -mps pass with -sm and -smfree.
#
#   GPUSLICE_LIB, OUT, NVCC, PYTHON          as in every GPU script (common.sh)
#   PTXSLICE_TORCH_BUDGET_S                  the whole script's budget, seconds (default 240,
#                                            +60 per neighbour copy beyond on/off in a pass;
#                                            560 with PTXSLICE_TORCH_MPS=both)
#   PTXSLICE_TORCH_ROUNDS                    rounds of the probe's phase cycle (default 3)
#   PTXSLICE_TORCH_PHASE_S                   seconds per phase (default 1)
#   PTXSLICE_TORCH_STARTUP_RUNS              start-up runs per variant (default 5)
#   PTXSLICE_TORCH_BUDGET_US                 also each neighbour with GPUSLICE_PRIORITY_BUDGET_US
#                                            set to this (INFO rows; default: not run)
#   PTXSLICE_TORCH_NB_SHARE                  also each neighbour with GPUSLICE_SM_SHARE set to this
#                                            (INFO rows -sm; default: not run): over MPS the
#                                            shim makes it the neighbour's active-thread
#                                            percentage, so SMs stay free for the probe
#   PTXSLICE_TORCH_NB_FREE                   1: with PTXSLICE_TORCH_NB_SHARE, the -mps pass also
#                                            runs each neighbour with that share and
#                                            GPUSLICE_PRIORITY_GATE=spatial-off (INFO rows
#                                            -smfree-mps, experimental, issue 19): where MPS
#                                            carries its share the shim does not hold its
#                                            launches back for the probe; each row FAILs unless
#                                            the neighbour's shim log says spatial, priority
#                                            gate off. Needs PTXSLICE_TORCH_MPS=1 or both (the
#                                            gate stays on time-sliced: nothing to measure);
#                                            default 0
#   PTXSLICE_TORCH_NB_EXTRA                  more neighbour copies, space-separated
#                                            NAME:K=V,K=V (INFO rows -NAME): each neighbour with
#                                            those variables added, an experiment with no code,
#                                            e.g. "q8:GPUSLICE_PRIORITY_QUEUE=8
#                                            free99:GPUSLICE_SM_SHARE=99,GPUSLICE_PRIORITY_GATE=spatial-off"
#   PTXSLICE_TORCH_NO_OFF                    1: leave out the slicing-off copy (default 0)
#   PTXSLICE_TORCH_KINDS                     the neighbours, comma-separated, of mm,tr,tc (default all)
#   PTXSLICE_TORCH_PROBES                    the probes, comma-separated, of graph,eager (default
#                                            both); the other's rows say SKIP, and the time
#                                            saved lets the one left run more rounds (e.g.
#                                            eager with PTXSLICE_TORCH_ROUNDS=6: ~2x its
#                                            requests a row, a p99 not the second worst)
#   PTXSLICE_TORCH_MPS                       0 (default): time-slicing, the rows as they were.
#                                            1: the torch rows over a private MPS control daemon
#                                            (common.sh's mps_start: `$MPS_CONTROL -d`, default
#                                            nvidia-cuda-mps-control; pipe and log folders in
#                                            $OUT/ptxslice_torch_mps/, the pipe in /tmp when that
#                                            path is too long for MPS's sockets; quit at the end
#                                            and on every way out): every neighbour and probe its
#                                            client (CUDA_MPS_PIPE_DIRECTORY), no
#                                            CUDA_MPS_ACTIVE_THREAD_PERCENTAGE or
#                                            CUDA_MPS_CLIENT_PRIORITY, so the shim maps the
#                                            classes (probe high -> client priority 0, neighbours
#                                            low -> 1). Rows g-mm-mps, g-mm-off-mps, ... judged
#                                            by the same bars, and each FAILs unless the shim's
#                                            log of the probe and of the neighbour says MPS
#                                            serves it with that client priority and the daemon
#                                            (asked when the probe is ready, every neighbour
#                                            alive) lists both pids among its server's clients
#                                            (common.sh's mps_served); row mps-quit. No census,
#                                            launch or startup rows (the time-sliced pass's).
#                                            both: the time-sliced pass (all its rows), then the
#                                            -mps pass; the probe's rounds are fitted so that
#                                            both passes fit the budget (560 s: a 600 s device
#                                            call). In a dry run: tests/gpu/dryrun's fake
#                                            control program and the simulated driver with
#                                            SIMCUDA_MPS=pipe; =1 adds rows mps-high / mps-low (a
#                                            cuclient at each class served with client priority
#                                            0 / 1), =torch runs the stand-in programs as the
#                                            fake daemon's clients, each on a context of the
#                                            simulated driver (the MPS checks judged, the
#                                            figures INFO).
#   PTXSLICE_TORCH_DRY_RUN=1                 no torch, no GPU: the census and start-up rows on
#                                            the simulated driver; the rest say SKIP (seconds).
#   PTXSLICE_TORCH_DRY_RUN=torch             the same, and the torch rows against the stand-in
#                                            tests/gpu/dryrun/sleeptorch as INFO (about a minute;
#                                            70 s here with PTXSLICE_TORCH_MPS=both).
# The rows and what they judge: tests/gpu/README.md, "ptxslice_torch.sh"; ptxslice_torch.py does
# the work and prints the table last (a table per pass; the mps rows after them). Writes
# $OUT/ptxslice_torch.log and $OUT/ptxslice_torch_census.txt. Exit: 0 all PASS, 1 a FAIL (or a
# crash), 2 setup problem.
set -u -o pipefail
DRY=${PTXSLICE_TORCH_DRY_RUN:-0}
STAND_IN=
case "$DRY" in
  0|1) ;;
  torch) DRY=1; STAND_IN=1 ;;
  *) echo "ptxslice_torch: PTXSLICE_TORCH_DRY_RUN must be 1 or torch, not '$DRY'" >&2; exit 2 ;;
esac
case ${PTXSLICE_TORCH_MPS:-0} in
  0) PASSES=sliced ;;
  1) PASSES=mps ;;
  both) PASSES="sliced mps" ;;
  *) echo "ptxslice_torch: PTXSLICE_TORCH_MPS must be 0, 1 or both, not '$PTXSLICE_TORCH_MPS'" >&2; exit 2 ;;
esac
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
ROUNDS=${PTXSLICE_TORCH_ROUNDS:-3}
PHASE_S=${PTXSLICE_TORCH_PHASE_S:-1}
STARTUP_RUNS=${PTXSLICE_TORCH_STARTUP_RUNS:-5}
NB_BUDGET_US=${PTXSLICE_TORCH_BUDGET_US:-0}
NB_SHARE=${PTXSLICE_TORCH_NB_SHARE:-0}
NB_FREE=${PTXSLICE_TORCH_NB_FREE:-0}
case "$NB_FREE" in
  0) ;;
  1) if [ "$NB_SHARE" = 0 ]; then
       echo "ptxslice_torch: PTXSLICE_TORCH_NB_FREE=1 needs PTXSLICE_TORCH_NB_SHARE=N (the share MPS carries)" >&2; exit 2
     fi
     if [ "$PASSES" = sliced ]; then
       echo "ptxslice_torch: PTXSLICE_TORCH_NB_FREE=1 needs PTXSLICE_TORCH_MPS=1 or both (time-sliced, the gate stays on)" >&2; exit 2
     fi ;;
  *) echo "ptxslice_torch: PTXSLICE_TORCH_NB_FREE must be 0 or 1, not '$NB_FREE'" >&2; exit 2 ;;
esac
# Each neighbour copy beyond on/off adds three neighbours: 6 s a probe round (1 s phases), so
# 36 s for two probe runs of 3 rounds, their alone phases and a longer start: a minute a copy.
# The largest pass counts (-smfree is the -mps pass's alone). With both passes: 560 (a 600 s
# device call), the rounds fitted to it.
NB_EXTRA=${PTXSLICE_TORCH_NB_EXTRA:-}
NO_OFF=${PTXSLICE_TORCH_NO_OFF:-0}
KINDS=${PTXSLICE_TORCH_KINDS:-mm,tr,tc}
PROBES=${PTXSLICE_TORCH_PROBES:-graph,eager}
read -r -a nb_extra <<<"$NB_EXTRA"
extra_copies=$(( (NB_BUDGET_US != 0) + (NB_SHARE != 0) + (NB_FREE == 1) + ${#nb_extra[@]} - (NO_OFF == 1) ))
if [ "$PASSES" = "sliced mps" ]; then BUDGET_S=${PTXSLICE_TORCH_BUDGET_S:-560}; else BUDGET_S=${PTXSLICE_TORCH_BUDGET_S:-$((240 + 60 * extra_copies))}; fi

args=(--lib "$LIB" --build "$BUILD" --out "$OUTDIR" --t0 "$T0" --rounds "$ROUNDS" --phase-s "$PHASE_S"
      --startup-runs "$STARTUP_RUNS" --budget-us "$NB_BUDGET_US" --nb-share "$NB_SHARE")
[ "$NB_FREE" = 1 ] && args+=(--nb-free)
for spec in "${nb_extra[@]}"; do args+=(--nb-extra "$spec"); done
[ "$NO_OFF" = 1 ] && args+=(--no-off)
args+=(--kinds "$KINDS" --probes "$PROBES")
if [ "$DRY" = 1 ]; then
  dry_setup ptxslice_torch ptxslice_torch.log "gpuslice: ResNet-50 beside PyTorch training, sliced and not"
  [ -x "$ROOT/target/clients/cuclient-link" ] || { note "ptxslice_torch: no target/clients/cuclient-link (run an integration test once)"; exit 2; }
  args+=(--dry-run --cuclient "$ROOT/target/clients/cuclient-link" --sim-dir "$ROOT/target/sim"
         --fixture "$ROOT/ptx/tests/fixtures/suite.ptx")
  [ -n "$STAND_IN" ] && args+=(--stand-in-torch "$ROOT/$HERE/dryrun/sleeptorch" --rounds 1 --alone-s 1)
else
  gpu_setup ptxslice_torch ptxslice_torch.log "gpuslice: ResNet-50 beside PyTorch training, sliced and not"
  if ! pyver=$("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)' 2>&1); then
    note "ptxslice_torch: $PY cannot import torch and torchvision: $(printf '%s' "$pyver" | tail -n 1)"
    exit 2
  fi
  gpu_machine name,driver_version,compute_cap,clocks.max.sm,power.limit "python: $("$PY" --version 2>&1); $pyver"
  note "$pyver"
  if build_cu bench "$BUILD/bench" "$HERE/ptxslice_torch.sh"; then
    args+=(--bench "$BUILD/bench")
  else
    note "ptxslice_torch: bench.cu did not build; the launch row FAILs"
  fi
fi

[ "$PASSES" = sliced ] || mps_prepare ptxslice_torch "PTXSLICE_TORCH_MPS=$PTXSLICE_TORCH_MPS"
copies="on"
[ "$NO_OFF" = 1 ] || copies+=" off"
[ "$NB_BUDGET_US" != 0 ] && copies+=" bud"
[ "$NB_SHARE" != 0 ] && copies+=" sm"
[ "$NB_FREE" = 1 ] && copies+=" smfree (-mps pass only)"
[ ${#nb_extra[@]} -gt 0 ] && copies+=" ${NB_EXTRA}"
note "passes: $PASSES; budget ${BUDGET_S}s; neighbour copies: $copies"

ROWS=()
FAILED=0
row() { # ID RESULT DETAIL: a row of the script's own (the daemon's), printed after the tables
  ROWS+=("$(printf '%-9s %-5s %s' "$1" "$2" "$3")")
  note "row: $1 $2 $3"
  [ "$2" = FAIL ] && FAILED=1
  return 0
}

# In the background under a token (common.sh): a signal reaches the Python part at once, and
# whatever still carries the token is killed by pid on the way out, then the MPS daemon is told
# to quit (clean_up: kill_tokened, mps_quit).
clean_up_on_exit GPUTEST_PTXSLICE_TORCH_TOKEN ptxtorch
# Each pass's Python part gets the whole run's clock and budget (it ends 10 s before the hard
# stop); its hard limit is what is left of the budget when it starts. With both passes the
# time-sliced one fits its probe rounds so that the -mps pass's (as many) fit after it.
rc=0
first=1
for pass in $PASSES; do
  left=$((BUDGET_S - ($(date +%s) - T0)))
  if [ "$left" -le 40 ]; then
    if [ "$first" = 1 ]; then
      note "ptxslice_torch: only ${left}s of the ${BUDGET_S}s budget left after the setup"
      exit 2
    fi
    row mps FAIL "the -mps pass did not run: only ${left}s of the ${BUDGET_S}s budget left"
    break
  fi
  first=0
  pargs=()
  if [ "$pass" = mps ]; then
    rm -rf "$OUTDIR/ptxslice_torch_mps"
    mps_begin "$OUTDIR/ptxslice_torch_mps/pipe" "$OUTDIR/ptxslice_torch_mps/log" || continue
    pargs=(--mps-pipe "$MPS_PIPE" --mps-log "$CUDA_MPS_LOG_DIRECTORY" --mps-control "$MPS_CONTROL")
  elif [ "$PASSES" = "sliced mps" ]; then
    # The -mps pass runs as many probes as this one.
    pargs=(--later-probe-runs "$(tr ',' '\n' <<<"$PROBES" | grep -c .)")
  fi
  start_python GPUTEST_PTXSLICE_TORCH_TOKEN "$left" 5 ptxslice_torch.py "${args[@]}" "${pargs[@]}" --budget-s "$((BUDGET_S - 10))"
  wait_python "ptxslice_torch: ptxslice_torch.py ($pass pass)" "$left"
  prc=$?
  PYPID=
  [ "$pass" = mps ] && mps_end
  case $prc in
    0) ;;
    2) [ "$rc" = 0 ] && rc=2 ;;
    *) rc=1 ;;
  esac
done
[ "$FAILED" = 1 ] && rc=1
note "elapsed: $(($(date +%s) - T0)) s; log: $LOG"
if [ ${#ROWS[@]} -gt 0 ]; then
  echo
  echo "== ptxslice_torch: the MPS daemon =="
  printf '%s\n' "${ROWS[@]}"
fi
exit $rc
