#!/usr/bin/env python3
"""A PyTorch workload for the soak (soak.py, `make gpu-soak`): random tensor churn and work,
with the same output lines as soakload.cu.

    soak_torch.py churn|oom --seed S [--pause-file PATH] [--hb-ms 500] [--max-s 900]
                  [--min-mib 1] [--max-mib 1024] [--hold-mib 8192] [--mat-max 4096]

churn: each step allocates a tensor (size log-uniform between --min-mib and --max-mib, filled),
       frees one, empties the cache, or frees everything (1 in 100), then runs a matmul of two
       random n x n fp32 matrices (n up to --mat-max) and an elementwise op on a live tensor.
       Allocations that would take torch's reserved memory over --hold-mib free one instead.
oom:   each step allocates a tensor (64-512 MiB, filled) until one is refused; a refusal frees
       a random half of the tensors (and empties the cache one time in three). Set no
       --hold-mib: the quota is what stops it.
Every step ends with torch.cuda.synchronize(). A refused allocation (torch.OutOfMemoryError, or
a RuntimeError that says "out of memory" / CUBLAS_STATUS_ALLOC_FAILED: a library that could not
get its workspace) is counted, never fatal.

Lines on stdout (kind, then key=value fields):
  ready pid= preloaded_gpuslice= total_mib= free_mib= torch=
  hb t= held= n= allocs= frees= ooms= ooms_rt= kernels= steps= paused= allocated=
  quiet seq= held= n= t= allocated=     (see soakload.cu: the pause file's protocol)
  bye held= ...                          after SIGTERM/SIGINT, exit 0
  error where= name= msg=                an unexpected exception: exit 1 (3 when CUDA never came up)
held = torch.cuda.memory_reserved(): the bytes torch's caching allocator has from cudaMalloc.
Libraries also allocate outside it (on the H200 with torch 2.11: 64.1 MiB per process, the size
of cuBLAS workspaces), which the soak judges as one constant (soak.py, rows 3 and 4).
t = time.monotonic() (CLOCK_MONOTONIC).
"""
import argparse
import math
import os
import random
import signal
import sys
import time

from procout import preloaded_gpuslice

MIB = 1 << 20
STOP = {"flag": False}


def line(kind, **kv):
    """One protocol line; spaces in values become underscores (fields are split on spaces)."""
    print(kind + "".join(f" {k}={str(v).replace(' ', '_')}" for k, v in kv.items()), flush=True)


def on_signal(_signum, _frame):
    STOP["flag"] = True


def pause_seq(path):
    """The pause file's number, or None when there is none."""
    if not path:
        return None
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return 0


