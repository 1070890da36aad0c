#!/usr/bin/env python3
"""gpuslice GPU acceptance checks. Started by tests/gpu/acceptance.sh after it built the CUDA
programs; see tests/gpu/README.md for what each check means.

    harness.py --lib ABS_PATH_TO_libgpuslice.so --build BUILD_DIR --out OUT_DIR [--t0 EPOCH]

Standard library only (the Python scripts it starts need torch/torchvision/pynvml). Writes
OUT_DIR/acceptance.log (appends) and OUT_DIR/results.tsv; prints the results table last.
Exit status: 0 when every program behaved (whatever the verdicts), 1 when a program crashed
(signal, timeout, unexpected exit status), 2 when something needed was missing.
"""
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import gpucommon
from gpucommon import (C, HERE, PY, budget, clip_lines, have, log, log_cmd, record, remaining,
                       settle, spawn, wait_proc)

LIMIT = "4GiB"
LIMIT_MIB = 4096
NVML_SLACK = 1.01
LAUNCH_NS_MAX_GROWTH = 150.0
MALLOC_MAX_GROWTH = 0.02
BAD_LIMIT = "4 GB x"

# Base names the shim must hand its own wrapper out for (cuGetProcAddress answers, with the shim).
MUST_HOOK = {
    "cuMemAlloc", "cuMemFree", "cuMemGetInfo", "cuMemAllocPitch", "cuMemAllocManaged",
    "cuMemAllocAsync", "cuMemAllocFromPoolAsync", "cuMemFreeAsync", "cuMemCreate", "cuMemRelease",
    "cuArrayCreate", "cuArray3DCreate", "cuMipmappedArrayCreate", "cuArrayDestroy",
    "cuMipmappedArrayDestroy", "cuDeviceTotalMem", "cuLaunchKernel", "cuLaunchKernelEx",
    "cuLaunchCooperativeKernel", "cuGraphLaunch", "cuGetProcAddress",
}

# A "clear gpuslice error": a stderr line that names gpuslice and says error/invalid/...
GPUSLICE_WORD = re.compile(r"gpuslice", re.IGNORECASE)
ERROR_WORD = re.compile(r"\b(error|invalid|cannot parse|could not parse|malformed|unrecognized|"
                        r"bad value)\b", re.IGNORECASE)


def is_error_line(line):
    return bool(GPUSLICE_WORD.search(line) and ERROR_WORD.search(line))



# ----------------------------------------------------------------------------- running

class Run(gpucommon.Run):
    def __init__(self, name):
        super().__init__(name)
        self.multi = {}
        self.why = ""
        self.watch = None  # dict from nvml_watch, or None
        self.watch_error = ""


def parse_kv(text):
    return gpucommon.parse_kv(text, skip=("PROBE ", "SUMMARY "))


def env_for(shim, limit=None, extra=None):
    env = gpucommon.env_for(shim)
    if limit is not None:
        env["GPUSLICE_MEMORY_LIMIT"] = limit
    if extra:
        env.update(extra)
    return env


def start_watcher(name):
    """Start nvml_watch.py (not under the shim) and wait until it is ready.
    Returns (proc, pidfile, outfile, errfile), or a string saying why it did not start."""
    pidfile = os.path.join(C.runs_dir, name + ".pid")
    outfile = os.path.join(C.runs_dir, name + ".nvml")
    ready = os.path.join(C.runs_dir, name + ".nvml.ready")
    errfile = os.path.join(C.runs_dir, name + ".nvml.err")
    for p in (pidfile, outfile, ready):
        if os.path.exists(p):
            os.unlink(p)
    with open(errfile, "w") as ef:
        proc = subprocess.Popen([PY, os.path.join(HERE, "nvml_watch.py"), pidfile, outfile,
                                 "--interval-ms", "20", "--ready", ready, "--max-s", "600"],
                                env=env_for(False), stdout=subprocess.DEVNULL, stderr=ef)
    t_end = time.time() + 20
    while time.time() < t_end:
        if os.path.exists(ready):
            return proc, pidfile, outfile, errfile
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    with open(errfile) as f:
        err = f.read().strip().splitlines()
    return "nvml_watch did not start: " + (err[-1] if err else f"rc={proc.returncode}")


