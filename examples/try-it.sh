#!/usr/bin/env bash
# Runs README.md's "Try it without a GPU" walk-through, its shell blocks as written, and checks
# what they print: the controller answers, two programs share a group's quota (one is refused a
# chunk), `top` draws the group, a live `set` raises the limit and a third program gets it, and
# the group is removed at the end.
#
#   bash examples/try-it.sh [BIN_DIR]
#
# BIN_DIR (default target/release, as the README says) is where gpuslice, libgpuslice.so,
# quota-fill and the simulated driver are; `make test` passes target/debug. Only two things are
# changed in the commands, both to keep a test run apart from anyone else's: the README's
# target/release becomes BIN_DIR, and /tmp/gpuslice-try a directory of this run's own. `gpuslice
# top` needs a terminal: it runs in one made by `script`, for two seconds (SIGTERM ends it as q does).
# `timeout --foreground` keeps it in the terminal's foreground process group: without it, timeout
# puts it in a group of its own, where setting raw mode stops it with SIGTTOU (it hung CI that way).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-target/release}
case $bin in /*) ;; *) bin=$root/$bin ;; esac
for f in gpuslice libgpuslice.so quota-fill libsimcuda.so libsimnvml.so; do
    [[ -e $bin/$f ]] || { echo "try-it: $bin/$f is missing: run \`make demo\` first (or pass the build directory)" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/gpuslice-try-it.XXXXXX")
export SIMCUDA_STATE=${SIMCUDA_STATE:-$work/simcuda.state}

# The section's ```sh blocks, in order, one file each.
awk -v out="$work/block" '
    /^## / { inside = ($0 == "## Try it without a GPU") ; next }
    inside && /^```sh$/ { n++; file = sprintf("%s%d.sh", out, n); printf "" > file; fenced = 1; next }
    inside && /^```$/ { fenced = 0; next }
    inside && fenced { print > file }
' "$root/README.md"
blocks=("$work"/block*.sh)
[[ -e ${blocks[0]} ]] || { echo "try-it: README.md has no \"## Try it without a GPU\" section with sh blocks" >&2; exit 1; }

# The walk-through in one shell, so that `export`s and `%1`-style jobs carry from block to block.
{
    echo 'set -euo pipefail'
    echo "cd '$root'"
    for b in "${blocks[@]}"; do
        echo "echo '### $(basename "$b")'"
        sed -e "s|target/release|${bin#$root/}|g" -e "s|/tmp/gpuslice-try|$work/try|g" \
            -e "s|^gpuslice top\$|script -qec 'stty rows 30 cols 120; timeout --foreground -k 5 --preserve-status -s TERM 2 gpuslice top' '$work/top.screen' >/dev/null|" "$b"
    done
} > "$work/walk.sh"

log=$work/walk.log
cleanup() {
    # Whatever the walk-through left running (it stops its own jobs when it gets to its end).
    if [[ -s $work/pids ]]; then kill $(cat "$work/pids") 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
echo 'trap '\''jobs -p > "'"$work"'/pids"'\'' EXIT' | cat - "$work/walk.sh" > "$work/walk2.sh"
status=0
timeout 120 bash "$work/walk2.sh" > "$log" 2>&1 || status=$?

fail=0
check() { # what, extended regex[, file]
    if grep -Eq -- "$2" "${3:-$log}"; then echo "PASS  $1"; else echo "FAIL  $1 (no line matching /$2/)"; fail=1; fi
}
check "status answers with the socket of GPUSLICE_SOCKET" '^socket  /.*/gpuslice\.sock$'
check "the controller answers and makes the group" 'group "demo" created: .*memory 2\.00 GiB'
check "two programs in the group, one refused a chunk" 'chunk [0-9]+ of 256 MiB refused: .*OUT_OF_MEMORY'
check "ls shows the group at 2 GiB with two members" '^demo +0 +[0-9.]+ [GM]iB / 2\.00 GiB .*[0-9]+,[0-9]+$'
touch "$work/top.screen"
check "top draws the group" 'demo' "$work/top.screen"
check "top has its columns" 'USED / LIMIT' "$work/top.screen"
check "set raises the limit live" 'group "demo" now: .*memory 3\.00 GiB'
check "a third program gets its two chunks" '^held 2 chunks = 512 MiB'
check "ls shows the new limit" '^demo +0 +[0-9.]+ [GM]iB / 3\.00 GiB'
check "the empty group is removed" 'group "demo" removed'
if [[ $status -ne 0 || $fail -ne 0 ]]; then
    echo "try-it: the walk-through exited $status; what it printed:"
    sed 's/^/    /' "$log"
    echo "    --- the controller's log:"
    sed 's/^/    /' "$work/try/serve.log" 2>/dev/null || true
    echo "    --- what top drew (raw):"
    tr -c '[:print:]\n' ' ' < "$work/top.screen" | sed 's/^/    /' | tail -40
    exit 1
fi
echo "try-it: README.md \"Try it without a GPU\" works as written (${#blocks[@]} blocks)"
