#!/usr/bin/env python3
"""gpuslice priority-class checks (issue 5). Started by tests/gpu/bench.sh after shares.py (or
alone with BENCH_ONLY=priority); see the section "Priorities (make gpu-bench)" in
tests/gpu/README.md for what each check means.

    priority.py --lib ABS_PATH_TO_libgpuslice.so --build BUILD_DIR --out OUT_DIR [--t0 EPOCH]
                [--budget-s 210] [--seconds 6] [--base-seconds 2.5] [--shim-log info]
                [--queue N] [--mps-dir DIR] [--torch-mode graph|eager]

A latency probe (latprobe, CUDA; torch_priority.py probe, ResNet-50) alone, then next to a
throughput neighbour (sharebench; torch_priority.py matmul) three ways: no shim (plain
time-slicing), under gpuslice (probe GPUSLICE_PRIORITY=high, neighbour low; no controller),
and under MPS (a daemon of its own in a temporary folder, neighbour at
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30). Also the low neighbour alone under the shim against no
shim. Standard library only (the torch children need torch and torchvision). Writes
OUT_DIR/bench.log (appends) and OUT_DIR/priority.tsv; prints its tables last.
Exit status: 0 when every program behaved (whatever the verdicts), 1 when a program crashed
(signal, timeout, unexpected exit status; not counted for a client under MPS, whose failure is
reported as MPS's), 2 when something needed was missing.

Every MPS daemon it starts is told `quit` on every way out (also on SIGTERM/SIGINT/SIGHUP),
and whatever of it is still alive 15 s later is killed by pid.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import gpucommon
from gpucommon import C, HERE, PY, clip_lines, env_for, have, log, log_cmd, record, remaining
from gpucommon import Stopped, on_signal

import shares  # Run/finish/parse (report lines, SM clock per run), sb_argv, mono_points, count_at

PROBE_REQUEST_US = 2000     # one request alone: 10 kernels of ~200 us
PROBE_KERNELS = 10
PROBE_PERIOD_MS = 10.0
PROBE_WARMUP_S = 0.5        # after the go file, not recorded
NB_KERNEL_US = (200, 50)    # the neighbour's kernel length: the main factor
NB_EXTRA_S = 2.0            # the neighbour runs this much longer than the probe's timed phase
P99_MAX_CUDA = 1.15         # check 1: p99 <= 1.15 x alone
P99_MAX_TORCH = 1.2         # check 2
NB_KEEP = 0.8               # check 1: neighbour >= 0.8 x (1 - probe busy fraction) of alone
LOW_TOL = 0.02              # check 3: |low / no shim - 1| <= 2%
MPS_NB_PCT = 30
TORCH_PERIOD_X = 3.0
TORCH_SPIN_MS = 1000.0      # above the period: the probe never sleeps (steadier launch speed)
TORCH_PHASE_S = 1.0         # pairs: 1 s with the neighbour, 1 s with it paused, ...
TORCH_NB_N = 2048           # fp32 (no TF32: PyTorch's default for matmul): ~0.3 ms kernels on
TORCH_NB_DTYPE = "fp32"     # CUDA cores. fp16 4096^2 runs into the power cap (1460 MHz at 666 W),
                            # which slows the probe by its clock, whatever the scheduling
READY_S = 120.0             # both of a pair print ready=1 within this
SMI_FIELDS = shares.SMI_FIELDS

SCRUB_PREFIXES = shares.SCRUB_PREFIXES
SCRUB_NAMES = shares.SCRUB_NAMES
IDS = ["0", "1a", "1b", "2", "1a-mps", "1b-mps", "2-mps", "3a", "3b"]
# The pairs each scenario runs: plain time-slicing, gpuslice, MPS (neighbour at 30% of the
# threads), gpuslice over MPS (the spatial mode: classes as MPS client priorities, no partition).
CONFIGS = ("noshim", "gpuslice", "mps", "gpuslice_mps")
# Verdicts: gpuslice alone (time-slicing) under the check's own id, over MPS under id-mps.
JUDGED = (("gpuslice", ""), ("gpuslice_mps", "-mps"))
TORCH = os.path.join(HERE, "torch_priority.py")

# This script's fields of the shared context (gpucommon.C; shares.py's are there too).
C.seconds = 6.0
C.base_seconds = 2.5
C.queue = ""            # GPUSLICE_PRIORITY_QUEUE for the low processes ("" = the shim's default)
C.torch_mode = "graph"  # the ResNet-50 probe: "graph" (CUDA graph replay) or "eager"
C.mps_root = ""
C.mps_root_own = False  # made here (removed at the end), not given by --mps-dir
C.mps_bin = None
C.mps = None            # the running Mps session, if any
C.mps_notes = []
C.children = []         # Popen objects started and maybe not finished
C.rows = []             # the side-by-side table: dicts
C.cells = []            # priority.tsv detail rows (a dict for a probe run: its ratio comes last)
C.ref = {}              # scenario -> the probe's alone p99 that ratios are taken against


def f3(x):
    return "?" if x is None else f"{x:.3f}"


def f1(x):
    return "?" if x is None else f"{x:.1f}"


# ----------------------------------------------------------------------------- running

def track(p):
    if p is not None:
        C.children.append(p)
    return p


def kill_children():
    for p in C.children:
        if p.poll() is None:
            log(f"  cleanup: killing pid {p.pid} ({' '.join(p.args[:3]) if isinstance(p.args, list) else p.args})")
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    C.children = []


def finish(r, rc, out_path, err_path, env, capped, mps=False):
    """shares.finish (settle, parse, clock, log); a client under MPS that fails does not count
    as a crash: it is MPS's failure, reported in the table."""
    n = len(C.crashes)
    shares.finish(r, rc, out_path, err_path, env, capped)
    r.mps_failed = False
    if mps and r.crashed:
        del C.crashes[n:]
        r.mps_failed = True
        log(f"  ({r.name}: a failure under MPS, reported as MPS's, not counted as a crash)")


