#!/usr/bin/env python3
"""gpuslice issue 19: the ResNet-50 probe next to PyTorch training, with the PTX slicer on and
off, and what the slicer costs a process it never slices. Started by tests/gpu/ptxslice_torch.sh
(see the section "ptxslice_torch.sh" in tests/gpu/README.md for the rows).

    ptxslice_torch.py --lib SHIM --build BUILD --out OUT [--t0 EPOCH] [--budget-s 230]
                      [--phase-s 1] [--rounds 3] [--alone-s 1.2] [--startup-runs 5]
                      [--launch-rounds 3] [--bench PATH] [--budget-us N] [--shim-log info]
                      [--nb-share N [--nb-free]] [--nb-extra NAME:K=V,K=V ...] [--no-off]
                      [--kinds mm,tr,tc] [--probes graph,eager]
                      [--later-probe-runs N] [--mps-pipe DIR --mps-log DIR --mps-control PROG]
                      [--dry-run --cuclient PATH --sim-dir DIR --fixture PTX]

1. Neighbours (tests/gpu/torch_priority.py, GPUSLICE_PRIORITY=low, no controller), started once
   and kept for the whole run, each paused by its own file: matmul fp32 2048^2 ("mm"), a
   training step eager ("tr") and torch.compile'd ("tc"), each twice: slicing on (the default,
   GPUSLICE_SLICE=low) and off (GPUSLICE_SLICE=off); with --budget-us a third copy of each with
   GPUSLICE_PRIORITY_BUDGET_US, and with --nb-share one with GPUSLICE_SM_SHARE (over MPS: the
   client's active-thread percentage); with --nb-free too, in a pass over MPS, one more with
   that share and GPUSLICE_PRIORITY_GATE=spatial-off ("smfree": the shim's priority gate lifted
   where MPS carries the share, experimental, issue 19; its rows FAIL unless the neighbour's
   shim log says spatial and gate off); each --nb-extra NAME:K=V,... one more copy with those
   variables added (INFO rows -NAME: an experiment with no code, e.g. a queue bound or a share
   with the gate off); --no-off leaves out the slicing-off copy, --kinds the neighbours run
   (each copy adds a neighbour a kind, and each neighbour two phases a probe round). Once all are ready, each runs alone for --alone-s (its rate
   alone: no high-priority process lives yet, so nothing is held or split).
2. The probe (ResNet-50 b8 fp32, high) as a CUDA graph, then eagerly, each a process of its own
   with --neighbours (--probes: which of the two run; the other's rows say SKIP, and the time
   saved lets the one left run more --rounds): phases of --phase-s cycle solo, mm_on, solo, mm_off, solo, tr_on, ...
   --rounds times, so the solo phases and every neighbour's phases come from one process,
   interleaved (the eager forward pass is bound by the host's launch rate, which differs between
   processes). Row per probe mode and neighbour, slicing on: p99 of its phases <= 1.10 x the solo
   phases' p99 and the neighbour's rate in its phases >= 60 % of alone; slicing off: INFO.
3. census: which modules the shim sliced in the slicing-on neighbours (their shim logs: "N of M
   kernels sliced", "not sliced: <what the image is>", "a library, not sliced: ...").
4. launch: bench.cu's empty-launch loop (host ns per launch) without the shim, under the shim at
   normal priority (never sliced) and the same with GPUSLICE_SLICE=off, interleaved, medians.
5. startup: `python -c "import torch; torch.zeros(1).cuda()"`: no shim, shim at normal priority
   (never sliced), the same with GPUSLICE_SLICE=off, shim at low priority (slicing on);
   interleaved, --startup-runs each, medians of the process's wall time.
With --mps-pipe (ptxslice_torch.sh's -mps pass, PTXSLICE_TORCH_MPS=1|both: the shell has
started a private MPS control daemon with common.sh's mps_start, and quits it): rows 1-2 only,
every program the daemon's client (CUDA_MPS_PIPE_DIRECTORY, CUDA_MPS_LOG_DIRECTORY; no
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE or CUDA_MPS_CLIENT_PRIORITY: the shim maps the classes, high
-> client priority 0, low -> 1), ids and run names ending in -mps. Once a probe process is ready
(every neighbour alive) the daemon is asked for its servers' clients (common.sh's mps_clients);
each row is then judged by the same bars and FAILs (INFO rows too) unless common.sh's mps_served
says the shim's log of the probe and of the neighbour shows MPS serving it with its class's
client priority and the daemon listed both pids. --later-probe-runs N (the time-sliced pass of
`both`): N probe runs of a later pass share the budget; the rounds are fitted to all of them
and, once the probes are done, the time they need is held back from rows 3-5.
A dry run (--dry-run: no torch, no GPU) runs rows 3 and 5 on the simulated driver with
tests/clients' cuclient-link (module loads of PTX, a cubin, a fat binary with compressed PTX and a
library; start-up = `cuclient-link init ctx 0`) and says SKIP for the rest; with
--stand-in-torch DIR (tests/gpu/dryrun/sleeptorch) rows 1-2 run too, against that stand-in
(every kernel a host sleep; each program makes a context on the simulated driver, under the
shim), as INFO: the orchestration is tried, the figures mean nothing. A dry run's -mps pass (the
fake control program of tests/gpu/dryrun, SIMCUDA_MPS=pipe): with the stand-in, rows 1-2 with
their MPS checks judged; without, rows mps-high / mps-low (cuclient-link at each class: the
shim says MPS serves it with client priority 0 / 1).
Standard library only. Writes OUT/ptxslice_torch.log (appends) and prints the table last.
Exit status: 0 all judged rows PASS, 1 a FAIL or a crash, 2 something needed was missing.
"""
import os
import signal
import statistics
import subprocess
import sys
import time

