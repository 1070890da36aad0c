#!/usr/bin/env python3
"""Matmul throughput of PyTorch on the GPU, for SM-share checks.

    torch_matmul_rate.py --seconds S [--n 4096] [--dtype fp16|bf16|fp32] [--warmup-s 1.0]
                         [--sync-every 20]

Two n x n matrices, `torch.matmul(a, b, out=c)` in a loop (no allocation inside the loop).
Warm-up for --warmup-s seconds (cuBLAS heuristics, clocks, and a throttle's steady state),
then counts iterations for S seconds of wall time with a torch.cuda.synchronize() every
--sync-every iterations (the clock is read after each synchronize, so only finished work is
counted). Prints key=value lines: iters=, seconds=, rate= (iterations/s), ms_per_iter=,
tflops=. Exit 0 on success, 1 on an unexpected error.
"""
import argparse
import os
import sys
import time

from procout import matmul_loop, out, preloaded_gpuslice


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--sync-every", type=int, default=20)
    args = ap.parse_args()
    if args.seconds <= 0 or args.n < 1 or args.sync_every < 1:
        ap.error("--seconds > 0, --n >= 1, --sync-every >= 1")

    import torch

    out("torch_version", torch.__version__)
    out("preloaded_gpuslice", preloaded_gpuslice())
    out("env_GPUSLICE_SM_SHARE", os.environ.get("GPUSLICE_SM_SHARE", "-"))
    c, block = matmul_loop(torch, args)

    t0 = time.monotonic()
    warm_iters = 0
    while True:
        block()
        warm_iters += args.sync_every
        if time.monotonic() - t0 >= args.warmup_s:
            break
    out("warmup_iters", warm_iters)
    out("warmup_seconds", f"{time.monotonic() - t0:.4f}")

    iters = 0
    t0 = time.monotonic()
    t_end = t0 + args.seconds
    now = t0
    while now < t_end:
        block()
        iters += args.sync_every
        now = time.monotonic()
    secs = now - t0
    rate = iters / secs
    flops = 2.0 * args.n ** 3
    out("iters", iters)
    out("seconds", f"{secs:.6f}")
    out("rate", f"{rate:.3f}")
    out("ms_per_iter", f"{1000.0 * secs / iters:.4f}")
    out("tflops", f"{rate * flops / 1e12:.2f}")
    out("checksum", f"{float(c[0, :8].float().sum()):.4f}")
    out("done", 1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a clear line for the log, then a non-zero status
        print(f"error={type(e).__name__}: {e}", flush=True)
        raise
