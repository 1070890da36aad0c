#!/usr/bin/env python3
"""A PyTorch tenant for tests/gpu/tenant_view.sh: holds --mib MiB on device 0 (and, with
--busy, runs fp32 matmuls back to back), then writes one JSON object to --ready (atomically):
its pid, torch.cuda.mem_get_info() and what NVML says in this same process (tenant_nvml.read),
read one right after the other; keeps running until --stop exists (or --max-s passes).

    tenant_worker.py --mib N --ready FILE --stop FILE [--busy] [--max-s 240]
"""
import argparse
import json
import os
import sys
import time

import torch

from tenant_nvml import open_nvml, read


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--stop", required=True)
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--max-s", type=float, default=240.0)
    a = ap.parse_args()
    t0 = time.monotonic()
    held = torch.empty(a.mib * (1 << 20) // 4, dtype=torch.float32, device="cuda")
    held.fill_(1.0)
    n = 4096
    x = torch.ones(n, n, dtype=torch.float32, device="cuda")
    y = torch.mm(x, x)  # the matmul's workspace and output exist before the measurement
    torch.cuda.synchronize()
    nv = open_nvml()
    free, total = torch.cuda.mem_get_info()
    seen = read(nv, 0)
    free2, total2 = torch.cuda.mem_get_info()
    report = {"pid": os.getpid(), "cuda_free": free, "cuda_total": total, "cuda_free_after": free2,
              "cuda_total_after": total2, "nvml": seen}
    tmp = a.ready + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, a.ready)
    while not os.path.exists(a.stop) and time.monotonic() - t0 < a.max_s:
        if a.busy:
            for _ in range(8):
                y = torch.mm(x, x)
            torch.cuda.synchronize()
        else:
            time.sleep(0.05)
    del held, x, y
    return 0


if __name__ == "__main__":
    sys.exit(main())