def run_one(name, argv, env, timeout, need, mps=False):
    r = shares.Run(name)
    b = gpucommon.budget(r, timeout, need)
    if b is None:
        return r
    timeout, capped = b
    t0 = time.time()
    p, out_path, err_path = shares.start(name, argv, env)
    track(p)
    rc = gpucommon.wait_proc(p, r, timeout)
    r.secs = time.time() - t0
    finish(r, rc, out_path, err_path, env, capped, mps)
    return r


def why_failed(r):
    extra = " ".join(f"{k}={r.get(k)}" for k in ("init_error", "cuda_error", "error", "go_timeout")
                     if r.get(k))
    return f"{r.name}: {r.status()}" + (f" {extra}" if extra else "")


def probe_problem(r, shim=None, prio=None):
    """Why a probe run cannot be judged, or ''."""
    if r is None:
        return "not run"
    if r.skipped:
        return "skipped: time budget spent"
    if r.cut:
        return f"{r.name}: cut short by the time budget"
    if r.crashed:
        return why_failed(r)
    if r.preload_failed:
        return f"{r.name}: LD_PRELOAD of the shim failed"
    if r.get("done") != "1" or r.num("p99_ms") is None:
        return f"{r.name}: no result (no done=1 / p99_ms=)"
    if shim is not None and r.get("preloaded_gpuslice") != ("1" if shim else "0"):
        return f"{r.name}: preloaded_gpuslice={r.get('preloaded_gpuslice')}"
    if prio is not None and r.get("env_GPUSLICE_PRIORITY") != prio:
        return f"{r.name}: saw GPUSLICE_PRIORITY={r.get('env_GPUSLICE_PRIORITY')}"
    return ""


def nb_problem(r, shim=None):
    if r is None:
        return "not run"
    if r.crashed:
        return why_failed(r)
    return shares.run_problem(r, shim=shim)


def go_path(tag):
    go = os.path.join(C.runs_dir, f"{tag}.go")
    if os.path.exists(go):
        os.unlink(go)
    return go


def pair(tag, probe_argv, probe_env, nb_argv, nb_env, probe_timeout, nb_timeout, mps=False):
    """Probe and neighbour started together; once both print ready=1 (contexts made, first
    kernels run) the go file is written, so their timed phases start together. Returns the two
    Runs (finished)."""
    go = go_path(tag)
    rp, rn = shares.Run(f"{tag}_probe"), shares.Run(f"{tag}_nb")
    procs = []
    t0 = time.time()
    for r, argv, env in ((rp, probe_argv, probe_env), (rn, nb_argv, nb_env)):
        p, op, ep = shares.start(r.name, argv + ["--go-file", go], env)
        track(p)
        procs.append((r, p, op, ep, env))
    states = gpucommon.wait_ready([(p, op) for _, p, op, _, _ in procs], READY_S)
    if not all(states):
        log(f"  {tag}: not both ready within {READY_S:g}s ({states}); go anyway")
    with open(go, "w") as f:
        f.write("go\n")
    t_go = time.monotonic()
    log(f"  {tag}: go file written {time.time() - t0:.2f}s after the start")
    for r, p, op, ep, env in procs:
        to = probe_timeout if r is rp else nb_timeout
        rc = gpucommon.wait_proc(p, r, max(5.0, t_go + to - time.monotonic()))
        r.secs = time.time() - t0
        finish(r, rc, op, ep, env, False, mps)
    return rp, rn


def windows_of(rp, key):
    """[(a, b)] from a probe's `key=a:b,c:d` (CLOCK_MONOTONIC), or None."""
    txt = rp.get(key)
    if not txt:
        return None
    try:
        return [tuple(float(x) for x in w.split(":")) for w in txt.split(",") if w]
    except ValueError:
        return None


def nb_window(rn, rp):
    """The neighbour's rate over the probe's timed phase (from its report lines, interpolated;
    with phases: over the shared windows only) and the part of that time it ran in its own
    timed phase; (None, why) when it cannot be had."""
    ps, pe = rp.num("mono_start"), rp.num("mono_end")
    ns, ne = rn.num("mono_start"), rn.num("mono_end")
    if None in (ps, pe, ns, ne) or not rn.reports:
        return None, "no timed window (mono_start/mono_end/report lines missing)"
    wins = windows_of(rp, "shared_windows") or [(ps, pe)]
    pts = shares.mono_points(rn)
    done = span = total = 0.0
    for a, b in wins:
        total += b - a
        w0, w1 = max(a, ns), min(b, ne)
        if w1 > w0:
            done += shares.count_at(pts, w1) - shares.count_at(pts, w0)
            span += w1 - w0
    if span < 1.0:
        return None, f"the neighbour ran during only {span:.2f}s of the probe's phase"
    return (done / span, span / total if total > 0 else 0.0), ""


# ----------------------------------------------------------------------------- MPS

class Mps:
    def __init__(self, tag):
        self.tag = tag
        self.dir = os.path.join(C.mps_root, tag)
        self.pipe = os.path.join(self.dir, "pipe")
        self.logd = os.path.join(self.dir, "log")
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": self.pipe, "CUDA_MPS_LOG_DIRECTORY": self.logd}

    def full_env(self):
        env = dict(C.base_env)
        env.update(self.env)
        return env


