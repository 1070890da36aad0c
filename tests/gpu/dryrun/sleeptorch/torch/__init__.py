"""Stand-in for the parts of PyTorch that tests/gpu/torch_priority.py's probe, matmul and train
modes use, for ptxslice_torch.sh's torch dry run only (PTXSLICE_TORCH_DRY_RUN=torch puts
tests/gpu/dryrun/sleeptorch first on PYTHONPATH). Not PyTorch, no CUDA kernels: every "kernel" sleeps
SLEEPTORCH_MS (0.3 ms) on the host, so that the orchestration (ready/go, pause files, phases,
report lines, windows, the table) runs on a machine without a GPU; its figures mean nothing.
With SLEEPTORCH_SIMCUDA=1 (ptxslice_torch.py sets it, with the simulated driver on
LD_LIBRARY_PATH) it also makes a primary context on the simulated driver at import, through
../../simdrv.py, as torch's first CUDA call does: the shim (when preloaded) then sees the
program's device and logs what it makes of it (whether MPS serves it), and an MPS daemon (the
fake one of tests/gpu/dryrun) counts it as a client (a libcuda mapped). The kernels still
sleep."""
import contextlib
import importlib.util
import os
import time

__version__ = "0.0-fake"
float16, float32, bfloat16 = "fp16", "fp32", "bf16"
OP_S = float(os.environ.get("SLEEPTORCH_MS", "0.3")) / 1000.0
_DRIVER = None
if os.environ.get("SLEEPTORCH_SIMCUDA") == "1":
    _spec = importlib.util.spec_from_file_location(
        "simdrv", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "simdrv.py"))
    _simdrv = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_simdrv)
    _DRIVER = _simdrv.Driver()  # kept: the context lives as long as the program


def _work(n=1):
    time.sleep(OP_S * n)


class Tensor:
    def __init__(self, v=0.5):
        self.v = v

    def to(self, *a, **k):
        return self

    cuda = float = detach = to

    def __getitem__(self, i):
        return self

    def sum(self):
        return self

    def __float__(self):
        return self.v

    def backward(self):
        _work(2)

    def __add__(self, o):
        _work()
        return Tensor()


def zeros(*a, **k):
    return Tensor(0.0)


def randn(*a, **k):
    return Tensor()


def empty(*a, **k):
    return Tensor()


def matmul(a, b, out=None):
    _work()
    return out


def manual_seed(s):
    pass


def device(d):
    return d


def compile(m):
    time.sleep(1.0)  # "compilation"
    return m


@contextlib.contextmanager
def no_grad():
    yield


class Generator:
    def __init__(self, device=None):
        pass

    def manual_seed(self, s):
        return self


class _Cuda:
    class Event:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self):
            self.t = time.monotonic()

        def elapsed_time(self, other):
            return 1000.0 * (other.t - self.t)

    class Stream:
        def wait_stream(self, s):
            pass

    class CUDAGraph:
        def replay(self):
            _work(5)

    def get_device_name(self, i=0):
        return "Fake GPU"

    def synchronize(self):
        pass

    def current_stream(self):
        return self.Stream()

    @contextlib.contextmanager
    def stream(self, s):
        yield

    @contextlib.contextmanager
    def graph(self, g):
        yield


cuda = _Cuda()


class _Backends:
    class cudnn:
        benchmark = False
        allow_tf32 = True

    class cuda:
        class matmul:
            allow_tf32 = False


backends = _Backends()


class _NN:
    class Module:
        def __init__(self):
            pass

        def to(self, *a, **k):
            return self

        def eval(self):
            return self

        def parameters(self):
            return []

        def __call__(self, x):
            return self.forward(x)

    class Linear(Module):
        def __init__(self, *a):
            pass

        def forward(self, x):
            _work()
            return x

    LayerNorm = Linear

    class Sequential(Module):
        def __init__(self, *mods):
            self.mods = mods

        def forward(self, x):
            for m in self.mods:
                x = m(x)
            return x

    class functional:
        @staticmethod
        def gelu(x):
            _work()
            return x

        @staticmethod
        def mse_loss(a, b):
            _work()
            return Tensor()


nn = _NN()


class optim:
    class AdamW:
        def __init__(self, params, lr=0):
            pass

        def zero_grad(self, set_to_none=True):
            pass

        def step(self):
            _work()