def stop_watcher(proc, outfile, errfile):
    try:
        proc.wait(timeout=5)  # it stops by itself once the target has exited
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not os.path.exists(outfile):
        with open(errfile) as f:
            err = f.read().strip().splitlines()
        return None, "nvml_watch wrote no result: " + (err[-1] if err else f"rc={proc.returncode}")
    with open(outfile) as f:
        kv, _ = parse_kv("\n".join(l for l in f.read().splitlines() if not l.startswith("pid=")))
    with open(outfile) as f:
        log("  nvml_watch:\n" + "\n".join("    " + l for l in f.read().splitlines()))
    return kv, ""


def run(name, argv, env, timeout, expect_rc=(0,), watch=False, min_needed=5.0):
    """Run one program; stdout/stderr go to files, a summary to the log."""
    r = Run(name)
    b = budget(r, timeout, min_needed)
    if b is None:
        r.why = "time budget spent"
        return r
    timeout, capped = b
    log_cmd(name, argv, env)
    w = None
    if watch:
        w = start_watcher(name)
        if isinstance(w, str):
            r.watch_error = w
            log("  " + w)
            w = None
    t0 = time.time()
    p, out_path, err_path = spawn(name, argv, env)
    if p is not None and w is not None:
        tmp = w[1] + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{p.pid}\n")
        os.replace(tmp, w[1])
    rc = wait_proc(p, r, timeout)
    r.secs = time.time() - t0
    if w is not None:
        r.watch, r.watch_error = stop_watcher(w[0], w[2], w[3])
    unexpected = settle(r, rc, out_path, err_path, env, capped, expect_rc)
    r.kv, r.multi = parse_kv(r.stdout)
    log(f"  result: {r.status()} in {r.secs:.1f}s" + ("  ** UNEXPECTED **" if unexpected else ""))
    log("  --- stdout")
    log(clip_lines(r.stdout, 200, 200))
    log("  --- stderr")
    log(clip_lines(r.stderr, 60, 120))
    return r


def run_problem(r):
    """Why a run cannot be judged, or ''."""
    if r.skipped:
        return "skipped: time budget spent"
    if r.cut:
        return "cut short by the time budget"
    if r.crashed:
        return f"program {r.status()}"
    if r.preload_failed:
        return "LD_PRELOAD of the shim failed"
    return ""


# ----------------------------------------------------------------------------- checks

def nvml_figure(r):
    """(max MiB used by the run's process per NVML, how it was found) or (None, why)."""
    if r.watch is None:
        return None, r.watch_error or "no NVML data"
    w = r.watch
    try:
        if w.get("target_seen") == "1":
            return float(w["target_max_used_mib"]), "pid"
        new = float(w.get("new_max_used_mib", "-1"))
    except ValueError:
        return None, "unparsable nvml_watch output"
    if new >= 0:
        return new, "new pid (pid namespace differs?)"
    return None, f"process never seen by NVML ({w.get('samples', '?')} samples)"


def check_nvml(cid, label, r):
    if r.skipped:
        record(cid, f"NVML max during {label}", False, "-", "skipped: time budget spent")
        return
    mib, how = nvml_figure(r)
    bound = LIMIT_MIB * NVML_SLACK
    if mib is None:
        record(cid, f"NVML max during {label}", False, "-", how)
        return
    note = "" if how == "pid" else how
    record(cid, f"NVML max during {label}", 0 < mib <= bound,
           f"max_used={mib:.0f}MiB <= {bound:.0f}", note)


