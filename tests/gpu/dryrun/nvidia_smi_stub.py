#!/usr/bin/env python3
"""Stand-in for nvidia-smi in tenant_view.sh's dry run (TENANT_DRY_RUN=1): the three forms the
script runs, from NVML through ctypes (tenant_nvml.py) on the simulated NVML, in nvidia-smi's
formats, so that the script's parsing and checks run here. Not nvidia-smi; but its process
lists come the way nvidia-smi 580's do, through NVML's internal export table.

    nvidia_smi_stub.py
    nvidia_smi_stub.py --query-gpu=memory.total,memory.used,utilization.gpu --format=csv
    nvidia_smi_stub.py --query-compute-apps=pid,used_memory --format=csv
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tenant_nvml import _Ctypes  # noqa: E402

MIB = 1 << 20


def main(argv):
    nv = _Ctypes()
    devices = [nv.handle(i) for i in range(nv.count())]
    query = {k: v for k, _, v in (a.partition("=") for a in argv)}
    if "--query-gpu" in query:
        print("memory.total [MiB], memory.used [MiB], utilization.gpu [%]")
        for h in devices:
            total, _, used = nv.memory(h)
            print(f"{total // MIB} MiB, {used // MIB} MiB, {nv.utilization(h)[0]} %")
    elif "--query-compute-apps" in query:
        print("pid, used_gpu_memory [MiB]")
        for h in devices:
            for pid, used in nv.smi_processes(h):
                print(f"{pid}, {used // MIB} MiB")
    else:
        print("+ nvidia-smi stand-in (dry run) +")
        for i, h in enumerate(devices):
            total, _, used = nv.memory(h)
            print(f"| {i}  Simulated GPU | {used // MIB}MiB / {total // MIB}MiB | {nv.utilization(h)[0]}% |")
        print("| Processes: GPU PID Usage |")
        for i, h in enumerate(devices):
            for pid, used in nv.smi_processes(h):
                print(f"| {i} {pid} {used // MIB}MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
