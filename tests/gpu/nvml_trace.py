#!/usr/bin/env python3
"""Record NVML's per-process device memory over time (for sums over processes, which
nvml_watch.py's per-pid maxima cannot give).

    nvml_trace.py OUTFILE [--interval-ms 20] [--ready FILE] [--max-s 600]

Polls nvmlDeviceGetComputeRunningProcesses on every device every --interval-ms and appends one
line per poll to OUTFILE (flushed each time, so it can be read while it runs):

    baseline pids=P,P,...                    the first poll (written before --ready)
    s mono=<CLOCK_MONOTONIC s> PID:BYTES PID:BYTES ...   one per poll (a pid on two devices: summed)
    err mono=<s> <message>                    a poll that failed

Stops on SIGTERM/SIGINT or after --max-s, writing `end samples=N errors=M why=...`.
Must NOT run under the shim.
"""
import argparse
import sys
import time

from gpucommon import nvml_close, nvml_open, poller_args, stop_flag_on_signals, write_ready


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outfile")
    poller_args(ap, max_s=600.0)
    args = ap.parse_args()

    stop = stop_flag_on_signals()
    pynvml, handles = nvml_open()
    f = open(args.outfile, "w")
    samples = errors = 0

    def poll():
        nonlocal samples, errors
        used = {}
        mono = time.monotonic()
        for h in handles:
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                for p in procs:
                    mem = getattr(p, "usedGpuMemory", None) or 0
                    used[p.pid] = used.get(p.pid, 0) + int(mem)
            except Exception as e:  # noqa: BLE001 - an NVML hiccup must not end the trace
                errors += 1
                f.write(f"err mono={mono:.6f} {type(e).__name__}: {e}\n")
        samples += 1
        return mono, used

    _, base = poll()
    f.write("baseline pids=" + ",".join(str(p) for p in sorted(base)) + "\n")
    f.flush()
    write_ready(args.ready)

    t_end = time.monotonic() + args.max_s
    interval = args.interval_ms / 1000.0
    why = "max_s"
    while time.monotonic() < t_end:
        mono, used = poll()
        f.write(f"s mono={mono:.6f} " + " ".join(f"{p}:{b}" for p, b in sorted(used.items())) + "\n")
        f.flush()
        if stop["flag"]:
            why = stop["why"]
            break
        time.sleep(interval)
    f.write(f"end samples={samples} errors={errors} why={why}\n")
    f.close()
    nvml_close(pynvml)
    return 0


if __name__ == "__main__":
    sys.exit(main())