def check_memfill_quota():
    prog = have("memfill")
    if not prog:
        record("1", "memfill under 4GiB quota", False, "-", "memfill not built")
        record("3a", "NVML max during memfill", False, "-", "memfill not built")
        return
    r = run("memfill_quota", [prog, "50", "0"], env_for(True, LIMIT), 90, watch=True)
    prob = run_problem(r)
    total = r.num("total_mib")
    used0 = r.num("used_before_mib")
    alloc = r.num("allocated_mib")
    chunks = r.num("chunks")
    refill = r.num("refill_chunks")
    err = r.get("alloc_error", "-")
    realloc = r.get("realloc_ok", "-")
    ssum = (alloc + used0) if alloc is not None and used0 is not None else None
    figs = (f"total={total:.0f} used0={used0:.0f} alloc={alloc:.0f} sum={ssum:.0f} err={err} "
            f"realloc={realloc} refill={refill:.0f}/{chunks:.0f}"
            if None not in (total, used0, alloc, chunks, refill) else
            f"{r.status()} init_error={r.get('init_error', '-')}")
    if prob:
        record("1", "memfill under 4GiB quota", False, figs, prob)
    else:
        reasons = []
        if total != LIMIT_MIB:
            reasons.append("total_mib != 4096")
        if err != "cudaErrorMemoryAllocation":
            reasons.append(f"stopped with {err}")
        if ssum is None or ssum > LIMIT_MIB:
            reasons.append("allocated + context reserve > 4096 MiB")
        if alloc is None or alloc < LIMIT_MIB / 2:
            reasons.append("less than half the quota allocatable")
        if realloc != "1":
            reasons.append("re-allocation after free failed")
        if refill is None or chunks is None or refill < chunks - 1:
            reasons.append("refill after free fell short (frees not credited?)")
        if r.get("preloaded_gpuslice") != "1":
            reasons.append("shim not loaded")
        record("1", "memfill under 4GiB quota", not reasons, figs, "; ".join(reasons))
    check_nvml("3a", "memfill", r)


TORCH_MODES = [
    ("default", {}, "native"),
    ("expandable", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "native"),
    ("async", {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}, "cudaMallocAsync"),
]


def check_torch_quota():
    for i, (mode, extra, backend) in enumerate(TORCH_MODES):
        cid = f"2{'abc'[i]}"
        nid = f"3{'bcd'[i]}"
        r = run(f"torch_quota_{mode}", [PY, os.path.join(HERE, "torch_quota.py"), mode,
                                        "--sleep-ms", "30"],
                env_for(True, LIMIT, extra), 180, watch=True, min_needed=30)
        prob = run_problem(r)
        total = r.num("mem_get_info_total_mib")
        n = r.num("tensors")
        refill = r.num("refill_tensors")
        capline = r.get("oom_capacity_line", "") or r.get("oom_message_first_line", "")
        figs = (f"total={total:.0f} tensors={n:.0f} held={n * 256:.0f} oom={r.get('oom')} "
                f"4.00GiB_in_msg={r.get('oom_mentions_4gib', '0')} realloc={r.get('realloc_ok')} "
                f"refill={refill:.0f}/{n:.0f}"
                if None not in (total, n, refill) else r.status())
        if prob:
            record(cid, f"torch {mode} allocator, 4GiB", False, figs, prob)
        else:
            reasons = []
            if total is None or abs(total - LIMIT_MIB) > 0.5:
                reasons.append("mem_get_info total != 4096 MiB")
            if r.get("oom") != "1":
                reasons.append("no OutOfMemoryError")
            if r.get("oom_mentions_4gib") != "1":
                reasons.append("OOM message does not mention 4.00 GiB")
            if n is None or n < 8:
                reasons.append("fewer than 8 tensors (2 GiB) fitted")
            if r.get("realloc_ok") != "1":
                reasons.append("allocation after free failed")
            if refill is None or n is None or refill < n - 1:
                reasons.append("refill after free fell short (frees not credited?)")
            if r.get("allocator_backend") != backend:
                reasons.append(f"allocator backend {r.get('allocator_backend')} != {backend}")
            if r.get("preloaded_gpuslice") != "1":
                reasons.append("shim not loaded")
            note = "; ".join(reasons) or f"msg: {capline[:90]}"
            record(cid, f"torch {mode} allocator, 4GiB", not reasons, figs, note)
        check_nvml(nid, f"torch {mode}", r)