def mps_cmd(sess, text, timeout):
    """echo TEXT | nvidia-cuda-mps-control (client mode); (rc, output) or (None, why)."""
    try:
        p = subprocess.run([C.mps_bin], input=text + "\n", env=sess.full_env(), text=True,
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"'{text}' got no answer within {timeout:g}s"
    except OSError as e:
        return None, f"cannot run {C.mps_bin}: {e}"
    return p.returncode, (p.stdout + p.stderr).strip()


def mps_procs(sess):
    """pids of this session's MPS daemon and server: nvidia-cuda-mps* processes whose
    environment names our pipe folder, and their nvidia-cuda-mps* children."""
    needle = f"CUDA_MPS_PIPE_DIRECTORY={sess.pipe}".encode()
    mps, parents = set(), {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                comm = f.read().strip()
            if not comm.startswith("nvidia-cuda-mps"):
                continue
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            parents[int(d)] = int(stat[stat.rfind(")") + 2:].split()[1])
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    mps.add(int(d))
        except (OSError, ValueError, IndexError):
            continue
    grew = True
    while grew:
        more = {pid for pid, pp in parents.items() if pp in mps and pid not in mps}
        grew = bool(more)
        mps |= more
    return sorted(mps)


def mps_start(tag):
    """Start a control daemon of our own; (Mps, '') or (None, why)."""
    if not C.mps_bin:
        return None, "nvidia-cuda-mps-control not found"
    sess = Mps(tag)
    shutil.rmtree(sess.dir, ignore_errors=True)
    os.makedirs(sess.pipe, mode=0o700)
    os.makedirs(sess.logd, mode=0o700)
    C.mps = sess  # from here on every way out quits it
    argv = [C.mps_bin, "-d"]
    log_cmd(f"mps_{tag}: start the MPS control daemon", argv, sess.full_env())
    # Its output into a file, not a pipe: a daemon that keeps the pipe open would hold us.
    out_path = os.path.join(C.runs_dir, f"mps_{tag}.start.out")
    try:
        with open(out_path, "w") as fo:
            p = subprocess.run(argv, env=sess.full_env(), stdin=subprocess.DEVNULL, stdout=fo,
                               stderr=subprocess.STDOUT, timeout=20)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        rc = None
    except OSError as e:
        rc = f"cannot start: {e}"
    text = gpucommon.read_clipped(out_path).strip() if os.path.exists(out_path) else ""
    if rc is None:
        text = ("no return within 20s " + text).strip()
    log(f"  -> rc={rc} {text}")
    why = ""
    if rc != 0:
        why = f"nvidia-cuda-mps-control -d: rc={rc} {text[:200]}"
    else:
        time.sleep(0.2)
        qrc, qtext = mps_cmd(sess, "get_server_list", 10)
        log(f"  get_server_list -> rc={qrc} {qtext!r}")
        if qrc != 0:
            why = f"the daemon does not answer (get_server_list rc={qrc}: {qtext[:200]})"
        else:
            log(f"  MPS daemon pids: {mps_procs(sess)}")
    if why:
        mps_stop()
        C.mps_notes.append(f"{tag}: {why}")
        return None, why
    return sess, ""


def mps_stop():
    """quit, wait for the daemon and server to go (15 s), kill what is left by pid, log the
    MPS logs, remove the folders. Safe to call twice."""
    sess = C.mps
    if sess is None:
        return
    rc, text = mps_cmd(sess, "quit", 15)
    log(f"  mps_{sess.tag}: quit -> rc={rc} {text[:200]!r}")
    end = time.monotonic() + 15
    left = mps_procs(sess)
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = mps_procs(sess)
    if left:
        note = f"{sess.tag}: MPS processes {left} still there 15 s after quit: killed"
        C.mps_notes.append(note)
        log("  " + note)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(1.0)
            left = mps_procs(sess)
            if not left:
                break
    for name in sorted(os.listdir(sess.logd)) if os.path.isdir(sess.logd) else []:
        path = os.path.join(sess.logd, name)
        if os.path.isfile(path):
            log(f"  --- MPS {name} ({sess.tag})")
            log(clip_lines(gpucommon.read_clipped(path), 30, 30))
    shutil.rmtree(sess.dir, ignore_errors=True)
    C.mps = None


def mps_pair(tag, probe_argv, nb_argv, probe_timeout, nb_timeout, shim=False):
    """A pair under a fresh MPS daemon (quit right after); (probe Run, nb Run, '') or
    (None, None, why MPS did not start). shim=False: MPS alone, the neighbour at
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30. shim=True: both under gpuslice (probe high, neighbour
    low), no partition: the shim maps the classes onto MPS client priorities itself."""
    sess, why = mps_start(tag)
    if sess is None:
        return None, None, why
    try:
        if shim:
            penv = env_shim("high", extra=sess.env)
            nenv = env_shim("low", True, extra=sess.env)
        else:
            penv = env_for(False, sess.env)
            nenv = env_for(False, dict(sess.env, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(MPS_NB_PCT)))
        rp, rn = pair(tag, probe_argv, penv, nb_argv, nenv, probe_timeout, nb_timeout, mps=True)
    finally:
        mps_stop()
    return rp, rn, ""


# ----------------------------------------------------------------------------- table rows

def ratio(scn, p99, own_ref=None):
    """p99 / the reference: the run's own solo phases' p99 when it has them, else the
    scenario's alone run's."""
    ref = own_ref or C.ref.get(scn)
    return p99 / ref if ref and p99 is not None else None


def add_row(scn, cfg, rp, nb_pct=None, note="", prob=""):
    """A row of the side-by-side table; p99/alone is taken when the table is printed."""
    row = {"scn": scn, "cfg": cfg, "p50": None, "p90": None, "p99": None, "max": None,
           "nb": nb_pct, "busy": None, "note": note, "ref": None}
    if rp is not None and not prob:
        row.update(p50=rp.num("p50_ms"), p90=rp.num("p90_ms"), p99=rp.num("p99_ms"),
                   max=rp.num("max_ms"), busy=rp.num("busy_frac"), ref=rp.num("solo_p99_ms"))
        if row["ref"]:
            note = "; ".join(x for x in (f"vs its solo phases: p50 {rp.get('solo_p50_ms')} "
                                         f"p99 {rp.get('solo_p99_ms')} max {rp.get('solo_max_ms')}",
                                         note) if x)
            row["note"] = note
    if prob:
        row["note"] = "; ".join(x for x in (prob, note) if x)
    elif rp is not None and rp.clock:
        row["note"] = "; ".join(x for x in (f"clk {rp.clock[0]:.0f}MHz", note) if x)
    C.rows.append(row)
    return row


def env_shim(prio, low=False, extra=None):
    extra = dict(extra or {}, GPUSLICE_PRIORITY=prio)
    if low and C.queue:
        extra["GPUSLICE_PRIORITY_QUEUE"] = C.queue
    return env_for(True, extra)


def three_pairs(scn, tag, probe_argv, nb_argv, probe_timeout, nb_timeout, need, nb_r0,
                nb_grid=None, phased=False):
    """No shim, gpuslice high/low, MPS, gpuslice high/low over MPS. Returns {config: (probe Run, nb Run, nb_pct, problem)}.
    nb_grid: the neighbour's grid alone (sharebench); a neighbour that launched a smaller grid
    (under MPS at 30% it sees 38 SMs, not 132) did that much less work per kernel, so its rate
    is scaled by its grid / nb_grid: the percentage is of work, not of kernels.
    phased: the probe pauses the neighbour every other phase (torch_priority.py --pause-file);
    its p99/alone is then its shared phases' p99 / its solo phases' p99."""
    res = {}
    probe_argv0, nb_argv0 = probe_argv, nb_argv
    for cfg in CONFIGS:
        label = {"noshim": "+ neighbour, no shim",
                 "gpuslice": "+ neighbour, gpuslice high/low"
                 + (f" (queue {C.queue})" if C.queue else ""),
                 "mps": f"+ neighbour, MPS (neighbour {MPS_NB_PCT}%)",
                 "gpuslice_mps": "+ neighbour, gpuslice high/low over MPS (no partition)"
                 + (f" (queue {C.queue})" if C.queue else "")}[cfg]
        if remaining() < need:
            res[cfg] = (None, None, None, "skipped: time budget spent")
            add_row(scn, label, None, prob="skipped: time budget spent")
            continue
        name = f"{tag}_{cfg}"
        why = ""
        probe_argv, nb_argv = probe_argv0, nb_argv0
        if phased:
            pause = os.path.join(C.runs_dir, f"{name}.pause")
            if os.path.exists(pause):
                os.unlink(pause)
            probe_argv = probe_argv0 + ["--pause-file", pause, "--phase-s", f"{TORCH_PHASE_S:g}"]
            nb_argv = nb_argv0 + ["--pause-file", pause]
        if cfg == "noshim":
            rp, rn = pair(name, probe_argv, env_for(False), nb_argv, env_for(False),
                          probe_timeout, nb_timeout)
            prob = probe_problem(rp, shim=False) or nb_problem(rn, shim=False)
        elif cfg == "gpuslice":
            rp, rn = pair(name, probe_argv, env_shim("high"), nb_argv, env_shim("low", True),
                          probe_timeout, nb_timeout)
            prob = probe_problem(rp, shim=True, prio="high") or nb_problem(rn, shim=True)
        else:
            shim = cfg == "gpuslice_mps"
            rp, rn, why = mps_pair(name, probe_argv, nb_argv, probe_timeout, nb_timeout, shim=shim)
            if why:
                prob = f"MPS did not start: {why}"
            elif shim:
                prob = probe_problem(rp, shim=True, prio="high") or nb_problem(rn, shim=True)
            else:
                prob = probe_problem(rp, shim=False) or nb_problem(rn, shim=False)
                if prob and (getattr(rp, "mps_failed", False) or getattr(rn, "mps_failed", False)):
                    prob = f"MPS: {prob}"
        nb_pct, note = None, ""
        if not prob:
            w, wwhy = nb_window(rn, rp)
            if w is None:
                note = wwhy
            elif nb_r0:
                rate = w[0]
                g = rn.num("grid")
                if nb_grid and g and g != nb_grid:
                    rate *= g / nb_grid
                    note = f"neighbour's grid {g:.0f} (alone {nb_grid:.0f}): % of work"
                nb_pct = rate / nb_r0 * 100.0
                if w[1] < 0.95:
                    note = "; ".join(x for x in (note, f"the neighbour covered {w[1] * 100:.0f}% "
                                                       "of the probe's phase") if x)
        add_row(scn, label, rp, nb_pct, note, prob)
        res[cfg] = (rp, rn, nb_pct, prob or note)
        cell_from(f"{tag}.{cfg}", scn, label, rp, nb_pct, prob or note, rn)
    return res


def cell_from(cid, scn, label, rp, nb_pct, note, rn=None):
    ok = rp is not None and not probe_problem(rp)
    p = (lambda k: rp.num(k)) if ok else (lambda k: None)
    figs = (f"requests={rp.get('requests')} late={rp.get('late_releases')} "
            f"wake_late_max={rp.get('wake_late_max_ms')}ms busy={rp.get('busy_frac')} "
            f"worst={rp.get('worst')} clk={shares.clock_of(rp)}MHz"
            + (f" enqueue_p50/p99={rp.get('enqueue_p50_ms')}/{rp.get('enqueue_p99_ms')}ms"
               if rp.get("enqueue_p50_ms") else "") if ok else "-")
    if rn is not None and rn.rate():
        figs += f" nb_rate_whole={rn.rate():.1f}/s nb_clk={shares.clock_of(rn)}MHz"
    C.cells.append({"scn": scn, "p99": p("p99_ms"), "ref": p("solo_p99_ms"),
                    "row": [cid, f"{scn}: {label}", "INFO", f3(p("p50_ms")), f3(p("p90_ms")),
                            f3(p("p99_ms")), f3(p("max_ms")), "?", f1(nb_pct), figs, note]})


# ----------------------------------------------------------------------------- checks

def calibrate(lat, sb):
    """(probe iters, {us: neighbour iters}, probe calibration Run)."""
    notes, parts = [], []
    probe_iters, cal = None, None
    if lat:
        cal = run_one("prio_cal_probe", [lat, "calibrate", "--request-us", str(PROBE_REQUEST_US),
                                         "--kernels", str(PROBE_KERNELS)], env_for(False), 60, 10)
        ms, n = cal.num("request_ms"), cal.num("iters")
        prob = shares.run_problem(cal, shim=False, need_rate=False)
        if not prob and (not n or ms is None):
            prob = "no iters=/request_ms="
        if not prob and abs(ms - PROBE_REQUEST_US / 1000.0) > 0.05 * PROBE_REQUEST_US / 1000.0:
            prob = f"request_ms={ms} not within 5% of {PROBE_REQUEST_US / 1000.0:g}"
        if prob:
            notes.append(f"latprobe: {prob}")
        else:
            probe_iters = int(n)
            parts.append(f"probe: iters={probe_iters} request={ms:.3f}ms dev={cal.get('dev_ms')}ms "
                         f"({PROBE_KERNELS} x {cal.get('kernel_us')}us)")
    nb = {}
    if sb:
        for us in NB_KERNEL_US:
            r = run_one(f"prio_cal_nb_{us}us", [sb, "calibrate", str(us)], env_for(False), 60, 10)
            prob = shares.run_problem(r, shim=False, need_rate=False)
            n, got = r.num("iters"), r.num("kernel_us")
            if not prob and n and got and abs(got - us) <= 0.05 * us:
                nb[us] = int(n)
                parts.append(f"{us}us: iters={int(n)} kernel_us={got:.1f}")
            else:
                notes.append(f"sharebench {us}us: {prob or f'kernel_us={got} not within 5%'}")
    ok = probe_iters is not None and len(nb) == len(NB_KERNEL_US)
    record("0", "calibration (no shim): probe request, neighbour kernels", "INFO" if ok else "FAIL",
           "  ".join(parts) or "-", "; ".join(notes))
    return probe_iters, nb


def probe_alone(lat, iters):
    """(no-shim alone run, shim-high alone run)."""
    argv = [lat, "run", "--iters", str(iters), "--seconds", f"{C.seconds:g}", "--kernels",
            str(PROBE_KERNELS), "--period-ms", f"{PROBE_PERIOD_MS:g}", "--warmup-s",
            f"{PROBE_WARMUP_S:g}"]
    need = C.seconds + PROBE_WARMUP_S + 10
    a = run_one("prio_probe_alone", argv + ["--dump", os.path.join(C.runs_dir, "prio_probe_alone.lat")],
                env_for(False), need + 30, need)
    h = run_one("prio_probe_alone_high", argv, env_shim("high"), need + 30, need)
    return a, h


def nb_baselines(cid, sb, us, iters):
    """Check 3: no shim, shim at low (no high process anywhere), no shim. Returns the no-shim
    mean rate (None when unusable) and the grid it launched."""
    name = f"low alone, shim vs no shim, sharebench {us}us"
    argv = shares.sb_argv(sb, iters, C.base_seconds)
    per = C.base_seconds + 30
    need = 3 * (C.base_seconds + 4)
    if remaining() < need:
        record(cid, name, False, "-", "skipped: time budget spent")
        return None, None
    a = run_one(f"prio_nb{us}_noshim_a", argv, env_for(False), per, C.base_seconds + 4)
    low = run_one(f"prio_nb{us}_low", argv, env_shim("low", True), per, C.base_seconds + 4)
    b = run_one(f"prio_nb{us}_noshim_b", argv, env_for(False), per, C.base_seconds + 4)
    r0, drift, bnote = shares.baseline_pair(f"{us}us", [a, b])
    grid = a.num("grid") or b.num("grid")
    prob = nb_problem(low, shim=True)
    if prob or r0 is None:
        record(cid, name, False, "-", prob or bnote or "no baseline")
        return r0, grid
    d = low.rate() / r0 - 1.0
    ok = abs(d) <= LOW_TOL
    notes = [bnote] if bnote else []
    if drift is not None and abs(drift) > 0.01:
        notes.append(f"no-shim baseline drifted {drift * 100:+.1f}%")
    figs = (f"{d * 100:+.2f}% (low {low.rate():.1f}/s vs no shim {r0:.1f}/s, drift "
            f"{shares.pct(drift * 100 if drift is not None else None, 2)}%; clk {shares.clock_of(low)}"
            f" vs {shares.clock_of(a)}/{shares.clock_of(b)} MHz)")
    record(cid, name, ok, figs, "; ".join(notes))
    C.cells.append((cid, name, "PASS" if ok else "FAIL", "", "", "", "", "", f1(100.0 * (1 + d)),
                    figs, "; ".join(notes)))
    return r0, grid


def check_cuda(cid, lat, sb, piters, us, niters, alone, high, busy, nb_r0, nb_grid):
    name = f"latprobe high + sharebench {us}us low: p99, neighbour's rate"
    scn = f"latprobe {PROBE_REQUEST_US / 1000:g}ms/{PROBE_PERIOD_MS:g}ms + sharebench {us}us"
    a99 = alone.num("p99_ms")
    C.ref[scn] = a99
    add_row(scn, "probe alone (no shim)", alone, note=f"busy {f3(busy)}")
    add_row(scn, "probe alone, shim high", high, prob=probe_problem(high, shim=True, prio="high"))
    probe_argv = [lat, "run", "--iters", str(piters), "--seconds", f"{C.seconds:g}", "--kernels",
                  str(PROBE_KERNELS), "--period-ms", f"{PROBE_PERIOD_MS:g}", "--warmup-s",
                  f"{PROBE_WARMUP_S:g}"]
    nb_secs = C.seconds + PROBE_WARMUP_S + NB_EXTRA_S
    nb_argv = shares.sb_argv(sb, niters, nb_secs)
    res = three_pairs(scn, f"prio_cuda{us}", probe_argv, nb_argv, C.seconds + 40, nb_secs + 40,
                      nb_secs + 15, nb_r0, nb_grid)
    for cfg, suffix in JUDGED:
        judge_cuda(cid + suffix, name + ("" if not suffix else " (over MPS)"), scn, res, cfg, a99, busy)


def judge_cuda(cid, name, scn, res, cfg, a99, busy):
    rp, rn, nb_pct, prob = res[cfg]
    if rp is None or probe_problem(rp, shim=True, prio="high") or nb_pct is None:
        record(cid, name, False, "-", prob or "no neighbour rate")
        return
    p99 = rp.num("p99_ms")
    x = p99 / a99
    need = NB_KEEP * (1.0 - busy) * 100.0
    ok = x <= P99_MAX_CUDA and nb_pct >= need
    bad = []
    if x > P99_MAX_CUDA:
        bad.append(f"p99 x{x:.3f} > {P99_MAX_CUDA:g}")
    if nb_pct < need:
        bad.append(f"neighbour {nb_pct:.1f}% < {need:.1f}%")
    others = []
    for ocfg, lab in (("noshim", "no shim"), ("mps", "MPS")):
        q = res[ocfg][0]
        others.append(f"{lab} x{f3(ratio(scn, q.num('p99_ms')) if q is not None else None)}"
                      f"/{f1(res[ocfg][2])}%")
    figs = (f"p99 {p99:.3f}/{a99:.3f}ms = x{x:.3f} (<= {P99_MAX_CUDA:g}); neighbour "
            f"{nb_pct:.1f}% of alone (>= {need:.1f} = {NB_KEEP:g} x (1 - busy {busy:.3f})); "
            f"max {rp.num('max_ms'):.3f}ms; p99/nb%: " + ", ".join(others))
    record(cid, name, ok, figs, "; ".join(bad + ([res[cfg][3]] if res[cfg][3] else [])))


def check_torch():
    """The ResNet-50 probe alone (no shim; its period: 3 x its back-to-back latency), the matmul
    alone, then the three pairs, each with phases: the probe pauses the neighbour every other
    second and compares its requests with the neighbour running against those with it paused,
    in the same process. Eager ResNet-50 at batch 8 is bound by the host's launch rate, and
    that rate differs between processes on this VM (alone p99 3.3-7.3 ms over a dozen runs of
    one setup), so a p99 from another process is no yardstick for a 20% bound."""
    cid = "2"
    name = "ResNet-50 high + matmul low: p99 vs its solo phases"
    scn = f"ResNet-50 b8 fp32 {C.torch_mode} + matmul {TORCH_NB_N}^2 {TORCH_NB_DTYPE}"
    pair_s = 1.5 * C.seconds  # half of it shared, half solo (less the settle time)
    if remaining() < C.seconds + 3 * (pair_s + 25):
        record(cid, name, False, "-", "skipped: time budget spent")
        return
    base = [PY, TORCH, "probe", "--warmup-s", f"{PROBE_WARMUP_S:g}", "--spin-ms",
            f"{TORCH_SPIN_MS:g}"] + (["--graph"] if C.torch_mode == "graph" else [])
    alone = run_one("prio_torch_alone", base + ["--seconds", f"{C.seconds:g}", "--period-x",
                                                 f"{TORCH_PERIOD_X:g}", "--dump",
                                                 os.path.join(C.runs_dir, "prio_torch_alone.lat")],
                    env_for(False), C.seconds + 120, C.seconds + 25)
    prob = probe_problem(alone, shim=False)
    if prob or not alone.num("period_ms"):
        add_row(scn, "probe alone (no shim)", None, prob=prob or "no period_ms")
        record(cid, name, False, "-", prob or "no period_ms")
        return
    a99 = alone.num("p99_ms")
    C.ref[scn] = a99
    busy = alone.num("busy_frac")
    period = alone.num("period_ms")
    add_row(scn, "probe alone (no shim)", alone,
            note=f"period {period:g}ms, solo {alone.get('solo_ms')}ms, busy {f3(busy)}, "
                 f"enqueue p50/p99 {alone.get('enqueue_p50_ms')}/{alone.get('enqueue_p99_ms')}ms")
    nb_base = [PY, TORCH, "matmul", "--n", str(TORCH_NB_N), "--dtype", TORCH_NB_DTYPE,
               "--report-ms", "20"]
    nb_alone = run_one("prio_torch_nb_alone", nb_base + ["--seconds", f"{C.base_seconds:g}"],
                       env_for(False), C.base_seconds + 120, C.base_seconds + 20)
    nprob = nb_problem(nb_alone, shim=False)
    nb_r0 = None if nprob else nb_alone.rate()
    probe_argv = base + ["--seconds", f"{pair_s:g}", "--period-ms", f"{period:g}"]
    nb_secs = pair_s + PROBE_WARMUP_S + NB_EXTRA_S
    res = three_pairs(scn, "prio_torch", probe_argv, nb_base + ["--seconds", f"{nb_secs:g}"],
                      pair_s + 150, nb_secs + 150, nb_secs + 25, nb_r0, phased=True)
    for cfg, suffix in JUDGED:
        judge_torch(cid + suffix, name + ("" if not suffix else " (over MPS)"), res, cfg, a99,
                    period, nprob)


def judge_torch(cid, name, res, cfg, a99, period, nprob):
    rp, rn, nb_pct, prob = res[cfg]
    if rp is None or probe_problem(rp, shim=True, prio="high") or not rp.num("solo_p99_ms"):
        record(cid, name, False, "-", prob or "no result (no solo_p99_ms)")
        return
    p99, ref = rp.num("p99_ms"), rp.num("solo_p99_ms")
    x = p99 / ref
    ok = x <= P99_MAX_TORCH
    others = []
    for ocfg, lab in (("noshim", "no shim"), ("mps", "MPS")):
        q = res[ocfg][0]
        qx = (q.num("p99_ms") / q.num("solo_p99_ms") if q is not None and q.num("p99_ms")
              and q.num("solo_p99_ms") else None)
        others.append(f"{lab} x{f3(qx)}/{f1(res[ocfg][2])}%")
    figs = (f"p99 {p99:.3f}/{ref:.3f}ms (neighbour paused) = x{x:.3f} (<= {P99_MAX_TORCH:g}); "
            f"vs the no-shim alone run's p99 {a99:.3f}: x{p99 / a99:.3f} (info); neighbour "
            f"{f1(nb_pct)}% of alone (info); period {period:g}ms; p99 ratio/nb%: "
            + ", ".join(others))
    notes = [] if ok else [f"p99 x{x:.3f} > {P99_MAX_TORCH:g}"]
    if nprob:
        notes.append(f"neighbour alone: {nprob}")
    if prob:
        notes.append(prob)
    record(cid, name, ok, figs, "; ".join(notes))


# ----------------------------------------------------------------------------- report

def shm_listing(label):
    try:
        names = sorted(n for n in os.listdir("/dev/shm") if "gpuslice" in n)
    except OSError as e:
        names = [f"({e})"]
    lines = []
    for n in names:
        try:
            st = os.stat(os.path.join("/dev/shm", n))
            lines.append(f"{n} {st.st_size}B mode {oct(st.st_mode & 0o777)} uid {st.st_uid}")
        except OSError:
            lines.append(n)
    more = f" and {len(lines) - 8} more" if len(lines) > 8 else ""
    log(f"  /dev/shm gpuslice entries {label} ({len(lines)}): "
        + ("; ".join(lines[:8]) + more if lines else "none"))


def side_by_side():
    head = (f"{'scenario':44s} {'config':38s} {'p50':>7s} {'p99':>7s} {'max':>7s} "
            f"{'p99/alone':>9s} {'nb %':>6s}  note")
    lines = ["", "latency (ms; due -> done); p99/alone: vs the probe alone without the shim, or for "
             "the PyTorch pairs vs the same run's solo phases (neighbour paused); nb %: the "
             "neighbour's rate while it ran next to the probe, % of it alone without the shim",
             head]
    last = None
    for r in C.rows:
        scn = r["scn"] if r["scn"] != last else ""
        last = r["scn"]
        x = ratio(r["scn"], r["p99"], r["ref"])
        x = f"x{x:.3f}" if x is not None else "-"
        lines.append(f"{scn:44s} {r['cfg']:38s} {f3(r['p50']):>7s} {f3(r['p99']):>7s} "
                     f"{f3(r['max']):>7s} {x:>9s} {f1(r['nb']) if r['nb'] is not None else '-':>6s}"
                     f"  {r['note']}")
    return lines


def write_results_and_table(smi_start, smi_end):
    done = {r[0] for r in C.results}
    for cid in IDS:
        if cid not in done:
            names = {"0": "calibration", "1a": "latprobe + sharebench 200us",
                     "1b": "latprobe + sharebench 50us", "2": "ResNet-50 + matmul",
                     "3a": "low alone 200us", "3b": "low alone 50us"}
            base = cid.removesuffix("-mps")
            name = names.get(base, cid) + (" under MPS" if base != cid else "")
            record(cid, name, False, "-", "not reached: stopped, time budget, or a harness error (see the log)")
    rows = gpucommon.sorted_results(IDS)
    clean = gpucommon.clean
    with open(os.path.join(C.out, "priority.tsv"), "w") as f:
        f.write("id\tcheck\tverdict\tp50_ms\tp90_ms\tp99_ms\tmax_ms\tp99_vs_alone\tnb_pct\t"
                "figures\tnote\n")
        for row in C.cells:
            if isinstance(row, dict):  # a probe run: p99 / the scenario's alone p99, now
                row, x = list(row["row"]), ratio(row["scn"], row["p99"], row["ref"])
                row[7] = f3(x)
            f.write("\t".join(clean(x) for x in row) + "\n")
        for cid, name, verdict, figs, note in rows:
            f.write("\t".join(clean(x) for x in (f"summary:{cid}", name, verdict, "", "", "", "",
                                                 "", "", figs, note)) + "\n")
    lines = gpucommon.table_lines(
        rows, "gpuslice priorities " + time.strftime("%Y-%m-%d %H:%M:%S")
        + f"  (p99 vs the probe alone without the shim, PyTorch: vs its solo phases; "
        f"{C.seconds:g}s probe runs; ResNet-50 {C.torch_mode}"
        + (f"; GPUSLICE_PRIORITY_QUEUE={C.queue} for low" if C.queue else "") + ")")
    lines += side_by_side()
    if C.mps_notes:
        lines.append("MPS: " + "; ".join(C.mps_notes))
    lines.append(f"GPU ({SMI_FIELDS}) start: {smi_start}; end: {smi_end}")
    lines.append(gpucommon.summary_line(rows))
    gpucommon.emit(lines)


def cleanup():
    gpucommon.ignore_signals()
    kill_children()
    mps_stop()
    if C.mps_root_own:
        shutil.rmtree(C.mps_root, ignore_errors=True)


def run_checks():
    lat, sb = have("latprobe"), have("sharebench")
    piters, nb = calibrate(lat, sb)
    alone = high = None
    a99 = busy = None
    if lat and piters:
        alone, high = probe_alone(lat, piters)
        prob = probe_problem(alone, shim=False)
        if prob:
            log(f"  probe alone unusable: {prob}")
        else:
            a99, busy = alone.num("p99_ms"), alone.num("busy_frac")
    order = [("1a", "3a", NB_KERNEL_US[0]), ("torch", None, None), ("1b", "3b", NB_KERNEL_US[1])]
    for cid, bid, us in order:
        if cid == "torch":
            check_torch()
            continue
        if not sb or us not in nb:
            record(bid, f"low alone, sharebench {us}us", False, "-",
                   "sharebench not built" if not sb else f"no calibration for {us}us")
            record(cid, f"latprobe + sharebench {us}us", False, "-", "no neighbour calibration")
            continue
        r0, grid = nb_baselines(bid, sb, us, nb[us])
        if a99 is None or busy is None:
            record(cid, f"latprobe + sharebench {us}us", False, "-",
                   "no probe-alone figures: " + (probe_problem(alone, shim=False) if alone is not None
                                                 else "latprobe not built or not calibrated"))
            continue
        if r0 is None:
            record(cid, f"latprobe + sharebench {us}us", False, "-", "no neighbour baseline")
            continue
        check_cuda(cid, lat, sb, piters, us, nb[us], alone, high, busy, r0, grid)


def main():
    ap = gpucommon.arg_parser(360.0)
    ap.add_argument("--seconds", type=float, default=6.0, help="the probe's timed seconds")
    ap.add_argument("--base-seconds", type=float, default=2.5,
                    help="timed seconds of the neighbour-alone runs")
    ap.add_argument("--shim-log", default="info", help="GPUSLICE_LOG for runs under the shim")
    ap.add_argument("--queue", default="", help="GPUSLICE_PRIORITY_QUEUE for the low processes")
    ap.add_argument("--mps-dir", default="", help="an empty folder for the MPS daemons' pipes/logs")
    ap.add_argument("--torch-mode", choices=["graph", "eager"], default="graph",
                    help="the ResNet-50 probe replays a CUDA graph, or runs eagerly")
    args = ap.parse_args()

    gpucommon.setup("priority", args, "prio_runs", "bench.log")
    C.seconds = args.seconds
    C.base_seconds = args.base_seconds
    C.shim_log = args.shim_log
    C.queue = args.queue.strip()
    C.torch_mode = args.torch_mode
    C.mono_to_epoch = time.time() - time.monotonic()
    C.base_env = gpucommon.scrubbed_env(SCRUB_PREFIXES, SCRUB_NAMES)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if args.mps_dir:
        C.mps_root = os.path.abspath(args.mps_dir)
        os.makedirs(C.mps_root, exist_ok=True)
    else:
        C.mps_root = tempfile.mkdtemp(prefix="gpuslice-mps.")
        C.mps_root_own = True
    C.mps_bin = shutil.which("nvidia-cuda-mps-control", path=C.base_env.get("PATH", os.defpath))
    if not C.mps_bin and os.access("/usr/bin/nvidia-cuda-mps-control", os.X_OK):
        C.mps_bin = "/usr/bin/nvidia-cuda-mps-control"

    log(f"\n##### priority: lib={C.lib} build={C.build} out={C.out} python={PY} "
        f"seconds={C.seconds} base_seconds={C.base_seconds} queue={C.queue or '(shim default)'} "
        f"torch_mode={C.torch_mode} "
        f"mps={C.mps_bin} mps_dir={C.mps_root} time left={remaining():.0f}s")
    smi_start, smi_end = shares.smi_snapshot("at the start of priority"), "?"
    shm_listing("at the start")
    C.smi = shares.Monitor()
    log(f"  monitor: {C.smi.how}" + (f" ({C.smi.error})" if C.smi.error else ""))
    try:
        run_checks()
    except Stopped as e:
        log(f"\n##### stopped by {e} with {remaining():.0f}s of the budget left")
        C.crashes.append(f"priority.py: stopped by {e}")
    except Exception as e:  # a harness bug must still leave a table behind
        gpucommon.harness_error(e)
    finally:
        cleanup()
        C.smi.stop()
        shm_listing("at the end")
        smi_end = shares.smi_snapshot("at the end of priority")
    write_results_and_table(smi_start, smi_end)
    return gpucommon.exit_status()


if __name__ == "__main__":
    sys.exit(main())
