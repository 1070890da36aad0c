"""Issue 13's GPU acceptance for uncounted memory and the cross-check (run by tests/gpu/modules.sh).

(a) A module-heavy program: ten cuModuleLoadData of a module holding a 256 MiB __device__ array,
    then a 256 MiB cuMemAlloc, under a 1 GiB quota (the issue's baseline without gpuslice: all
    succeed, 3334 MiB by NVML). With the shim the loads beyond the quota are refused, the program
    goes on, and NVML's per-process figure, sampled every 2 ms while it runs, never exceeds
    1 GiB x 1.01. Once with the default loading mode (LAZY) and once with CUDA_MODULE_LOADING=EAGER.
(b) The cross-check: under `gpuslice serve`, a process of a 2 GiB group that leaves 768 MiB of
    what it allocates out of its report (the shim's test knob GPUSLICE_TEST_UNDERREPORT_BYTES)
    is flagged in `ls --json`, charged NVML's figure, and its next allocation, which fits on its
    report but not on NVML's figure, is refused.

Standard library only (NVML through ctypes), so that the dry run on the simulated driver runs it
unchanged. Prints the results table last.
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

MIB = 1 << 20
GIB = 1 << 30
RESULTS = []  # (id, name, PASS/FAIL/INFO, figures)


def record(case, name, verdict, figures):
    RESULTS.append((case, name, verdict, figures))
    log(f"{case} {name}: {verdict} {figures}")


LOG = None


def log(text):
    if LOG:
        LOG.write(text + "\n")
        LOG.flush()


class ProcInfo(ctypes.Structure):  # nvmlProcessInfo_t (v2/v3 layout)
    _fields_ = [("pid", ctypes.c_uint), ("used", ctypes.c_ulonglong), ("gi", ctypes.c_uint), ("ci", ctypes.c_uint)]


class Nvml:
    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)) != 0:
            raise RuntimeError("nvmlDeviceGetHandleByIndex_v2(0) failed")
        self.fn = self.lib.nvmlDeviceGetComputeRunningProcesses_v3

    def used_by(self, pid):
        n = ctypes.c_uint(256)
        arr = (ProcInfo * 256)()
        if self.fn(self.handle, ctypes.byref(n), arr) != 0:
            return None
        for i in range(min(n.value, 256)):
            if arr[i].pid == pid:
                return arr[i].used
        return 0


class Sampler(threading.Thread):
    """NVML's figure for one pid every 2 ms while it runs; keeps the largest."""

    def __init__(self, nvml, pid):
        super().__init__(daemon=True)
        self.nvml, self.pid, self.peak, self.samples, self.stop = nvml, pid, 0, 0, False

    def run(self):
        while not self.stop:
            used = self.nvml.used_by(self.pid)
            if used is not None:
                self.peak = max(self.peak, used)
                self.samples += 1
            time.sleep(0.002)


def run_client(args, nvml, script, env_extra, shim=True, name="run", timeout=120, started=None):
    env = dict(args.base_env)
    env.update(env_extra)
    if shim:
        env["LD_PRELOAD"] = args.lib
    out_path = os.path.join(args.out, f"modules-{name}.out")
    err_path = os.path.join(args.out, f"modules-{name}.err")
    log(f"$ {' '.join(f'{k}={v}' for k, v in env_extra.items())} {'LD_PRELOAD=' + args.lib if shim else ''} {args.client} {script}")
    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        p = subprocess.Popen([args.client] + script.split(), env=env, stdout=fo, stderr=fe)
        if started is not None:
            started["pid"] = p.pid
        sampler = Sampler(nvml, p.pid)
        sampler.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        sampler.stop = True
        sampler.join()
    lines = open(out_path).read().splitlines()
    log(f"  rc={rc} samples={sampler.samples} peak={sampler.peak / MIB:.0f} MiB")
    for line in lines:
        log("  " + line)
    return rc, lines, sampler.peak


def case_modules(args, nvml, case, mode, shim):
    loads = " ".join(["modimage " + args.image] * 10)
    script = f"init ctx 0 {loads} alloc 256M info nvmlprocs 0 sleep 200"
    env = {"CUDA_MODULE_LOADING": mode}
    if shim:
        env["GPUSLICE_MEMORY_LIMIT"] = "1GiB"
    rc, lines, peak = run_client(args, nvml, script, env, shim=shim, name=f"{case}-{mode.lower()}")
    ok_loads = sum(1 for l in lines if l.startswith("ok modimage"))
    refused = sum(1 for l in lines if l.startswith("err modimage code=2"))
    other = [l for l in lines if l.startswith("err") and not l.startswith("err modimage code=2") and not l.startswith("err alloc code=2")]
    alloc = next((l for l in lines if l.split()[1:2] == ["alloc"]), "alloc: no line")
    figures = f"loads ok {ok_loads}, refused {refused}; {alloc.split(' id=')[0]}; NVML peak {peak / MIB:.0f} MiB"
    if not shim:
        record(case, f"baseline, no gpuslice, {mode}: 10 loads + 256 MiB", "INFO", figures)
        return
    bound = int(GIB * 1.01)
    good = rc == 0 and refused >= 1 and not other and peak <= bound and any(l.startswith("ok sleep") for l in lines)
    record(case, f"1 GiB quota, {mode}: loads beyond it refused, NVML <= 1.01 GiB", "PASS" if good else "FAIL",
           figures + f" (bound {bound / MIB:.0f} MiB; exit {rc})")


