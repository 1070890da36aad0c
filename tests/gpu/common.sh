# shellcheck shell=bash disable=SC2034  # the variables set here are used by the scripts that source it
# Sourced by the shell entry points of tests/gpu (bash), before anything else:
#   . "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2
# Takes the start time, moves to the repo root, and sets:
#   T0 CALLER_PWD ROOT HERE LIB BIN OUTDIR BUILD PY (DRY=1 first: the simulated driver's defaults)
# then gpu_setup NAME LOGFILE TITLE makes the folders, starts the log and checks the shim,
# python and nvcc (exit 2 on a setup problem; NAME prefixes its messages), and gpu_machine
# QUERY EXTRA appends the machine's description to the log. For the scripts that run a Python
# part in the background: check_cli, clean_up_on_exit (token, EXIT trap, signals), build_cu
# (nvcc a program of tests/gpu), start_python and wait_python. For the scripts that run over an
# MPS daemon of their own: mps_start, mps_ask, mps_quit (and alive).
T0=$(date +%s)
CALLER_PWD=$(pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$(pwd)
HERE=tests/gpu

abspath() { # path relative to the caller's directory -> absolute
  case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$CALLER_PWD/$1" ;; esac
}

# DRY=1 (the caller sets it from its *_DRY_RUN before sourcing this): the checks run on the
# simulated driver, with this checkout's debug build and a dry-run output folder, unless the
# environment names others.
if [ "${DRY:-0}" = 1 ]; then
  : "${GPUSLICE_LIB:=$ROOT/target/debug/libgpuslice.so}"
  : "${GPUSLICE_BIN:=$ROOT/target/debug/gpuslice}"
  : "${OUT:=$ROOT/.gpu/out-dry}"
  export GPUSLICE_LIB GPUSLICE_BIN OUT
fi
if [ -n "${GPUSLICE_LIB:-}" ]; then LIB=$(abspath "$GPUSLICE_LIB"); else LIB=$ROOT/.gpu/libgpuslice.so; fi
if [ -n "${GPUSLICE_BIN:-}" ]; then BIN=$(abspath "$GPUSLICE_BIN"); else BIN=$ROOT/.gpu/gpuslice; fi
if [ -n "${OUT:-}" ]; then OUTDIR=$(abspath "$OUT"); else OUTDIR=$ROOT/.gpu/out; fi
# GPU_BUILD_DIR: where CUDA test programs are built (detached.sh puts it outside .gpu/, which a
# later device call's carry replaces).
BUILD=${GPU_BUILD_DIR:-$ROOT/.gpu/build}
PY=${PYTHON:-python3}

note() { printf '%s\n' "$*" | tee -a "$LOG"; }

# trap_signals: SIGINT/SIGTERM/SIGHUP are passed on to the Python harness ($PYPID, through its
# `timeout`), which cleans up and still prints its table; then the script leaves with 130/143
# (its EXIT trap runs as usual).
pass_on_signal() {
  trap '' INT TERM HUP
  if [ -n "${PYPID:-}" ]; then
    kill -TERM "$PYPID" 2>/dev/null
    wait "$PYPID" 2>/dev/null
  fi
  exit "$1"
}
trap_signals() {
  trap 'pass_on_signal 130' INT
  trap 'pass_on_signal 143' TERM HUP
}

# kill_tokened NAME: SIGKILL every process but this shell whose environment holds NAME=$TOKEN,
# i.e. whatever the harness started and is still alive, however it was re-parented.
kill_tokened() {
  local name=$1 d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$pid" = "$$" ] && continue
    if grep -qzx "$name=$TOKEN" "$d/environ" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null && echo "$(basename "$0"): killed left-over pid $pid" >&2
    fi
  done
}

gpu_setup() { # NAME LOGFILE TITLE: sets LOG, NVCC and GPU_NAME
  local name=$1
  GPU_NAME=$name
  mkdir -p "$OUTDIR" "$BUILD" || { echo "$name: cannot create $OUTDIR or $BUILD" >&2; exit 2; }
  LOG=$OUTDIR/$2
  : >"$LOG"

  note "$3: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
  note "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"

  if [ ! -f "$LIB" ]; then
    note "$name: shim not found at $LIB: put the prebuilt library at .gpu/libgpuslice.so or set GPUSLICE_LIB"
    exit 2
  fi
  LIB=$(cd "$(dirname "$LIB")" && pwd)/$(basename "$LIB")
  note "shim: $LIB ($(stat -c %s "$LIB" 2>/dev/null) bytes, sha256 $(sha256sum "$LIB" 2>/dev/null | cut -c1-16))"

  if ! command -v "$PY" >/dev/null 2>&1; then
    note "$name: python not found ($PY); set PYTHON"
    exit 2
  fi

  NVCC=${NVCC:-}
  if [ -z "$NVCC" ]; then
    if command -v nvcc >/dev/null 2>&1; then NVCC=nvcc
    elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
    fi
  fi
  if [ -z "$NVCC" ]; then
    note "$name: nvcc not found (PATH or /usr/local/cuda/bin); set NVCC"
    exit 2
  fi
}

gpu_machine() { # QUERY-GPU-FIELDS LAST-LINE: the machine, into the log
  {
    echo "--- machine"
    nvidia-smi --query-gpu="$1" --format=csv,noheader 2>&1
    echo "compute processes before the run (pid, used):"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>&1
    "$NVCC" --version 2>&1 | tail -n 2
    echo "$2"
  } >>"$LOG" 2>&1
}

wait_python() { # WHAT LIMIT: waits for $PYPID and returns its status; 1, with a note, when
  # it ran past LIMIT seconds or was killed (timeout's 124, SIGKILL's 137)
  wait "$PYPID"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "$1 ran past ${2}s, or was killed (rc=$rc)"
    rc=1
  fi
  return $rc
}

up_to_date() { # BIN SOURCE...: BIN is executable and newer than every SOURCE
  local bin=$1 src
  shift
  [ -x "$bin" ] || return 1
  for src in "$@"; do [ "$bin" -nt "$src" ] || return 1; done
}

check_cli() { # $BIN (the gpuslice CLI) must be executable: made absolute, and its size, hash and
  # version noted; exit 2 otherwise
  if [ ! -x "$BIN" ]; then
    note "$GPU_NAME: gpuslice binary not found at $BIN: put the prebuilt CLI at .gpu/gpuslice or set GPUSLICE_BIN"
    exit 2
  fi
  BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
  note "cli: $BIN ($(stat -c %s "$BIN" 2>/dev/null) bytes, sha256 $(sha256sum "$BIN" 2>/dev/null | cut -c1-16)); $(timeout 10 "$BIN" --version 2>&1 | head -n 1)"
}

clean_up_on_exit() { # TOKEN_VAR PREFIX: sets TOKEN (unique: PREFIX-pid-ns) and empties TMPD
  # and PYPID; on exit, kills whatever still carries TOKEN_VAR=$TOKEN (kill_tokened), then quits
  # the MPS daemon mps_start started, if one runs (mps_quit), and removes $TMPD and $LEDGER_DIR
  # when set; SIGINT/SIGTERM/SIGHUP go to the Python part (trap_signals)
  CLEANUP_TOKEN_VAR=$1
  TOKEN="$2-$$-$(date +%s%N)"
  TMPD=
  PYPID=
  trap clean_up EXIT
  trap_signals
}
clean_up() {
  kill_tokened "$CLEANUP_TOKEN_VAR"
  mps_quit
  [ -n "$TMPD" ] && rm -rf "$TMPD"
  [ -n "${LEDGER_DIR:-}" ] && rm -rf "$LEDGER_DIR"
}

build_cu() { # NAME BIN [DEP...]: nvcc -O2 -arch=sm_90 tests/gpu/NAME.cu into BIN, unless BIN is
  # newer than NAME.cu, gpucommon.cuh and each DEP; nvcc's output goes into $LOG; 1 (with a note
  # prefixed by $GPU_NAME) when the build fails
  local name=$1 bin=$2 blog=$BUILD/$1.build.log
  shift 2
  if up_to_date "$bin" "$HERE/$name.cu" "$HERE/gpucommon.cuh" "$@"; then
    echo "--- build $name: up to date" >>"$LOG"
    return 0
  fi
  rm -f "$bin"
  if "$NVCC" -O2 -arch=sm_90 -o "$bin" "$HERE/$name.cu" >"$blog" 2>&1; then
    echo "--- build $name: ok ($bin)" >>"$LOG"
    cat "$blog" >>"$LOG"
    return 0
  fi
  note "$GPU_NAME: build of $name FAILED (log follows in $LOG)"
  cat "$blog" >>"$LOG"
  return 1
}

start_python() { # TOKEN_VAR LIMIT KILL_AFTER SCRIPT ARG...: tests/gpu/SCRIPT in the background
  # with TOKEN_VAR=$TOKEN in its environment, under `timeout --foreground -k KILL_AFTER LIMIT`
  # where there is timeout (in this process group, so Ctrl-C reaches it too); sets PYPID.
  # In the background so that a signal reaches the trap at once (bash runs traps only between
  # commands).
  local var=$1 limit=$2 kill_after=$3 script=$ROOT/$HERE/$4
  shift 4
  if command -v timeout >/dev/null 2>&1; then
    env "$var=$TOKEN" timeout --foreground -k "$kill_after" "$limit" "$PY" "$script" "$@" &
  else
    env "$var=$TOKEN" "$PY" "$script" "$@" &
  fi
  PYPID=$!
}

dry_setup() { # NAME LOGFILE TITLE: a dry run's log (like gpu_setup's) and its checks: the shim
  # from target/debug, the simulated driver in target/sim
  mkdir -p "$OUTDIR" "$BUILD" || exit 2
  LOG=$OUTDIR/$2
  : >"$LOG"
  note "$3 (DRY RUN on the simulated driver): $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  [ -f "$LIB" ] || { note "$1: no shim at $LIB (cargo build --workspace)"; exit 2; }
  [ -f "$ROOT/target/sim/libcuda.so.1" ] || { note "$1: no simulated driver in target/sim (run an integration test once)"; exit 2; }
}

alive() { # PID: it runs (a zombie nobody reaps, as an orphan of a pid 1 that does not reap is, does not)
  local s
  s=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$s" ] && [ "${s%% *}" != Z ] && [ "${s%% *}" != X ]
}

# A private MPS control daemon (mps_extra.sh, ptxslice_probe.sh; priority.py keeps its own, in
# Python; ptxslice_torch.sh's Python part asks through mps_served and mps_clients).
# mps_start PIPE_DIR LOG_DIR runs `$MPS_CONTROL -d` (default nvidia-cuda-mps-control;
# the dry runs name tests/gpu/dryrun's fake) with those folders (a PIPE_DIR too long for MPS's
# sockets is replaced by one in /tmp, MPS_PIPE, removed by mps_quit), and exports them as
# CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY, so that every CUDA program started after
# it is the daemon's client; 1, with a note, when it did not start. mps_ask COMMAND: the
# daemon's answer (get_server_list, get_client_list PID, ...). mps_quit: `quit`, then waits for
# the daemon to go (10 s; then SIGKILL to it and its children, the MPS server) and unexports
# the folders; does nothing when no daemon runs, so an EXIT trap may call it again.
# For a pass of rows over the daemon (the caller defines `row ID RESULT DETAIL`): mps_begin and
# mps_end (row mps-quit). What the shim and the daemon say of the programs: mps_client,
# mps_says, mps_clients, listed, and mps_served, which judges them.
MPS_CONTROL=${MPS_CONTROL:-nvidia-cuda-mps-control}
# mps_prepare SCRIPT SETTING: before a pass over a private daemon. MPS without a partition: the
# shim sets each program's client priority from its class, so neither MPS variable is inherited;
# a dry run (DRY=1) uses the fake control program; exit 2 when the real one is not installed.
mps_prepare() {
  unset CUDA_MPS_ACTIVE_THREAD_PERCENTAGE CUDA_MPS_CLIENT_PRIORITY
  if [ "${DRY:-0}" = 1 ]; then
    MPS_CONTROL=$ROOT/$HERE/dryrun/nvidia-cuda-mps-control
  elif ! command -v "$MPS_CONTROL" >/dev/null 2>&1; then
    note "$1: $MPS_CONTROL not found ($2)"
    exit 2
  fi
}
MPS_PIPE=
MPS_PID=
MPS_TMP=
mps_start() { # PIPE_DIR LOG_DIR
  local pipe=$1 i
  # MPS's sockets live in the pipe folder: past ~87 bytes their paths no longer fit.
  if [ ${#pipe} -gt 87 ]; then
    MPS_TMP=$(mktemp -d /tmp/gpuslice-mps.XXXXXX) || return 1
    note "mps: the pipe directory $pipe is longer than 87 bytes, too long for MPS's sockets; $MPS_TMP/pipe instead"
    pipe=$MPS_TMP/pipe
  fi
  mkdir -p "$pipe" "$2" || return 1
  MPS_PIPE=$pipe
  export CUDA_MPS_PIPE_DIRECTORY=$pipe CUDA_MPS_LOG_DIRECTORY=$2
  echo "--- mps: $MPS_CONTROL -d, pipe directory $pipe, log directory $2" >>"$LOG"
  if ! "$MPS_CONTROL" -d >>"$LOG" 2>&1; then
    note "mps: $MPS_CONTROL -d failed (log)"
    mps_quit
    return 1
  fi
  for i in $(seq 100); do
    [ -e "$pipe/control" ] && break
    sleep 0.1
  done
  MPS_PID=$(cat "$pipe/nvidia-cuda-mps-control.pid" 2>/dev/null)
  ls -la "$pipe" >>"$LOG" 2>&1
  if [ ! -e "$pipe/control" ]; then
    note "mps: the daemon does not listen in $pipe 10 s after $MPS_CONTROL -d"
    mps_quit
    return 1
  fi
  echo "--- mps: daemon ${MPS_PID:-(no pid file)} listens" >>"$LOG"
}
mps_ask() { # COMMAND: the daemon's answer, stdout and stderr (10 s at most)
  CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE timeout 10 "$MPS_CONTROL" <<<"$1" 2>&1
}
mps_quit() {
  [ -n "$MPS_PIPE" ] || return 0
  local pid=$MPS_PID i kids
  [ -n "$pid" ] || pid=$(cat "$MPS_PIPE/nvidia-cuda-mps-control.pid" 2>/dev/null)
  echo "--- mps: quit (daemon ${pid:-?}): $(mps_ask quit | tr '\n' ' ')" >>"$LOG"
  if [ -n "$pid" ]; then
    for i in $(seq 100); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      kids=$(ps -o pid= --ppid "$pid" 2>/dev/null | tr '\n' ' ')
      note "mps: daemon $pid still there 10 s after quit: SIGKILL to it and its children ${kids:-(none)}"
      # shellcheck disable=SC2086  # the children's pids, one word each
      kill -KILL "$pid" $kids 2>/dev/null
    fi
  else
    sleep 1
  fi
  [ -n "$MPS_TMP" ] && rm -rf "$MPS_TMP"
  MPS_PIPE=
  MPS_PID=
  MPS_TMP=
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}

mps_begin() { # PIPE_DIR LOG_DIR: mps_start for a pass of rows; 1 (with row mps FAIL) when the
  # daemon did not start
  if mps_start "$1" "$2"; then
    note "mps: a private control daemon ($MPS_CONTROL, pid ${MPS_PID:-?}) listens in $MPS_PIPE; every program of the -mps rows is its client (CUDA_MPS_PIPE_DIRECTORY), no CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; the shim sets each one's client priority (high 0, low 1)"
    return 0
  fi
  row mps FAIL "the private MPS daemon did not start ($MPS_CONTROL -d; log)"
  return 1
}
mps_end() { # mps_quit, then row mps-quit: whether the daemon is gone
  local pid=$MPS_PID
  mps_quit
  if [ -n "$pid" ] && alive "$pid"; then
    row mps-quit FAIL "daemon $pid still alive after quit"
  else
    row mps-quit PASS "daemon ${pid:-(no pid file)} gone after quit"
  fi
}

mps_client() { # ERRFILE: "PRIORITY CLIENT_PRIORITY" from the shim's line "pid N: device D is
  # served by MPS: priority P as CUDA_MPS_CLIENT_PRIORITY=C, ..." (info), nothing without one
  sed -n 's/.*is served by MPS: priority \([a-z]*\) as CUDA_MPS_CLIENT_PRIORITY=\([0-9]*\).*/\1 \2/p' "$1" | head -n 1
}
mps_says() { # ERRFILE WANT: a word for the log and the rows: "client priority C" when the shim
  # says MPS serves the program with client priority WANT, else what is wrong
  local c
  c=$(mps_client "$1")
  if [ -z "$c" ]; then echo "NOT served by MPS"
  elif [ "${c#* }" = "$2" ]; then echo "client priority ${c#* }"
  else echo "WRONG client priority ${c#* } (want $2)"
  fi
}
mps_clients() { # the daemon's servers and each one's clients, as "server S: clients P Q; ..."
  local s out=
  for s in $(mps_ask get_server_list | grep -o '^[0-9][0-9]*'); do
    out="$out${out:+; }server $s: clients $(mps_ask "get_client_list $s" | grep -o '^[0-9][0-9]*' | tr '\n' ' ' | sed 's/ $//')"
  done
  echo "${out:-no server}"
}
listed() { # PID CLIENTS: PID is among the clients mps_clients printed
  case " $(echo "$2" | sed 's/server [0-9]*://g' | tr -c '0-9' ' ') " in *" $1 "*) return 0 ;; esac
  return 1
}
mps_served() { # CLIENTS NAME PID ERRFILE WANT [NAME PID ERRFILE WANT ...]: prints "over MPS:
  # NAME <mps_says>, ...; daemon: CLIENTS" and the pids the daemon does not list; 0 when each
  # program's shim log (ERRFILE) says MPS serves it with client priority WANT and CLIENTS (what
  # mps_clients printed while they all lived; empty: not asked) lists each PID, else 1
  local clients=$1 says= missing= ok=0 s
  shift
  while [ $# -ge 4 ]; do
    s=$(mps_says "$3" "$4")
    says="$says${says:+, }$1 $s"
    [ "$s" = "client priority $4" ] || ok=1
    listed "$2" "$clients" || { missing="$missing${missing:+, }the $1's pid $2"; ok=1; }
    shift 4
  done
  [ -n "$missing" ] && missing=" (not among the daemon's clients: $missing)"
  echo "over MPS: $says; daemon: ${clients:-not asked}$missing"
  return $ok
}
