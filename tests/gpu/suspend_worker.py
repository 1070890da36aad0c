"""The tenants of tests/gpu/suspend.sh (issue 22), one process each:

  train --gib G --steps N --pause-at K --go FILE --losses FILE
        a deterministic PyTorch training (seeded; deterministic algorithms) holding about G GiB
        (a small MLP, its optimizer, and a ballast tensor filled from a seeded generator); at
        step K it waits (CPU only) for FILE, then trains on; every step's loss goes to the
        losses file as `step loss.hex() t_ns`, so runs compare bit for bit
  loop --gib G --stop FILE --losses FILE
        the same training without a pause, until FILE exists (the alternating tenant)
  hold --gib G --hold-s S
        one allocation of G GiB (timed: a suspension of others may happen inside it), kept and
        written for S seconds, then freed

Prints key=value lines (procout.py). `--dry` runs the same protocol on the simulated driver
(tests/gpu/dryrun/simdrv.py, no torch): the "model" is a linear regression on the CPU, each step
also launches and synchronizes a kernel, so that a suspended process blocks there.
"""
import argparse
import hashlib
import os
import sys
import time

from procout import out

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30


class TorchTenant:
    def __init__(self, gib, seed=0):
        import torch
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        self.torch = torch
        width = 4096
        self.model = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, 1)).cuda()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.width = width
        gen = torch.Generator(device="cuda")
        gen.manual_seed(seed + 12345)
        # The bulk of the tenant's memory, filled from a seeded generator and checked after.
        floats = max(gen_floats(gib), 1)
        self.ballast = torch.empty(floats, dtype=torch.float32, device="cuda")
        self.ballast.uniform_(generator=gen)
        torch.cuda.synchronize()

    def step(self, i):
        torch = self.torch
        gen = torch.Generator(device="cuda")
        gen.manual_seed(1000 + i)
        x = torch.randn(256, self.width, device="cuda", generator=gen)
        y = x[:, :1] * 0.5
        self.opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        return float(loss.item())

    def checksum(self):
        # A strided sample and both ends, copied to the host: exact, and cheap next to 60 GiB.
        b = self.ballast
        h = hashlib.sha256()
        for part in (b[::4096], b[:1 << 18], b[-(1 << 18):]):
            h.update(part.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def mem(self):
        free, total = self.torch.cuda.mem_get_info()
        return free, total


def gen_floats(gib):
    # The model, its gradients and momentum take about 0.4 GiB; the rest is ballast.
    return int(max(gib - 0.5, 0.1) * GIB) // 4


class DryTenant:
    """The same protocol on the simulated driver (no device data: the checksum is the host's)."""

    def __init__(self, gib, seed=0):
        sys.path.insert(0, os.path.join(HERE, "dryrun"))
        import simdrv
        self.drv = simdrv.Driver()
        self.ptr = self.drv.alloc(int(gib * GIB))
        if self.ptr is None:
            raise MemoryError(f"out of memory allocating {gib} GiB")
        self.w = 0.0
        self.seed = seed

    def step(self, i):
        # Linear regression on a seeded sample: deterministic, bit for bit.
        state = (self.seed * 7919 + i * 104729) & 0xFFFFFFFF
        loss = 0.0
        grad = 0.0
        for _ in range(32):
            state = (state * 1664525 + 1013904223) & 0xFFFFFFFF
            x = state / 2 ** 32
            err = self.w * x - 0.5 * x
            loss += err * err
            grad += 2 * err * x
        self.w -= 0.1 * grad / 32
        self.drv.launch(20_000)
        self.drv.sync()
        return loss / 32

    def checksum(self):
        return hashlib.sha256(str(self.ptr).encode()).hexdigest()[:16]

    def mem(self):
        return self.drv.mem_info()


def tenant(args):
    return DryTenant(args.gib) if args.dry else TorchTenant(args.gib)


def train(args, until_stop):
    t = tenant(args)
    out("ready", 1)
    out("checksum_before", t.checksum())
    gaps = []
    last = time.monotonic_ns()
    i = 0
    with open(args.losses, "w") as f:
        while True:
            if until_stop and os.path.exists(args.stop):
                break
            if not until_stop and i >= args.steps:
                break
            if not until_stop and i == args.pause_at:
                out("paused_at", i)
                while not os.path.exists(args.go):
                    time.sleep(0.01)
                last = time.monotonic_ns()
            loss = t.step(i)
            now = time.monotonic_ns()
            gaps.append((now - last, i))
            last = now
            f.write(f"{i} {loss.hex()} {now}\n")
            f.flush()
            if until_stop and i % 50 == 0:
                out("checksum_at", f"{i}:{t.checksum()}")
            i += 1
    gap_ns, gap_step = max(gaps) if gaps else (0, -1)
    out("steps", i)
    out("max_step_gap_ms", f"{gap_ns / 1e6:.1f}")
    out("max_step_gap_at", gap_step)
    out("checksum_after", t.checksum())


def hold(args):
    if args.dry:
        sys.path.insert(0, os.path.join(HERE, "dryrun"))
        import simdrv
        drv = simdrv.Driver()
        t0 = time.monotonic()
        ptr = drv.alloc(int(args.gib * GIB))
        out("alloc_s", f"{time.monotonic() - t0:.3f}")
        out("alloc_ok", int(ptr is not None))
        if ptr is None:
            return 3
        time.sleep(args.hold_s)
        drv.free(ptr)
        return 0
    import torch
    t0 = time.monotonic()
    try:
        x = torch.empty(int(args.gib * GIB), dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as e:
        out("alloc_s", f"{time.monotonic() - t0:.3f}")
        out("alloc_ok", 0)
        out("oom", str(e).splitlines()[0][:200])
        return 3
    out("alloc_s", f"{time.monotonic() - t0:.3f}")
    out("alloc_ok", 1)
    end = time.monotonic() + args.hold_s
    while time.monotonic() < end:
        x.fill_(7)
        torch.cuda.synchronize()
        time.sleep(0.2)
    out("hold_ok", int(int(x[-1].item()) == 7))
    del x
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "loop", "hold"])
    ap.add_argument("--gib", type=float, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pause-at", type=int, default=-1)
    ap.add_argument("--go", default="")
    ap.add_argument("--stop", default="")
    ap.add_argument("--losses", default="/dev/null")
    ap.add_argument("--hold-s", type=float, default=5.0)
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args()
    out("pid", os.getpid())
    if args.mode == "hold":
        return hold(args)
    train(args, until_stop=(args.mode == "loop"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
