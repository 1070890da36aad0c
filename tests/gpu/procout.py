"""What the torch scripts started by the harnesses (torch_quota.py, torch_models.py,
torch_matmul_rate.py) share: key=value output lines, and whether the shim is mapped into this
process. Standard library only; found because python3 puts a script's own directory
(tests/gpu) first on sys.path."""


def out(key, value):
    print(f"{key}={value}", flush=True)


def preloaded_gpuslice():
    try:
        with open("/proc/self/maps") as f:
            return int("gpuslice" in f.read())
    except OSError:
        return -1