def check_memfill_nolimit():
    prog = have("memfill")
    if not prog:
        record("4a", "memfill, no limit: same with/without shim", False, "-", "memfill not built")
        return
    a = run("memfill_nolimit_noshim", [prog, "0", "16"], env_for(False), 60)
    b = run("memfill_nolimit_shim", [prog, "0", "16"], env_for(True), 60)
    prob = run_problem(a) or run_problem(b)
    figs = (f"total={a.get('total_mib')}/{b.get('total_mib')} free={a.get('free_mib')}/"
            f"{b.get('free_mib')} chunks={a.get('chunks')}/{b.get('chunks')} "
            f"realloc={a.get('realloc_ok')}/{b.get('realloc_ok')} (no shim/shim)")
    if prob:
        record("4a", "memfill, no limit: same with/without shim", False, figs, prob)
        return
    reasons = []
    for key in ("total_mib", "chunks", "allocated_mib", "stop_reason", "alloc_error",
                "realloc_ok", "refill_chunks", "free_errors", "final_sync"):
        if a.get(key) != b.get(key):
            reasons.append(f"{key}: {a.get(key)} vs {b.get(key)}")
    if a.get("chunks") != "16" or a.get("realloc_ok") != "1":
        reasons.append("reference run did not get 16 chunks + realloc")
    fa, fb = a.num("free_mib"), b.num("free_mib")
    if fa is None or fb is None or abs(fa - fb) > 256:
        reasons.append("free_mib differs by more than 256 MiB")
    if b.get("preloaded_gpuslice") != "1":
        reasons.append("shim not loaded")
    record("4a", "memfill, no limit: same with/without shim", not reasons, figs,
           "; ".join(reasons))


def parse_probe(text):
    rows, extra = {}, {}
    for line in text.splitlines():
        tok = line.split()
        if tok and tok[0] == "PROBE" and "->" in tok:
            kv = dict(t.split("=", 1) for t in tok[1:] if "=" in t)
            kv["match"] = tok[tok.index("->") + 1]
            rows[(kv.get("via"), kv.get("base"), kv.get("ver"), kv.get("flags"))] = kv
        elif tok and tok[0] in ("gpa_v2", "gpa12000", "cuInit"):
            extra[tok[0]] = dict(t.split("=", 1) for t in tok[1:] if "=" in t)
    return rows, extra


PROBE_CHECK = "cuGetProcAddress probe, same answers + hooks"


def check_probe():
    prog = have("procaddr_probe")
    if not prog:
        record("4b", PROBE_CHECK, False, "-", "procaddr_probe not built")
        return
    a = run("probe_noshim", [prog], env_for(False), 60)
    b = run("probe_shim", [prog], env_for(True), 60)
    prob = run_problem(a) or run_problem(b)
    if prob:
        record("4b", PROBE_CHECK, False, f"{a.status()}/{b.status()}", prob)
        return
    ra, xa = parse_probe(a.stdout)
    rb, xb = parse_probe(b.stdout)
    diffs = []
    for key in sorted(set(ra) | set(rb)):
        pa, pb = ra.get(key), rb.get(key)
        if pa is None or pb is None:
            diffs.append(f"{' '.join(key)}: only in {'shim' if pa is None else 'no-shim'} run")
            continue
        fa = (pa.get("res"), pa.get("status"), pa["match"])
        fb = (pb.get("res"), pb.get("status"), pb["match"])
        if fa != fb:
            diffs.append(f"{' '.join(key)}: {'/'.join(fa)} vs {'/'.join(fb)}")
    unhooked = sorted({f"{k[1]}@{k[2]}/{k[3]}" for k, v in rb.items()
                       if k[1] in MUST_HOOK and v["match"] != "NULL" and v.get("in_shim") != "1"})
    nomatch = sum(1 for v in ra.values() if v["match"] == "NOMATCH")
    found = sum(1 for v in ra.values() if v["match"] != "NULL")
    in_shim = sum(1 for v in rb.values() if v.get("in_shim") == "1")
    gpa_in_shim = xb.get("gpa_v2", {}).get("in_shim", "?")
    gpa2_in_shim = xb.get("gpa12000", {}).get("in_shim", "?")
    log("  probe differences (no shim vs shim; res/status/match):")
    for d in diffs:
        log("    " + d)
    log("  must-hook lookups not answered by the shim: " + (", ".join(unhooked) or "none"))
    reasons = []
    if not ra:
        reasons.append("no PROBE lines")
    if diffs:
        reasons.append(f"{len(diffs)} answers differ, e.g. {diffs[0]}")
    if unhooked:
        reasons.append(f"{len(unhooked)} must-hook answers not the shim's, e.g. {unhooked[0]}")
    if gpa_in_shim != "1" or gpa2_in_shim != "1":
        reasons.append("cuGetProcAddress(_v2) not the shim's")
    figs = (f"lookups={len(ra)} found={found} nomatch_noshim={nomatch} diffs={len(diffs)} "
            f"in_shim={in_shim} unhooked={len(unhooked)} gpa_in_shim={gpa_in_shim}/{gpa2_in_shim}")
    record("4b", PROBE_CHECK, not reasons, figs,
           "; ".join(reasons))


