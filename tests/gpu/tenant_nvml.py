"""What a tenant reads from NVML on one device, for tenant_view.py and its workers: memory
(nvmlDeviceGetMemoryInfo, and _v2 when the library has it), the compute processes, utilization.
pynvml (nvidia-ml-py) when it imports, as on the GPU machine; else the same calls through ctypes
(the dry run's simulated NVML). `read(index)` returns a dict; `--json` prints it (the pynvml
script of tests/gpu/tenant_view.sh):

    tenant_nvml.py --json [--index 0] [--samples N --interval-s S]
"""
import argparse
import ctypes
import json
import sys
import time


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _ProcessInfo(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Ctypes:
    how = "ctypes"

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._ok(self.lib.nvmlInit_v2(), "nvmlInit_v2")

    @staticmethod
    def _ok(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} returned {rc}")

    def count(self):
        n = ctypes.c_uint(0)
        self._ok(self.lib.nvmlDeviceGetCount_v2(ctypes.byref(n)), "nvmlDeviceGetCount_v2")
        return n.value

    def handle(self, i):
        h = ctypes.c_void_p()
        self._ok(self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(h)), "GetHandleByIndex_v2")
        return h

    def memory(self, h):
        m = _Memory()
        self._ok(self.lib.nvmlDeviceGetMemoryInfo(h, ctypes.byref(m)), "nvmlDeviceGetMemoryInfo")
        return m.total, m.free, m.used

    def processes(self, h):
        n = ctypes.c_uint(64)
        buf = (_ProcessInfo * 64)()
        self._ok(self.lib.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(n), buf), "ComputeRunningProcesses_v3")
        return [(buf[i].pid, buf[i].usedGpuMemory) for i in range(n.value)]

    # nvidia-smi's own way to the process list: NVML's internal export table (slots 213-215,
    # entries of 4128 bytes, pid first, memory at byte 8), as shim/src/nvml/smi_table.rs reads it.
    SMI_TABLE_ID = bytes([0xc4, 0xfe, 0x3e, 0x6c, 0xc9, 0x8f, 0x6c, 0x4e, 0xa3, 0x27, 0xee, 0x69, 0x6e, 0x12, 0xf7, 0xc4])
    SMI_ENTRY = 4128

    def smi_processes(self, h, slot=213, room=64):
        table = ctypes.c_void_p()
        ident = ctypes.create_string_buffer(self.SMI_TABLE_ID, 16)
        self._ok(self.lib.nvmlInternalGetExportTable(ctypes.byref(table), ident), "nvmlInternalGetExportTable")
        words = ctypes.cast(table, ctypes.POINTER(ctypes.c_uint64))
        if words[0] // 8 <= slot:
            raise RuntimeError(f"the export table has {words[0]} bytes, no slot {slot}")
        fn = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p)(words[slot])
        buf = ctypes.create_string_buffer(room * self.SMI_ENTRY)
        n = ctypes.c_uint(room)
        self._ok(fn(h, ctypes.byref(n), buf), f"export table slot {slot}")
        raw = buf.raw
        return [(int.from_bytes(raw[k * self.SMI_ENTRY:k * self.SMI_ENTRY + 4], "little"),
                 int.from_bytes(raw[k * self.SMI_ENTRY + 8:k * self.SMI_ENTRY + 16], "little")) for k in range(n.value)]

    def utilization(self, h):
        u = _Utilization()
        self._ok(self.lib.nvmlDeviceGetUtilizationRates(h, ctypes.byref(u)), "nvmlDeviceGetUtilizationRates")
        return u.gpu, u.memory


class _Pynvml:
    how = "pynvml"

    def __init__(self):
        import pynvml
        self.nv = pynvml
        pynvml.nvmlInit()

    def count(self):
        return self.nv.nvmlDeviceGetCount()

    def handle(self, i):
        return self.nv.nvmlDeviceGetHandleByIndex(i)

    def memory(self, h):
        m = self.nv.nvmlDeviceGetMemoryInfo(h)
        return int(m.total), int(m.free), int(m.used)

    def processes(self, h):
        return [(int(p.pid), int(p.usedGpuMemory or 0)) for p in self.nv.nvmlDeviceGetComputeRunningProcesses(h)]

    def utilization(self, h):
        u = self.nv.nvmlDeviceGetUtilizationRates(h)
        return int(u.gpu), int(u.memory)


def open_nvml():
    try:
        return _Pynvml()
    except ImportError:
        return _Ctypes()


def read(nv, index=0):
    h = nv.handle(index)
    total, free, used = nv.memory(h)
    gpu, mem = nv.utilization(h)
    return {"how": nv.how, "count": nv.count(), "total": total, "free": free, "used": used,
            "processes": nv.processes(h), "util_gpu": gpu, "util_memory": mem, "mono": time.monotonic()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--interval-s", type=float, default=1.0)
    a = ap.parse_args()
    nv = open_nvml()
    for k in range(a.samples):
        if k:
            time.sleep(a.interval_s)
        print(json.dumps(read(nv, a.index)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
