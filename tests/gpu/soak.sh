#!/usr/bin/env bash
# gpuslice soak (issue 6, `make gpu-soak`): four workloads (two CUDA C++, two PyTorch) under
# `gpuslice serve` with quotas, shares and priorities, one killed -9 and restarted every 30 s,
# for SOAK_SECONDS. Run from anywhere on a machine with an NVIDIA GPU, nvcc, and Python with
# torch (nvidia-ml-py used when present). Never builds Rust.
#
#   SOAK_SECONDS     length of the soak phase            (default 540; shortened when the budget
#                                                          below would not hold it; the table says
#                                                          how long it really ran)
#   SOAK_BUDGET_S    seconds for everything, build to table (default 590)
#   SOAK_KILL_EVERY  seconds between two kills            (default 30)
#   SOAK_SEED        seed of the kill order and the workloads (default 1)
#   SOAK_DRY_RUN=1   no GPU: the same orchestration on the simulated driver (tests/simcuda,
#                    tests/simnvml) with stub workloads; the shim, CLI and simulator come from
#                    target/debug (`cargo build -p gpuslice-shim -p gpuslice -p gpuslice-simcuda
#                    -p gpuslice-simnvml`); soakload.cu is compiled when nvcc is found, not run
#   GPUSLICE_LIB     the prebuilt shim                    (default .gpu/libgpuslice.so; dry run:
#                                                          target/debug/libgpuslice.so)
#   GPUSLICE_BIN     the prebuilt gpuslice CLI            (default .gpu/gpuslice; dry run:
#                                                          target/debug/gpuslice)
#   OUT              where soak.log + soak.tsv go         (default .gpu/out)
#   NVCC, PYTHON     tools (default nvcc or /usr/local/cuda/bin/nvcc, python3)
#   SOAK_SHIM_LOG    GPUSLICE_LOG for the workloads       (default info)
#   SOAK_CTL_LOG     GPUSLICE_LOG for `gpuslice serve`    (default info)
#
# Builds soakload into .gpu/build, then tests/gpu/soak.py starts the controller (socket in a
# temporary folder, ledger under /dev/shm), runs the soak and prints the results table last.
# Everything it starts is killed on the way out, also when interrupted: each child carries
# GPUTEST_SOAK_TOKEN and the trap kills by pid whatever still has it.
# Exit: 0 = every program behaved (read the table for PASS/FAIL), 1 = a program crashed or the
# controller died, 2 = setup problem (no shim/CLI/compiler/torch, build failed).
set -u
set -o pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
SOAK_S=${SOAK_SECONDS:-540}
BUDGET_S=${SOAK_BUDGET_S:-590}
KILL_EVERY=${SOAK_KILL_EVERY:-30}
SEED=${SOAK_SEED:-1}
DRY=${SOAK_DRY_RUN:-0}
SHIM_LOG=${SOAK_SHIM_LOG:-info}
CTL_LOG=${SOAK_CTL_LOG:-info}
for v in "$SOAK_S" "$BUDGET_S" "$KILL_EVERY" "$SEED"; do
  case "$v" in
    ''|*[!0-9.]*) echo "soak: SOAK_SECONDS, SOAK_BUDGET_S, SOAK_KILL_EVERY and SOAK_SEED are numbers, not '$v'" >&2; exit 2 ;;
  esac
done

if [ "$DRY" = 1 ]; then
  [ -n "${GPUSLICE_LIB:-}" ] || LIB=$ROOT/target/debug/libgpuslice.so
  BIN_DEFAULT=$ROOT/target/debug/gpuslice
  # nvcc is optional here: with one, soakload.cu is compiled as a check (it cannot run on the
  # simulator: the CUDA runtime needs driver entry points the simulator does not have).
  if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    NVCC=none
  fi
else
  BIN_DEFAULT=$ROOT/.gpu/gpuslice
fi
if [ -n "${GPUSLICE_BIN:-}" ]; then BIN=$(abspath "$GPUSLICE_BIN"); else BIN=$BIN_DEFAULT; fi