def check_models():
    script = os.path.join(HERE, "torch_models.py")
    fa = os.path.join(C.runs_dir, "models_noshim.pt")
    fb = os.path.join(C.runs_dir, "models_shim.pt")
    for f in (fa, fb):
        if os.path.exists(f):
            os.unlink(f)
    a = run("models_noshim", [PY, script, "run", fa], env_for(False), 240, min_needed=40)
    b = run("models_shim", [PY, script, "run", fb], env_for(True), 240, min_needed=40)
    prob = run_problem(a) or run_problem(b)
    figs = (f"matmul_ok={a.get('matmul_ok')}/{b.get('matmul_ok')} "
            f"resnet_ok={a.get('resnet_ok')}/{b.get('resnet_ok')} "
            f"resnet_rel_vs_cpu={a.get('resnet_max_rel_diff_vs_cpu')}/"
            f"{b.get('resnet_max_rel_diff_vs_cpu')}")
    if prob:
        record("4c", "matmul + ResNet-50, same with/without shim", False, figs, prob)
        return
    c = run("models_compare", [PY, script, "compare", fa, fb], env_for(False), 60, min_needed=10)
    reasons = []
    if a.get("matmul_ok") != "1" or b.get("matmul_ok") != "1":
        reasons.append("matmul wrong")
    if a.get("resnet_ok") != "1" or b.get("resnet_ok") != "1":
        reasons.append("ResNet-50 logits wrong")
    if run_problem(c) or c.get("same_outputs") != "1":
        reasons.append("outputs differ with the shim: " + (run_problem(c) or
                       f"matmul {c.get('max_abs_diff_matmul')}, logits "
                       f"{c.get('max_abs_diff_logits')}"))
    if b.get("preloaded_gpuslice") != "1":
        reasons.append("shim not loaded")
    figs += (f" same={c.get('same_outputs')} bitwise={c.get('bitwise_equal_matmul')}/"
             f"{c.get('bitwise_equal_logits')}")
    record("4c", "matmul + ResNet-50, same with/without shim", not reasons, figs,
           "; ".join(reasons))


