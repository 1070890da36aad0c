"""What the torch scripts started by the harnesses (torch_quota.py, torch_models.py,
torch_matmul_rate.py, torch_priority.py) share: key=value output lines, whether the shim is
mapped into this process, and the matmul workload (torch is passed in). Standard library only; found because python3 puts a script's own directory
(tests/gpu) first on sys.path."""


def out(key, value):
    print(f"{key}={value}", flush=True)


def preloaded_gpuslice():
    try:
        with open("/proc/self/maps") as f:
            return int("gpuslice" in f.read())
    except OSError:
        return -1


def matmul_loop(torch, args):
    """The matmul workload of torch_matmul_rate.py and torch_priority.py: prints device=, n=,
    dtype=, sync_every=, makes two seeded n x n matrices (args.n, args.dtype) and an output, and
    returns (c, block): block() runs args.sync_every `matmul(a, b, out=c)` and synchronizes."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out("device", torch.cuda.get_device_name(0))
    out("n", args.n)
    out("dtype", args.dtype)
    out("sync_every", args.sync_every)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(args.n, args.n, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(args.n, args.n, device="cuda", dtype=dtype, generator=g)
    c = torch.empty(args.n, args.n, device="cuda", dtype=dtype)

    def block():
        for _ in range(args.sync_every):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()

    return c, block