class Load:
    def __init__(self, torch, args):
        self.torch = torch
        self.args = args
        self.rng = random.Random(args.seed)
        self.live = []
        self.allocs = self.frees = self.ooms = self.ooms_rt = self.kernels = self.steps = 0
        self.t_hb = 0.0
        self.oom_types = (torch.cuda.OutOfMemoryError,)

    # -- figures
    def held(self):
        return self.torch.cuda.memory_reserved()

    def hb(self, paused):
        self.t_hb = time.monotonic()
        line("hb", t=f"{self.t_hb:.6f}", held=self.held(), n=len(self.live), allocs=self.allocs,
             frees=self.frees, ooms=self.ooms, ooms_rt=self.ooms_rt, kernels=self.kernels,
             steps=self.steps, paused=int(paused), allocated=self.torch.cuda.memory_allocated())

    def maybe_pause(self):
        seq = pause_seq(self.args.pause_file)
        said = None
        while seq is not None and not STOP["flag"]:
            if seq != said:
                self.torch.cuda.synchronize()
                line("quiet", seq=seq, held=self.held(), n=len(self.live), t=f"{time.monotonic():.6f}",
                     allocated=self.torch.cuda.memory_allocated())
                said = seq
            if time.monotonic() - self.t_hb >= self.args.hb_ms / 1000.0:
                self.hb(True)
            time.sleep(0.01)
            seq = pause_seq(self.args.pause_file)

    # -- steps
    def refused(self, e):
        """True (and counted) when e is the quota saying no."""
        if isinstance(e, self.oom_types):
            self.ooms += 1
            return True
        msg = str(e)
        if isinstance(e, RuntimeError) and ("out of memory" in msg or "ALLOC_FAILED" in msg):
            self.ooms_rt += 1
            return True
        return False

    def free_one(self):
        if self.live:
            self.live.pop(self.rng.randrange(len(self.live)))
            self.frees += 1

    def alloc(self, mib):
        numel = max(1, int(mib * MIB) // 4)
        try:
            t = self.torch.empty(numel, dtype=self.torch.float32, device="cuda")
            t.fill_(1.0)
        except Exception as e:  # noqa: BLE001 - sorted by refused()
            if not self.refused(e):
                raise
            return False
        self.live.append(t)
        self.allocs += 1
        return True

    def matmul(self, n):
        torch = self.torch
        try:
            a = torch.empty((n, n), dtype=torch.float32, device="cuda").fill_(0.001)
            b = torch.empty((n, n), dtype=torch.float32, device="cuda").fill_(0.002)
            c = torch.mm(a, b)
            c.add_(1.0)
            self.kernels += 4
        except Exception as e:  # noqa: BLE001
            if not self.refused(e):
                raise

    def step_churn(self):
        a, r = self.args, self.rng.random()
        if r < 0.01:
            self.frees += len(self.live)
            self.live.clear()
            self.torch.cuda.empty_cache()
        elif r < 0.45:
            mib = math.exp(math.log(a.min_mib) + self.rng.random() * (math.log(a.max_mib) - math.log(a.min_mib)))
            if a.hold_mib and self.held() + mib * MIB > a.hold_mib * MIB and self.live:
                self.free_one()
            elif not self.alloc(mib):
                self.free_one()
        elif r < 0.75:
            self.free_one()
        elif r < 0.80:
            self.torch.cuda.empty_cache()
        if self.rng.random() < 0.7:
            self.matmul(self.rng.choice([256, 512, 1024, 2048, 3072, a.mat_max]))
        if self.live and self.rng.random() < 0.5:
            self.live[self.rng.randrange(len(self.live))].mul_(1.0001)
            self.kernels += 1

    def step_oom(self):
        if not self.alloc(self.rng.randint(64, 512)):
            for _ in range(len(self.live) // 2):
                self.free_one()
            if self.rng.random() < 1 / 3:
                self.torch.cuda.empty_cache()
        if self.rng.random() < 0.3:
            self.matmul(1024)

    def run(self):
        t0 = time.monotonic()
        step = self.step_churn if self.args.mode == "churn" else self.step_oom
        self.hb(False)
        while not STOP["flag"]:
            if time.monotonic() - t0 > self.args.max_s:
                line("watchdog", t=f"{time.monotonic():.6f}")
                return 3
            self.maybe_pause()
            if STOP["flag"]:
                break
            self.steps += 1
            step()
            self.torch.cuda.synchronize()
            if time.monotonic() - self.t_hb >= self.args.hb_ms / 1000.0:
                self.hb(False)
        self.frees += len(self.live)
        self.live.clear()
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        line("bye", held=self.held(), allocs=self.allocs, frees=self.frees, ooms=self.ooms,
             ooms_rt=self.ooms_rt, kernels=self.kernels)
        return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["churn", "oom"])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--pause-file", default="")
    ap.add_argument("--hb-ms", type=float, default=500.0)
    ap.add_argument("--max-s", type=float, default=900.0)
    ap.add_argument("--min-mib", type=float, default=1.0)
    ap.add_argument("--max-mib", type=float, default=1024.0)
    ap.add_argument("--hold-mib", type=float, default=0.0, help="0: no limit of its own")
    ap.add_argument("--mat-max", type=int, default=4096)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        import torch
        x = torch.zeros(1, device="cuda")
        # cuBLAS comes up now, while memory is free, not at the quota later.
        torch.mm(torch.ones((256, 256), device="cuda"), torch.ones((256, 256), device="cuda"))
        torch.cuda.synchronize()
        free_b, total_b = torch.cuda.mem_get_info()
        del x
    except Exception as e:  # noqa: BLE001 - report it in the protocol's terms
        line("error", where="init", name=type(e).__name__, msg=str(e).splitlines()[0][:200] if str(e) else "-")
        return 3
    line("ready", pid=os.getpid(), preloaded_gpuslice=preloaded_gpuslice(),
         total_mib=f"{total_b / MIB:.0f}", free_mib=f"{free_b / MIB:.0f}", torch=torch.__version__)
    load = Load(torch, args)
    try:
        return load.run()
    except Exception as e:  # noqa: BLE001 - a crash, said in the protocol's terms, then the traceback
        msg = str(e).splitlines()[0][:200] if str(e) else "-"
        line("error", where="step", name=type(e).__name__, msg=msg)
        raise


if __name__ == "__main__":
    sys.exit(main())