def check_bad_value():
    prog = have("memfill")
    if not prog:
        record("6", "bad GPUSLICE_MEMORY_LIMIT", False, "-", "memfill not built")
        return
    r = run("bad_limit", [prog, "0", "1"], env_for(True, BAD_LIMIT), 60, expect_rc=None)
    err_lines = [l.strip() for l in r.stderr.splitlines() if is_error_line(l)]
    first_call = r.get("init_error", "none")
    figs = f"{r.status()} first_call={first_call}"
    reasons = []
    if r.skipped:
        reasons.append("skipped: time budget spent")
    else:
        if r.timed_out or (r.rc is not None and r.rc < 0):
            reasons.append(f"crashed: {r.status()}")  # run() has counted it as a crash
        if not err_lines:
            reasons.append("no gpuslice error line on stderr")
        if "chunks" in r.kv:
            reasons.append("memfill went on to allocate")
        elif first_call == "none" and r.rc == 0:
            reasons.append("no CUDA call failed")
        if r.preload_failed:
            reasons.append("LD_PRELOAD of the shim failed")
    note = "; ".join(reasons) or (f"stderr: {err_lines[0][:100]}" if err_lines else "")
    record("6", f"bad GPUSLICE_MEMORY_LIMIT={BAD_LIMIT!r}", not reasons, figs, note)


