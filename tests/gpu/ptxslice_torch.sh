#!/usr/bin/env bash
# gpuslice issue 19: the ResNet-50 probe (CUDA graph and eager, high priority) next to PyTorch
# training at low priority — fp32 matmul, a training step eager and torch.compile'd — with the
# PTX slicer on and off; what the slicer saw in those processes; and what it costs a process it
# never slices (launch ns, start-up). Run from the repo root as `bash tests/gpu/ptxslice_torch.sh`
# on a machine with an NVIDIA GPU (sm_90), nvcc, torch and torchvision, with the shim built
# (.gpu/libgpuslice.so); at most 4 minutes (a budget guard fits the probe's rounds to it).
#
#   GPUSLICE_LIB, OUT, NVCC, PYTHON          as in every GPU script (common.sh)
#   PTXSLICE_TORCH_BUDGET_S                  the whole script's budget, seconds (default 240)
#   PTXSLICE_TORCH_ROUNDS                    rounds of the probe's phase cycle (default 3)
#   PTXSLICE_TORCH_PHASE_S                   seconds per phase (default 1)
#   PTXSLICE_TORCH_STARTUP_RUNS              start-up runs per variant (default 5)
#   PTXSLICE_TORCH_BUDGET_US                 also each neighbour with GPUSLICE_PRIORITY_BUDGET_US
#                                            set to this (INFO rows; default: not run)
#   PTXSLICE_TORCH_DRY_RUN=1                 no torch, no GPU: the census and start-up rows on
#                                            the simulated driver; the rest say SKIP (seconds).
#   PTXSLICE_TORCH_DRY_RUN=torch             the same, and the torch rows against the stand-in
#                                            tests/gpu/dryrun/sleeptorch as INFO (about a minute).
# The rows and what they judge: tests/gpu/README.md, "ptxslice_torch.sh"; ptxslice_torch.py does
# the work and prints the table last. Writes $OUT/ptxslice_torch.log and
# $OUT/ptxslice_torch_census.txt. Exit: 0 all PASS, 1 a FAIL (or a crash), 2 setup problem.
set -u -o pipefail
DRY=${PTXSLICE_TORCH_DRY_RUN:-0}
STAND_IN=
case "$DRY" in
  0|1) ;;
  torch) DRY=1; STAND_IN=1 ;;
  *) echo "ptxslice_torch: PTXSLICE_TORCH_DRY_RUN must be 1 or torch, not '$DRY'" >&2; exit 2 ;;
esac
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
BUDGET_S=${PTXSLICE_TORCH_BUDGET_S:-240}
ROUNDS=${PTXSLICE_TORCH_ROUNDS:-3}
PHASE_S=${PTXSLICE_TORCH_PHASE_S:-1}
STARTUP_RUNS=${PTXSLICE_TORCH_STARTUP_RUNS:-5}
NB_BUDGET_US=${PTXSLICE_TORCH_BUDGET_US:-0}

args=(--lib "$LIB" --build "$BUILD" --out "$OUTDIR" --t0 "$T0" --rounds "$ROUNDS" --phase-s "$PHASE_S"
      --startup-runs "$STARTUP_RUNS" --budget-us "$NB_BUDGET_US")
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

# In the background under a token (common.sh): a signal reaches the Python part at once, and
# whatever still carries the token is killed by pid on the way out.
clean_up_on_exit GPUTEST_PTXSLICE_TORCH_TOKEN ptxtorch
# The Python part's own budget ends 10 s before the hard stop, which is the script's budget
# less what has passed already (setup, the build).
left=$((BUDGET_S - ($(date +%s) - T0)))
[ "$left" -gt 40 ] || { note "ptxslice_torch: only ${left}s of the ${BUDGET_S}s budget left after the setup"; exit 2; }
start_python GPUTEST_PTXSLICE_TORCH_TOKEN "$left" 5 ptxslice_torch.py "${args[@]}" --budget-s "$((BUDGET_S - 10))"
wait_python "ptxslice_torch: ptxslice_torch.py" "$left"
rc=$?
note "elapsed: $(($(date +%s) - T0)) s; log: $LOG"
exit $rc
