"""The CUDA driver API through ctypes, for the soak's dry run (tests/gpu/soak.sh with
SOAK_DRY_RUN=1) and ptxslice_torch.sh's torch dry run (sleeptorch's context): what
soakload_stub.py and the stand-in torches need of the simulated driver
(tests/simcuda, found as libcuda.so.1 on LD_LIBRARY_PATH). Under the shim, ctypes' dlsym lookups
reach the shim's hooks, as a program that dlopens libcuda does.

A kernel on the simulated device lasts as many nanoseconds as its first parameter says."""
import ctypes
from ctypes import POINTER, byref, c_int, c_size_t, c_uint, c_uint64, c_void_p

CUDA_ERROR_OUT_OF_MEMORY = 2


class CudaError(Exception):
    def __init__(self, what, rc):
        super().__init__(f"{what} returned CUresult {rc}")
        self.rc = rc


def _check(what, rc):
    if rc != 0:
        raise CudaError(what, rc)


class Driver:
    """One device's primary context, one module, one kernel; the context current on this thread."""

    def __init__(self):
        cu = ctypes.CDLL("libcuda.so.1")
        cu.cuInit.argtypes = [c_uint]
        cu.cuDeviceGet.argtypes = [POINTER(c_int), c_int]
        cu.cuDevicePrimaryCtxRetain.argtypes = [POINTER(c_void_p), c_int]
        cu.cuCtxSetCurrent.argtypes = [c_void_p]
        cu.cuModuleLoadData.argtypes = [POINTER(c_void_p), c_void_p]
        cu.cuModuleGetFunction.argtypes = [POINTER(c_void_p), c_void_p, ctypes.c_char_p]
        cu.cuMemAlloc_v2.argtypes = [POINTER(c_uint64), c_size_t]
        cu.cuMemFree_v2.argtypes = [c_uint64]
        cu.cuMemGetInfo_v2.argtypes = [POINTER(c_size_t), POINTER(c_size_t)]
        cu.cuLaunchKernel.argtypes = [c_void_p, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint,
                                      c_uint, c_void_p, POINTER(c_void_p), POINTER(c_void_p)]
        self.cu = cu
        _check("cuInit", cu.cuInit(0))
        dev = c_int(0)
        _check("cuDeviceGet", cu.cuDeviceGet(byref(dev), 0))
        self.ctx = c_void_p()
        _check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(byref(self.ctx), dev))
        _check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self.ctx))
        self._image = ctypes.create_string_buffer(b"soak dry-run module")
        mod = c_void_p()
        _check("cuModuleLoadData", cu.cuModuleLoadData(byref(mod), ctypes.cast(self._image, c_void_p)))
        self.func = c_void_p()
        _check("cuModuleGetFunction", cu.cuModuleGetFunction(byref(self.func), mod, b"soak"))

    def alloc(self, nbytes):
        """The device pointer, or None when the driver (or the quota) says out of memory."""
        p = c_uint64(0)
        rc = self.cu.cuMemAlloc_v2(byref(p), c_size_t(nbytes))
        if rc == CUDA_ERROR_OUT_OF_MEMORY:
            return None
        _check(f"cuMemAlloc_v2({nbytes})", rc)
        return p.value

    def free(self, ptr):
        _check("cuMemFree_v2", self.cu.cuMemFree_v2(c_uint64(ptr)))

    def launch(self, ns):
        dur = c_uint64(int(ns))
        params = (c_void_p * 1)(ctypes.cast(byref(dur), c_void_p))
        _check("cuLaunchKernel", self.cu.cuLaunchKernel(self.func, 132, 1, 1, 256, 1, 1, 0, None, params, None))

    def sync(self):
        _check("cuCtxSynchronize", self.cu.cuCtxSynchronize())

    def mem_info(self):
        free, total = c_size_t(0), c_size_t(0)
        _check("cuMemGetInfo_v2", self.cu.cuMemGetInfo_v2(byref(free), byref(total)))
        return free.value, total.value