def check_bench():
    prog = have("bench")
    if not prog:
        record("5a", "empty launch overhead", False, "-", "bench not built")
        record("5b", "64 MiB malloc+free overhead", False, "-", "bench not built")
        return
    configs = [("noshim", env_for(False)), ("shim", env_for(True)),
               ("shim4g", env_for(True, LIMIT))]
    runs = {name: [] for name, _ in configs}
    bad = []
    rounds_wanted, rounds_min = 16, 2
    rounds_done = 0
    per_round = None
    # One short unrecorded run first, so that clocks and caches are warm for the first real one.
    run("bench_warmup", [prog, "1", "20000", "20"], env_for(False), 60, min_needed=15)
    for rnd in range(rounds_wanted):
        if rnd >= rounds_min and per_round is not None and remaining() < per_round + 15:
            log(f"\n  bench: stopping after {rnd} rounds, {remaining():.0f}s left")
            break
        t0 = time.time()
        # ABC, CBA, ABC, ...: no configuration always runs first or last
        for name, env in (configs if rnd % 2 == 0 else configs[::-1]):
            r = run(f"bench_{name}_{rnd}", [prog], env, 120, min_needed=15)
            p = run_problem(r)
            if p:
                bad.append(f"{r.name}: {p}")
            elif not r.multi.get("launch_ns_run") or not r.multi.get("malloc_pair_us_run"):
                bad.append(f"{r.name}: no figures ({r.get('cuda_error', '?')})")
            elif r.get("preloaded_gpuslice") != ("0" if name == "noshim" else "1"):
                bad.append(f"{r.name}: preloaded_gpuslice={r.get('preloaded_gpuslice')}")
            else:
                runs[name].append(r)
        rounds_done += 1
        per_round = time.time() - t0

    def pooled(name, key):
        vals = [float(v) for r in runs[name] for v in r.multi.get(key, [])]
        return (statistics.median(vals), len(vals)) if vals else (None, 0)

    summary = {}
    for name, _ in configs:
        for key in ("launch_ns_run", "burst_ns_run", "malloc_pair_us_run"):
            summary[(name, key)] = pooled(name, key)
    log("\n  bench pooled medians (value, runs):")
    for (name, key), (v, n) in sorted(summary.items()):
        log(f"    {name:7s} {key:20s} {v} ({n})")
    for name, _ in configs:
        log(f"    {name}: per-invocation launch medians "
            + ", ".join(r.get("launch_ns_median", "?") for r in runs[name])
            + "; malloc medians " + ", ".join(r.get("malloc_pair_us_median", "?") for r in runs[name]))

    enough = all(len(runs[n]) >= 2 for n, _ in configs)
    note_base = "; ".join(bad[:2])
    if not enough:
        note_base = (note_base + "; " if note_base else "") + "fewer than 2 good runs per config"

    # 5a launch
    base, _ = summary[("noshim", "launch_ns_run")]
    bb, _ = summary[("noshim", "burst_ns_run")]
    parts, ok = [], enough and base is not None
    for name in ("shim", "shim4g"):
        v, _ = summary[(name, "launch_ns_run")]
        vb, _ = summary[(name, "burst_ns_run")]
        if v is None or base is None:
            ok = False
            parts.append(f"{name}=?")
            continue
        d = v - base
        ok = ok and d <= LAUNCH_NS_MAX_GROWTH
        parts.append(f"{name}={d:+.0f}")
        if vb is not None and bb is not None:
            parts.append(f"(burst {vb - bb:+.0f})")
    figs = (f"base={base:.0f}ns " if base is not None else "base=? ") + " ".join(parts) + \
        (f" burst_base={bb:.0f}ns" if bb is not None else "") + f" rounds={rounds_done}"
    record("5a", "empty launch: host ns growth <= 150", ok, figs, note_base)

    # 5b malloc. Each process lands in one of a few timing modes for its whole run (seen on the
    # H200: 82-91 us, ~105 us or 130-175 us per pair, with and without the shim alike), so a
    # pooled median says more about which mode the invocations drew than about the shim. The
    # shim's cost is fixed per call: judge on each configuration's fastest invocation over 16
    # rounds (the minimum is the estimator for a fixed overhead under one-sided noise); the mean
    # of the faster half and the pooled medians are shown in the log.
    def per_invocation(name):
        return sorted(float(r.get("malloc_pair_us_median")) for r in runs[name] if r.get("malloc_pair_us_median"))

    def best(name):
        vals = per_invocation(name)
        return vals[0] if vals else None

    for name, _ in configs:
        vals = per_invocation(name)
        if vals:
            fast = vals[:max(1, len(vals) // 2)]
            log(f"    {name}: malloc fastest {vals[0]:.2f} us, faster-half mean {sum(fast) / len(fast):.2f} us")
    base = best("noshim")
    parts, ok = [], enough and base is not None
    for name in ("shim", "shim4g"):
        v = best(name)
        if v is None or not base:
            ok = False
            parts.append(f"{name}=?")
            continue
        g = v / base - 1.0
        ok = ok and g <= MALLOC_MAX_GROWTH
        parts.append(f"{name}={g * 100:+.1f}%")
    figs = (f"fastest base={base:.1f}us " if base is not None else "base=? ") + " ".join(parts)
    record("5b", "64MiB malloc+free: growth <= 2%", ok, figs, note_base)


# ----------------------------------------------------------------------------- report

# Inherited variables that would change what a run does; removed from every run's environment.
SCRUB_PREFIXES = ("GPUSLICE_",)
SCRUB_NAMES = ("LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF")


def write_results_and_table():
    rows = gpucommon.sorted_results(
        ["1", "2a", "2b", "2c", "3a", "3b", "3c", "3d", "4a", "4b", "4c", "5a", "5b", "6"])
    with open(os.path.join(C.out, "results.tsv"), "w") as f:
        f.write("id\tcheck\tverdict\tfigures\tnote\n")
        for row in rows:
            f.write("\t".join(gpucommon.clean(x) for x in row) + "\n")
    lines = gpucommon.table_lines(rows, "gpuslice GPU acceptance " + time.strftime("%Y-%m-%d %H:%M:%S"))
    npass = sum(1 for r in rows if r[2] == "PASS")
    lines.append(f"{npass}/{len(rows)} PASS; {gpucommon.crashes_and_missing()}")
    gpucommon.emit(lines)


def main():
    args = gpucommon.arg_parser(465.0).parse_args()
    gpucommon.setup("harness", args, "runs", "acceptance.log")
    C.base_env = gpucommon.scrubbed_env(SCRUB_PREFIXES, SCRUB_NAMES)

    log(f"\n##### harness: lib={C.lib} build={C.build} out={C.out} python={PY} "
        f"time left={remaining():.0f}s")
    try:
        check_memfill_quota()
        check_bad_value()
        check_torch_quota()
        check_memfill_nolimit()
        check_probe()
        check_models()
        check_bench()
    except Exception as e:  # a harness bug must still leave a table behind
        gpucommon.harness_error(e)
    write_results_and_table()
    return gpucommon.exit_status()


if __name__ == "__main__":
    sys.exit(main())