import gpucommon
from gpucommon import C, HERE, PY, env_for, log, record, remaining
from gpucommon import Stopped, on_signal

import shares  # Run, start, finish (report lines), mono_points, count_at, Monitor, SCRUB_*
import priority as prio  # track, kill_children, probe_problem, nb_problem, windows_of, f1, f3

TORCH = os.path.join(HERE, "torch_priority.py")
P99_MAX = 1.10          # the issue's bound: p99 <= 1.10 x the solo phases'
NB_MIN = 0.60           # the neighbour keeps >= 60 % of its rate alone
PERIOD_X = 3.0          # the probe's period: 3 x its back-to-back latency (priority.py's)
SPIN_MS = 1000.0        # above the period: the probe never sleeps (priority.py's)
SETTLE_S = 0.1          # the first part of a phase left out (the neighbour stops or starts)
ALONE_SETTLE_S = 0.2
STARTUP_TOL = (0.03, 0.03)   # never sliced vs slicer off: <= +3 % and +30 ms
LAUNCH_TOL = (0.03, 20.0)    # <= +3 % and +20 ns
OVERHEAD_S = 75.0       # kept for rows 4 and 5 when the probe's rounds are fitted to the budget
PROBE_START_S = 20.0    # a probe process's start (torch, ResNet-50, warm-up, graph capture)
READY_S = 150.0         # every neighbour ready within this (torch.compile's first compile)
LATER_SETUP_MAX_S = 60.0  # a later pass's neighbours: at most this pass's start-up to ready and
LATER_EXTRA_S = 15.0      # alone (Inductor's cache is warm then), plus the daemon and the stops
COMMON_SH = os.path.join(HERE, "common.sh")
NB_SPEC = {
    "mm": ("matmul fp32 2048^2", ["matmul", "--n", "2048", "--dtype", "fp32", "--sync-every", "10"]),
    "tr": ("training step, eager", ["train"]),
    "tc": ("training step, torch.compile", ["train", "--compile"]),
}
IDS = ["g-mm", "g-tr", "g-tc", "e-mm", "e-tr", "e-tc", "census", "launch", "startup"]
MPS_CLIENT_PRIORITY = {"high": 0, "low": 1}  # class -> the MPS client priority the shim gives it

C.cells = []
C.mono_to_epoch = 0.0
C.smi = None
C.children = []
C.rows = []     # the detail table: (probe, neighbour config, p50, p99, x solo, nb %, note)
C.sfx = ""      # "-mps" in the pass over the daemon: row ids and run names
C.mps_pipe = ""  # the daemon's pipe folder in the -mps pass
C.mps_control = "nvidia-cuda-mps-control"
C.later_runs = 0     # --later-probe-runs
C.later_fixed = 0.0  # seconds a later pass needs besides its probe runs
C.per_round, C.rounds_used = 0.0, 0  # the last probe run's round (seconds) and rounds
C.nb_extra = {}      # --nb-extra: copy name -> the variables it adds
C.kinds = list(NB_SPEC)  # --kinds
PROBES = ("graph", "eager")
C.probes = list(PROBES)  # --probes
C.no_off = False     # --no-off


def env_low(mode):
    extra = {"GPUSLICE_PRIORITY": "low"}
    if mode == "off":
        extra["GPUSLICE_SLICE"] = "off"
    elif mode == "bud":
        extra["GPUSLICE_PRIORITY_BUDGET_US"] = str(C.budget_us)
    elif mode == "sm":
        # An SM share on the neighbour: over MPS the shim makes it the client's active-thread
        # percentage (spatial: SMs stay free for the probe's first blocks); time-sliced, a cap.
        extra["GPUSLICE_SM_SHARE"] = str(C.nb_share)
    elif mode == "smfree":
        # The same share, and the shim's priority gate off where MPS carries it: the neighbour
        # launches as if no high-priority process lived; the free SMs alone protect the probe.
        extra["GPUSLICE_SM_SHARE"] = str(C.nb_share)
        extra["GPUSLICE_PRIORITY_GATE"] = "spatial-off"
    elif mode in C.nb_extra:
        extra.update(C.nb_extra[mode])
    # What held its launches back, every 2 s (the shim's hold_summary): where its share went.
    extra.setdefault("GPUSLICE_LOG", C.shim_log + ",gpuslice::policy::hold_summary=debug")
    return env_for(True, extra)


def median(xs):
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------- 1 + 2

class Nb:
    def __init__(self, kind, mode):
        self.kind, self.mode = kind, mode
        self.name = f"{kind}_{mode}"
        self.pause = os.path.join(C.runs_dir, f"{self.name}{C.sfx}.pause")
        self.run = shares.Run(f"pt_nb_{self.name}{C.sfx}")
        self.proc = self.out = self.err = self.env = None
        self.alone = None   # (a, b) CLOCK_MONOTONIC window it ran alone
        self.r0 = None      # its rate alone

    def rate_in(self, wins):
        """Units per second over the windows (from its report lines); None when it ran < 0.5 s
        of them."""
        r = self.run
        ns, ne = r.num("mono_start"), r.num("mono_end")
        if None in (ns, ne) or not r.reports:
            return None
        pts = shares.mono_points(r)
        done = span = 0.0
        for a, b in wins:
            w0, w1 = max(a, ns), min(b, ne)
            if w1 > w0:
                done += shares.count_at(pts, w1) - shares.count_at(pts, w0)
                span += w1 - w0
        return done / span if span >= 0.5 else None


