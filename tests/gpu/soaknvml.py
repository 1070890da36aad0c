"""NVML's per-process device memory for the soak (soak.py): `open_nvml()` gives an object whose
`poll()` returns {pid: bytes used, summed over devices} (pynvml when nvidia-ml-py is installed,
else the same NVML calls through ctypes: what the dry run's simulated NVML offers), and `Watch`
samples it in a thread against each process's quota. Must not run under the shim."""
import ctypes
import threading
import time

NVML_SUCCESS = 0
NVML_ERROR_INSUFFICIENT_SIZE = 7


class _Pynvml:
    how = "pynvml"

    def __init__(self):
        import pynvml
        self.nv = pynvml
        pynvml.nvmlInit()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                        for i in range(pynvml.nvmlDeviceGetCount())]

    def poll(self):
        used = {}
        for h in self.handles:
            for p in self.nv.nvmlDeviceGetComputeRunningProcesses(h):
                mem = getattr(p, "usedGpuMemory", None) or 0
                used[p.pid] = used.get(p.pid, 0) + int(mem)
        return used

    def close(self):
        try:
            self.nv.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass


class _ProcessInfo(ctypes.Structure):
    # nvmlProcessInfo_t (nvml.h: nvmlProcessInfo_v2_t), what the _v2 and _v3 calls fill in.
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


class _Ctypes:
    how = "ctypes libnvidia-ml.so.1"

    def __init__(self):
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        self.lib = lib
        self._ok(lib.nvmlInit_v2(), "nvmlInit_v2")
        count = ctypes.c_uint(0)
        self._ok(lib.nvmlDeviceGetCount_v2(ctypes.byref(count)), "nvmlDeviceGetCount_v2")
        self.handles = []
        for i in range(count.value):
            h = ctypes.c_void_p()
            self._ok(lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(h)),
                     "nvmlDeviceGetHandleByIndex_v2")
            self.handles.append(h)
        self.get = getattr(lib, "nvmlDeviceGetComputeRunningProcesses_v3", None) or \
            lib.nvmlDeviceGetComputeRunningProcesses_v2

    @staticmethod
    def _ok(rc, what):
        if rc != NVML_SUCCESS:
            raise RuntimeError(f"{what} returned NVML error {rc}")

    def poll(self):
        used = {}
        for h in self.handles:
            n = ctypes.c_uint(0)
            rc = self.get(h, ctypes.byref(n), None)
            if rc == NVML_SUCCESS and n.value == 0:
                continue
            if rc not in (NVML_SUCCESS, NVML_ERROR_INSUFFICIENT_SIZE):
                raise RuntimeError(f"nvmlDeviceGetComputeRunningProcesses returned {rc}")
            cap = n.value + 16  # room for processes that start between the two calls
            arr = (_ProcessInfo * cap)()
            n = ctypes.c_uint(cap)
            self._ok(self.get(h, ctypes.byref(n), arr), "nvmlDeviceGetComputeRunningProcesses")
            for p in arr[:n.value]:
                used[p.pid] = used.get(p.pid, 0) + int(p.usedGpuMemory)
        return used

    def close(self):
        try:
            self.lib.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def open_nvml():
    """pynvml if it imports, else ctypes; raises when neither can initialise NVML."""
    try:
        return _Pynvml()
    except ImportError:
        return _Ctypes()


class Watch(threading.Thread):
    """Samples NVML's per-process memory every `interval` s; keeps, per workload, the largest
    figure and the samples above its quota x `slack`. `lookup(pid)` names a process of ours:
    (workload key, quota in bytes, instance name), None for any other; `clock(t)` turns a
    time.monotonic() value into the time the records carry."""

    def __init__(self, lookup, clock, slack, interval):
        super().__init__(daemon=True)
        self.lookup, self.clock, self.slack, self.interval = lookup, clock, slack, interval
        self.stop_flag = threading.Event()
        self.error = ""
        self.how = ""
        self.samples = self.errors = 0
        self.last_error = ""
        self.max = {}            # wl key -> (bytes, ratio, t_rel, instance name)
        self.violations = []     # (t_rel, instance name, pid, bytes, ratio); the first 50
        self.n_violations = {}   # wl key -> count
        self.last_seen = {}      # pid -> mono of the last sample that listed it
        self.others = {}         # pids NVML listed that are not ours -> max bytes
        try:
            self.nv = open_nvml()
            self.how = self.nv.how
        except Exception as e:  # noqa: BLE001 - no NVML: say so in the table
            self.nv = None
            self.error = f"NVML unavailable: {type(e).__name__}: {e}"

    def run(self):
        while not self.stop_flag.is_set():
            t = time.monotonic()
            try:
                used = self.nv.poll()
            except Exception as e:  # noqa: BLE001 - a hiccup must not end the sampling
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                used = None
            if used is not None:
                self.samples += 1
                for pid, b in used.items():
                    self.last_seen[pid] = t
                    ours = self.lookup(pid)
                    if ours is None:
                        self.others[pid] = max(self.others.get(pid, 0), b)
                        continue
                    key, quota, name = ours
                    ratio = b / quota
                    if key not in self.max or b > self.max[key][0]:
                        self.max[key] = (b, ratio, self.clock(t), name)
                    if b > quota * self.slack:
                        self.n_violations[key] = self.n_violations.get(key, 0) + 1
                        if len(self.violations) < 50:
                            self.violations.append((self.clock(t), name, pid, b, ratio))
            self.stop_flag.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def stop(self):
        self.stop_flag.set()
        if self.is_alive():
            self.join(timeout=5)
        if self.nv is not None:
            self.nv.close()
