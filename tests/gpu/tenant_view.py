#!/usr/bin/env python3
"""The tenant's own view on the GPU (issue 15), run by tests/gpu/tenant_view.sh: what
`nvidia-smi` and pynvml print under the shim, against the slice.

  (a) GPUSLICE_MEMORY_LIMIT=4GiB, no controller: a PyTorch process holding 1 GiB; nvidia-smi
      and the pynvml script (tenant_nvml.py) started beside it with the same environment.
  (b) `gpuslice serve` with group `tenant` (6 GiB, --sm 30 in its config) holding two PyTorch
      processes running matmuls; nvidia-smi and the pynvml script started in the group.

PASS when: totals are 4096 / 6144 MiB; used is within 1 % of the group's figure in
`gpuslice ls --json` (in (a), where no controller keeps a ledger, of what the process itself
holds by torch.cuda.mem_get_info); exactly the group's processes are listed (in (a) a process
is its own slice, so nvidia-smi beside the worker lists nothing and shows 0 MiB used, and the
worker's own NVML lists itself); utilization within 5 points of the group's measured share
while it runs at 30 % (the group's charged device time in `ls --json`, read every 0.2 s, over
the same stretch of time as the NVML figures); torch.cuda.mem_get_info() and NVML in the same
process agree within 1 %. Also prints what plain nvidia-smi shows without the shim, and a
comparison table, then the results table last. Standard library only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1 << 20
GIB = 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))

A = None  # the arguments
LOGF = None
RESULTS = []  # (id, check, ok, figures)
COMPARE = {}  # column -> {row: text}
CHILDREN = []


def log(text=""):
    LOGF.write(text + "\n")
    LOGF.flush()


def record(cid, name, ok, figures):
    RESULTS.append((cid, name, "PASS" if ok else "FAIL", figures))
    log(f"== {cid} {name}: {'PASS' if ok else 'FAIL'} ({figures})")


def base_env():
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("GPUSLICE_") or k in ("LD_PRELOAD", "CUDA_VISIBLE_DEVICES"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, A.pythonpath, env.get("PYTHONPATH", "")]))
    env["GPUSLICE_SOCKET"] = A.socket if A.with_ctl else os.path.join(A.tmp, "no-controller.sock")
    if not A.with_ctl:
        # A socket in the environment means "use a controller" (issue 13's no-fail-open): case (a)
        # is the environment's own quota with no controller, which the process must be told.
        env["GPUSLICE_ON_NO_CONTROLLER"] = "alone"
        env["GPUSLICE_CONTROLLER_WAIT"] = "0"
    return env


def shim_env(**extra):
    env = base_env()
    env.update({"LD_PRELOAD": A.lib, "GPUSLICE_LOG": "info", "GPUSLICE_LOG_FILE": os.path.join(A.out, "tenant_view.shim.log")})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(argv, env, timeout=60):
    """(rc, stdout) of a program run to its end; its output goes into the log."""
    shown = " ".join(f"{k}={env[k]}" for k in ("LD_PRELOAD", "GPUSLICE_MEMORY_LIMIT", "GPUSLICE_GROUP") if k in env)
    log(f"$ {shown} {' '.join(argv)}")
    try:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"  failed: {e}")
        return -1, ""
    log("  " + p.stdout.rstrip().replace("\n", "\n  "))
    if p.stderr.strip():
        log("  stderr: " + p.stderr.rstrip().replace("\n", "\n  "))
    return p.returncode, p.stdout


def smi(args, env):
    return run(A.smi + args, env)


def show_plain(label, env):
    """Plain nvidia-smi, into the log and onto stdout (for the README's comparison)."""
    rc, out = smi([], env)
    print(f"--- plain nvidia-smi, {label} (rc {rc}):\n{out.rstrip()}", flush=True)


def csv_rows(text):
    """nvidia-smi's CSV without its header, units stripped: [[str, ...], ...]."""
    rows = []
    for line in text.strip().splitlines()[1:]:
        cells = [c.strip() for c in line.split(",")]
        rows.append([c.split()[0] if c and c.split() else c for c in cells])
    return rows


def query_gpu(env):
    """(total MiB, used MiB, utilization %) of device 0 as nvidia-smi prints them."""
    rc, out = smi(["--query-gpu=memory.total,memory.used,utilization.gpu", "--format=csv"], env)
    rows = csv_rows(out) if rc == 0 else []
    try:
        return tuple(int(x) for x in rows[0][:3])
    except (IndexError, ValueError):
        return None


def query_apps(env):
    """{pid: used MiB} as nvidia-smi's compute-apps query prints it."""
    rc, out = smi(["--query-compute-apps=pid,used_memory", "--format=csv"], env)
    apps = {}
    for row in csv_rows(out) if rc == 0 else []:
        try:
            apps[int(row[0])] = int(row[1])
        except (IndexError, ValueError):
            pass
    return apps


def probe(env, samples=1, interval=1.0):
    """The pynvml script's samples (tenant_nvml.py --json)."""
    rc, out = run([sys.executable, os.path.join(HERE, "tenant_nvml.py"), "--json", "--samples", str(samples),
                   "--interval-s", str(interval)], env, timeout=30 + samples * interval)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")] if rc == 0 else []


def worker(name, env, mib, busy):
    ready = os.path.join(A.tmp, f"{name}.ready")
    argv = [sys.executable, os.path.join(HERE, "tenant_worker.py"), "--mib", str(mib), "--ready", ready,
            "--stop", os.path.join(A.tmp, "stop"), "--max-s", "200"] + (["--busy"] if busy else [])
    log(f"$ ({name}) {' '.join(argv)}")
    out = open(os.path.join(A.out, f"tenant_view.{name}.out"), "w")
    p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    CHILDREN.append(p)
    return p, ready


def wait_ready(p, ready, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(ready):
            with open(ready) as f:
                r = json.load(f)
            log(f"  ready: {json.dumps(r)}")
            return r
        if p.poll() is not None:
            log(f"  worker exited rc={p.returncode} before it was ready")
            return None
        time.sleep(0.1)
    log("  worker not ready in time")
    return None


def within(a, b, frac):
    return a is not None and b is not None and abs(a - b) <= frac * max(abs(b), 1)


def in_process(cid, label, r):
    """torch.cuda.mem_get_info() and NVML in one process agree within 1 % (of the total)."""
    if not r:
        record(cid, f"{label}: torch.cuda.mem_get_info and NVML agree (1 %)", False, "no report")
        return
    nv = r["nvml"]
    total_ok = within(nv["total"], r["cuda_total"], 0.01)
    free_ok = abs(nv["free"] - r["cuda_free"]) <= 0.01 * r["cuda_total"]
    record(cid, f"{label}: torch.cuda.mem_get_info and NVML agree (1 %)", total_ok and free_ok,
           f"torch total {r['cuda_total'] // MIB} free {r['cuda_free'] // MIB} MiB; "
           f"NVML total {nv['total'] // MIB} free {nv['free'] // MIB} used {nv['used'] // MIB} MiB")


def stop_workers():
    open(os.path.join(A.tmp, "stop"), "w").close()
    for p in CHILDREN:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    CHILDREN.clear()
    os.unlink(os.path.join(A.tmp, "stop"))


def baseline():
    env = base_env()
    show_plain("without the shim", env)
    q = query_gpu(env)
    apps = query_apps(env)
    COMPARE["no shim, idle"] = {"memory.total": f"{q[0]} MiB" if q else "?", "memory.used": f"{q[1]} MiB" if q else "?",
                          "utilization.gpu": f"{q[2]} %" if q else "?", "compute apps": str(len(apps))}


def case_env():
    limit = 4 * GIB
    env = shim_env(GPUSLICE_MEMORY_LIMIT="4GiB")
    p, ready = worker("env", env, 1024, busy=False)
    r = wait_ready(p, ready)
    show_plain("under the shim, GPUSLICE_MEMORY_LIMIT=4GiB, beside a worker holding 1 GiB", env)
    q = query_gpu(env)
    apps = query_apps(env)
    samples = probe(env)
    s = samples[0] if samples else None
    record("a1", "4 GiB in the environment: nvidia-smi and pynvml total 4096 MiB",
           q is not None and q[0] == 4096 and s is not None and s["total"] == limit,
           f"nvidia-smi {q[0] if q else '?'} MiB, pynvml {s['total'] // MIB if s else '?'} MiB")
    # Alone (no controller), a process is its own slice: the one beside the worker holds nothing.
    record("a2", "4 GiB env: nvidia-smi/pynvml beside the worker show their own slice (0 used, no process)",
           q is not None and q[1] == 0 and not apps and s is not None and s["used"] == 0 and not s["processes"],
           f"nvidia-smi used {q[1] if q else '?'} MiB, apps {sorted(apps)}; pynvml used {s['used'] if s else '?'} B, "
           f"processes {s['processes'] if s else '?'}")
    if r:
        nv = r["nvml"]
        held = r["cuda_total"] - r["cuda_free"]
        pids = [pid for pid, _ in nv["processes"]]
        record("a3", "4 GiB env: the worker's own NVML lists itself, used within 1 % of what it holds",
               pids == [r["pid"]] and within(nv["used"], held, 0.01) and nv["total"] == limit,
               f"listed {pids} (pid {r['pid']}), NVML used {nv['used'] // MIB} MiB, held {held // MIB} MiB, total {nv['total'] // MIB} MiB")
    else:
        record("a3", "4 GiB env: the worker's own NVML lists itself", False, "worker failed")
    in_process("a4", "4 GiB env", r)
    COMPARE["shim, 4 GiB env"] = {"memory.total": f"{q[0]} MiB" if q else "?", "memory.used": f"{q[1]} MiB" if q else "?",
                                  "utilization.gpu": f"{q[2]} %" if q else "?", "compute apps": str(len(apps))}
    stop_workers()


def ls_group():
    """(group row's device-0 entry, member pids) of group `tenant` in `gpuslice ls --json`."""
    rc, out = run([A.bin, "ls", "--json", "--socket", A.socket], base_env(), timeout=15)
    try:
        g = next(g for g in json.loads(out)["groups"] if g["name"] == "tenant")
        d = next(d for d in g["devices"] if d["device"] == 0) if g["devices"] else None
        return d, g.get("members", [])
    except (ValueError, KeyError, StopIteration):
        return None, []


def charged_reading():
    """(CLOCK_MONOTONIC s, the group's charged device time in ns) from `ls --json`, quietly."""
    t = time.monotonic()
    p = subprocess.run([A.bin, "ls", "--json", "--socket", A.socket], env=base_env(), capture_output=True, text=True, timeout=15)
    t = (t + time.monotonic()) / 2
    try:
        g = next(g for g in json.loads(p.stdout)["groups"] if g["name"] == "tenant")
        return t, int(next(d for d in g["devices"] if d["device"] == 0)["charged_ns"])
    except (ValueError, KeyError, StopIteration):
        return None


def charged_at(readings, t):
    """The group's charged ns at time t, interpolated between the readings around it."""
    before = [r for r in readings if r[0] <= t]
    after = [r for r in readings if r[0] >= t]
    if not before or not after:
        return None
    (t0, c0), (t1, c1) = before[-1], after[0]
    return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)


def share_between(readings, t0, t1):
    """The group's measured share of the device's time between t0 and t1, percent."""
    c0, c1 = charged_at(readings, t0), charged_at(readings, t1)
    return None if c0 is None or c1 is None or t1 <= t0 else (c1 - c0) / ((t1 - t0) * 1e9) * 100


def start_serve():
    cfg = os.path.join(A.tmp, "controller.toml")
    with open(cfg, "w") as f:
        f.write('[groups.tenant]\nmemory_limit = "6GiB"\nsm_share = 30\n')
    env = base_env()
    env["GPUSLICE_LOG"] = "info"
    argv = [A.bin, "serve", "--socket", A.socket, "--ledger", A.ledger, "--config", cfg]
    log(f"$ {' '.join(argv)}")
    err = open(os.path.join(A.out, "tenant_view.serve.log"), "w")
    p = subprocess.Popen(argv, env=env, stdout=err, stderr=subprocess.STDOUT)
    end = time.monotonic() + 15
    while time.monotonic() < end and p.poll() is None:
        if os.path.exists(A.socket) and subprocess.run([A.bin, "status", "--socket", A.socket], env=env,
                                                       capture_output=True, timeout=5).returncode == 0:
            return p
        time.sleep(0.05)
    log(f"gpuslice serve did not come up (rc {p.poll()})")
    p.kill()
    return None


def case_group():
    serve = start_serve()
    if not serve:
        record("b0", "gpuslice serve starts", False, "see tenant_view.serve.log")
        return
    try:
        group(serve)
    finally:
        stop_workers()
        serve.terminate()
        try:
            serve.wait(timeout=10)
        except subprocess.TimeoutExpired:
            serve.kill()


def group(serve):
    limit = 6 * GIB
    env = shim_env(GPUSLICE_GROUP="tenant")
    ws = [worker(f"group{i}", env, 1024, busy=True) for i in (1, 2)]
    # A process outside the group (no shim) on the same card, so that b3's "exactly the group's
    # processes" is a filter at work and not an empty card (nvidia-smi lists processes through
    # NVML's internal export table: shim/src/nvml/smi_table.rs).
    outsider, outsider_ready = worker("outsider", base_env(), 512, busy=False)
    wait_ready(outsider, outsider_ready)
    reports = [wait_ready(p, ready) for p, ready in ws]
    pids = sorted(p.pid for p, _ in ws)
    time.sleep(3)  # the throttled load settles; the controller samples achieved shares every second
    show_plain("under the shim, in group tenant (6 GiB, 30 %) with its two workers", env)
    d_before, _ = ls_group()
    around_smi = [charged_reading()]
    q = query_gpu(env)
    around_smi.append(charged_reading())
    apps = query_apps(env)
    d_after, members = ls_group()
    ledger_used = d_after["used"] if d_after else None
    record("b1", "group of 6 GiB: nvidia-smi total 6144 MiB", q is not None and q[0] == 6144, f"{q[0] if q else '?'} MiB")
    record("b2", "group: nvidia-smi used within 1 % of the group's ledger figure",
           q is not None and ledger_used is not None and within(q[1] * MIB, ledger_used, 0.01),
           f"nvidia-smi {q[1] if q else '?'} MiB, ledger {ledger_used // MIB if ledger_used else '?'} MiB "
           f"(before {d_before['used'] // MIB if d_before else '?'} MiB)")
    record("b3", "group: nvidia-smi lists exactly the group's two processes", sorted(apps) == pids,
           f"listed {sorted(apps)} ({', '.join(f'{v} MiB' for v in apps.values())}), group workers {pids}, ls members {members}")

    # The pynvml script: 6 samples a second apart; the group's charged device time from
    # `ls --json` every 0.2 s meanwhile, so that both are judged over the same stretch of time.
    probe_argv = [sys.executable, os.path.join(HERE, "tenant_nvml.py"), "--json", "--samples", "6", "--interval-s", "1"]
    log(f"$ (pynvml, group) {' '.join(probe_argv)}")
    pr = subprocess.Popen(probe_argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    readings, shares = [], []
    last_ls = 0.0
    while pr.poll() is None:
        r = charged_reading()
        if r:
            readings.append(r)
        if time.monotonic() - last_ls >= 1.0:
            last_ls = time.monotonic()
            d, _ = ls_group()
            if d and d.get("achieved_share") is not None:
                shares.append(float(d["achieved_share"]))
        time.sleep(0.2)
    r = charged_reading()
    if r:
        readings.append(r)
    out, err = pr.communicate()
    log("  " + out.rstrip().replace("\n", "\n  ") + (f"\n  stderr: {err.strip()}" if err.strip() else ""))
    samples = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    d_end, _ = ls_group()
    s = samples[-1] if samples else None
    record("b4", "group: pynvml total 6 GiB, used within 1 % of the ledger, exactly the group's processes",
           s is not None and d_end is not None and s["total"] == limit and within(s["used"], d_end["used"], 0.01)
           and sorted(p for p, _ in s["processes"]) == pids,
           f"total {s['total'] // MIB if s else '?'} MiB, used {s['used'] // MIB if s else '?'} MiB vs ledger "
           f"{d_end['used'] // MIB if d_end else '?'} MiB, listed {sorted(p for p, _ in s['processes']) if s else '?'}")
    # Sample k (k >= 1) covers the time since sample k-1: their mean covers the first to the last.
    utils = [x["util_gpu"] for x in samples[1:]]
    mean_util = sum(utils) / len(utils) if utils else None
    measured = share_between(readings, samples[0]["mono"], samples[-1]["mono"]) if len(samples) > 1 else None
    fmt = lambda v: "?" if v is None else f"{v:.1f}"  # noqa: E731
    record("b5", "group at 30 %: pynvml utilization within 5 points of the group's measured share",
           mean_util is not None and measured is not None and abs(mean_util - measured) <= 5,
           f"NVML {utils} mean {fmt(mean_util)} %; the group's charged time over the same {fmt(samples[-1]['mono'] - samples[0]['mono'] if samples else None)} s: "
           f"{fmt(measured)} %; ls achieved_share meanwhile {[round(x, 1) for x in shares]}")
    smi_share = share_between([x for x in around_smi if x], around_smi[0][0], around_smi[1][0]) if all(around_smi) else None
    record("b6", "group at 30 %: nvidia-smi utilization.gpu within 5 points of the group's measured share",
           q is not None and smi_share is not None and abs(q[2] - smi_share) <= 5,
           f"nvidia-smi {q[2] if q else '?'} % (its 1 s period), the group's charged time around the call {fmt(smi_share)} %")
    for i, r in enumerate(reports, 1):
        in_process(f"b{6 + i}", f"group worker {i}", r)
    # The same queries without the shim meanwhile: the card, as a tenant sees it without gpuslice.
    q0, apps0 = query_gpu(base_env()), query_apps(base_env())
    COMPARE["no shim, during (b)"] = {"memory.total": f"{q0[0]} MiB" if q0 else "?", "memory.used": f"{q0[1]} MiB" if q0 else "?",
                                      "utilization.gpu": f"{q0[2]} %" if q0 else "?", "compute apps": str(len(apps0))}
    COMPARE["shim, group of 6 GiB at 30 %"] = {
        "memory.total": f"{q[0]} MiB" if q else "?", "memory.used": f"{q[1]} MiB" if q else "?",
        "utilization.gpu": f"{q[2]} %" if q else "?", "compute apps": str(len(apps))}


def tables():
    cols = list(COMPARE)
    rows = ["memory.total", "memory.used", "utilization.gpu", "compute apps"]
    lines = ["", "nvidia-smi --query-gpu / --query-compute-apps, device 0:",
             "| field | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + r + " | " + " | ".join(COMPARE[c].get(r, "?") for c in cols) + " |" for r in rows]
    lines += ["", "tenant view (issue 15):", "| id | check | result | figures |", "|---|---|---|---|"]
    lines += [f"| {cid} | {name} | {res} | {fig} |" for cid, name, res, fig in RESULTS]
    passed = sum(1 for r in RESULTS if r[2] == "PASS")
    lines.append(f"tenant view: {passed}/{len(RESULTS)} PASS in {time.monotonic() - A.t0:.0f} s")
    text = "\n".join(lines)
    log(text)
    print(text, flush=True)


def main():
    global A, LOGF
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--ledger", required=True)
    ap.add_argument("--smi", default="nvidia-smi", help="the nvidia-smi command, split on spaces")
    ap.add_argument("--pythonpath", default="")
    A = ap.parse_args()
    A.t0 = time.monotonic()
    A.smi = A.smi.split()
    A.socket = os.path.join(A.tmp, "gpuslice.sock")
    LOGF = open(os.path.join(A.out, "tenant_view.log"), "a")
    try:
        A.with_ctl = False
        baseline()
        case_env()
        A.with_ctl = True
        case_group()
    finally:
        for p in CHILDREN:
            p.kill()
        tables()
    return 0 if RESULTS and all(r[2] == "PASS" for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
