#!/usr/bin/env python3
"""PyTorch programs for the priority checks of `make gpu-bench` (started by priority.py).

    torch_priority.py probe --seconds S (--period-ms P | --period-x X) [--batch 8]
                      [--dtype fp32|fp16] [--warmup-s 0.5] [--go-file PATH]
                      [--go-timeout-s 60] [--dump PATH] [--spin-ms 1] [--graph]
                      [--pause-file PATH | --neighbours NAME=PATH,...]
                      [--phase-s 1] [--settle-s 0.1]
    torch_priority.py matmul --seconds S [--n 4096] [--dtype fp16|bf16|fp32] [--sync-every 20]
                      [--warmup-s 0.5] [--report-ms 50] [--go-file PATH] [--go-timeout-s 60]
                      [--pause-file PATH] [--pause-poll-ms 0.2] [--stop-file PATH]
    torch_priority.py train --seconds S [--compile] [--tokens 4096] [--dim 1024]
                      [--hidden 2048] [--layers 2] [--sync-every 4] (the rest as matmul)

probe: ResNet-50 inference (torchvision, weights=None, seed 0, eval, no_grad, batch 8,
channels-first, cudnn.benchmark off so the algorithms do not depend on the run) as periodic
requests: each request = one forward pass + torch.cuda.synchronize(). Eager by default: about
170 kernels launched one by one from Python, so a request is bound by the host's launch rate;
with --graph the forward pass is captured once into a CUDA graph and each request replays it
(one launch; the request is then bound by the GPU). Before ready=1 it runs
10 requests (cuDNN and allocator warm-up) and times 20 more back to back (`solo_ms=`, their
median); with --period-x the period is X times that, rounded to 0.1 ms. After the go file: a
--warmup-s warm-up of the same pattern (not recorded), then requests due every period for S
seconds; latency = due time -> completion (CLOCK_MONOTONIC), so a request that waits for the
device shows the whole wait. Between requests it sleeps until --spin-ms before the next one is
due, then spins (a value above the period: it never sleeps, which keeps the launch path's
speed steadier). Prints the same keys as latprobe's run (requests=, p50_ms=, p90_ms=, p99_ms=,
max_ms=, mean_ms=, busy_frac= from CUDA events around each forward, ..., mono_start=,
mono_end=), and enqueue_p50_ms=/enqueue_p99_ms= (release -> forward() returned: the host's
share; near the latency when the request is bound by the launch rate). The garbage collector
is off during the timed phase.
With --pause-file (the same path given to the neighbour) the timed phase alternates: --phase-s
seconds "shared" (the file absent: the neighbour runs), --phase-s seconds "solo" (the file
present: the neighbour stops after its current block), and so on; requests due in the first
--settle-s of a phase are left out, and so are requests of a run of late ones that began in an
earlier phase (spill_requests=: a backlog an earlier neighbour left). The plain keys (p50_ms=, ..., busy_frac=) are then the
shared requests', the solo_* keys the solo ones', and shared_windows=/solo_windows= give the
phases (CLOCK_MONOTONIC a:b pairs, settle time excluded). Alone and shared requests thus come
from one process, minutes apart at most, which matters: the eager forward pass is bound by the
host's launch rate, and that rate differs between processes by up to 1.5x on the H200 VM.

matmul: the throughput neighbour, torch.matmul(a, b, out=c) on n x n matrices in a loop with a
synchronize every --sync-every iterations; after the go file a warm-up, then S timed seconds,
with a line `t=<s> kernels=<iterations done> mono=<s>` at most every --report-ms (after a
synchronize, so only finished work counts), the same format as sharebench's report lines.
Prints iters=, seconds=, rate= (iterations/s), ms_per_iter=, mono_start=, mono_end=. With
--pause-file it stops launching while that file exists (a report line on either side of each
pause; paused_s= in all); rate= then counts the pauses as time.

With --neighbours NAME1=PATH1,NAME2=PATH2,... (tests/gpu/ptxslice_torch.py) the phases cycle
solo, NAME1, solo, NAME2, ...: every PATH exists except, in phase NAME, that neighbour's, so one
neighbour runs at a time; at the end every PATH exists again. The plain keys are then the solo
phases', NAME_p50_ms= ... NAME_busy_frac= each neighbour's phases', and NAME_windows= (and
solo_windows=) the phases.

train: the training-step neighbour: forward, backward and an AdamW step of a small MLP
(--layers blocks of LayerNorm, Linear dim->hidden, GELU, Linear hidden->dim, residual; --tokens
rows; fp32), eager or with --compile (torch.compile'd model: Triton kernels from Inductor for
the norms and pointwise work, cuBLAS for the matmuls); compiled and run 3 x --sync-every steps
before ready=1 (setup_s=). Same loop and keys as matmul, counting steps (loss= at the end).
matmul and train: with --stop-file they end as soon as PATH exists (also while paused); the
pause file is polled every --pause-poll-ms.

Each prints ready=1 (with --go-file) once its CUDA context, model/matrices and first kernels
exist, then wait for PATH to exist. Exit 0 on success, 1 on an unexpected error (an error=
line first), 5 when the go file never came.
"""
import argparse
import gc
import math
import os
import sys
import time

