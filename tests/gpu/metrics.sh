#!/usr/bin/env bash
# The controller's Prometheus endpoint on the real GPU (issue 7), ~20 s: `gpuslice serve
# --metrics`, a PyTorch process in a group with a 2 GiB limit that allocates 1 GiB, is refused
# once at the limit and runs matmuls at a 50% share; one scrape while it holds still, compared
# with `gpuslice ls --json` of the same moment and with NVML. Prints a short table last.
# Needs .gpu/gpuslice and .gpu/libgpuslice.so (make gpu-bundle), Python with torch.
set -u
. "$(dirname "${BASH_SOURCE[0]}")/common.sh" || exit 2
BIN=$ROOT/.gpu/gpuslice
D=$(mktemp -d /tmp/gpuslice-metrics.XXXXXX)
LEDGER=/dev/shm/gpuslice-metrics-$$/ledger
PORT=19400
cat >"$D/config.toml" <<EOF
[groups.svc]
memory_limit = "2GiB"
sm_share = 50
EOF
"$BIN" serve --socket "$D/sock" --ledger "$LEDGER" --config "$D/config.toml" --metrics 127.0.0.1:$PORT 2>"$D/serve.err" &
SP=$!
trap 'kill $SP $WP 2>/dev/null; wait 2>/dev/null; rm -rf "$D" "$(dirname "$LEDGER")"' EXIT
WP=
for _ in $(seq 50); do [ -S "$D/sock" ] && break; sleep 0.1; done
cat >"$D/work.py" <<'EOF'
import os, sys, time, torch
x = [torch.empty(256 << 20, dtype=torch.uint8, device="cuda") for _ in range(4)]  # 1 GiB
try:
    y = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    print("refused=0", flush=True)
except torch.OutOfMemoryError:
    print("refused=1", flush=True)
a = torch.randn(4096, 4096, device="cuda")
t = time.time()
while time.time() - t < 3:
    a = a @ a; a = a / a.norm()
torch.cuda.synchronize()
print(f"pid={os.getpid()} reserved={torch.cuda.memory_reserved()}", flush=True)
open(sys.argv[1], "w").close()
time.sleep(30)
EOF
LD_PRELOAD=$LIB GPUSLICE_SOCKET=$D/sock GPUSLICE_GROUP=svc "$PY" "$D/work.py" "$D/ready" >"$D/work.out" 2>"$D/work.err" &
WP=$!
for _ in $(seq 600); do [ -e "$D/ready" ] && break; sleep 0.1; done
sleep 1.2   # one more share sample
"$BIN" ls --socket "$D/sock" --json >"$D/ls.json"
"$PY" - "$D" "$PORT" <<'EOF'
import json, sys, urllib.request
d, port = sys.argv[1], sys.argv[2]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
open(f"{d}/metrics.txt", "w").write(text)
ls = json.load(open(f"{d}/ls.json"))
work = dict(kv.split("=") for l in open(f"{d}/work.out") for kv in l.split())
pid = work["pid"]
def metric(name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None
proc = next(p for p in ls["processes"] if str(p.get("own_pid", p["pid"])) == pid or str(p["pid"]) == pid)
dev = proc["devices"][0]
group = next(g for g in ls["groups"] if g["name"] == "svc")
gdev = group["devices"][0]
try:
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    nv = {str(p.pid): p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}.get(pid)
except Exception as e:
    nv = f"? ({e})"
rows = [
    ("process memory used (bytes)", metric("gpuslice_process_memory_used_bytes", pid=proc["pid"]), dev["used"]),
    ("group memory used (bytes)", metric("gpuslice_group_memory_used_bytes", group="svc"), gdev["used"]),
    ("group memory limit (bytes)", metric("gpuslice_group_memory_limit_bytes", group="svc"), gdev["limit"]),
    ("group OOM refusals", metric("gpuslice_group_oom_refusals_total", group="svc"), gdev.get("refusals")),
    ("group share target", metric("gpuslice_group_sm_share_target_ratio", group="svc"), (gdev.get("share") or 0) / 100),
    ("group device time (s)", metric("gpuslice_group_device_time_seconds_total", group="svc"), gdev.get("charged_ns", 0) / 1e9),
]
ok = True
print("\nmetrics on the GPU (scrape vs gpuslice ls --json)")
for name, m, l in rows:
    same = m is not None and l is not None and abs(m - float(l)) <= max(1e-6, 0.05 * abs(float(l))) if "time" in name else m == (float(l) if l is not None else None)
    ok &= bool(same)
    print(f"{name:32s} scrape {m!s:>14} ls {l!s:>14} {'ok' if same else 'DIFFERENT'}")
ach = metric("gpuslice_group_sm_share_achieved_ratio", group="svc")
print(f"{'group share achieved':32s} scrape {ach!s:>14} (info)")
print(f"{'NVML used by the process':32s} {nv} bytes (info; ledger used {dev['used']})")
print(f"refused at the limit: {work.get('refused')}; torch reserved {work.get('reserved')}")
print(f"health: up={metric('gpuslice_up') if 'gpuslice_up{' in text else [l for l in text.splitlines() if l.startswith('gpuslice_up ')]}")
print("METRICS", "PASS" if ok and work.get("refused") == "1" else "FAIL")
EOF
