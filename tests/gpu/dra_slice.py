"""gpuslice-dra on a real node: the ResourceSlice it publishes says what NVML says about the GPUs.

Starts a small API server (it records the plugin's server-side apply), runs gpuslice-dra until it
serves the kubelet's sockets, then compares the published slice with NVML read directly through
ctypes: one device per GPU (or per MIG instance), its UUID, model, memory (as capacity, in whole
MiB), compute capability and driver version, consumable `sm` 100, allowMultipleAllocations.
Prints a PASS/FAIL table last. Run by tests/gpu/dra.sh (which names the binary and the folders).
"""

import ctypes
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

PLUGIN, OUTDIR = sys.argv[1], sys.argv[2]
NODE = "gpu-node"
MIB = 1 << 20


def nvml_truth():
    lib = ctypes.CDLL("libnvidia-ml.so.1")
    assert lib.nvmlInit_v2() == 0, "nvmlInit_v2"
    count = ctypes.c_uint()
    assert lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
    buf = ctypes.create_string_buffer(96)
    driver = lib.nvmlSystemGetDriverVersion(buf, 96) == 0 and buf.value.decode() or None
    gpus = []
    for i in range(count.value):
        h = ctypes.c_void_p()
        assert lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)) == 0
        lib.nvmlDeviceGetUUID(h, buf, 96)
        uuid = buf.value.decode()
        lib.nvmlDeviceGetName(h, buf, 96)
        name = buf.value.decode()
        mem = (ctypes.c_ulonglong * 3)()
        assert lib.nvmlDeviceGetMemoryInfo(h, mem) == 0
        major, minor = ctypes.c_int(), ctypes.c_int()
        cc = lib.nvmlDeviceGetCudaComputeCapability(h, ctypes.byref(major), ctypes.byref(minor)) == 0 and (major.value, minor.value) or None
        cur, pend = ctypes.c_uint(), ctypes.c_uint()
        mig = lib.nvmlDeviceGetMigMode(h, ctypes.byref(cur), ctypes.byref(pend)) == 0 and cur.value == 1
        gpus.append({"index": i, "uuid": uuid, "name": name, "memory": mem[0], "cc": cc, "mig": mig})
    return driver, gpus


class Api(http.server.BaseHTTPRequestHandler):
    applied = {}

    def log_message(self, *a):
        pass

    def answer(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path in Api.applied:
            self.answer(200, Api.applied[path])
        else:
            self.answer(404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404})

    def do_PATCH(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        Api.applied[self.path.split("?")[0]] = body
        self.answer(200, body)


def semver(v):
    parts = v.split(".")
    return ".".join(str(int(p)) for p in (parts + ["0"])[:3]) if all(p.isdigit() for p in parts) and len(parts) in (2, 3) else None


def main():
    results = []

    def check(what, ok, figures):
        results.append((what, ok, figures))

    driver, gpus = nvml_truth()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = tempfile.mkdtemp(prefix="gpuslice-dra-")
    log = open(os.path.join(OUTDIR, "dra-plugin.log"), "w")
    args = [PLUGIN, "--node-name", NODE, "--api-server", f"http://127.0.0.1:{server.server_address[1]}",
            "--registrar-dir", f"{work}/registry", "--plugin-dir", f"{work}/plugin", "--cdi-dir", f"{work}/cdi",
            "--controller-socket", f"{work}/none.sock"]
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    ready = p.stdout.readline()
    started = time.monotonic() - t0
    check("plugin serves the kubelet's sockets", ready.startswith("ready") and os.path.exists(f"{work}/registry/gpuslice.dev-reg.sock"), f"{started:.2f} s: {ready.strip()}")
    p.terminate()
    p.wait(timeout=10)
    shutil.rmtree(work, ignore_errors=True)
    slice_obj = Api.applied.get(f"/apis/resource.k8s.io/v1/resourceslices/{NODE}-gpuslice-dev")
    check("ResourceSlice applied", slice_obj is not None, f"{len(Api.applied)} object(s) applied")
    if slice_obj is None:
        return report(results)
    with open(os.path.join(OUTDIR, "dra-resourceslice.json"), "w") as f:
        json.dump(slice_obj, f, indent=2)
    devices = {d["name"]: d for d in slice_obj["spec"].get("devices", [])}
    whole = [g for g in gpus if not g["mig"]]
    check("one device per GPU without MIG", all(f"gpu-{g['index']}" in devices for g in whole), f"{len(whole)} GPUs, {len(devices)} devices: {sorted(devices)}")
    for g in gpus:
        if g["mig"]:
            migs = [d for n, d in devices.items() if n.startswith(f"gpu-{g['index']}-mig-")]
            check(f"GPU {g['index']} (MIG on): instances offered, not the parent", f"gpu-{g['index']}" not in devices and len(migs) > 0, f"{len(migs)} instances")
            continue
        d = devices.get(f"gpu-{g['index']}")
        if d is None:
            continue
        a, c = d.get("attributes", {}), d.get("capacity", {})
        want_mem = g["memory"] // MIB
        got_mem = c.get("memory", {}).get("value", "")
        mem_ok = got_mem in (f"{want_mem}Mi", f"{want_mem // 1024}Gi" if want_mem % 1024 == 0 else None)
        check(f"GPU {g['index']}: uuid and model", a.get("uuid", {}).get("string") == g["uuid"] and a.get("model", {}).get("string") == g["name"], f"{g['uuid']} {g['name']}")
        check(f"GPU {g['index']}: memory capacity", mem_ok, f"NVML {g['memory']} B = {want_mem} MiB; slice {got_mem}")
        cc = g["cc"] and f"{g['cc'][0]}.{g['cc'][1]}.0"
        check(f"GPU {g['index']}: compute capability, driver", a.get("cudaComputeCapability", {}).get("version") == cc and a.get("driverVersion", {}).get("version") == semver(driver or ""), f"cc {cc}, driver {driver}")
        check(f"GPU {g['index']}: sm 100, shared", c.get("sm", {}).get("value") == "100" and d.get("allowMultipleAllocations") is True, f"sm {c.get('sm', {}).get('value')}")
    return report(results)


def report(results):
    width = max(len(r[0]) for r in results)
    print()
    print(f"{'check':<{width}}  result  figures")
    for what, ok, figures in results:
        print(f"{what:<{width}}  {'PASS' if ok else 'FAIL':<6}  {figures}")
    failed = sum(1 for r in results if not r[1])
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