from procout import matmul_loop, out, preloaded_gpuslice


def env_lines():
    out("preloaded_gpuslice", preloaded_gpuslice())
    for k in ("GPUSLICE_PRIORITY", "GPUSLICE_PRIORITY_QUEUE", "GPUSLICE_SLICE",
              "GPUSLICE_PRIORITY_BUDGET_US", "GPUSLICE_PRIORITY_ANTICIPATE", "GPUSLICE_SM_SHARE",
              "GPUSLICE_PRIORITY_GATE",
              "CUDA_MPS_PIPE_DIRECTORY",
              "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        out(f"env_{k}", os.environ.get(k, "-"))


def wait_go(path, timeout_s):
    """ready=1, then wait for the go file; False when it never came."""
    out("ready", 1)
    give_up = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > give_up:
            out("go_timeout", 1)
            return False
        time.sleep(0.0002)
    out("go_mono", f"{time.monotonic():.6f}")
    return True


def sleep_until(t, spin_s):
    """Sleep to spin_s before t, then spin: Python's sleep overshoots, and a thread that slept
    launches more slowly at first (a CPU-bound forward pass took ~1 ms longer after a sleep)."""
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        if left > spin_s + 0.0002:
            time.sleep(left - spin_s)


def pctl(sorted_vals, q):
    """Nearest-rank percentile (the definition latprobe uses)."""
    if not sorted_vals:
        return 0.0
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[k]


# ----------------------------------------------------------------------------- probe

def probe(args):
    import torch
    import torchvision

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out("torch_version", torch.__version__)
    out("torchvision_version", torchvision.__version__)
    env_lines()
    out("device", torch.cuda.get_device_name(0))
    torch.backends.cudnn.benchmark = False
    out("cudnn_benchmark", 0)
    out("cudnn_allow_tf32", int(torch.backends.cudnn.allow_tf32))
    out("matmul_allow_tf32", int(torch.backends.cuda.matmul.allow_tf32))
    out("dtype", args.dtype)
    out("batch", args.batch)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(device=dev, dtype=dtype)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(42))
    x = x.to(device=dev, dtype=dtype)
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    sink = []
    enq = [0.0]  # when the last request's forward() returned (all its work enqueued)

    if args.graph:
        # The forward pass captured once (after a warm-up on a side stream, as PyTorch's CUDA
        # graph recipe has it); a request replays it: one launch, then the GPU's work only.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            y_static = model(x)
        torch.cuda.synchronize()

        def forward():
            graph.replay()
            return y_static
    else:
        def forward():
            with torch.no_grad():
                return model(x)
    out("graph", int(args.graph))

    def request():
        """One forward pass, synchronized; its device time (events) in ms."""
        e0.record()
        y = forward()
        e1.record()
        enq[0] = time.monotonic()
        torch.cuda.synchronize()
        if not sink:
            sink.append(float(y[0, :4].float().sum()))
        return e0.elapsed_time(e1)

    for _ in range(10):
        request()
    solo = []
    for _ in range(20):
        t = time.monotonic()
        request()
        solo.append(1000.0 * (time.monotonic() - t))
    solo.sort()
    solo_ms = (solo[9] + solo[10]) / 2
    out("solo_ms", f"{solo_ms:.4f}")
    if args.period_ms:
        period_ms = args.period_ms
    else:
        period_ms = max(0.1, round(args.period_x * solo_ms, 1))
    out("period_ms", f"{period_ms:.3f}")
    out("spin_ms", f"{args.spin_ms:.3f}")
    out("seconds_target", f"{args.seconds:.3f}")
    if args.go_file and not wait_go(args.go_file, args.go_timeout_s):
        return 5
    period = period_ms / 1000.0
    # The phases' cycle: (label, the pause file removed in it; every other one is present).
    if args.neighbours:
        pauses = dict(nb.split("=", 1) for nb in args.neighbours.split(","))
        cycle = [c for name in pauses for c in (("solo", None), (name, pauses[name]))]
    elif args.pause_file:
        pauses = {"shared": args.pause_file}
        cycle = [("shared", args.pause_file), ("solo", None)]
    else:
        pauses, cycle = {}, []
    phase_s = args.phase_s if cycle else 0.0
    windows = {label: [] for label, _ in cycle}
    cur = [-1]  # the phase the pause files are set for

    def set_pause(path, on):
        if on:
            with open(path, "w") as f:
                f.write("pause\n")
        elif os.path.exists(path):
            os.unlink(path)

    def pause_all():
        for path in pauses.values():
            set_pause(path, True)

    def kind_of(due, t0, t_stop):
        """"all" without phases; else the phase's label ("shared" or a neighbour's name: that
        neighbour runs; "solo": all are paused) or "settle" (the first --settle-s of a phase).
        Moves the pause files at a phase's start: the others' first, then this one's."""
        if phase_s <= 0:
            return "all"
        k = int((due - t0) // phase_s)
        tb = t0 + k * phase_s
        kind, runs = cycle[k % len(cycle)]
        if k != cur[0]:
            cur[0] = k
            for path in pauses.values():
                if path != runs:
                    set_pause(path, True)
            if runs:
                set_pause(runs, False)
            windows[kind].append((tb + args.settle_s, min(tb + phase_s, t_stop)))
        return kind if due >= tb + args.settle_s else "settle"

    def periodic(t0, t_stop, rec):
        last_done = t0
        wake_late_max = 0.0
        i = 0
        # The phase in which the current run of late requests began: a request released late
        # because of a backlog left by an earlier phase's neighbour is that phase's doing, not
        # its own phase's, so it is labelled "spill" and counted in neither (a neighbour that
        # starves the probe for seconds, as one holding 99 % of the SMs with the gate off did
        # in stop 24, otherwise poisons the solo phases after it).
        chain_phase = None
        while True:
            due = t0 + i * period
            i += 1
            if due >= t_stop:
                break
            kind = kind_of(due, t0, t_stop) if rec is not None else "all"
            prev_late = last_done > due
            if rec is not None and phase_s > 0:
                phase = int((due - t0) // phase_s)
                if not prev_late:
                    chain_phase = phase
                elif chain_phase is not None and chain_phase != phase:
                    kind = "spill"
            sleep_until(due, args.spin_ms / 1000.0)
            rel = time.monotonic()
            d = request()
            done = time.monotonic()
            last_done = done
            if rec is not None:
                late_ms = 1000.0 * (rel - due)
                rec.append((due, 1000.0 * (done - due), d, late_ms, 1000.0 * (enq[0] - rel), kind))
                if not prev_late:
                    wake_late_max = max(wake_late_max, late_ms)
        return last_done, wake_late_max

    if args.warmup_s > 0:
        w0 = time.monotonic()
        periodic(w0, w0 + args.warmup_s, None)
    gc.collect()
    gc.disable()
    reqs = []
    t0 = time.monotonic() + 0.5 * period
    try:
        t_end, wake_late_max = periodic(t0, t0 + args.seconds, reqs)
    finally:
        if args.neighbours:
            pause_all()  # the neighbours wait, paused, for whoever comes next
        elif phase_s > 0:
            set_pause(args.pause_file, False)
    gc.enable()
    wall = t_end - t0
    out("mono_start", f"{t0:.6f}")
    out("mono_end", f"{t_end:.6f}")
    out("seconds", f"{wall:.6f}")
    if phase_s > 0:
        out("phase_s", f"{phase_s:g}")
        out("settle_s", f"{args.settle_s:g}")
        for kind in windows:
            out(f"{kind}_windows", ",".join(f"{a:.6f}:{b:.6f}" for a, b in windows[kind]))
        out("settle_requests", sum(1 for r in reqs if r[5] == "settle"))
        out("spill_requests", sum(1 for r in reqs if r[5] == "spill"))

    def stats(prefix, sel, span):
        """Latency figures of the requests `sel`; busy over `span` seconds."""
        lat = [r[1] for r in sel]
        s = sorted(lat)
        dev = sorted(r[2] for r in sel)
        n = len(sel)
        out(f"{prefix}requests", n)
        for key, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
            out(prefix + key, f"{pctl(s, q):.4f}")
        out(f"{prefix}max_ms", f"{s[-1] if s else 0.0:.4f}")
        out(f"{prefix}min_ms", f"{s[0] if s else 0.0:.4f}")
        out(f"{prefix}mean_ms", f"{sum(lat) / n if n else 0.0:.4f}")
        out(f"{prefix}busy_frac", f"{sum(dev) / 1000.0 / span if span > 0 else 0.0:.4f}")
        out(f"{prefix}busy_frac_wall", f"{sum(lat) / 1000.0 / span if span > 0 else 0.0:.4f}")
        out(f"{prefix}dev_p50_ms", f"{pctl(dev, 0.5):.4f}")
        enq_ms = sorted(r[4] for r in sel)
        out(f"{prefix}enqueue_p50_ms", f"{pctl(enq_ms, 0.5):.4f}")
        out(f"{prefix}enqueue_p99_ms", f"{pctl(enq_ms, 0.99):.4f}")
        worst = sorted(sel, key=lambda r: -r[1])[:5]
        out(f"{prefix}worst", ",".join(f"{r[0] - t0:.3f}:{r[1]:.3f}" for r in worst))

    if args.neighbours:
        # The plain keys are the solo phases' (every neighbour paused), NAME_* each neighbour's.
        span = {k: sum(b - a for a, b in windows[k]) for k in windows}
        stats("", [r for r in reqs if r[5] == "solo"], span["solo"])
        for name in pauses:
            stats(f"{name}_", [r for r in reqs if r[5] == name], span[name])
    elif phase_s > 0:
        # The plain keys are the shared phases' (the neighbour running), solo_* the solo ones'.
        span = {k: sum(b - a for a, b in windows[k]) for k in windows}
        stats("", [r for r in reqs if r[5] == "shared"], span["shared"])
        stats("solo_", [r for r in reqs if r[5] == "solo"], span["solo"])
    else:
        stats("", reqs, wall)
    out("late_releases", sum(1 for r in reqs if r[3] > 0.1))
    out("wake_late_max_ms", f"{wake_late_max:.4f}")
    if args.dump:
        with open(args.dump, "w") as f:
            for due, l, d, late, e, kind in reqs:
                f.write(f"{due - t0:.6f} {l:.4f} {d:.4f} {late:.4f} {e:.4f} {kind}\n")
    out("result", f"{sink[0] if sink else float('nan'):.6f}")
    out("done", 1)
    return 0


# ----------------------------------------------------------------------------- neighbours

def paused(args):
    return args.pause_file and os.path.exists(args.pause_file)


def stopped(args):
    return args.stop_file and os.path.exists(args.stop_file)


def throughput(args, block, per_block, extra=None):
    """The neighbours' loop: after the go file a --warmup-s warm-up, then block() (per_block
    units of work, synchronized at its end) until --seconds pass or the stop file appears, with
    a report line `t=<s> kernels=<units done> mono=<s>` at most every --report-ms and on either
    side of each pause. extra(iters, secs): key/values printed at the end."""
    out("seconds_target", f"{args.seconds:.3f}")
    if args.go_file and not wait_go(args.go_file, args.go_timeout_s):
        return 5
    t0 = time.monotonic()
    warm = 0
    while time.monotonic() - t0 < args.warmup_s:
        block()
        warm += per_block
    out("warmup_iters", warm)
    iters = 0
    t0 = time.monotonic()
    t_end = t0 + args.seconds
    next_report = t0 + args.report_ms / 1000.0
    now = t0
    paused_s = 0.0
    while now < t_end and not stopped(args):
        if paused(args):
            # Paused by the probe: a report line on either side, so counts are exact there.
            print(f"t={now - t0:.4f} kernels={iters} mono={now:.6f}", flush=True)
            while paused(args) and time.monotonic() < t_end and not stopped(args):
                time.sleep(args.pause_poll_ms / 1000.0)
            p1 = time.monotonic()
            paused_s += p1 - now
            print(f"t={p1 - t0:.4f} kernels={iters} mono={p1:.6f}", flush=True)
            now = p1
            continue
        block()
        iters += per_block
        now = time.monotonic()
        if now >= next_report:
            print(f"t={now - t0:.4f} kernels={iters} mono={now:.6f}", flush=True)
            next_report = max(next_report + args.report_ms / 1000.0, now)
    secs = now - t0
    print(f"t={secs:.4f} kernels={iters} mono={now:.6f}", flush=True)
    out("mono_start", f"{t0:.6f}")
    out("mono_end", f"{now:.6f}")
    out("iters", iters)
    out("paused_s", f"{paused_s:.4f}")
    out("seconds", f"{secs:.6f}")
    out("rate", f"{iters / secs:.3f}")
    out("ms_per_iter", f"{1000.0 * secs / max(iters, 1):.4f}")
    for k, v in (extra(iters, secs) if extra else {}).items():
        out(k, v)
    out("done", 1)
    return 0


def matmul(args):
    import torch

    out("torch_version", torch.__version__)
    env_lines()
    c, block = matmul_loop(torch, args)

    block()  # cuBLAS handle and workspace before anyone waits on us
    return throughput(args, block, args.sync_every, lambda iters, secs: {
        "tflops": f"{iters / secs * 2.0 * args.n ** 3 / 1e12:.2f}",
        "checksum": f"{float(c[0, :8].float().sum()):.4f}"})


def train(args):
    """A small model's training step: forward, backward and an AdamW step on an MLP of
    --layers blocks (LayerNorm, Linear dim->hidden, GELU, Linear hidden->dim, residual) over
    --tokens rows, fp32 (no TF32: PyTorch's default for matmul); with --compile the model is
    torch.compile'd (Inductor: Triton kernels for the norms and pointwise work, cuBLAS for the
    matmuls; forward and backward), the optimizer step eager (multi-tensor kernels). A unit of
    work is one step."""
    import torch

    out("torch_version", torch.__version__)
    env_lines()
    out("device", torch.cuda.get_device_name(0))
    out("compile", int(args.compile))
    out("tokens", args.tokens)
    out("dim", args.dim)
    out("hidden", args.hidden)
    out("layers", args.layers)
    out("sync_every", args.sync_every)
    torch.manual_seed(0)
    dev = torch.device("cuda")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(args.dim)
            self.up = torch.nn.Linear(args.dim, args.hidden)
            self.down = torch.nn.Linear(args.hidden, args.dim)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    model = torch.nn.Sequential(*[Block() for _ in range(args.layers)]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if args.compile else model
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(args.tokens, args.dim, device=dev, generator=g)
    target = torch.randn(args.tokens, args.dim, device=dev, generator=g)
    last = [0.0]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(fwd(x), target)
        loss.backward()
        opt.step()
        return loss

    def block():
        for _ in range(args.sync_every):
            loss = step()
        last[0] = loss.detach()
        torch.cuda.synchronize()

    # Compilation (or cuBLAS/cuDNN set-up) and a few steps before anyone waits on us.
    t = time.monotonic()
    for _ in range(3):
        block()
    out("setup_s", f"{time.monotonic() - t:.3f}")
    return throughput(args, block, args.sync_every, lambda iters, secs: {"loss": f"{float(last[0]):.6f}"})


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--period-ms", type=float, default=None)
    p.add_argument("--period-x", type=float, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--warmup-s", type=float, default=0.5)
    p.add_argument("--go-file", default=None)
    p.add_argument("--go-timeout-s", type=float, default=60.0)
    p.add_argument("--dump", default=None)
    p.add_argument("--spin-ms", type=float, default=1.0)
    p.add_argument("--graph", action="store_true")
    p.add_argument("--pause-file", default=None)
    p.add_argument("--phase-s", type=float, default=1.0)
    p.add_argument("--settle-s", type=float, default=0.1)
    p.add_argument("--neighbours", default=None,
                   help="NAME=PAUSE_FILE,...: phases solo, NAME1, solo, NAME2, ... in turn")
    m = sub.add_parser("matmul")
    m.add_argument("--n", type=int, default=4096)
    m.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    m.add_argument("--sync-every", type=int, default=20)
    t = sub.add_parser("train")
    t.add_argument("--compile", action="store_true")
    t.add_argument("--tokens", type=int, default=4096)
    t.add_argument("--dim", type=int, default=1024)
    t.add_argument("--hidden", type=int, default=2048)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--sync-every", type=int, default=4)
    for q in (m, t):
        q.add_argument("--seconds", type=float, required=True)
        q.add_argument("--warmup-s", type=float, default=0.5)
        q.add_argument("--report-ms", type=float, default=50.0)
        q.add_argument("--go-file", default=None)
        q.add_argument("--go-timeout-s", type=float, default=60.0)
        q.add_argument("--pause-file", default=None)
        q.add_argument("--pause-poll-ms", type=float, default=0.2)
        q.add_argument("--stop-file", default=None)
    args = ap.parse_args()
    if args.seconds <= 0:
        ap.error("--seconds > 0")
    if args.cmd == "probe":
        if (args.period_ms is None) == (args.period_x is None):
            ap.error("probe: exactly one of --period-ms and --period-x")
        if (args.period_ms is not None and args.period_ms <= 0) or \
                (args.period_x is not None and args.period_x <= 0) or args.batch < 1 or \
                args.spin_ms < 0 or args.phase_s <= 0 or not 0 <= args.settle_s < args.phase_s:
            ap.error("probe: period > 0, batch >= 1, --spin-ms >= 0, 0 <= --settle-s < --phase-s")
        if args.neighbours and (args.pause_file or not all(
                "=" in nb and nb.split("=", 1)[0] not in ("", "solo", "settle", "all", "shared")
                for nb in args.neighbours.split(","))):
            ap.error("probe: --neighbours NAME=PAUSE_FILE,... (names other than solo/shared), "
                     "not with --pause-file")
        return probe(args)
    if args.sync_every < 1 or args.report_ms <= 0 or args.pause_poll_ms <= 0:
        ap.error(f"{args.cmd}: --sync-every >= 1, --report-ms > 0, --pause-poll-ms > 0")
    if args.cmd == "train":
        if min(args.tokens, args.dim, args.hidden, args.layers) < 1:
            ap.error("train: --tokens, --dim, --hidden, --layers >= 1")
        return train(args)
    if args.n < 1:
        ap.error("matmul: --n >= 1")
    return matmul(args)

if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a clear line for the log, then a non-zero status
        print(f"error={type(e).__name__}: {e}", flush=True)
        raise
