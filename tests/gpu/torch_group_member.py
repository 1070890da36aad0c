#!/usr/bin/env python3
"""A PyTorch process for the controller checks (controller.py, `make gpu-ctl`): holds or
allocates 256 MiB tensors when told to, and says exactly what happened.

    torch_group_member.py hold --tensors N [--max-s 180]
        Allocate N tensors, print held_tensors=, held_mib=, hold_ok=, ready=1, then hold them
        until stdin reaches EOF or says "quit" (or --max-s passes).
    torch_group_member.py worker [--max-s 180]
        Print ready=1 once CUDA is up, then obey one command per stdin line:
          fill CAP SLEEP_MS TAG     allocate tensors (SLEEP_MS apart) until an error or CAP
                                    more; prints TAG_tensors= (new ones), TAG_stop=oom|cap|error,
                                    TAG_error_type=, TAG_error=, TAG_total_tensors=, TAG_done=1
          regain N TIMEOUT_S INTERVAL_MS TAG
                                    try one tensor every INTERVAL_MS until N more were allocated
                                    or TIMEOUT_S passed: TAG_started=1 after the first try, then
                                    TAG_got=, TAG_fails=, TAG_fail_monos=, TAG_success_monos=
                                    (time.monotonic(), i.e. CLOCK_MONOTONIC), TAG_stop=, TAG_done=1
          quit                      free everything and exit 0
    torch_group_member.py probe [--hold-s 3] [--cap 8]
        Print pid=, preloaded_gpuslice=, total_mib= (torch.cuda.mem_get_info), ready=1; sleep
        --hold-s; then fill until an error or --cap tensors (fill_* keys as above).

Every tensor is 256 MiB of float32, filled and synchronized (so the memory is really there).
Key=value output lines; exit 0 when the program ran to its end (whatever the allocations did),
1 on an unexpected error, 3 when --max-s passed (a watchdog: the caller died or hung).
"""
import argparse
import os
import sys
import threading
import time

from procout import out, preloaded_gpuslice

CHUNK_ELEMS = 64 * 1024 * 1024  # float32: 256 MiB
MIB = 1024 * 1024

torch = None
OOM = None


def watchdog(max_s):
    def fire():
        out("watchdog", 1)
        sys.stdout.flush()
        os._exit(3)
    t = threading.Timer(max_s, fire)
    t.daemon = True
    t.start()


def one_tensor():
    t = torch.empty(CHUNK_ELEMS, dtype=torch.float32, device="cuda")
    t.fill_(1.0)
    torch.cuda.synchronize()
    return t


def err_name(e):
    return f"{type(e).__module__}.{type(e).__qualname__}"


def first_line(e):
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[0] if lines else ""


def fill(held, cap, sleep_ms, tag):
    """Allocate until an error or `cap` more; appends to `held`."""
    out(f"{tag}_t0_mono", f"{time.monotonic():.6f}")
    n0 = len(held)
    stop, etype, emsg, full = "cap", "", "", ""
    while len(held) - n0 < cap:
        try:
            held.append(one_tensor())
        except Exception as e:  # noqa: BLE001 - which error it was is the point
            stop = "oom" if isinstance(e, OOM) else "error"
            etype, emsg = err_name(e), first_line(e)
            full = " | ".join(l.strip() for l in str(e).splitlines() if l.strip())
            break
        print(f"ev {tag} n={len(held) - n0} mono={time.monotonic():.6f}", flush=True)
        if sleep_ms:
            time.sleep(sleep_ms / 1000.0)
    out(f"{tag}_t1_mono", f"{time.monotonic():.6f}")
    out(f"{tag}_tensors", len(held) - n0)
    out(f"{tag}_stop", stop)
    out(f"{tag}_error_type", etype)
    out(f"{tag}_error", emsg)
    if full:
        out(f"{tag}_error_full", full[:2000])
    out(f"{tag}_total_tensors", len(held))
    out(f"{tag}_held_mib", len(held) * 256)
    try:
        out(f"{tag}_reserved_mib", f"{torch.cuda.memory_reserved() / MIB:.1f}")
    except Exception as e:  # noqa: BLE001
        out(f"{tag}_reserved_error", err_name(e))
    out(f"{tag}_done", 1)


def regain(held, n, timeout_s, interval_ms, tag):
    t0 = time.monotonic()
    out(f"{tag}_start_mono", f"{t0:.6f}")
    got, fails, succ = 0, [], []
    stop, etype = "timeout", ""
    started = False
    while True:
        try:
            held.append(one_tensor())
            got += 1
            succ.append(time.monotonic())
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, OOM):
                stop, etype = "error", f"{err_name(e)}: {first_line(e)}"
                break
            fails.append(time.monotonic())
        if not started:
            out(f"{tag}_started", 1)
            started = True
        if got >= n:
            stop = "done"
            break
        if time.monotonic() - t0 > timeout_s:
            break
        if fails and (not succ or fails[-1] > succ[-1]):
            time.sleep(interval_ms / 1000.0)  # pause only after a refusal
    if not started:
        out(f"{tag}_started", 1)
    out(f"{tag}_got", got)
    out(f"{tag}_fails", len(fails))
    out(f"{tag}_fail_monos", ",".join(f"{x:.6f}" for x in fails))
    out(f"{tag}_success_monos", ",".join(f"{x:.6f}" for x in succ))
    out(f"{tag}_stop", stop)
    out(f"{tag}_error_type", etype)
    out(f"{tag}_total_tensors", len(held))
    out(f"{tag}_done", 1)


def cuda_up():
    free_b, total_b = torch.cuda.mem_get_info()
    out("pid", os.getpid())
    out("preloaded_gpuslice", preloaded_gpuslice())
    out("torch_version", torch.__version__)
    out("total_mib", f"{total_b / MIB:.1f}")
    out("free_mib", f"{free_b / MIB:.1f}")
    for k in ("GPUSLICE_SOCKET", "GPUSLICE_GROUP", "GPUSLICE_MEMORY_LIMIT", "GPUSLICE_PRIORITY"):
        out(f"env_{k}", os.environ.get(k, "-"))


def main():
    global torch, OOM
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["hold", "worker", "probe"])
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--max-s", type=float, default=180.0)
    ap.add_argument("--hold-s", type=float, default=3.0)
    ap.add_argument("--cap", type=int, default=8)
    args = ap.parse_args()
    watchdog(args.max_s)

    import torch as _torch
    torch = _torch
    OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    cuda_up()
    held = []

    if args.role == "probe":
        out("ready", 1)
        time.sleep(args.hold_s)
        fill(held, args.cap, 0, "fill")
        del held
        out("done", 1)
        return 0

    if args.role == "hold":
        fill(held, args.tensors, 0, "hold")
        out("held_tensors", len(held))
        out("held_mib", len(held) * 256)
        out("hold_ok", int(len(held) == args.tensors))
        out("ready", 1)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
        del held
        out("done", 1)
        return 0

    out("ready", 1)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        try:
            if cmd == "fill":
                fill(held, int(words[1]), int(words[2]), words[3])
            elif cmd == "regain":
                regain(held, int(words[1]), float(words[2]), float(words[3]), words[4])
            elif cmd == "quit":
                break
            else:
                out("bad_command", line.strip())
        except (IndexError, ValueError):
            out("bad_command", line.strip())
    held.clear()
    torch.cuda.synchronize()
    out("done", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
