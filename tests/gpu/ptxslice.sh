#!/usr/bin/env bash
# gpuslice issue 19, part 1: the PTX slicer on the GPU. Run from the repo root as
# `bash tests/gpu/ptxslice.sh` on a machine with an NVIDIA GPU (sm_90), nvcc and python3 (standard
# library only). Never builds Rust; about 1 minute.
#
#   PTXSLICE_BIN   the prebuilt slicer          (default: .gpu/ptx-slice; `cargo build --release -p gpuslice-ptx`)
#   GPUSLICE_LIB   the prebuilt shim, only checked to exist as in every GPU script (default: .gpu/libgpuslice.so)
#   OUT            where ptxslice.log and the PTX go (default: .gpu/out)
#   NVCC, PYTHON
#   PTXSLICE_DRY_RUN=1  no GPU, no nvcc: the hand-written fixtures of ptx/tests/fixtures stand for
#                  nvcc's output, target/debug/ptx-slice for the slicer; the GPU rows say SKIP.
#
# 1. nvcc -ptx -arch=sm_90 tests/gpu/ptxslice/{suite,refuse}.cu, and suite.cu with -lineinfo
# 2. ptx-slice on each: the verdict on every kernel (suite: all 10 sliced, the two that call
#    device functions reading blockIdx through clones; refuse.cu: grid_sync, cluster_rank,
#    reads_gridid refused, reads_smid sliced with a note); then the PTX inside nvcc -fatbin's output
# 3. ptx-slice on a module of >= 1 MB (copies of the suite, bigptx.py): time per MB (<= 1000 ms),
#    and a second run through the cache is a hit
# 4. run.cu (driver API): original vs sliced launches (1, 7, a row, a plane, all blocks per
#    slice; kernelParams, `extra` buffer, a CUDA graph) bit-identical; launch overhead of slicing;
#    the other sliced modules JIT-compile
# Prints the PASS/FAIL table last. Exit: 0 all PASS, 1 a FAIL, 2 setup problem.
set -u -o pipefail
DRY=${PTXSLICE_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then  # the slicer CI builds, and an output folder of its own
  cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
  : "${PTXSLICE_BIN:=$PWD/target/debug/ptx-slice}" "${OUT:=$PWD/.gpu/out-dry}"
  export OUT
fi
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2  # T0, ROOT, LIB, OUTDIR, BUILD, PY, note, ...
if [ -n "${PTXSLICE_BIN:-}" ]; then SLICER=$(abspath "$PTXSLICE_BIN"); else SLICER=$ROOT/.gpu/ptx-slice; fi
SRC=$ROOT/$HERE/ptxslice

if [ "$DRY" = 1 ]; then
  mkdir -p "$OUTDIR" || exit 2
  LOG=$OUTDIR/ptxslice.log
  : >"$LOG"
  note "gpuslice PTX slicer acceptance (DRY RUN: fixtures for nvcc, no GPU): $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
else
  gpu_setup ptxslice ptxslice.log "gpuslice PTX slicer acceptance"
  gpu_machine name,driver_version,compute_cap "python: $("$PY" --version 2>&1)"
fi
[ -x "$SLICER" ] || { note "ptxslice: no slicer at $SLICER (.gpu/ptx-slice or PTXSLICE_BIN)"; exit 2; }
WORK=$OUTDIR/ptxslice
rm -rf "$WORK"
mkdir -p "$WORK" || exit 2

ROWS=()
FAILED=0
row() { # ID RESULT DETAIL
  ROWS+=("$(printf '%-10s %-5s %s' "$1" "$2" "$3")")
  note "row: $1 $2 $3"
  [ "$2" = FAIL ] && FAILED=1
  return 0
}

# ---- 1. PTX: nvcc's, or the fixtures in a dry run
# suite_lineinfo: the same suite with -lineinfo (`.loc` lines and a `.section .debug_str`).
for name in suite refuse suite_lineinfo; do
  src=${name%_lineinfo}
  flags=()
  [ "$name" = "$src" ] || flags=(-lineinfo)
  if [ "$DRY" = 1 ]; then
    [ "$name" = "$src" ] && cp "$ROOT/ptx/tests/fixtures/$name.ptx" "$WORK/$name.ptx"
  elif "$NVCC" -ptx -O3 -arch=sm_90 "${flags[@]}" -o "$WORK/$name.ptx" "$SRC/$src.cu" >>"$LOG" 2>&1; then
    note "nvcc -ptx ${flags[*]} $src.cu: $(wc -c <"$WORK/$name.ptx") bytes"
  else
    row "nvcc-$name" FAIL "nvcc -ptx ${flags[*]} $src.cu failed (log)"
  fi
done

# ---- 2. verdicts
verdict() { # REPORT KERNEL -> sliced|refused|missing
  local line
  line=$(grep -E "^kernel $2: " "$1" | head -n 1)
  case "$line" in *": sliced;"*) echo sliced ;; *": refused:"*) echo refused ;; *) echo missing ;; esac
}
check_verdicts() { # NAME EXPECTED(kernel=verdict ...)
  local name=$1 report=$WORK/$1.report bad="" pair k want got
  shift
  if ! "$SLICER" "$WORK/$name.ptx" "$WORK/$name.sliced.ptx" --json "$WORK/$name.json" >"$report" 2>>"$LOG"; then
    row "slice-$name" FAIL "ptx-slice exited $? on $name.ptx (log)"
    return
  fi
  cat "$report" >>"$LOG"
  for pair in "$@"; do
    k=${pair%=*}
    want=${pair#*=}
    got=$(verdict "$report" "$k")
    [ "$got" = "$want" ] || bad="$bad $k:$got(want $want)"
  done
  if [ -z "$bad" ]; then
    row "slice-$name" PASS "$# kernels as expected: $(grep -c ': sliced;' "$report") sliced, $(grep -c ': refused:' "$report") refused"
  else
    row "slice-$name" FAIL "wrong verdicts:$bad"
  fi
}
SUITE_VERDICTS=(fill_1d=sliced fill_2d=sliced fill_3d=sliced grid_stride=sliced block_sum_static=sliced reverse_dynamic=sliced
  histogram=sliced uses_helper=sliced helper_reads_ctaid=sliced helper_chain=sliced)
[ -f "$WORK/suite.ptx" ] && check_verdicts suite "${SUITE_VERDICTS[@]}"
[ -f "$WORK/suite_lineinfo.ptx" ] && check_verdicts suite_lineinfo "${SUITE_VERDICTS[@]}"
[ -f "$WORK/refuse.ptx" ] && check_verdicts refuse grid_sync=refused cluster_rank=refused reads_gridid=refused reads_smid=sliced

# ---- 2b. the PTX inside a fat binary (what programs actually load): nvcc's default, then with
# compression off; verdicts as for the PTX. All PTX compressed is INFO (the codec is part 2).
if [ "$DRY" = 1 ]; then
  row fatbin SKIP "dry run: no nvcc to make a fat binary (the reader's unit tests use synthetic ones)"
else
  fb_done=0
  fb_seen=""
  for fb_flags in "" "-Xfatbin=--compress=false" "--compress-mode=none"; do
    rm -f "$WORK/suite.fatbin"
    # shellcheck disable=SC2086  # the flags are one word or none
    if "$NVCC" -fatbin -O3 -arch=sm_90 $fb_flags -o "$WORK/suite.fatbin" "$SRC/suite.cu" >>"$LOG" 2>&1; then
      "$SLICER" "$WORK/suite.fatbin" "$WORK/suite.fatbin.sliced.ptx" >"$WORK/suite_fatbin.report" 2>>"$LOG"
      fb_rc=$?
      cat "$WORK/suite_fatbin.report" >>"$LOG"
      fb_seen="$fb_seen [${fb_flags:-default}: $(grep -c '^fatbin entry' "$WORK/suite_fatbin.report") entries, $(grep -c '^fatbin entry: ptx.*compressed' "$WORK/suite_fatbin.report") compressed PTX, rc $fb_rc]"
      if [ $fb_rc -eq 0 ]; then
        cp "$WORK/suite_fatbin.report" "$WORK/suite_fatbin_ok.report"
        bad=""
        for pair in "${SUITE_VERDICTS[@]}"; do
          [ "$(verdict "$WORK/suite_fatbin.report" "${pair%=*}")" = "${pair#*=}" ] || bad="$bad ${pair%=*}"
        done
        if [ -z "$bad" ]; then row fatbin PASS "PTX found and sliced as the -ptx output:$fb_seen"; else row fatbin FAIL "wrong verdicts:$bad$fb_seen"; fi
        fb_done=1
        break
      fi
    fi
  done
  [ $fb_done = 1 ] || row fatbin INFO "no uncompressed PTX found:${fb_seen:- nvcc -fatbin failed (log)}"
fi

# ---- 3. speed per MB, and the cache
if [ -f "$WORK/suite.ptx" ] && "$PY" "$SRC/bigptx.py" "$WORK/suite.ptx" "$WORK/big.ptx" 1 >>"$LOG" 2>&1; then
  out=$("$SLICER" "$WORK/big.ptx" "$WORK/big.sliced.ptx" --repeat 3 --cache "$WORK/cache" 2>>"$LOG" | tail -n 1)
  note "big: $out"
  ms_per_mb=$(printf '%s\n' "$out" | sed -n 's/.* = \([0-9.]*\) ms per MB/\1/p')
  if [ -n "$ms_per_mb" ] && awk -v m="$ms_per_mb" 'BEGIN { exit !(m <= 1000) }'; then
    row speed PASS "$ms_per_mb ms per MB of PTX (limit 1000; $(wc -c <"$WORK/big.ptx") bytes, best of 3)"
  else
    row speed FAIL "${ms_per_mb:-no figure} ms per MB of PTX (limit 1000): $out"
  fi
  second=$("$SLICER" "$WORK/big.ptx" "$WORK/big.sliced2.ptx" --cache "$WORK/cache" 2>>"$LOG" | grep '^cache:')
  if [ "${second#cache: hit}" != "$second" ] && cmp -s "$WORK/big.sliced.ptx" "$WORK/big.sliced2.ptx"; then
    row cache PASS "second load: $second (first: miss, stored)"
  else
    row cache FAIL "second load: ${second:-no cache line}"
  fi
else
  row speed FAIL "could not make the 1 MB module (bigptx.py; log)"
fi
rm -rf "$WORK"/big*.ptx "$WORK/cache"  # megabytes nobody reads; keeps $OUT small

# ---- 4. on the GPU
if [ "$DRY" = 1 ]; then
  row gpu SKIP "dry run: run.cu needs the GPU (original vs sliced launches, overhead)"
else
  runner=$BUILD/ptxslice_run
  if ! up_to_date "$runner" "$SRC/run.cu"; then
    "$NVCC" -O2 -arch=sm_90 -o "$runner" "$SRC/run.cu" -lcuda >>"$LOG" 2>&1 || { row build FAIL "nvcc run.cu failed (log)"; runner=; }
  fi
  if [ -n "$runner" ] && [ -f "$WORK/suite.sliced.ptx" ]; then
    timeout 300 "$runner" "$WORK/suite.ptx" "$WORK/suite.sliced.ptx" "$WORK/suite.report" "$SLICER" >"$WORK/run.out" 2>&1
    rc=$?
    cat "$WORK/run.out" >>"$LOG"
    while read -r _ id result detail; do row "$id" "$result" "$detail"; done < <(grep '^CHECK ' "$WORK/run.out")
    grep -q '^CHECK ' "$WORK/run.out" || row gpu FAIL "run.cu printed no result (rc=$rc; log)"
    [ $rc -eq 0 ] || [ $rc -eq 1 ] || row gpu FAIL "run.cu exited $rc (124: timeout, >128: signal)"
    others=()
    for f in "$WORK/refuse.sliced.ptx" "$WORK/suite_lineinfo.sliced.ptx"; do [ -f "$f" ] && others+=("$f"); done
    if [ ${#others[@]} -gt 0 ]; then
      timeout 120 "$runner" --jit "${others[@]}" >"$WORK/jit.out" 2>&1
      cat "$WORK/jit.out" >>"$LOG"
      while read -r _ id result detail; do row "$id" "$result" "$detail"; done < <(grep '^CHECK ' "$WORK/jit.out")
    fi
  fi
fi

note "elapsed: $(($(date +%s) - T0)) s; log: $LOG"
echo
echo "== ptxslice results =="
printf '%s\n' "${ROWS[@]}"
exit $FAILED
