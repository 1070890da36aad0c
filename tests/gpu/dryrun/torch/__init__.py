"""Stand-in for the few parts of PyTorch that soak_torch.py uses, for the soak's dry run only
(SOAK_DRY_RUN=1 puts tests/gpu/dryrun first on PYTHONPATH). Not PyTorch: it exists so that
soak_torch.py's own logic (steps, refusals, the pause protocol) runs against the shim, the
controller and the simulated driver on a machine without a GPU.

Tensors are device allocations on the simulated driver (simdrv.py). Like torch's caching
allocator, segments are whole multiples of 2 MiB and a freed tensor's segment stays reserved for
reuse (same size) until empty_cache(); a refused allocation empties the cache and tries once more
before raising OutOfMemoryError. memory_reserved() is therefore what torch means by it: the bytes
obtained from the driver and not given back. Kernels take a plausible time on the simulated
device (bytes / 3 TB/s, 2 n^3 / 50 TFLOP/s)."""
import types
import weakref

from simdrv import Driver

__version__ = "0.0+soak-dryrun"
SEGMENT = 2 << 20


class dtype:
    def __init__(self, name, itemsize):
        self.name = name
        self.itemsize = itemsize

    def __repr__(self):
        return f"torch.{self.name}"


float32 = dtype("float32", 4)
float16 = dtype("float16", 2)


class OutOfMemoryError(RuntimeError):
    pass


class _Allocator:
    def __init__(self):
        self.drv = None
        self.cached = {}  # segment size -> [device pointers]
        self.reserved = 0
        self.allocated = 0

    def driver(self):
        if self.drv is None:
            self.drv = Driver()
        return self.drv

    def get(self, nbytes):
        size = max(SEGMENT, (nbytes + SEGMENT - 1) // SEGMENT * SEGMENT)
        pool = self.cached.get(size)
        if pool:
            ptr = pool.pop()
        else:
            ptr = self.driver().alloc(size)
            if ptr is None:
                self.empty()
                ptr = self.driver().alloc(size)
            if ptr is None:
                raise OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {size / 2**20:.2f} MiB "
                    f"({self.reserved / 2**30:.2f} GiB reserved in total by the stand-in torch)")
            self.reserved += size
        self.allocated += size
        return ptr, size

    def put(self, ptr, size):
        self.allocated -= size
        self.cached.setdefault(size, []).append(ptr)

    def empty(self):
        for size, ptrs in self.cached.items():
            for p in ptrs:
                self.driver().free(p)
                self.reserved -= size
        self.cached = {}


_A = _Allocator()


class Tensor:
    def __init__(self, shape, dt):
        self.shape = shape
        self.dtype = dt
        numel = 1
        for s in shape:
            numel *= s
        self.nbytes = numel * dt.itemsize
        ptr, size = _A.get(max(1, self.nbytes))
        weakref.finalize(self, _A.put, ptr, size)

    def _touch(self):
        _A.driver().launch(self.nbytes / 3e12 * 1e9 + 2000)
        return self

    def fill_(self, _v):
        return self._touch()

    def mul_(self, _v):
        return self._touch()

    def add_(self, _v):
        return self._touch()


def _shape(size):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        return tuple(size[0])
    return tuple(size)


def empty(*size, dtype=float32, device="cuda"):
    assert str(device).startswith("cuda"), "the stand-in torch has CUDA tensors only"
    return Tensor(_shape(size), dtype)


def zeros(*size, dtype=float32, device="cuda"):
    return empty(*size, dtype=dtype, device=device).fill_(0)


def ones(*size, dtype=float32, device="cuda"):
    return empty(*size, dtype=dtype, device=device).fill_(1)


def mm(a, b):
    n, k = a.shape
    m = b.shape[1]
    out = Tensor((n, m), a.dtype)
    _A.driver().launch(2.0 * n * k * m / 50e12 * 1e9 + 2000)
    return out


def _synchronize():
    _A.driver().sync()


def _mem_get_info():
    return _A.driver().mem_info()


cuda = types.SimpleNamespace(
    OutOfMemoryError=OutOfMemoryError,
    is_available=lambda: True,
    synchronize=_synchronize,
    memory_reserved=lambda: _A.reserved,
    memory_allocated=lambda: _A.allocated,
    empty_cache=lambda: _A.empty(),
    mem_get_info=_mem_get_info,
)
