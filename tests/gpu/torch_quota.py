#!/usr/bin/env python3
"""Fill the GPU with 256 MiB PyTorch tensors until torch.OutOfMemoryError.

    torch_quota.py MODE [--sleep-ms N] [--cap N] [--hold-ms N]

MODE is default | expandable | async and is only a label checked against the allocator
that is actually in use: the caller sets PYTORCH_CUDA_ALLOC_CONF (unset,
expandable_segments:True, backend:cudaMallocAsync). Prints key=value lines.
Exit 0 when the run completed (whatever the quota did), 1 on an unexpected error.
"""
import argparse
import gc
import os
import sys
import time

from procout import out, preloaded_gpuslice

CHUNK_ELEMS = 64 * 1024 * 1024  # float32: 256 MiB
MIB = 1024 * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["default", "expandable", "async"])
    ap.add_argument("--sleep-ms", type=int, default=0, help="pause after each tensor")
    ap.add_argument("--cap", type=int, default=64, help="stop after this many tensors (safety)")
    ap.add_argument("--hold-ms", type=int, default=-1, help="pause at the peak; default max(200, 4*sleep)")
    args = ap.parse_args()
    hold_ms = args.hold_ms if args.hold_ms >= 0 else (max(200, 4 * args.sleep_ms) if args.sleep_ms else 0)

    import torch

    oom_error = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    out("mode", args.mode)
    out("alloc_conf", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    out("torch_version", torch.__version__)
    out("preloaded_gpuslice", preloaded_gpuslice())
    try:
        out("allocator_backend", torch.cuda.get_allocator_backend())
    except Exception as e:  # older torch
        out("allocator_backend", f"unknown({type(e).__name__})")

    free_b, total_b = torch.cuda.mem_get_info()
    out("mem_get_info_total_bytes", total_b)
    out("mem_get_info_total_mib", f"{total_b / MIB:.1f}")
    out("mem_get_info_free_mib", f"{free_b / MIB:.1f}")

    tensors = []
    oom = None
    stop_reason = "cap"
    while len(tensors) < args.cap:
        try:
            t = torch.empty(CHUNK_ELEMS, dtype=torch.float32, device="cuda")
            t.fill_(1.0)
            torch.cuda.synchronize()
        except oom_error as e:
            oom = str(e)
            stop_reason = "oom"
            break
        tensors.append(t)
        if args.sleep_ms:
            time.sleep(args.sleep_ms / 1000.0)

    n = len(tensors)
    out("tensors", n)
    out("held_mib", n * 256)
    out("stop_reason", stop_reason)
    out("oom", int(oom is not None))
    out("reserved_mib", f"{torch.cuda.memory_reserved() / MIB:.1f}")
    try:
        free_p, total_p = torch.cuda.mem_get_info()
        out("peak_mem_get_info_free_mib", f"{free_p / MIB:.1f}")
    except Exception as e:
        out("peak_mem_get_info_error", type(e).__name__)
    if oom is not None:
        lines = [l.strip() for l in oom.splitlines() if l.strip()]
        out("oom_message_first_line", lines[0] if lines else "")
        # The native allocator says "GPU 0 has a total capacity of 4.00 GiB"; the cudaMallocAsync
        # backend says "Device limit : 4.00 GiB" on a later line.
        cap_lines = [l for l in lines if "capacity" in l or "Device limit" in l]
        out("oom_capacity_line", " ".join(cap_lines[0].split()) if cap_lines else "")
        out("oom_mentions_4gib", int("4.00 GiB" in oom))
        out("oom_message_full", " | ".join(lines))
    if hold_ms:
        time.sleep(hold_ms / 1000.0)

    # Free, return the cache, and allocate again.
    del tensors
    t = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_a, _ = torch.cuda.mem_get_info()
    out("after_free_mem_get_info_free_mib", f"{free_a / MIB:.1f}")
    try:
        t = torch.empty(CHUNK_ELEMS, dtype=torch.float32, device="cuda")
        t.fill_(2.0)
        torch.cuda.synchronize()
        ok = int(float(t[0].item()) == 2.0)
        out("realloc_ok", ok)
    except oom_error as e:
        out("realloc_ok", 0)
        out("realloc_error", str(e).splitlines()[0] if str(e) else "OutOfMemoryError")
    del t
    gc.collect()
    torch.cuda.empty_cache()

    # Refill to the same count: shows the frees were credited back to the quota.
    refill = []
    try:
        while len(refill) < n:
            x = torch.empty(CHUNK_ELEMS, dtype=torch.float32, device="cuda")
            x.fill_(3.0)
            refill.append(x)
        torch.cuda.synchronize()
    except oom_error:
        pass
    out("refill_tensors", len(refill))
    del refill
    gc.collect()
    torch.cuda.empty_cache()
    out("done", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