LEDGER_DIR=/dev/shm/gpuslice-soak-$$
clean_up_on_exit GPUTEST_SOAK_TOKEN soak

title="gpuslice soak"
[ "$DRY" = 1 ] && title="gpuslice soak (DRY RUN: simulated driver, stub workloads)"
gpu_setup soak soak.log "$title"

check_cli

TMPD=$(mktemp -d /tmp/gpuslice-soak.XXXXXX) || { note "soak: mktemp failed"; exit 2; }
rm -rf "$LEDGER_DIR"

if [ "$DRY" = 1 ]; then
  # The simulated machine: one device of 24 GiB, its state file in our temporary folder.
  libdir=$(dirname "$LIB")
  SIM=$TMPD/sim
  mkdir -p "$SIM"
  for f in libsimcuda.so libsimnvml.so; do
    if [ ! -f "$libdir/$f" ]; then
      note "soak: dry run needs $libdir/$f: cargo build -p gpuslice-simcuda -p gpuslice-simnvml"
      exit 2
    fi
  done
  cp "$libdir/libsimcuda.so" "$SIM/libcuda.so.1"
  ln -s libcuda.so.1 "$SIM/libcuda.so"
  cp "$libdir/libsimnvml.so" "$SIM/libnvidia-ml.so.1"
  export LD_LIBRARY_PATH=$SIM SIMCUDA_STATE=$TMPD/simcuda-state SIMCUDA_DEVICES=1 SIMCUDA_MEM=24G
  note "dry run: simulated driver in $SIM (SIMCUDA_STATE=$SIMCUDA_STATE, 1 device of 24 GiB)"
  echo "python: $("$PY" --version 2>&1); nvcc: $NVCC" >>"$LOG"
else
  if ! pyver=$("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1); then
    note "soak: $PY cannot import torch: $(printf '%s' "$pyver" | tail -n 1)"
    exit 2
  fi
  nvml=$("$PY" -c 'import pynvml; print("pynvml ok")' 2>&1 | tail -n 1)
  gpu_machine name,driver_version,memory.total,memory.used,clocks.max.sm \
    "python: $("$PY" --version 2>&1), $pyver; $nvml; shim log: $SHIM_LOG; controller log: $CTL_LOG"
fi

# ---- build soakload (skipped when the binary is newer than its source and the header). The dry
# run only compiles it, into the temporary folder: a binary from this machine must not travel
# to the GPU machine in .gpu/build.
bin=$BUILD/soakload
[ "$DRY" = 1 ] && bin=$TMPD/soakload
if [ "$NVCC" = none ]; then
  echo "--- build soakload: skipped (dry run without nvcc)" >>"$LOG"
elif ! build_cu soakload "$bin"; then
  tail -n 20 "$BUILD/soakload.build.log"
  exit 2
fi
note "setup done in $(( $(date +%s) - T0 ))s; soak phase ${SOAK_S}s, kill every ${KILL_EVERY}s, seed $SEED, budget ${BUDGET_S}s"

# ---- the soak; soak.py prints the results table last. In the background so that a signal
# reaches the trap at once; `timeout --foreground` keeps it in this process group.
args=(--lib "$LIB" --bin "$BIN" --build "$BUILD" --out "$OUTDIR" --t0 "$T0" --budget-s "$BUDGET_S"
      --soak-s "$SOAK_S" --kill-every-s "$KILL_EVERY" --seed "$SEED"
      --socket "$TMPD/gpuslice.sock" --ledger "$LEDGER_DIR/ledger" --shim-log "$SHIM_LOG"
      --ctl-log "$CTL_LOG")
[ "$DRY" = 1 ] && args+=(--dry-run)
# Hard stop 5 s after the budget (soak.py keeps 20 s of it for the end and bounds every wait by it).
limit=$(( ${BUDGET_S%.*} - ($(date +%s) - T0) + 5 ))
[ "$limit" -lt 30 ] && limit=30
start_python GPUTEST_SOAK_TOKEN "$limit" 5 soak.py "${args[@]}"
wait_python "soak: soak.py" "$limit"
rc=$?
exit $rc
