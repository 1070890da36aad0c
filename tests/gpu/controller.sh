#!/usr/bin/env bash
# gpuslice controller acceptance (issue 4, `make gpu-ctl`). Run from anywhere on a machine with
# an NVIDIA GPU, nvcc, and Python with torch and nvidia-ml-py. Never builds Rust.
#
#   GPUSLICE_LIB   the prebuilt shim            (default: .gpu/libgpuslice.so in the repo root)
#   GPUSLICE_BIN   the prebuilt gpuslice CLI    (default: .gpu/gpuslice in the repo root)
#   OUT            where the log + results go   (default: .gpu/out)
#   NVCC, PYTHON   tools                        (default: nvcc or /usr/local/cuda/bin/nvcc, python3)
#   CTL_SHIM_LOG   GPUSLICE_LOG for shimmed runs          (default info)
#   CTL_LOG        GPUSLICE_LOG for `gpuslice serve`      (default info)
#
# Builds sharebench into .gpu/build (as bench.sh does), then tests/gpu/controller.py starts
# `gpuslice serve` on a socket in a temporary folder (ledger under /dev/shm), runs the checks,
# stops the controller and prints the results table last. Writes $OUT/controller.log and
# $OUT/controller.tsv only. Everything it starts is killed on the way out, also when it is
# interrupted: each child carries GPUTEST_CTL_TOKEN, and the trap kills by pid whatever still
# has it.
# Exit: 0 = every program behaved (read the table for PASS/FAIL), 1 = a program crashed
# (signal, timeout, unexpected exit status), 2 = setup problem (no shim/CLI/compiler/torch,
# build failed).
set -u
set -o pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
SHIM_LOG=${CTL_SHIM_LOG:-info}
CTL_LOG=${CTL_LOG:-info}
PY_LIMIT_S=250   # hard stop for controller.py (its own budget ends earlier, at 215 s from T0)


LEDGER_DIR=/dev/shm/gpuslice-gputest-$$
clean_up_on_exit GPUTEST_CTL_TOKEN ctl

gpu_setup controller controller.log "gpuslice controller acceptance"

check_cli
if ! pyver=$("$PY" -c 'import torch, pynvml; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1); then
  note "controller: $PY cannot import torch and pynvml (nvidia-ml-py): $(printf '%s' "$pyver" | tail -n 1)"
  exit 2
fi

gpu_machine name,driver_version,memory.total,memory.used,clocks.max.sm \
  "python: $("$PY" --version 2>&1), $pyver; shim log: $SHIM_LOG; controller log: $CTL_LOG"

# ---- build (skipped when the binary is newer than its source, the shared header and this script)
build_cu sharebench "$BUILD/sharebench" || exit 2
note "build done in $(( $(date +%s) - T0 ))s"

# ---- the socket's folder (short: a unix socket path has at most 107 bytes); the ledger's
# folder is created by `gpuslice serve` and removed on the way out
TMPD=$(mktemp -d /tmp/gpuslice-ctl.XXXXXX) || { note "controller: mktemp failed"; exit 2; }
rm -rf "$LEDGER_DIR"

# ---- the checks; controller.py prints the results table last
args=(--lib "$LIB" --bin "$BIN" --build "$BUILD" --out "$OUTDIR" --t0 "$T0"
      --socket "$TMPD/gpuslice.sock" --ledger "$LEDGER_DIR/ledger" --shim-log "$SHIM_LOG"
      --ctl-log "$CTL_LOG")
start_python GPUTEST_CTL_TOKEN "$PY_LIMIT_S" 10 controller.py "${args[@]}"
wait_python "controller: controller.py" "$PY_LIMIT_S"
rc=$?
exit $rc