def start_neighbours(go, stop, modes):
    nbs = []
    for kind in C.kinds:
        for mode in modes:
            nb = Nb(kind, mode)
            with open(nb.pause, "w") as f:
                f.write("pause\n")
            argv = [PY, TORCH] + NB_SPEC[kind][1] + [
                "--seconds", "100000", "--warmup-s", "0", "--report-ms", "20", "--go-file", go,
                "--go-timeout-s", f"{READY_S + 30:g}", "--pause-file", nb.pause,
                "--pause-poll-ms", "1", "--stop-file", stop]
            nb.env = env_low(mode)
            nb.proc, nb.out, nb.err = shares.start(nb.run.name, argv, nb.env)
            prio.track(nb.proc)
            nbs.append(nb)
    return nbs


def stop_neighbours(nbs, stop):
    with open(stop, "w") as f:
        f.write("stop\n")
    for nb in nbs:
        rc = gpucommon.wait_proc(nb.proc, nb.run, 30)
        shares.finish(nb.run, rc, nb.out, nb.err, nb.env, False)


def alone_phases(nbs):
    for nb in nbs:
        if nb.proc is None or nb.proc.poll() is not None:
            continue
        os.unlink(nb.pause)
        t0 = time.monotonic()
        time.sleep(C.alone_s)
        nb.alone = (t0 + ALONE_SETTLE_S, time.monotonic())
        with open(nb.pause, "w") as f:
            f.write("pause\n")
        time.sleep(0.05)  # it notices between blocks


