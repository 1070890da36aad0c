"""Several GPUs (issue 20): run by tests/gpu/multigpu.sh; see its header.

Cases (each a row of the table printed last):
  m1  two processes, one per GPU, 8 GiB quota each, torch.distributed NCCL all-reduce of 1 GiB
      tensors for MULTIGPU_SECONDS (P2P path, NCCL_CUMEM_ENABLE=1, NVLS off): no error, NVML
      per-process memory within quota + 1 %, bus bandwidth within 3 % of the same run without
      the shim.
  m2  CUDA_VISIBLE_DEVICES=1,0 and the same by UUID, GPUSLICE_MEMORY_LIMIT_0=4GiB: quota-fill
      on cuda:0 fills 4 GiB of the GPU NVML calls 1 and nothing of NVML's 0.
  m3  a tensor-parallel server's profiler (torch.cuda.mem_get_info before and after a warm-up,
      then gpu_memory_utilization x total filled with cache blocks) on both GPUs with 8 and 12
      GiB quotas: sized to the slice, no out-of-memory error, NVML within quota + 1 %.
  m4  what the shim's export table keys a POSIX-fd export by: two cuMemCreate allocations
      exported as file descriptors are different files (device + inode); if the driver hands
      every export the same inode, an fd import cannot be told from another and the shim treats
      every such import as one of a gpuslice exporter (docs/NOTES.md, issue 20).
NVLS (multicast) is never enabled: this workplace forbids it on shared hosts (KINDS.md).
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

GIB = 1 << 30
MIB = 1 << 20


class Nvml:
    """The few NVML calls the checks need, through ctypes (the real library, or the simulated
    one in the dry run); never preloaded with the shim."""

    class Proc(ctypes.Structure):
        _fields_ = [("pid", ctypes.c_uint), ("used", ctypes.c_ulonglong), ("gi", ctypes.c_uint), ("ci", ctypes.c_uint)]

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        assert self.lib.nvmlInit_v2() == 0, "nvmlInit_v2"

    def handle(self, index):
        h = ctypes.c_void_p()
        assert self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(h)) == 0
        return h

    def uuid(self, index):
        buf = ctypes.create_string_buffer(96)
        assert self.lib.nvmlDeviceGetUUID(self.handle(index), buf, 96) == 0
        return buf.value.decode()

    def count(self):
        n = ctypes.c_uint()
        assert self.lib.nvmlDeviceGetCount_v2(ctypes.byref(n)) == 0
        return n.value

    def procs(self, index):
        """{pid: bytes} of the compute processes on NVML device `index`."""
        h = self.handle(index)
        n = ctypes.c_uint(64)
        arr = (self.Proc * 64)()
        if self.lib.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(n), arr) != 0:
            return {}
        return {arr[i].pid: arr[i].used for i in range(n.value)}


class Sampler:
    """Maximum NVML per-process figure of each pid on each device, sampled every 0.2 s."""

    def __init__(self, nvml, devices):
        self.nvml, self.devices, self.max, self.stop = nvml, devices, {}, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            for d in self.devices:
                for pid, used in self.nvml.procs(d).items():
                    key = (d, pid)
                    self.max[key] = max(self.max.get(key, 0), used)
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()

    def of(self, pids, device):
        return max([self.max.get((device, p), 0) for p in pids] or [0])


def child_env(args, shim, extra):
    env = {k: v for k, v in os.environ.items() if not (k.startswith("GPUSLICE_") or k in ("LD_PRELOAD", "CUDA_VISIBLE_DEVICES"))}
    env.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1", "GPUSLICE_SOCKET": "/nonexistent/gpuslice.sock",
                # Named a socket, a process waits for its controller and then refuses CUDA
                # (issue 13's no fail-open); these runs are meant to be alone.
                "GPUSLICE_ON_NO_CONTROLLER": "alone", "GPUSLICE_CONTROLLER_WAIT": "0"})
    if shim:
        env["LD_PRELOAD"] = args.lib
    env.update(extra)
    return env


def run(cmd, env, timeout, log, name):
    t = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        out += "\n(timed out)"
    with open(os.path.join(args.out, name + ".out"), "w") as f:
        f.write(out)
    log.write(f"--- {name}: {' '.join(cmd)} rc={p.returncode} in {time.time() - t:.1f}s\n{out[-3000:]}\n")
    log.flush()
    return p.returncode, out, p.pid


WORKER = r'''
import json, os, sys, time, torch, torch.distributed as dist
rank, world, seconds, init = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
torch.cuda.set_device(rank)
dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
x = torch.ones(GIB // 4, dtype=torch.float32, device="cuda")
for _ in range(3):
    dist.all_reduce(x)
torch.cuda.synchronize()
n, t0 = 0, time.time()
while time.time() - t0 < seconds:
    dist.all_reduce(x)
    n += 1
    if n % 8 == 0:
        torch.cuda.synchronize()
torch.cuda.synchronize()
dt = time.time() - t0
algbw = n * x.numel() * 4 / dt / 1e9
print(json.dumps({"rank": rank, "n": n, "s": dt, "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (world - 1) / world, "pid": os.getpid()}), flush=True)
dist.destroy_process_group()
'''.replace("GIB", str(GIB))

PROFILER = r'''
import json, os, sys, torch
util = float(sys.argv[1])
report = {"pid": os.getpid(), "devices": []}
for d in range(torch.cuda.device_count()):
    torch.cuda.set_device(d)
    free0, total = torch.cuda.mem_get_info(d)
    torch.cuda.reset_peak_memory_stats(d)
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):
        a = torch.tanh(a @ a)        # the warm-up: a few "forward passes"
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(d)
    free1, _ = torch.cuda.mem_get_info(d)
    non_torch = total - free1 - torch.cuda.memory_reserved(d)
    budget = int(total * util) - peak - max(non_torch, 0)
    blocks, block = [], 64 << 20
    oom = None
    try:
        while (len(blocks) + 1) * block <= budget:
            blocks.append(torch.empty(block, dtype=torch.uint8, device="cuda"))
        b = torch.tanh(a @ a)        # a forward pass with the cache in place
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as e:
        oom = str(e)[:200]
    report["devices"].append({"device": d, "total": total, "free_before": free0, "peak": peak, "budget": budget, "cache": len(blocks) * block, "oom": oom})
    del blocks
print(json.dumps(report), flush=True)
'''


def m1(args, nvml, log, rows):
    if args.dry:
        rows.append(("m1", "SKIP", "NCCL all-reduce needs two GPUs and torch.distributed (dry run)"))
        return
    res = {}
    for shim in (False, True):
        init = f"file://{args.tmp}/nccl-{int(shim)}-{time.time_ns()}"
        extra = {"NCCL_CUMEM_ENABLE": "1"}
        if shim:
            extra["GPUSLICE_MEMORY_LIMIT"] = "8GiB"
        env = child_env(args, shim, extra)
        procs = []
        with Sampler(nvml, [0, 1]) as s:
            for rank in (0, 1):
                procs.append(subprocess.Popen([args.py, "-c", WORKER, str(rank), "2", str(args.seconds), init], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            outs = [p.communicate(timeout=args.seconds + 120)[0] for p in procs]
        for rank, (p, out) in enumerate(zip(procs, outs)):
            log.write(f"--- m1 shim={shim} rank {rank} rc={p.returncode}\n{out[-3000:]}\n")
        lines = [json.loads(line) for out in outs for line in out.splitlines() if line.startswith("{")]
        ok = all(p.returncode == 0 for p in procs) and len(lines) == 2
        res[shim] = {"ok": ok, "busbw": min((x["busbw_GBps"] for x in lines), default=0.0), "nvml": [s.of([x["pid"] for x in lines if x["rank"] == d], d) for d in (0, 1)]}
    base, sh = res[False], res[True]
    within = all(n <= 8 * GIB * 1.01 for n in sh["nvml"])
    bw = sh["busbw"] / base["busbw"] if base["busbw"] else 0.0
    passed = base["ok"] and sh["ok"] and within and bw >= 0.97
    rows.append(("m1", "PASS" if passed else "FAIL", f"all-reduce 1 GiB x {args.seconds:.0f}s: busbw {sh['busbw']:.1f} GB/s vs {base['busbw']:.1f} without shim ({bw * 100:.1f} %); NVML max per process {sh['nvml'][0] / MIB:.0f} / {sh['nvml'][1] / MIB:.0f} MiB (limit 8192 + 1 %); ran: {base['ok']}/{sh['ok']}"))


def m2(args, nvml, log, rows):
    u0, u1 = nvml.uuid(0), nvml.uuid(1)
    for label, visible in (("indices 1,0", "1,0"), ("UUIDs", f"{u1},{u0}")):
        env = child_env(args, True, {"CUDA_VISIBLE_DEVICES": visible, "GPUSLICE_MEMORY_LIMIT_0": "4GiB"})
        with Sampler(nvml, [0, 1]) as s:
            rc, out, pid = run([args.quota_fill, "256", "1000", "2"], env, 120, log, f"m2-{visible[:3]}")
        on1, on0 = s.of([pid], 1), s.of([pid], 0)
        passed = rc == 0 and 3 * GIB <= on1 <= 4 * GIB * 1.01 and on0 <= 64 * MIB
        rows.append(("m2", "PASS" if passed else "FAIL", f"CUDA_VISIBLE_DEVICES={label}, limit on ordinal 0 = 4 GiB: NVML's GPU 1 max {on1 / MIB:.0f} MiB, GPU 0 {on0 / MIB:.0f} MiB (quota-fill rc {rc})"))


def m3(args, nvml, log, rows):
    if args.dry:
        rows.append(("m3", "SKIP", "the profiler needs torch on two GPUs (dry run)"))
        return
    quotas = (8 * GIB, 12 * GIB)
    env = child_env(args, True, {"GPUSLICE_MEMORY_LIMIT_0": "8GiB", "GPUSLICE_MEMORY_LIMIT_1": "12GiB"})
    with Sampler(nvml, [0, 1]) as s:
        rc, out, pid = run([args.py, "-c", PROFILER, "0.9"], env, 300, log, "m3")
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if rc != 0 or not reports:
        rows.append(("m3", "FAIL", f"profiler rc {rc}, see m3.out"))
        return
    for dev in reports[0]["devices"]:
        d, q = dev["device"], quotas[dev["device"]]
        peak_nvml = s.of([pid], d)
        passed = dev["total"] == q and dev["oom"] is None and dev["cache"] > 0 and dev["cache"] + dev["peak"] <= q and peak_nvml <= q * 1.01
        rows.append(("m3", "PASS" if passed else "FAIL", f"GPU {d}: total {dev['total'] / MIB:.0f} MiB (quota {q / MIB:.0f}), cache {dev['cache'] / MIB:.0f} MiB, oom {dev['oom']!r}, NVML max {peak_nvml / MIB:.0f} MiB"))


M4 = r'''
import ctypes, json, os, sys
cu = ctypes.CDLL("libcuda.so.1")
class Loc(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]
class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("handleTypes", ctypes.c_int), ("loc", Loc), ("win32", ctypes.c_void_p), ("flags", ctypes.c_ubyte * 8)]
def ck(r, what):
    if r != 0:
        print(json.dumps({"error": f"{what}: {r}"})); sys.exit(1)
ck(cu.cuInit(0), "cuInit")
ctx = ctypes.c_void_p()
ck(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "retain")
ck(cu.cuCtxSetCurrent(ctx), "set")
prop = Prop(1, 1, Loc(1, 0), None)
gran = ctypes.c_size_t()
ck(cu.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 0), "granularity")
stats = []
for _ in range(2):
    h = ctypes.c_ulonglong()
    ck(cu.cuMemCreate(ctypes.byref(h), gran, ctypes.byref(prop), ctypes.c_ulonglong(0)), "cuMemCreate")
    fd = ctypes.c_int(-1)
    ck(cu.cuMemExportToShareableHandle(ctypes.byref(fd), h, 1, ctypes.c_ulonglong(0)), "export")
    st = os.fstat(fd.value)
    stats.append([st.st_dev, st.st_ino, os.readlink(f"/proc/self/fd/{fd.value}")])
print(json.dumps({"stats": stats}))
'''


def m4(args, nvml, log, rows):
    rc, out, _ = run([args.py, "-c", M4], child_env(args, False, {}), 60, log, "m4")
    res = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if rc != 0 or not res or "stats" not in res[0]:
        rows.append(("m4", "FAIL", f"rc {rc}: {res[0] if res else out[-200:]!r}"))
        return
    (d0, i0, l0), (d1, i1, l1) = res[0]["stats"]
    distinct = (d0, i0) != (d1, i1)
    rows.append(("m4", "PASS" if distinct else "FAIL", f"two fd exports are {'different files' if distinct else 'THE SAME file: fd imports cannot be told apart'} ({l0} ino {i0}, {l1} ino {i1})"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--quota-fill", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--py", default=sys.executable)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args()
    rows = []
    nvml = Nvml()
    with open(os.path.join(args.out, "multigpu.log"), "a") as log:
        # m4 needs one GPU only; the others two.
        cases = (m4, m2, m3, m1) if nvml.count() >= 2 else (m4,)
        if nvml.count() < 2:
            rows.append(("m0", "FAIL", f"NVML lists {nvml.count()} GPU(s); m1-m3 need two"))
        for case in cases:
            try:
                case(args, nvml, log, rows)
            except Exception as e:  # one case's crash must not hide the others' rows
                rows.append((case.__name__, "FAIL", f"crashed: {e!r}"))
    print("\nmultigpu results")
    for case, verdict, what in rows:
        print(f"{case:4} {verdict:5} {what}")
    sys.exit(0 if all(v != "FAIL" for _, v, _ in rows) else 1)