def ctl(args, *argv, check=True):
    r = subprocess.run([args.bin, *argv, "--socket", args.socket], env=args.base_env, capture_output=True, text=True, timeout=30)
    log(f"$ gpuslice {' '.join(argv)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    if check and r.returncode != 0:
        raise RuntimeError(f"gpuslice {' '.join(argv)} failed: {r.stderr.strip()}")
    return r


def case_crosscheck(args, nvml):
    case = "b"
    serve_err = open(os.path.join(args.out, "modules-serve.err"), "w")
    env = dict(args.base_env)
    env["GPUSLICE_LOG"] = "info"
    serve = subprocess.Popen([args.bin, "serve", "--socket", args.socket, "--ledger", args.ledger], env=env,
                             stdout=serve_err, stderr=serve_err)
    try:
        deadline = time.monotonic() + 20
        while ctl(args, "status", check=False).returncode != 0:
            if time.monotonic() > deadline or serve.poll() is not None:
                record(case, "cross-check", "FAIL", "gpuslice serve did not come up (modules-serve.err)")
                return
            time.sleep(0.2)
        ctl(args, "set", "--create", "--group", "liars", "--memory", "2GiB")
        go = os.path.join(args.tmp, "go")
        script = f"init ctx 0 alloc 1G info nvmlprocs 0 waitfile {go} alloc 768M alloc 64M nvmlprocs 0"
        env_extra = {"GPUSLICE_GROUP": "liars", "GPUSLICE_SOCKET": args.socket, "GPUSLICE_TEST_UNDERREPORT_BYTES": "768MiB"}
        result = {}

        def client():
            result["r"] = run_client(args, nvml, script, env_extra, name="liar", timeout=90, started=result)

        t = threading.Thread(target=client)
        t.start()
        listing, row = None, None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and t.is_alive():
            r = ctl(args, "ls", "--json", check=False)
            if r.returncode == 0:
                listing = json.loads(r.stdout)
                rows = listing.get("underreporting", [])
                if rows:
                    row = rows[0]
                    break
            time.sleep(0.25)
        # NVML's figure for the liar now, from outside it (its own NVML calls go through the shim).
        nvml_figure = nvml.used_by(result["pid"]) if "pid" in result else None
        table = ctl(args, "ls", check=False).stdout
        group_used = None
        if listing:
            for g in listing.get("groups", []):
                if g["name"] == "liars" and g["devices"]:
                    group_used = g["devices"][0]["used"]
        open(go, "w").close()
        t.join()
        rc, lines, peak = result.get("r", (None, [], 0))
        if row is None:
            record(case, "cross-check flags an under-reporting process", "FAIL", f"not flagged within 30 s; exit {rc}")
            return
        nvml_figure = nvml_figure or 0
        second = [l for l in lines if l.split()[1:2] == ["alloc"]]
        refused = len(second) >= 2 and second[1].startswith("err alloc code=2")
        small_ok = len(second) >= 3 and second[2].startswith("ok alloc")
        flagged_ok = row["charged"] >= 700 * MIB and abs(row["measured"] - nvml_figure) <= 16 * MIB
        charged_ok = group_used is not None and group_used >= row["measured"]
        in_table = "UNDER-REPORTING" in table
        record(case, "ls --json flags it, charged NVML's figure", "PASS" if flagged_ok and charged_ok and in_table else "FAIL",
               f"reported {row['reported'] / MIB:.0f} MiB, NVML {nvml_figure / MIB:.0f} MiB, charged +{row['charged'] / MIB:.0f} MiB, "
               f"group used {0 if group_used is None else group_used / MIB:.0f} MiB, in ls table: {in_table}")
        record(case, "its next allocation beyond the limit is refused", "PASS" if refused and small_ok and rc == 0 else "FAIL",
               f"768 MiB: {second[1] if len(second) > 1 else '-'}; 64 MiB: {second[2] if len(second) > 2 else '-'}; exit {rc}")
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=10)
        except subprocess.TimeoutExpired:
            serve.kill()
        serve_err.close()


def main():
    global LOG
    ap = argparse.ArgumentParser()
    for a in ("lib", "bin", "client", "image", "out", "socket", "ledger", "tmp"):
        ap.add_argument("--" + a, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    LOG = open(os.path.join(args.out, "modules.log"), "a")
    args.base_env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GPUSLICE_GROUP", "GPUSLICE_SOCKET")}
    args.base_env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    nvml = Nvml()
    t0 = time.monotonic()
    case_modules(args, nvml, "a0", "LAZY", shim=False)
    case_modules(args, nvml, "a1", "LAZY", shim=True)
    case_modules(args, nvml, "a2", "EAGER", shim=True)
    try:
        case_crosscheck(args, nvml)
    except Exception as e:  # a setup problem of (b) is a FAIL row, not a crash without a table
        record("b", "cross-check", "FAIL", f"{type(e).__name__}: {e}")
    if args.dry_run:
        # The shim's turn page of the simulated device (made by the runs without a controller):
        # its UUID is new for every simulated machine, so nothing else would ever reuse it.
        uuid = ctypes.create_string_buffer(96)
        if nvml.lib.nvmlDeviceGetUUID(nvml.handle, uuid, 96) == 0:
            try:
                os.unlink(f"/dev/shm/gpuslice-board5-{os.getuid()}-{uuid.value.decode()}")
            except OSError:
                pass
    log(f"done in {time.monotonic() - t0:.0f} s")
    print(f"\n{'ID':<3} {'RESULT':<6} {'CHECK':<62} FIGURES")
    for case, name, verdict, figures in RESULTS:
        print(f"{case:<3} {verdict:<6} {name:<62} {figures}")
    return 0 if all(v != "FAIL" for _, _, v, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