def probe_run(mode, nbs, runs_left):
    """The probe in `mode` beside the live neighbours, for --rounds rounds, or as many as fit
    in the time left (less OVERHEAD_S for rows 4 and 5 in the time-sliced pass, less a later
    pass's set-up), shared among the `runs_left` probe runs and a later pass's. Over a daemon,
    the daemon's clients are asked once the probe is ready (r.mps_clients)."""
    live = [nb for nb in nbs if nb.proc is not None and nb.proc.poll() is None]
    per_round = 2 * len(live) * C.phase_s
    runs = runs_left + C.later_runs
    keep = (0.0 if C.mps_pipe else OVERHEAD_S) + (C.later_fixed if C.later_runs else 0.0)
    fit = int((remaining() - keep - runs * PROBE_START_S) / runs // max(per_round, 1e-9))
    rounds = min(C.rounds, fit)
    if rounds < C.rounds:
        log(f"  probe {mode}: {max(rounds, 0)} rounds instead of {C.rounds} (time budget)")
    C.per_round, C.rounds_used = per_round, max(rounds, 0)
    seconds = rounds * per_round
    r = shares.Run(f"pt_probe_{mode}{C.sfx}")
    if rounds < 1 or not live:
        r.skipped = True
        log(f"\n=== {r.name}: SKIPPED, {remaining():.0f}s of the time budget left")
        return r
    go = prio.go_path(f"pt_probe_{mode}{C.sfx}")
    argv = [PY, TORCH, "probe", "--seconds", f"{seconds:g}", "--period-x", f"{PERIOD_X:g}",
            "--warmup-s", "0.5", "--spin-ms", f"{SPIN_MS:g}", "--phase-s", f"{C.phase_s:g}",
            "--settle-s", f"{SETTLE_S:g}", "--go-file", go,
            "--neighbours", ",".join(f"{nb.name}={nb.pause}" for nb in live)]
    if mode == "graph":
        argv.append("--graph")
    env = env_for(True, {"GPUSLICE_PRIORITY": "high"})
    t0 = time.time()
    p, op, ep = shares.start(r.name, argv, env)
    prio.track(p)
    r.pid, r.err_path = (p.pid if p else None), ep
    gpucommon.wait_ready([(p, op)], 120)
    if C.mps_pipe:
        # Every neighbour and the probe have their contexts: the daemon's view, before the
        # measured phases.
        r.mps_clients = common_sh("mps_clients")[1]
        log(f"  MPS daemon's clients, {r.name} ready: {r.mps_clients}")
    with open(go, "w") as f:
        f.write("go\n")
    rc = gpucommon.wait_proc(p, r, max(10.0, min(seconds + 60, remaining())))
    r.secs = time.time() - t0
    shares.finish(r, rc, op, ep, env, False)
    return r


def judge(mode, rp, nbs):
    tag = {"graph": "g", "eager": "e"}[mode]
    label = {"graph": "CUDA graph", "eager": "eager"}[mode]
    prob = prio.probe_problem(rp, shim=True, prio="high")
    solo99 = None if prob else rp.num("p99_ms")
    for kind in C.kinds:
        what = NB_SPEC[kind][0]
        for nb in [n for n in nbs if n.kind == kind]:
            cid = f"{tag}-{kind}"
            name = (f"ResNet-50 {label} + {what}" + ("" if nb.mode == "on" else f" ({nb.mode})")
                    + (", over MPS" if C.mps_pipe else ""))
            why = prob or prio.nb_problem(nb.run, shim=True)
            p99 = None if why else rp.num(f"{nb.name}_p99_ms")
            wins = None if why else prio.windows_of(rp, f"{nb.name}_windows")
            if not why and (p99 is None or not wins):
                why = f"the probe has no phases of {nb.name}"
            rate = None if why else nb.rate_in(wins)
            nb_pct = rate / nb.r0 * 100.0 if rate is not None and nb.r0 else None
            busy = None if why else rp.num(f"{nb.name}_busy_frac")
            x = p99 / solo99 if p99 and solo99 else None
            verdict = "INFO" if nb.mode != "on" or C.stand_in else (
                x is not None and nb_pct is not None and x <= P99_MAX and nb_pct >= NB_MIN * 100)
            figs = ("-" if why else
                    f"p99 {p99:.3f}/{solo99:.3f}ms = x{prio.f3(x)} (<= {P99_MAX:g}); p50 "
                    f"{rp.get(nb.name + '_p50_ms')} (solo {rp.get('p50_ms')}); neighbour "
                    f"{prio.f1(nb_pct)}% of alone (>= {NB_MIN * 100:.0f}), "
                    f"{prio.f1(nb_pct / (1 - busy) if nb_pct is not None and busy is not None and busy < 1 else None)}% "
                    f"of what the probe leaves (busy {prio.f3(busy)}); "
                    f"{rp.get(nb.name + '_requests')} requests; period {rp.get('period_ms')}ms")
            note = why or ("" if verdict in (True, "INFO") else
                           "; ".join(x_ for x_ in (
                               f"p99 x{prio.f3(x)} > {P99_MAX:g}" if x is None or x > P99_MAX else "",
                               f"neighbour {prio.f1(nb_pct)}% < {NB_MIN * 100:.0f}%"
                               if nb_pct is None or nb_pct < NB_MIN * 100 else "") if x_))
            if C.mps_pipe and getattr(rp, "pid", None):
                # Over the daemon for real: the shim's line in each log, the daemon's list.
                rc, said = common_sh("mps_served", getattr(rp, "mps_clients", ""),
                                     "probe", rp.pid, rp.err_path, MPS_CLIENT_PRIORITY["high"],
                                     "neighbour", nb.proc.pid if nb.proc else 0, nb.err,
                                     MPS_CLIENT_PRIORITY["low"])
                figs = said if figs == "-" else f"{figs}; {said}"
                if rc != 0:
                    verdict = False
                    note = "; ".join(x_ for x_ in (note, "not over the daemon as asked: " + said) if x_)
            if nb.mode == "smfree":
                # The figures mean what the row says only if the shim lifted the gate.
                ok, said = gate_says(nb.err)
                figs = said if figs == "-" else f"{figs}; {said}"
                if not ok:
                    verdict = False
                    note = "; ".join(x_ for x_ in (note, "the neighbour's priority gate was not off: " + said) if x_)
            record((cid if nb.mode == "on" else f"{cid}-{nb.mode}") + C.sfx, name, verdict, figs, note)


def gate_says(err_path):
    """(True, text) when the shim's log of an smfree neighbour says its device is spatial under
    MPS with the priority gate off; (False, what it says instead)."""
    try:
        text = gpucommon.read_clipped(err_path)
    except OSError as e:
        return False, f"no shim log ({e})"
    lines = [l for l in text.splitlines() if " is served by MPS: " in l or " is time-sliced: " in l]
    if not lines:
        return False, "the shim's log has no MPS line"
    line = lines[0]
    share = line.split("SM share ", 1)[1].split(" ", 1)[0] if "SM share " in line else "?"
    if "(spatial:" in line and "priority gate off" in line:
        return True, f"neighbour: spatial, SM share {share}, priority gate off (shim log)"
    return False, line.split("gpuslice::policy::mps: ", 1)[-1][:240]


def check_torch():
    if C.dry_run and not C.stand_in:
        for cid in IDS[:6]:
            record(cid + C.sfx, f"ResNet-50 {'CUDA graph' if cid[0] == 'g' else 'eager'} + "
                   f"{NB_SPEC[cid[2:]][0]}" + (", over MPS" if C.mps_pipe else ""), "SKIP",
                   "-", "dry run: needs torch and the GPU")
        return
    modes = (["on"] + ([] if C.no_off else ["off"]) + (["bud"] if C.budget_us else [])
             + (["sm"] if C.nb_share else [])
             + (["smfree"] if C.nb_share and C.nb_free and C.mps_pipe else []) + list(C.nb_extra))
    go = prio.go_path(f"pt_nb{C.sfx}")
    stop = os.path.join(C.runs_dir, f"pt_nb{C.sfx}.stop")
    if os.path.exists(stop):
        os.unlink(stop)
    t_start = time.time()
    nbs = start_neighbours(go, stop, modes)
    try:
        states = gpucommon.wait_ready([(nb.proc, nb.out) for nb in nbs], min(READY_S, remaining() - 60))
        log(f"  neighbours ready: {dict(zip((nb.name for nb in nbs), states))} "
            f"({time.time() - C.t0:.0f}s since the start)")
        with open(go, "w") as f:
            f.write("go\n")
        time.sleep(0.5)
        alone_phases(nbs)
        # What a later pass needs besides its probe runs: its neighbours' start (this pass's,
        # capped: Inductor's cache is warm by then), the alone phases, the daemon, the stops.
        C.later_fixed = min(time.time() - t_start, LATER_SETUP_MAX_S) + LATER_EXTRA_S
        probes = {mode: probe_run(mode, nbs, len(C.probes) - i) for i, mode in enumerate(C.probes)}
    finally:
        stop_neighbours(nbs, stop)
    if C.later_runs:
        # The later pass's share is held back from the rows that follow (launch, startup).
        held = C.later_fixed + C.later_runs * (PROBE_START_S + C.rounds_used * C.per_round)
        C.deadline -= held
        log(f"  {held:.0f}s held back for the later pass ({C.later_runs} probe runs of "
            f"{C.rounds_used} rounds); {remaining():.0f}s left for this one")
    for nb in nbs:
        if nb.alone and not prio.nb_problem(nb.run, shim=True):
            nb.r0 = nb.rate_in([nb.alone])
        log(f"  {nb.name}: alone {prio.f1(nb.r0)} units/s over {nb.alone}; "
            f"setup {nb.run.get('setup_s')}s")
    for mode, rp in probes.items():
        judge(mode, rp, nbs)
    for mode in (m for m in PROBES if m not in C.probes):
        tag = {"graph": "g", "eager": "e"}[mode]
        for kind in C.kinds:
            record(f"{tag}-{kind}{C.sfx}", f"ResNet-50 {'CUDA graph' if mode == 'graph' else 'eager'} + "
                   f"{NB_SPEC[kind][0]}" + (", over MPS" if C.mps_pipe else ""), "SKIP", "-",
                   f"the {mode} probe was not asked for (--probes {','.join(C.probes)})")
    C.census_logs = [(nb.name, nb.err) for nb in nbs if nb.mode == "on"]


# ----------------------------------------------------------------------------- MPS

def common_sh(func, *args):
    """common.sh's FUNC ARGS... in a bash of its own, over this pass's daemon (MPS_PIPE,
    MPS_CONTROL); (exit status, stdout stripped). The checks over MPS live there, shared with
    ptxslice_probe.sh."""
    argv = ["bash", "-c", '. "$0" >/dev/null || exit 2; MPS_PIPE=$1 MPS_CONTROL=$2; shift 2; "$@"',
            COMMON_SH, C.mps_pipe, C.mps_control, func] + [str(a) for a in args]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 2, f"common.sh {func}: {e}"
    if p.stderr.strip():
        log(f"  common.sh {func}: {p.stderr.strip()[-300:]}")
    return p.returncode, p.stdout.strip()


def check_mps_classes():
    """Dry run without the stand-in: a cuclient at each class over the fake daemon, on the
    simulated driver (SIMCUDA_MPS=pipe): the shim's view of MPS, as the -mps rows check it."""
    for cls, want in MPS_CLIENT_PRIORITY.items():
        env = env_for(True, {"GPUSLICE_PRIORITY": cls, "LD_LIBRARY_PATH": C.sim_dir,
                             "SIMCUDA_STATE": os.path.join(C.runs_dir, "simstate")})
        r = shares.run(f"pt_mps_{cls}", [C.cuclient, "init", "ctx", "0"], env, 30, 5)
        said = common_sh("mps_says", os.path.join(C.runs_dir, f"pt_mps_{cls}.err"), want)[1]
        ok = r.rc == 0 and said == f"client priority {want}"
        record(f"mps-{cls}", f"dry run: cuclient at {cls} over the fake daemon", ok,
               f"the shim says {said} ({C.mps_control}, simulated driver); {r.status()}",
               "" if ok else "not served as asked (log)")


# ----------------------------------------------------------------------------- 3 census

def census_of(path):
    """The slicer's lines in a shim log: (modules sliced [(what, line)], other lines by kind)."""
    sliced, kinds = [], {}
    try:
        text = gpucommon.read_clipped(path)
    except OSError:
        return sliced, kinds
    for line in text.splitlines():
        if " kernels sliced (" in line:
            sliced.append(line.strip())
        elif ": not sliced: " in line or ": a library, not sliced: " in line:
            what = line.split(" not sliced: ", 1)[1].split("; it runs as it is")[0]
            src = "library" if "a library, not sliced" in line else "module"
            key = f"{src}: {what}"
            kinds[key] = kinds.get(key, 0) + 1
    return sliced, kinds


def check_census():
    logs = getattr(C, "census_logs", [])
    if not logs:
        record("census", "what the slicer saw in the low neighbours", "SKIP", "-",
               "no neighbour logs (the torch part did not run)")
        return
    path = os.path.join(C.out, "ptxslice_torch_census.txt")
    parts, expect_ok = [], True
    with open(path, "w") as f:
        for name, err in logs:
            sliced, kinds = census_of(err)
            n_sliced = sum(int(l.split(" of ")[0].rsplit(" ", 1)[-1]) for l in sliced
                           if l.split(" of ")[0].rsplit(" ", 1)[-1].isdigit())
            f.write(f"== {name}: {len(sliced)} modules with sliced kernels ({n_sliced} kernels)\n")
            for l in sliced:
                f.write(f"  {l}\n")
            for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
                f.write(f"  {n:5d} x {k}\n")
            usable = sum(n for k, n in kinds.items() if k.endswith(": yes"))
            parts.append(f"{name}: {len(sliced)} modules sliced ({n_sliced} kernels), "
                         f"{sum(kinds.values())} loads not sliced ({usable} of them with "
                         f"uncompressed PTX for the device)")
            if name in getattr(C, "census_expect", {}):
                expect_ok &= C.census_expect[name](sliced, kinds)
    verdict = expect_ok if C.dry_run else "INFO"
    record("census", "what the slicer saw in the low neighbours", verdict,
           "; ".join(parts) + f"; all lines: {path}",
           "" if expect_ok else "the dry run's loads did not give the expected lines")


def dry_census():
    """Loads under the shim at low priority on the simulated driver: the suite's PTX (sliced),
    a cubin, a fat binary whose PTX is compressed, a library."""
    d = os.path.join(C.runs_dir, "census")
    os.makedirs(d, exist_ok=True)
    cubin = os.path.join(d, "stub.cubin")
    with open(cubin, "wb") as f:
        f.write(b"\x7fELF\x02\x01\x01" + bytes(57))
    fat = os.path.join(d, "compressed.fatbin")
    with open(fat, "wb") as f:
        f.write(fatbin([(2, 90, 0, b"\x7fELF....."), (1, 90, 0x2000, b"lz4-ish")]))
    logs = []
    for tag, cmd in (("ptx", ["modimage", C.fixture]), ("cubin", ["modimage", cubin]),
                     ("fatbin", ["modimage", fat]), ("library", ["libload", "4096"])):
        env = env_for(True, {"GPUSLICE_PRIORITY": "low", "LD_LIBRARY_PATH": C.sim_dir,
                             "SIMCUDA_STATE": os.path.join(d, "simstate")})
        r = shares.run(f"pt_census_{tag}", [C.cuclient, "init", "ctx", "0"] + cmd, env, 30, 5)
        logs.append((tag, os.path.join(C.runs_dir, f"pt_census_{tag}.err")))
        if r.crashed:
            log(f"  census {tag}: {r.status()}")
    C.census_logs = logs
    C.census_expect = {
        "ptx": lambda s, k: len(s) == 1,
        "cubin": lambda s, k: any("a cubin" in x for x in k),
        "fatbin": lambda s, k: any("(compressed)" in x and x.endswith("none") for x in k),
        "library": lambda s, k: any(x.startswith("library: ") for x in k),
    }


def fatbin(entries):
    """A one-container fat binary of (kind, arch, flags, payload) entries (fatbin.rs's layout)."""
    body = b""
    for kind, arch, flags, payload in entries:
        padded = -(-len(payload) // 8) * 8
        h = bytearray(64)
        h[0:2] = kind.to_bytes(2, "little")
        h[4:8] = (64).to_bytes(4, "little")
        h[8:16] = padded.to_bytes(8, "little")
        h[28:32] = arch.to_bytes(4, "little")
        h[40:48] = flags.to_bytes(8, "little")
        body += bytes(h) + payload.ljust(padded, b"\0")
    return ((0xBA55ED50).to_bytes(4, "little") + (1).to_bytes(2, "little")
            + (16).to_bytes(2, "little") + len(body).to_bytes(8, "little") + body)


# ----------------------------------------------------------------------------- 4 + 5 overhead

def interleaved(tag, argv, variants, rounds, key=None, timeout=60):
    """Runs argv under each (name, env) of variants, round by round; {name: [figure]}: the
    process's wall seconds, or its `key=` value."""
    got = {name: [] for name, _ in variants}
    for i in range(rounds):
        for name, env in variants:
            if remaining() < 15:
                log(f"  {tag}: stopped after {i} rounds (time budget)")
                return got
            t = time.monotonic()
            r = shares.run(f"pt_{tag}_{name}_{i}", argv, env, timeout, 5)
            wall = time.monotonic() - t
            if r.rc == 0 and not r.crashed:
                v = wall if key is None else r.num(key)
                if v is not None:
                    got[name].append(v)
    return got


def verdict_ab(got, a, b, tol, unit):
    """a (never sliced) against b (slicer off): median within tol = (fraction, absolute)."""
    ma, mb = median(got.get(a)), median(got.get(b))
    if ma is None or mb is None:
        return False, None, "no figures"
    ok = ma <= mb * (1 + tol[0]) + tol[1]
    return ok, (ma, mb), "" if ok else f"{a} {ma:.4g} > {b} {mb:.4g} x {1 + tol[0]:g} + {tol[1]:g}{unit}"


def fmt_medians(got, scale, unit):
    return ", ".join(f"{n} {median(v) * scale:.1f}{unit} (n={len(v)}, {min(v) * scale:.1f}-"
                     f"{max(v) * scale:.1f})" if v else f"{n} ?" for n, v in got.items())


def overhead_variants(with_low):
    v = [("noshim", env_for(False)), ("normal", env_for(True, {"GPUSLICE_PRIORITY": "normal"})),
         ("normal_off", env_for(True, {"GPUSLICE_PRIORITY": "normal", "GPUSLICE_SLICE": "off"}))]
    if with_low:
        v.append(("low", env_for(True, {"GPUSLICE_PRIORITY": "low"})))
    if C.dry_run:
        for _, env in v:
            env.update({"LD_LIBRARY_PATH": C.sim_dir,
                        "SIMCUDA_STATE": os.path.join(C.runs_dir, "simstate")})
    return v


def check_launch():
    name = "launch ns, never sliced vs slicer off"
    if C.dry_run or not C.bench:
        record("launch", name, "SKIP" if C.dry_run else False, "-",
               "dry run: bench.cu needs the GPU" if C.dry_run else "bench not built")
        return
    got = interleaved("launch", [C.bench, "3", "100000", "100"], overhead_variants(False),
                      C.launch_rounds, key="launch_ns_median")
    ok, _, why = verdict_ab(got, "normal", "normal_off", LAUNCH_TOL, " ns")
    record("launch", name, ok, fmt_medians(got, 1, " ns") + f" (bench 3 100000 100, medians of "
           f"{C.launch_rounds} runs; bound +{LAUNCH_TOL[0] * 100:g}% +{LAUNCH_TOL[1]:g} ns)", why)


def check_startup():
    name = "start-up, never sliced vs slicer off"
    if C.dry_run:
        argv = [C.cuclient, "init", "ctx", "0"]
        what = "cuclient-link init ctx 0 on the simulated driver"
    else:
        argv = [PY, "-c", "import torch; torch.zeros(1).cuda(); torch.cuda.synchronize()"]
        what = "python -c 'import torch; torch.zeros(1).cuda()'"
    got = interleaved("startup", argv, overhead_variants(True), C.startup_runs, timeout=120)
    ok, _, why = verdict_ab(got, "normal", "normal_off", STARTUP_TOL, " s")
    if C.dry_run and ok is False and why != "no figures":
        ok, why = "INFO", f"dry run (debug build, loaded machine): {why}"
    record("startup", name, ok, fmt_medians(got, 1000, " ms") + f"; {what}, medians of "
           f"{C.startup_runs} (bound +{STARTUP_TOL[0] * 100:g}% +{STARTUP_TOL[1] * 1000:g} ms)", why)


# ----------------------------------------------------------------------------- main

def run_checks():
    check_torch()
    if C.mps_pipe:
        # The -mps pass: the torch rows only (census, launch and startup are the time-sliced
        # pass's); without the stand-in, a dry run shows the shim's view of each class instead.
        if C.dry_run and not C.stand_in:
            check_mps_classes()
        return
    if C.dry_run:
        dry_census()
    check_census()
    check_launch()
    check_startup()


def main():
    ap = gpucommon.arg_parser(230.0)
    ap.add_argument("--phase-s", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alone-s", type=float, default=1.2)
    ap.add_argument("--startup-runs", type=int, default=5)
    ap.add_argument("--launch-rounds", type=int, default=3)
    ap.add_argument("--bench", default="")
    ap.add_argument("--budget-us", type=int, default=0)
    ap.add_argument("--nb-share", type=int, default=0,
                    help="also each neighbour with GPUSLICE_SM_SHARE set to this (INFO rows -sm)")
    ap.add_argument("--nb-free", action="store_true",
                    help="with --nb-share, over MPS: also each neighbour with that share and "
                         "GPUSLICE_PRIORITY_GATE=spatial-off (INFO rows -smfree)")
    ap.add_argument("--nb-extra", action="append", default=[], metavar="NAME:K=V,K=V",
                    help="also each neighbour with these variables (INFO rows -NAME)")
    ap.add_argument("--no-off", action="store_true", help="leave out the slicing-off copy")
    ap.add_argument("--kinds", default=",".join(NB_SPEC),
                    help="the neighbours to run, of " + ",".join(NB_SPEC))
    ap.add_argument("--probes", default=",".join(PROBES),
                    help="the probes to run, of graph,eager (in that order)")
    ap.add_argument("--shim-log", default="info")
    ap.add_argument("--later-probe-runs", type=int, default=0,
                    help="probe runs of a later pass (ptxslice_torch.sh's -mps pass) to fit in the budget")
    ap.add_argument("--mps-pipe", default="",
                    help="the -mps pass: every program a client of the daemon listening in DIR")
    ap.add_argument("--mps-log", default="")
    ap.add_argument("--mps-control", default="nvidia-cuda-mps-control")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--cuclient", default="")
    ap.add_argument("--sim-dir", default="")
    ap.add_argument("--fixture", default="")
    ap.add_argument("--stand-in-torch", default="",
                    help="dry run: a folder with stand-in torch/torchvision packages (dryrun/sleeptorch)")
    args = ap.parse_args()
    if args.phase_s <= SETTLE_S or args.rounds < 1 or args.alone_s <= ALONE_SETTLE_S + 0.5 \
            or args.startup_runs < 1 or args.launch_rounds < 1:
        ap.error("--phase-s > 0.1, --rounds >= 1, --alone-s > 0.7, --startup-runs/--launch-rounds >= 1")

    gpucommon.setup("ptxslice_torch", args, "ptxslice_torch_runs", "ptxslice_torch.log")
    C.shim_log = args.shim_log
    C.phase_s, C.rounds, C.alone_s = args.phase_s, args.rounds, args.alone_s
    C.startup_runs, C.launch_rounds = args.startup_runs, args.launch_rounds
    C.bench = args.bench
    C.budget_us = args.budget_us
    C.nb_share = args.nb_share
    C.nb_free = args.nb_free
    C.no_off = args.no_off
    C.kinds = [k for k in args.kinds.split(",") if k]
    if not C.kinds or any(k not in NB_SPEC for k in C.kinds):
        ap.error(f"--kinds: a comma-separated list of {','.join(NB_SPEC)}, not {args.kinds!r}")
    asked = [m for m in args.probes.split(",") if m]
    if not asked or any(m not in PROBES for m in asked) or len(set(asked)) != len(asked):
        ap.error(f"--probes: graph, eager or both, comma-separated, not {args.probes!r}")
    C.probes = [m for m in PROBES if m in asked]
    for spec in args.nb_extra:
        name, _, pairs = spec.partition(":")
        taken = {"on", "off", "bud", "sm", "smfree"}
        if not name.isalnum() or name in taken or name in C.nb_extra:
            ap.error(f"--nb-extra {spec!r}: NAME must be letters and digits, new, not one of {sorted(taken)}")
        try:
            C.nb_extra[name] = dict(kv.split("=", 1) for kv in pairs.split(",") if kv)
        except ValueError:
            ap.error(f"--nb-extra {spec!r}: variables as K=V,K=V")
    C.dry_run = args.dry_run
    C.cuclient, C.sim_dir, C.fixture = args.cuclient, args.sim_dir, args.fixture
    C.stand_in = args.stand_in_torch
    C.later_runs = max(args.later_probe_runs, 0)
    C.mps_pipe, C.mps_control = args.mps_pipe, args.mps_control
    C.sfx = "-mps" if C.mps_pipe else ""
    C.mono_to_epoch = time.time() - time.monotonic()
    C.base_env = gpucommon.scrubbed_env(shares.SCRUB_PREFIXES, shares.SCRUB_NAMES)
    # No controller: each process on its own limits; a private PTX cache per run.
    C.base_env.update({"GPUSLICE_ON_NO_CONTROLLER": "alone", "GPUSLICE_CONTROLLER_WAIT": "0",
                       "GPUSLICE_SOCKET": os.path.join(C.runs_dir, "no-controller.sock"),
                       "GPUSLICE_PTX_CACHE": os.path.join(C.runs_dir, "ptxcache"),
                       "TORCHINDUCTOR_CACHE_DIR": os.path.join(C.build, "inductor-cache")})
    if C.stand_in:
        # The stand-in makes a context on the simulated driver at import (SLEEPTORCH_SIMCUDA),
        # so the shim and a daemon see each program as they see torch's.
        C.base_env["PYTHONPATH"] = os.pathsep.join(
            x for x in (os.path.abspath(C.stand_in), C.base_env.get("PYTHONPATH", "")) if x)
        C.base_env.update({"SLEEPTORCH_SIMCUDA": "1", "LD_LIBRARY_PATH": C.sim_dir,
                           "SIMCUDA_STATE": os.path.join(C.runs_dir, "simstate")})
    if C.mps_pipe:
        # Every program of this pass is the daemon's client; the base environment has no other
        # CUDA_MPS_* (scrubbed), so the shim sets the client priority from the class.
        C.base_env["CUDA_MPS_PIPE_DIRECTORY"] = C.mps_pipe
        if args.mps_log:
            C.base_env["CUDA_MPS_LOG_DIRECTORY"] = args.mps_log
        if C.dry_run:
            C.base_env["SIMCUDA_MPS"] = "pipe"  # the simulated driver: MPS_ENABLED while `control` is there
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    log(f"\n##### ptxslice_torch: lib={C.lib} build={C.build} out={C.out} python={PY} "
        f"phase_s={C.phase_s} rounds={C.rounds} alone_s={C.alone_s} budget_us={C.budget_us} nb_share={C.nb_share} nb_free={int(C.nb_free)} "
        f"nb_extra={C.nb_extra or '-'} kinds={','.join(C.kinds)} probes={','.join(C.probes)} no_off={int(C.no_off)} "
        f"dry_run={C.dry_run} mps_pipe={C.mps_pipe or '-'} later_probe_runs={C.later_runs} "
        f"time left={remaining():.0f}s")
    if not C.dry_run:
        C.smi = shares.Monitor()
    try:
        run_checks()
    except Stopped as e:
        log(f"\n##### stopped by {e} with {remaining():.0f}s of the budget left")
        C.crashes.append(f"ptxslice_torch.py: stopped by {e}")
    except Exception as e:  # a harness bug must still leave a table behind
        gpucommon.harness_error(e)
    finally:
        gpucommon.ignore_signals()
        prio.kill_children()
        if C.smi is not None:
            C.smi.stop()
    rows = gpucommon.sorted_results([c + C.sfx for i in IDS[:6] for c in (i, f"{i}-off", f"{i}-bud", f"{i}-sm", f"{i}-smfree", *(f"{i}-{m}" for m in C.nb_extra))]
                                    + [i + C.sfx for i in IDS[6:]] + [f"mps-{c}" for c in MPS_CLIENT_PRIORITY])
    title = "== ptxslice_torch results ==" if not C.mps_pipe else (
        "== ptxslice_torch results, over MPS (a private daemon; client priority 0 high, 1 low) ==")
    gpucommon.emit(gpucommon.table_lines(rows, title, id_w=max([9 + len(C.sfx)] + [len(r[0]) for r in rows]))
                   + [gpucommon.summary_line(rows)])
    if C.crashes or any(r[2] == "FAIL" for r in rows):
        return 1
    return 2 if C.missing else 0


if __name__ == "__main__":
    sys.exit(main())
