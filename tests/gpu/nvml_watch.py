#!/usr/bin/env python3
"""Poll NVML for per-process device memory and record the maximum seen per pid.

    nvml_watch.py TARGET OUTFILE [--interval-ms 20] [--ready FILE] [--max-s 900]

TARGET is a pid, a path to a file that holds a pid (it may appear later), or "all".
Every process on every device is recorded (nvmlDeviceGetComputeRunningProcesses); the
target decides only when to stop: when the target pid has exited (or is a zombie), on
SIGTERM/SIGINT, or after --max-s. OUTFILE then gets key=value lines:

    target_pid=, target_seen=, target_max_used_mib=     the target itself (-1: never seen)
    new_max_used_mib=, new_pids=                        pids not present at the first poll
                                                        (useful when NVML reports pids of
                                                        another pid namespace)
    samples=, errors=, baseline_pids=
    pid=P max_used_mib=M samples=S                      one line per pid seen

--ready FILE is written after NVML is initialised and the first (baseline) poll is done, so a
caller can start its target only then. Must NOT run under the shim.
"""
import argparse
import os
import sys
import time

from gpucommon import nvml_close, nvml_open, poller_args, stop_flag_on_signals, write_ready

MIB = 1024 * 1024


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    # state follows the ")" that closes the command name
    state = stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]
    return state not in ("Z", "X", "")


def read_pid(target):
    if target == "all":
        return None
    if target.isdigit():
        return int(target)
    try:
        with open(target) as f:
            txt = f.read().strip()
        return int(txt) if txt.isdigit() else None
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("outfile")
    poller_args(ap, max_s=900.0)
    args = ap.parse_args()

    stop = stop_flag_on_signals()
    pynvml, handles = nvml_open()

    per_pid = {}  # pid -> [max_bytes, samples]
    unknown_mem = set()  # pids for which NVML gave no figure
    samples = 0
    errors = 0
    last_error = ""

    def poll():
        nonlocal samples, errors, last_error
        seen = set()
        for h in handles:
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            except pynvml.NVMLError as e:
                errors += 1
                last_error = str(e)
                continue
            for p in procs:
                seen.add(p.pid)
                mem = getattr(p, "usedGpuMemory", None)
                if mem is None:
                    unknown_mem.add(p.pid)
                    mem = 0
                entry = per_pid.setdefault(p.pid, [0, 0])
                entry[0] = max(entry[0], int(mem))
                entry[1] += 1
        samples += 1
        return seen

    baseline = poll()
    write_ready(args.ready)

    t_start = time.monotonic()
    target_pid = read_pid(args.target)
    interval = args.interval_ms / 1000.0
    why = ""
    while True:
        poll()
        if stop["flag"]:
            why = stop["why"]
            break
        if target_pid is None:
            target_pid = read_pid(args.target)
        if target_pid is not None and not alive(target_pid):
            poll()  # one last look
            why = "target_exited"
            break
        if time.monotonic() - t_start > args.max_s:
            why = "max_s"
            break
        time.sleep(interval)

    nvml_close(pynvml)

    new = {pid: v for pid, v in per_pid.items() if pid not in baseline}
    lines = [
        f"target={args.target}",
        f"target_pid={target_pid if target_pid is not None else -1}",
        f"target_seen={int(target_pid in per_pid)}",
        f"target_max_used_mib={per_pid[target_pid][0] / MIB:.1f}" if target_pid in per_pid
        else "target_max_used_mib=-1",
        f"new_max_used_mib={max(v[0] for v in new.values()) / MIB:.1f}" if new else "new_max_used_mib=-1",
        "new_pids=" + ",".join(str(p) for p in sorted(new)),
        "baseline_pids=" + ",".join(str(p) for p in sorted(baseline)),
        "unknown_mem_pids=" + ",".join(str(p) for p in sorted(unknown_mem)),
        f"samples={samples}",
        f"errors={errors}",
        f"last_error={last_error}",
        f"stopped_by={why}",
        f"duration_s={time.monotonic() - t_start:.2f}",
    ]
    for pid, (mx, n) in sorted(per_pid.items()):
        lines.append(f"pid={pid} max_used_mib={mx / MIB:.1f} samples={n}")
    tmp = args.outfile + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.outfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
