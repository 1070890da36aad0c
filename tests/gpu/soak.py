#!/usr/bin/env python3
"""gpuslice soak (issue 6, `make gpu-soak`). Started by tests/gpu/soak.sh; see the section
"Soak (make gpu-soak)" in tests/gpu/README.md for what is checked and how.

    soak.py --lib ABS_libgpuslice.so --bin ABS_gpuslice --build BUILD_DIR --out OUT_DIR
            --socket PATH --ledger PATH [--t0 EPOCH] [--budget-s 590] [--soak-s 540]
            [--kill-every-s 30] [--seed 1] [--shim-log info] [--ctl-log info]
            [--dry-run --stub-dir DIR]

Four workloads (two soakload.cu, two soak_torch.py) run under `gpuslice serve`, each in a group
of its own with a memory quota, some with an SM share and a priority, from the config file this
script writes. Every --kill-every-s one of them is killed with SIGKILL (seeded order) and started
again; half-way between kills all of them pause (a pause file) and the ledger is compared with
what each one says it holds; a thread samples NVML's per-process memory every 100 ms. At the end
(--soak-s after all were ready, or earlier when the time budget says so) a last comparison, then
SIGTERM to all and a look at what the ledger has left.

--dry-run: the same orchestration on the simulated driver (no GPU): soakload.cu is replaced by
DIR/soakload_stub.py and torch by the stand-in in DIR (both on tests/simcuda through ctypes), with
smaller quotas; the environment must point LD_LIBRARY_PATH and SIMCUDA_STATE at the simulator.

Standard library only (the children need torch; pynvml is used when present, else ctypes).
Writes OUT_DIR/soak.log (appends) and OUT_DIR/soak.tsv; prints the results table last.
Exit status: 0 when every program behaved (whatever the verdicts), 1 when a program crashed
(a workload ended by itself, the controller died), 2 when something needed was missing.
Every child carries GPUTEST_SOAK_TOKEN (inherited from soak.sh); whatever still carries it at
the end is killed by pid.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import gpucommon
from gpucommon import C, HERE, PY, clip_lines, log, log_cmd, record, remaining
from gpucommon import Stopped, dev0, num, on_signal
import soaknvml

MIB = 1 << 20
GIB = 1 << 30
TOKEN_VAR = "GPUTEST_SOAK_TOKEN"
SCRUB_PREFIXES = ("GPUSLICE_", "CUDA_DEVICE_MEMORY_LIMIT", "CUDA_MPS_")
SCRUB_NAMES = ("LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_SM_LIMIT",
               "CUDA_LAUNCH_BLOCKING")

NVML_SLACK = 1.01          # NVML per-process memory may exceed the quota by 1%
NVML_INTERVAL_S = 0.1
HB_MS = 500                # workloads' heartbeat period
HANG_S = 10.0              # no heartbeat for this long (while alive and ready) = hang
START_TIMEOUT_S = 120.0    # spawn -> ready, else a hang ("never ready")
CHECK_EVERY_S = 2.0        # gpuslice status + ls --json
STATUS_MAX_S = 1.0         # the controller answers status within this
GONE_MAX_S = 1.0           # a killed process's slot and bytes gone from the ledger within this
GONE_POLL_S = 3.0          # how long to keep looking
QUIET_TIMEOUT_S = 10.0     # every ready workload says quiet within this after the pause file
STOP_TIMEOUT_S = 20.0      # SIGTERM -> exit
END_RESERVE_S = 20.0       # kept for the end (last comparison, stopping, the table: ~5 s)
RESPAWN_DELAY_S = 2.0      # after a crash, before starting the workload again
GIVE_UP_CRASHES = 5        # crashes in a row without getting ready: stop restarting it


class ControllerDied(Exception):
    pass


def mib(b):
    return "?" if b is None else f"{b / MIB:.0f}MiB"


def gib_txt(b):
    return f"{b / GIB:g}GiB"


def now():
    return time.monotonic()


def bounded(secs):
    """secs, or less when the time budget has less left (at least 0.5 s)."""
    return max(0.5, min(secs, remaining() - 3.0))


def rel(t):
    """Seconds since the soak phase began (negative before it)."""
    return t - C.soak_t0 if C.soak_t0 else 0.0


# ----------------------------------------------------------------------------- workloads

class Workload:
    """One of the four: its group in the config, and how to start an instance of it."""

    def __init__(self, key, kind, quota, priority, share, argv_tail, what):
        self.key = key
        self.kind = kind            # "cuda" or "torch"
        self.group = f"soak_{key}"
        self.quota = quota          # bytes
        self.priority = priority    # "high" / "normal" / "low"
        self.share = share          # percent or None
        self.argv_tail = argv_tail  # options after the program
        self.what = what

    def argv(self, seed):
        if self.kind == "cuda":
            prog = ([PY, os.path.join(C.stub_dir, "soakload_stub.py")] if C.dry_run
                    else [os.path.join(C.build, "soakload")])
            return prog + ["--seed", str(seed)] + self.common_opts() + self.argv_tail
        mode, rest = self.argv_tail[0], self.argv_tail[1:]
        return [PY, os.path.join(HERE, "soak_torch.py"), mode, "--seed", str(seed)] + \
            self.common_opts() + rest

    def common_opts(self):
        return ["--pause-file", C.pause_file, "--hb-ms", str(HB_MS),
                "--max-s", str(int(C.soak_s_max + 300))]

    def env(self):
        env = gpucommon.env_for(True)
        env["GPUSLICE_SOCKET"] = C.socket
        env["GPUSLICE_GROUP"] = self.group
        if C.dry_run and self.kind == "torch":
            env["PYTHONPATH"] = C.stub_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def config(self):
        lines = [f"[groups.{self.group}]", f'memory_limit = "{gib_txt(self.quota)}"',
                 f'priority = "{self.priority}"']
        if self.share:
            lines.append(f"sm_share = {self.share}")
        return "\n".join(lines) + "\n"

    def label(self):
        return (f"{self.key}: {self.what}, group {self.group} {gib_txt(self.quota)}, "
                f"{self.priority}" + (f", share {self.share}%" if self.share else ""))


def workloads(dry):
    """The four workloads; smaller quotas and sizes on the simulated device."""
    if not dry:
        return [
            Workload("hi", "cuda", 4 * GIB, "high", None,
                     ["--min-mib", "1", "--max-mib", "512", "--hold-mib", "4600", "--burst-min", "1",
                      "--burst-max", "4", "--iters-min", "600", "--iters-max", "1500",
                      "--sleep-max-us", "5000", "--streams", "1"],
                     "soakload, bursts of 1-4 kernels of 10-25 us, sleeps"),
            Workload("lo", "cuda", 6 * GIB, "low", 30,
                     ["--min-mib", "1", "--max-mib", "512", "--hold-mib", "6800", "--burst-min", "4",
                      "--burst-max", "16", "--iters-min", "3000", "--iters-max", "6000",
                      "--sleep-max-us", "0", "--streams", "2"],
                     "soakload, bursts of 4-16 kernels of 50-100 us on 2 streams"),
            Workload("torch", "torch", 8 * GIB, "normal", 50,
                     ["churn", "--min-mib", "1", "--max-mib", "1024", "--hold-mib", "9000",
                      "--mat-max", "4096"],
                     "PyTorch tensor churn + fp32 matmuls"),
            Workload("oom", "torch", 4 * GIB, "low", None, ["oom"],
                     "PyTorch fill to the quota, free half, again"),
        ]
    return [
        Workload("hi", "cuda", 1 * GIB, "high", None,
                 ["--min-mib", "1", "--max-mib", "128", "--hold-mib", "1200", "--burst-min", "1",
                  "--burst-max", "4", "--iters-min", "600", "--iters-max", "1500",
                  "--sleep-max-us", "5000", "--streams", "1"],
                 "soakload stub (simulated)"),
        Workload("lo", "cuda", 3 * GIB // 2, "low", 30,
                 ["--min-mib", "1", "--max-mib", "128", "--hold-mib", "1700", "--burst-min", "4",
                  "--burst-max", "16", "--iters-min", "3000", "--iters-max", "6000",
                  "--sleep-max-us", "2000", "--streams", "2"],
                 "soakload stub (simulated)"),
        Workload("torch", "torch", 2 * GIB, "normal", 50,
                 ["churn", "--min-mib", "1", "--max-mib", "256", "--hold-mib", "2300",
                  "--mat-max", "2048"],
                 "soak_torch.py on the stand-in torch (simulated)"),
        Workload("oom", "torch", 1 * GIB, "low", None, ["oom"],
                 "soak_torch.py on the stand-in torch (simulated)"),
    ]


def parse_line(text):
    """'kind k=v k=v' -> (kind, {k: v})."""
    parts = text.split()
    if not parts:
        return "", {}
    kv = {}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            kv[k] = v
    return parts[0], kv


def as_int(kv, key, default=None):
    try:
        return int(kv[key])
    except (KeyError, TypeError, ValueError):
        return default


def as_float(kv, key, default=None):
    try:
        return float(kv[key])
    except (KeyError, TypeError, ValueError):
        return default


class Instance:
    """One process of a workload, from its start to its end; reads its stdout as it grows."""

    def __init__(self, wl, n):
        self.wl = wl
        self.n = n
        self.name = f"{wl.key}.{n}"
        self.seed = C.seed * 1000 + len(C.instances) + 1
        argv, env = wl.argv(self.seed), wl.env()
        self.out_path = os.path.join(C.runs_dir, self.name + ".out")
        self.err_path = os.path.join(C.runs_dir, self.name + ".err")
        log_cmd(f"{self.name} (t={rel(now()):.1f}s)", argv, env)
        self.t_spawn = now()
        with open(self.out_path, "w") as fo, open(self.err_path, "w") as fe:
            try:
                self.p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=fo,
                                          stderr=fe, cwd=C.build)
            except OSError as e:
                fe.write(f"soak: cannot start: {e}\n")
                self.p = None
        self.pid = self.p.pid if self.p else -1
        self.pos = 0
        self.partial = b""
        self.ready = None        # the ready line's fields
        self.t_ready = None
        self.hb = None           # the last heartbeat's fields
        self.last_hb_t = None    # its t= (CLOCK_MONOTONIC)
        self.max_gap = 0.0
        self.hbs = 0
        self.quiet = {}          # seq -> fields
        self.bye = None
        self.error = None
        self.odd = []            # other lines (watchdog, ...)
        self.killed_at = None    # when we sent SIGKILL (the kill schedule, or a hang)
        self.stopping = False    # SIGTERM at the end
        self.rc = None
        self.t_end = None
        self.fate = "running"
        C.instances.append(self)
        if self.pid > 0:
            C.by_pid[self.pid] = self

    def alive(self):
        if self.p is None:
            return False
        if self.rc is None and self.p.poll() is not None:
            self.rc = self.p.returncode
            self.t_end = now()
        return self.rc is None

    def read(self):
        try:
            with open(self.out_path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        if not data:
            return
        self.pos += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            self.on_line(raw.decode(errors="replace"))

    def on_line(self, text):
        kind, kv = parse_line(text)
        if kind == "hb":
            t = as_float(kv, "t")
            if t is not None:
                prev = self.last_hb_t if self.last_hb_t is not None else self.t_ready
                if prev is not None:
                    self.max_gap = max(self.max_gap, t - prev)
                self.last_hb_t = t
            self.hb = kv
            self.hbs += 1
        elif kind == "quiet":
            seq = as_int(kv, "seq")
            if seq is not None:
                self.quiet[seq] = kv
        elif kind == "ready":
            self.ready = kv
            self.t_ready = now()
            log(f"  {self.name} pid {self.pid} ready after {self.t_ready - self.t_spawn:.2f}s: {text}")
        elif kind == "bye":
            self.bye = kv
        elif kind == "error":
            self.error = kv
            log(f"  {self.name}: {text}")
        elif text.strip():
            self.odd.append(text.strip()[:200])
            log(f"  {self.name}: {text.strip()[:200]}")

    def counter(self, key):
        """The last figure the instance reported (bye, else its last heartbeat)."""
        for kv in (self.bye, self.hb):
            if kv and key in kv:
                return as_int(kv, key, 0)
        return 0

    def stderr_tail(self, n=6):
        try:
            text = gpucommon.read_clipped(self.err_path, 1 << 16)
        except OSError:
            return ""
        lines = [l for l in text.splitlines() if l.strip()]
        return " | ".join(lines[-n:])


def spawn(wl):
    n = C.spawns.get(wl.key, 0) + 1
    C.spawns[wl.key] = n
    inst = Instance(wl, n)
    C.current[wl.key] = inst
    return inst


def live_instances():
    return [i for i in (C.current.get(w.key) for w in C.wls) if i is not None and i.alive()]


def read_all():
    for inst in C.current.values():
        if inst is not None:
            inst.read()


# ----------------------------------------------------------------------------- the controller

class Cli:
    def __init__(self, sub):
        self.sub = sub
        self.rc = None
        self.out = ""
        self.err = ""
        self.secs = 0.0
        self.problem = ""

    def ok(self):
        return self.rc == 0 and not self.problem

    def why(self):
        if self.problem:
            return self.problem
        last = [l for l in self.err.strip().splitlines() if l.strip()]
        return f"rc={self.rc}" + (f": {last[-1][:160]}" if last else "")


def cli(sub, args, timeout=5.0):
    argv = [C.bin, sub, "--socket", C.socket] + [str(a) for a in args]
    r = Cli(sub)
    t0 = now()
    try:
        p = subprocess.run(argv, env=C.base_env, capture_output=True, text=True, timeout=timeout,
                           cwd=C.build)
        r.rc, r.out, r.err = p.returncode, p.stdout, p.stderr
        if r.rc < 0:
            r.problem = f"gpuslice {sub}: killed by signal {-r.rc}"
    except subprocess.TimeoutExpired:
        r.problem = f"gpuslice {sub}: no answer within {timeout:g}s"
    except OSError as e:
        r.problem = f"gpuslice {sub}: cannot start: {e}"
    r.secs = now() - t0
    return r


def ls():
    """(parsed ls --json or None, Cli)."""
    r = cli("ls", ["--json"])
    C.ls_times.append(r.secs)
    if not r.ok():
        return None, r
    try:
        js = json.loads(r.out)
    except ValueError as e:
        r.problem = f"ls --json: not JSON ({e})"
        return None, r
    if not isinstance(js, dict) or not isinstance(js.get("groups"), list) \
            or not isinstance(js.get("processes"), list):
        r.problem = "ls --json: no groups/processes lists"
        return None, r
    return js, r


def procs_of(js):
    return {p.get("pid"): p for p in js.get("processes", []) if isinstance(p, dict)}


def groups_of(js):
    return {g.get("name"): g for g in js.get("groups", []) if isinstance(g, dict)}


def proc_used(row):
    """A process row's (used, overhead) on device 0; used counts overhead (the context and
    driver-held memory) plus the tracked allocations."""
    d = dev0(row)
    return num(d, "used"), num(d, "overhead")


def group_used(grow):
    """(used, limit) of a group row on device 0; a group without device rows (nothing
    claimed on the device yet) uses nothing."""
    d = dev0(grow)
    if not d:
        return 0, None
    return num(d, "used"), num(d, "limit")


def lookup_pid(pid):
    """(workload key, quota, instance name) of one of our processes, for the NVML sampler."""
    inst = C.by_pid.get(pid)
    return (inst.wl.key, inst.wl.quota, inst.name) if inst is not None else None


def start_serve():
    cfg = os.path.join(C.runs_dir, "soak.toml")
    with open(cfg, "w") as f:
        f.write("\n".join(w.config() for w in C.wls))
    with open(cfg) as f:
        log(f"\n--- config file {cfg}:\n" + f.read().rstrip())
    if os.path.exists(C.socket):
        os.unlink(C.socket)
    env = dict(C.base_env)
    env["GPUSLICE_LOG"] = C.ctl_log
    argv = [C.bin, "serve", "--socket", C.socket, "--ledger", C.ledger, "--config", cfg]
    C.serve_paths = (os.path.join(C.runs_dir, "serve.out"), os.path.join(C.runs_dir, "serve.err"))
    log_cmd("gpuslice serve", argv, env)
    t0 = now()
    with open(C.serve_paths[0], "w") as fo, open(C.serve_paths[1], "w") as fe:
        try:
            C.serve = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=fo,
                                       stderr=fe, cwd=C.build)
        except OSError as e:
            return f"cannot start gpuslice serve: {e}"
    why = "the socket never appeared"
    while now() < t0 + 15:
        if C.serve.poll() is not None:
            why = f"gpuslice serve exited rc={C.serve.returncode}"
            break
        if os.path.exists(C.socket):
            r = cli("status", [])
            if r.ok():
                log(f"  controller up after {now() - t0:.2f}s")
                log("  status: " + r.out.strip().replace("\n", "\n          "))
                return ""
            why = f"gpuslice status: {r.why()}"
        time.sleep(0.05)
    if C.serve.poll() is None:
        C.serve.kill()
    C.serve.wait()
    err = gpucommon.read_clipped(C.serve_paths[1])
    log("  serve stderr:\n" + clip_lines(err, 40, 80))
    C.serve = None
    last = [l for l in err.splitlines() if l.strip()]
    return why + (f": {last[-1].strip()[:200]}" if last else "")


def stop_serve():
    if C.serve is None:
        return
    rc = C.serve.poll()
    if rc is None:
        C.serve.send_signal(signal.SIGTERM)
        try:
            rc = C.serve.wait(timeout=bounded(10.0))
        except subprocess.TimeoutExpired:
            C.serve.kill()
            rc = C.serve.wait()
            C.crashes.append("gpuslice serve: did not stop after SIGTERM")
    else:
        C.crashes.append(f"gpuslice serve: exited by itself (rc={rc})")
    log(f"\n=== gpuslice serve ended: rc={rc}")
    log("  --- stderr\n" + clip_lines(gpucommon.read_clipped(C.serve_paths[1]), 100, 200))
    C.serve = None


def serve_alive():
    return C.serve is not None and C.serve.poll() is None


# ----------------------------------------------------------------------------- the checks

def write_pause(seq):
    tmp = C.pause_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{seq}\n")
    os.replace(tmp, C.pause_file)


def clear_pause():
    try:
        os.unlink(C.pause_file)
    except FileNotFoundError:
        pass


def quiesce(label, timeout):
    """Pause every workload, compare the ledger with what each one holds, resume. Returns the
    check's record (also kept in C.quiet_checks)."""
    C.seq += 1
    seq = C.seq
    t0 = now()
    write_pause(seq)
    read_all()
    targets = [i for i in live_instances() if i.ready is not None]
    pending = list(targets)
    while pending and now() < t0 + timeout:
        for inst in list(pending):
            inst.read()
            if seq in inst.quiet or not inst.alive():
                pending.remove(inst)
        if pending:
            time.sleep(0.02)
    took = now() - t0
    js, r = ls()
    # Everything the ledger says is read while every target is still paused.
    read_all()
    clear_pause()
    chk = {"seq": seq, "label": label, "t": rel(t0), "took": took, "rows": [], "groups": [],
           "problems": []}
    for inst in pending:
        chk["problems"].append(f"{inst.name} did not pause within {timeout:.1f}s")
    if js is None:
        chk["problems"].append(f"ls: {r.why()}")
        C.quiet_checks.append(chk)
        log_quiet(chk)
        return chk
    procs, groups = procs_of(js), groups_of(js)
    quiet_pids = set()
    for inst in targets:
        q = inst.quiet.get(seq)
        if q is None:
            continue
        quiet_pids.add(inst.pid)
        held = as_int(q, "held")
        row = procs.get(inst.pid)
        if row is None:
            chk["problems"].append(f"{inst.name} (pid {inst.pid}) is not in ls")
            continue
        used, over = proc_used(row)
        diff = None if used is None or over is None or held is None else used - over - held
        chk["rows"].append({"inst": inst.name, "wl": inst.wl.key, "pid": inst.pid, "held": held,
                            "used": used, "overhead": over, "diff": diff,
                            "torch": inst.wl.kind == "torch"})
    for wl in C.wls:
        g = groups.get(wl.group)
        if g is None:
            chk["problems"].append(f"group {wl.group} is not in ls")
            continue
        members = [m for m in (g.get("members") or []) if isinstance(m, int)]
        alive = {i.pid for i in live_instances() if i.wl is wl}
        ghosts = [m for m in members if m not in alive]
        if ghosts:
            chk["problems"].append(f"group {wl.group} lists {ghosts}, not alive")
        used, limit = group_used(g)
        if any(m not in quiet_pids for m in members):
            chk["groups"].append({"group": wl.group, "used": used, "sum": None, "members": members,
                                  "note": "a member was not quiet (starting)"})
            continue
        rows = [procs.get(m) for m in members]
        if any(x is None for x in rows):
            chk["problems"].append(f"group {wl.group}: a member has no process row")
            continue
        total = sum(proc_used(x)[0] or 0 for x in rows)
        chk["groups"].append({"group": wl.group, "used": used, "sum": total, "members": members,
                              "limit": limit})
    C.quiet_checks.append(chk)
    log_quiet(chk)
    return chk


def log_quiet(chk):
    log(f"\n--- quiet check {chk['seq']} ({chk['label']}) at t={chk['t']:.1f}s, all quiet after "
        f"{chk['took'] * 1000:.0f} ms")
    for r in chk["rows"]:
        log(f"  {r['inst']:9s} pid {r['pid']}: holds {r['held']} B; ledger used {r['used']} - "
            f"overhead {r['overhead']} = {None if r['diff'] is None else r['diff'] + r['held']} B; "
            f"diff {r['diff']}")
    for g in chk["groups"]:
        log(f"  group {g['group']}: used {g['used']} B, members {g['members']}, sum of members "
            f"{g['sum']}" + (f" ({g['note']})" if g.get("note") else ""))
    for p in chk["problems"]:
        log(f"  PROBLEM: {p}")


def pick_victim():
    """The next workload in the seeded order whose instance is alive and ready; else any alive."""
    for _ in range(len(C.wls)):
        if not C.kill_order:
            order = list(C.wls)
            C.rng.shuffle(order)
            C.kill_order = order
        wl = C.kill_order.pop(0)
        inst = C.current.get(wl.key)
        if inst is not None and inst.alive() and inst.ready is not None:
            return inst
    alive = live_instances()
    return alive[0] if alive else None


def kill_and_restart(k):
    inst = pick_victim()
    if inst is None:
        log(f"\n--- kill {k}: nothing alive to kill")
        C.kills.append({"k": k, "t": rel(now()), "inst": None})
        return
    wl = inst.wl
    inst.read()
    held = as_int(inst.hb or {}, "held")
    t_kill = now()
    inst.killed_at = t_kill
    inst.fate = "killed"
    try:
        os.kill(inst.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    ev = {"k": k, "t": rel(t_kill), "t_mono": t_kill, "inst": inst.name, "wl": wl.key, "pid": inst.pid,
          "held": held, "gone_s": None, "reaped_s": None, "polls": 0, "last": ""}
    while now() < t_kill + GONE_POLL_S:
        if ev["reaped_s"] is None and not inst.alive():
            ev["reaped_s"] = now() - t_kill
        js, r = ls()
        ev["polls"] += 1
        if js is None:
            ev["last"] = r.why()
            time.sleep(0.03)
            continue
        procs, groups = procs_of(js), groups_of(js)
        listed = inst.pid in procs or any(inst.pid in (g.get("members") or []) for g in groups.values())
        g = groups.get(wl.group)
        used, _ = group_used(g) if g else (None, None)
        others = [procs.get(m) for m in ((g or {}).get("members") or []) if m != inst.pid]
        total = sum((proc_used(x)[0] or 0) for x in others if x is not None)
        ev["last"] = f"listed={listed} group used={used} sum of others={total}"
        if not listed and used is not None and used == total:
            ev["gone_s"] = now() - t_kill
            ev["group_used"] = used
            break
        time.sleep(0.03)
    if ev["reaped_s"] is None:
        try:
            inst.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            ev["last"] += "; not reaped 10 s after SIGKILL"
        inst.alive()
        ev["reaped_s"] = now() - t_kill
    C.kills.append(ev)
    gone = f"{ev['gone_s'] * 1000:.0f} ms" if ev["gone_s"] is not None else f"NOT within {GONE_POLL_S:g}s"
    log(f"\n--- kill {k} at t={ev['t']:.1f}s: {inst.name} pid {inst.pid} (held {held} B at its "
        f"last heartbeat); slot and bytes gone from ls after {gone} ({ev['polls']} polls; "
        f"{ev['last']}); reaped after {ev['reaped_s'] * 1000:.0f} ms")
    spawn(wl)


def hang(inst, why):
    if inst.last_hb_t is not None:
        inst.max_gap = max(inst.max_gap, now() - inst.last_hb_t)
    log(f"\n--- HANG {inst.name} pid {inst.pid} at t={rel(now()):.1f}s: {why}; killing it")
    C.hangs.append((rel(now()), inst.name, why))
    inst.fate = "hang"
    inst.killed_at = now()
    try:
        os.kill(inst.pid, signal.SIGKILL)
        inst.p.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    inst.alive()
    spawn(inst.wl)


def tick():
    """Read the workloads' output; notice crashes and hangs, restart what must be."""
    t = now()
    for wl in C.wls:
        inst = C.current.get(wl.key)
        if inst is None:
            if t >= C.respawn_at.get(wl.key, float("inf")):
                spawn(wl)
            continue
        inst.read()
        if not inst.alive():
            if inst.killed_at is None and not inst.stopping and inst.fate == "running":
                crashed(inst)
            continue
        if inst.ready is None:
            if t - inst.t_spawn > START_TIMEOUT_S:
                hang(inst, f"not ready {t - inst.t_spawn:.0f}s after its start")
        else:
            last = inst.last_hb_t if inst.last_hb_t is not None else inst.t_ready
            if t - last > HANG_S:
                hang(inst, f"no heartbeat for {t - last:.1f}s")


def crashed(inst):
    inst.fate = "crash"
    why = (f"{inst.name} pid {inst.pid} ended by itself at t={rel(now()):.1f}s, rc={inst.rc}"
           + (f", {inst.error}" if inst.error else "") + (f"; stderr: {inst.stderr_tail(3)}"))
    log(f"\n--- CRASH {why}")
    C.crash_events.append(why)
    C.crashes.append(f"{inst.name}: rc={inst.rc}")
    wl = inst.wl
    C.current[wl.key] = None
    streak = C.crash_streak.get(wl.key, 0) + (1 if inst.ready is None else 0)
    C.crash_streak[wl.key] = streak if inst.ready is None else 0
    if streak >= GIVE_UP_CRASHES:
        log(f"  {wl.key}: {streak} crashes in a row before getting ready: not restarted again")
        C.respawn_at[wl.key] = float("inf")
    else:
        C.respawn_at[wl.key] = now() + RESPAWN_DELAY_S


def check_controller():
    r = cli("status", [])
    C.status_checks += 1
    C.status_max = max(C.status_max, r.secs)
    if not r.ok() or r.secs > STATUS_MAX_S:
        C.status_misses.append((rel(now()), r.secs, r.why() if not r.ok() else "slow"))
        log(f"  status at t={rel(now()):.1f}s: {r.why() if not r.ok() else 'ok'} in {r.secs * 1000:.0f} ms")
    if not serve_alive():
        raise ControllerDied(f"gpuslice serve exited (rc={C.serve.poll() if C.serve else '?'})")
    js, r = ls()
    if js is None:
        C.ls_failures.append((rel(now()), r.why()))
        return
    groups = groups_of(js)
    t = now()
    for pid, row in procs_of(js).items():
        inst = C.by_pid.get(pid)
        if inst is None:
            C.strangers.add(pid)
        elif inst.t_end is not None and t - inst.t_end > GONE_MAX_S and pid not in C.ghosts:
            C.ghosts[pid] = (rel(t), inst.name, f"still listed {t - inst.t_end:.1f}s after it ended")
    for wl in C.wls:
        g = groups.get(wl.group)
        if g is None:
            continue
        d = dev0(g)
        if isinstance(d.get("uuid"), str):
            C.uuids.add(d["uuid"])
        peak = num(d, "peak")
        if peak is not None:
            C.group_peak[wl.key] = peak
        ach = num(d, "achieved_share")
        if ach is not None:
            C.achieved.setdefault(wl.key, []).append(ach)
        if wl.key not in C.group_seen and d:
            C.group_seen[wl.key] = (num(d, "limit"), num(d, "share"), g.get("priority"))


# ----------------------------------------------------------------------------- the run

def wait_ready(limit_s):
    t0 = now()
    while now() < t0 + limit_s:
        tick()
        if all((C.current.get(w.key) is not None and C.current[w.key].ready is not None)
               for w in C.wls):
            return True
        time.sleep(0.1)
    return False


def soak():
    """Start everything, run the schedule, end with the last comparison and a clean stop."""
    for wl in C.wls:
        log("  workload " + wl.label())
    err = start_serve()
    if err:
        C.crashes.append(f"gpuslice serve: {err}")
        C.setup_problem = err
        return
    C.nvml = soaknvml.Watch(lookup_pid, rel, NVML_SLACK, NVML_INTERVAL_S)
    if C.nvml.nv is not None:
        C.nvml.start()
    log(f"  NVML: {C.nvml.how or C.nvml.error}")
    for wl in C.wls:
        spawn(wl)
    all_ready = wait_ready(min(START_TIMEOUT_S, max(10.0, remaining() - END_RESERVE_S - 30)))
    C.soak_t0 = now()
    C.soak_s = min(C.soak_s_req, remaining() - END_RESERVE_S)
    log(f"\n##### soak phase: {C.soak_s:.1f}s (asked {C.soak_s_req:g}s; {remaining():.0f}s of the "
        f"budget left); all ready: {all_ready}; kill every {C.kill_every:g}s; seed {C.seed}")
    if C.soak_s < 5:
        C.setup_problem = f"no time left for the soak ({C.soak_s:.0f}s)"
        return
    events = []
    k = 1
    while k * C.kill_every < C.soak_s:
        events.append((k * C.kill_every, "kill", k))
        k += 1
    q = C.kill_every / 2
    while q < C.soak_s - 3:
        events.append((q, "quiet", None))
        q += C.kill_every
    events.sort()
    next_check, next_summary = 0.0, 30.0
    while True:
        t = rel(now())
        if t >= C.soak_s:
            break
        tick()
        if t >= next_check:
            check_controller()
            next_check = t + CHECK_EVERY_S
        if t >= next_summary:
            summary_line()
            next_summary += 30.0
        if events and t >= events[0][0]:
            _, what, arg = events.pop(0)
            if what == "kill":
                kill_and_restart(arg)
            else:  # a workload that never pauses must not push the phase past its end
                quiesce("mid-run", max(1.0, min(QUIET_TIMEOUT_S, C.soak_s - rel(now()))))
            continue
        upcoming = min([C.soak_s, next_check] + ([events[0][0]] if events else []))
        time.sleep(max(0.0, min(0.1, upcoming - rel(now()))))
    C.soak_ran = rel(now())
    tick()
    C.final = quiesce("final", bounded(QUIET_TIMEOUT_S))
    stop_all()
    after_exit()


def summary_line():
    parts = []
    for wl in C.wls:
        inst = C.current.get(wl.key)
        if inst is None:
            parts.append(f"{wl.key}:-")
            continue
        hb = inst.hb or {}
        parts.append(f"{inst.name}:{'ready' if inst.ready else 'starting'} held={mib(as_int(hb, 'held'))} "
                     f"ooms={hb.get('ooms', '?')} steps={hb.get('steps', '?')}")
    nv = C.nvml
    log(f"  [t={rel(now()):.0f}s] " + "; ".join(parts)
        + (f"; NVML samples {nv.samples}, errors {nv.errors}" if nv else ""))


def stop_all():
    t0 = now()
    limit = bounded(STOP_TIMEOUT_S)
    insts = live_instances()
    for inst in insts:
        inst.stopping = True
        inst.fate = "stopped"
        try:
            inst.p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    for inst in insts:
        try:
            inst.p.wait(timeout=max(0.5, t0 + limit - now()))
        except subprocess.TimeoutExpired:
            inst.p.kill()
            inst.p.wait()
            C.crashes.append(f"{inst.name}: did not exit within {limit:.0f}s of SIGTERM")
            C.crash_events.append(f"{inst.name}: did not exit within {limit:.0f}s of SIGTERM (killed)")
        inst.alive()
        inst.read()
        if inst.rc != 0 and inst.fate == "stopped":
            C.crashes.append(f"{inst.name}: rc={inst.rc} after SIGTERM")
            C.crash_events.append(f"{inst.name}: exit status {inst.rc} after SIGTERM"
                                  + (f", {inst.error}" if inst.error else "")
                                  + f"; stderr: {inst.stderr_tail(3)}")
    C.stop_s = now() - t0
    log(f"\n--- stopped {len(insts)} workloads with SIGTERM in {C.stop_s:.2f}s: "
        + ", ".join(f"{i.name} rc={i.rc} bye={'yes' if i.bye else 'no'}" for i in insts))


def after_exit():
    """After every workload exited: no process of ours listed, every group at 0 bytes."""
    t0 = now()
    last = ""
    while now() < t0 + bounded(GONE_POLL_S):
        js, r = ls()
        if js is None:
            last = r.why()
        else:
            procs, groups = procs_of(js), groups_of(js)
            ours = [p for p in procs if p in C.by_pid]
            used = {w.group: group_used(groups[w.group])[0] if w.group in groups else None for w in C.wls}
            last = f"listed {ours}, group used {used}"
            if not ours and all(u == 0 for u in used.values()):
                C.after = (now() - t0, "")
                log(f"  after exit: ledger empty for our groups after {C.after[0] * 1000:.0f} ms")
                return
        time.sleep(0.05)
    C.after = (None, last)
    log(f"  after exit: NOT empty within {GONE_POLL_S:g}s: {last}")


# ----------------------------------------------------------------------------- verdicts

N = {
    "0": "setup: shim in every workload, quotas/shares/priorities as configured",
    "1": "kill -9 + restart: slot and bytes gone from the ledger <= 1 s",
    "2": "NVML per-process memory <= quota x 1.01",
    "3": "ledger = live allocations at the end (used - overhead = held)",
    "4": "ledger = live allocations at every mid-run pause",
    "5": "group used = sum of its members (pauses, after kills)",
    "6": "after the workloads exit: nothing left in the ledger",
    "7": "OOMs from the quota, caught and counted",
    "8": "hangs (no heartbeat > 10 s, not ready in 120 s, no pause)",
    "9": "controller answered status <= 1 s at every check",
    "10": "crashes other than the killed ones",
}
IDS = [str(i) for i in range(11)]


def per_wl(fn):
    return " ".join(f"{w.key}:{fn(w)}" for w in C.wls)


def verdicts():
    insts = C.instances
    # 0: setup
    probs = []
    for i in insts:
        if i.ready is None:
            continue
        if i.ready.get("preloaded_gpuslice") != "1":
            probs.append(f"{i.name}: preloaded_gpuslice={i.ready.get('preloaded_gpuslice')}")
        total = as_float(i.ready, "total_mib")
        if total is not None and abs(total - i.wl.quota / MIB) > 0.5:
            probs.append(f"{i.name}: device total {total:.0f} MiB, not its quota {i.wl.quota / MIB:.0f}")
    for w in C.wls:
        seen = C.group_seen.get(w.key)
        if seen is None:
            probs.append(f"group {w.group} never listed with a device")
            continue
        limit, share, prio = seen
        if limit != w.quota or (share or None) != w.share or prio != w.priority:
            probs.append(f"{w.group}: ls shows limit {limit} share {share} priority {prio}")
    if C.setup_problem:
        probs.insert(0, C.setup_problem)
    dur = (f"soak phase {C.soak_ran:.1f}s (asked {C.soak_s_req:g}s"
           + (f", cut to {C.soak_s:.0f}s by the budget" if C.soak_s < C.soak_s_req - 0.5 else "")
           + f"), kill every {C.kill_every:g}s, seed {C.seed}, {'DRY RUN (simulated driver)' if C.dry_run else 'GPU'}")
    record("0", N["0"], not probs, dur, "; ".join(probs[:4]))

    # 1: kills
    done = [k for k in C.kills if k.get("inst")]
    slow = [k for k in done if k["gone_s"] is None or k["gone_s"] > GONE_MAX_S]
    restarts = sum(max(0, n - 1) for n in C.spawns.values())
    gone = [k["gone_s"] for k in done if k["gone_s"] is not None]
    per = {w.key: sum(1 for k in done if k["wl"] == w.key) for w in C.wls}
    ready_after = [i for i in insts if i.n > 1 and i.ready is not None]
    nv_gone = []
    if C.nvml is not None:
        for k in done:
            seen = C.nvml.last_seen.get(k["pid"])
            nv_gone.append(max(0.0, seen - k["t_mono"]) if seen is not None else 0.0)
    figs = (f"{len(done)} kills ({' '.join(f'{k}:{v}' for k, v in per.items())}), {restarts} restarts "
            f"({len(ready_after)} got ready); ledger: gone after max {max(gone) * 1000 if gone else float('nan'):.0f} ms, "
            f"median {sorted(gone)[len(gone) // 2] * 1000 if gone else float('nan'):.0f} ms"
            + (f"; NVML last listed a killed pid +{max(nv_gone) * 1000:.0f} ms after its kill (info)" if nv_gone else ""))
    notes = [f"kill {k['k']} ({k['inst']}): {ms_or(k['gone_s'], 'not gone')} ({k['last']})" for k in slow[:3]]
    if not done:
        notes.append("no kill happened (soak shorter than one period?)")
    record("1", N["1"], bool(done) and not slow, figs, "; ".join(notes))

    # 2: NVML
    nv = C.nvml
    if nv is None or nv.nv is None:
        record("2", N["2"], False, "-", nv.error if nv else "not started")
    else:
        def mx(w):
            m = nv.max.get(w.key)
            return f"{m[0] / MIB:.0f}/{w.quota / MIB:.0f}MiB={m[1]:.3f}" if m else "never seen"
        nviol = sum(nv.n_violations.values())
        # A process NVML lists without a memory figure (None: not available) counts as unseen.
        unseen = [w.key for w in C.wls if w.key not in nv.max or nv.max[w.key][0] == 0]
        notes = [f"t={v[0]:.1f}s {v[1]} {v[3] / MIB:.0f}MiB x{v[4]:.4f}" for v in nv.violations[:3]]
        if unseen:
            notes.append(f"NVML never listed {unseen}" + (
                f" but listed other pids {sorted(nv.others)[:6]} (pid namespace?)" if nv.others else ""))
        if nv.errors:
            notes.append(f"{nv.errors} NVML errors (last: {nv.last_error})")
        record("2", N["2"], nviol == 0 and not unseen and nv.samples > 0,
               f"max {per_wl(mx)}; {nv.samples} samples, {nviol} above x{NVML_SLACK}", "; ".join(notes))

    # 3 / 4: ledger vs held. The CUDA C++ workloads allocate every byte themselves: the ledger
    # must equal their own count exactly. A PyTorch process also holds memory that libraries
    # allocate outside torch's caching allocator (memory_reserved() does not see it; on the H200
    # 64.1 MiB per process): there the ledger must exceed torch's count by one constant, the
    # same in every pause of every instance of the run. A difference that changes is drift.
    all_quiet = ([C.final] if C.final else []) + list(C.quiet_checks)
    lib = torch_library_offset(all_quiet)

    def wrong(r):
        if r["diff"] is None:
            return True
        return r["diff"] != (lib if r.get("torch") and lib is not None else 0)

    def judge_rows(checks):
        rows = [r for c in checks for r in c["rows"]]
        bad = [r for r in rows if wrong(r)]
        probs = [f"#{c['seq']}: {p}" for c in checks for p in c["problems"]]
        return rows, bad, probs

    lib_txt = (f"; PyTorch outside torch's allocator: {lib} B ({lib / MIB:.1f} MiB) in every pause of "
               f"every instance" if lib is not None else "")
    fin = [C.final] if C.final else []
    rows, bad, probs = judge_rows(fin)
    figs = " ".join(f"{r['inst']}:{mib(r['held'])}/diff={r['diff']}" for r in rows) or "-"
    notes = [f"{r['inst']} diff {r['diff']} B (ledger {r['used']} - {r['overhead']}, holds {r['held']})" for r in bad[:3]]
    record("3", N["3"], bool(rows) and not bad and not probs, figs + lib_txt, "; ".join(notes + probs[:3]) or
           ("" if rows else "no final comparison"))

    mids = [c for c in C.quiet_checks if c["label"] == "mid-run"]
    rows, bad, probs = judge_rows(mids)
    by = {}
    for r in rows:
        s = by.setdefault(r["wl"], [0, 0])
        s[0] += 1
        s[1] = max(s[1], abs(r["diff"]) if r["diff"] is not None else 1 << 62)
    figs = (f"{len(mids)} pauses, {len(rows)} comparisons; max |diff| "
            + " ".join(f"{k}:{v[1]}B/{v[0]}" for k, v in by.items()) + lib_txt)
    notes = [f"#{r_seq(r)} {r['inst']} diff {r['diff']} B" for r in bad[:3]]
    consts = constant_offsets(bad)
    if consts:
        notes.append("constant per instance (allocations outside the program's own count?): " + consts)
    record("4", N["4"], bool(rows) and not bad and not probs, figs, "; ".join(notes + probs[:3]))

    # 5: group sums
    gs = [g for c in C.quiet_checks for g in c["groups"] if g.get("sum") is not None]
    gbad = [g for g in gs if g["used"] != g["sum"]]
    skipped = sum(1 for c in C.quiet_checks for g in c["groups"] if g.get("sum") is None)
    kills_bad = [k for k in done if k["gone_s"] is None]
    figs = f"{len(gs)} group comparisons at pauses ({skipped} skipped: member starting), {len(done)} after kills"
    notes = [f"{g['group']} used {g['used']} != members {g['sum']}" for g in gbad[:3]]
    notes += [f"after kill {k['k']}: {k['last']}" for k in kills_bad[:2]]
    record("5", N["5"], bool(gs) and not gbad and not kills_bad, figs, "; ".join(notes))

    # 6: after exit
    if C.after is None:
        record("6", N["6"], False, "-", "not reached")
    else:
        t, last = C.after
        record("6", N["6"], t is not None,
               f"all stopped {C.stop_s * 1000:.0f} ms after SIGTERM; ledger empty after {t * 1000:.0f} ms"
               if t is not None else "-", last)

    # 7: OOMs
    def ooms(w):
        return sum(i.counter("ooms") + i.counter("ooms_rt") for i in insts if i.wl is w)
    record("7", N["7"], "INFO", per_wl(ooms) + " (refused allocations; none fatal)")

    # 8: hangs
    never = [h for h in C.hangs if "not ready" in h[2]]
    gaps = {w.key: max([i.max_gap for i in insts if i.wl is w] or [0]) for w in C.wls}
    readies = {w.key: max([i.t_ready - i.t_spawn for i in insts if i.wl is w and i.t_ready] or [0])
               for w in C.wls}
    nopause = [p for c in C.quiet_checks for p in c["problems"] if "did not pause" in p]
    figs = (f"{len(C.hangs)} hangs, {len(nopause)} missed pauses; max heartbeat gap "
            + " ".join(f"{k}:{v:.1f}s" for k, v in gaps.items())
            + "; max start->ready " + " ".join(f"{k}:{v:.1f}s" for k, v in readies.items()))
    notes = [f"t={h[0]:.0f}s {h[1]}: {h[2]}" for h in C.hangs[:3]] + nopause[:2]
    if never:
        notes.append(f"{len(never)} never got ready")
    record("8", N["8"], not C.hangs and not nopause, figs, "; ".join(notes))

    # 9: controller
    ls_max = max(C.ls_times) if C.ls_times else float("nan")
    figs = (f"{C.status_checks - len(C.status_misses)}/{C.status_checks} within {STATUS_MAX_S:g}s, "
            f"max {C.status_max * 1000:.0f} ms; {len(C.ls_times)} ls calls, max {ls_max * 1000:.0f} ms, "
            f"{len(C.ls_failures)} failed")
    notes = [f"t={m[0]:.0f}s {m[1] * 1000:.0f} ms {m[2]}" for m in C.status_misses[:3]]
    notes += [f"ls t={f[0]:.0f}s: {f[1]}" for f in C.ls_failures[:2]]
    if C.ghosts:
        pid, (t, name, why) = next(iter(C.ghosts.items()))
        notes.append(f"{len(C.ghosts)} dead processes still listed, e.g. {name} pid {pid} at t={t:.0f}s: {why}")
    if C.controller_died:
        notes.insert(0, C.controller_died)
    record("9", N["9"], C.status_checks > 0 and not C.status_misses and not C.ls_failures
           and not C.ghosts and not C.controller_died, figs, "; ".join(notes))

    # 10: crashes
    record("10", N["10"], not C.crash_events,
           f"{len(C.crash_events)}" + (f": {C.crash_events[0][:160]}" if C.crash_events else ""),
           "; ".join(e[:160] for e in C.crash_events[1:3]))


def ms_or(secs, otherwise):
    return otherwise if secs is None else f"{secs * 1000:.0f} ms"


def r_seq(row):
    for c in C.quiet_checks:
        if row in c["rows"]:
            return c["seq"]
    return "?"


def torch_library_offset(checks):
    """The PyTorch workloads' difference (ledger - overhead - torch's reserved) when it is one
    positive number in every comparison of every instance; None otherwise (then every
    non-zero difference counts as wrong)."""
    diffs = {r["diff"] for c in checks for r in c["rows"] if r.get("torch")}
    if len(diffs) == 1:
        d = next(iter(diffs))
        if d is not None and d > 0:
            return d
    return None


def constant_offsets(bad):
    """'inst:diff' for instances whose every non-zero difference was the same number."""
    by = {}
    for r in bad:
        by.setdefault(r["inst"], set()).add(r["diff"])
    return " ".join(f"{k}:{next(iter(v))}B" for k, v in by.items() if len(v) == 1)


def workload_lines():
    nv = C.nvml
    head = (f"{'wl':6s} {'group':10s} {'quota':>6s} {'prio':6s} {'share':>5s} {'inst':>4s} "
            f"{'kills':>5s} {'ooms':>6s} {'allocs':>7s} {'kernels':>8s} {'NVML max':>9s} {'ratio':>6s} "
            f"{'ledger peak':>11s} {'gap':>5s} {'ach%':>5s}")
    out = [head]
    for w in C.wls:
        insts = [i for i in C.instances if i.wl is w]
        m = nv.max.get(w.key) if nv else None
        ach = C.achieved.get(w.key)
        out.append(
            f"{w.key:6s} {w.group:10s} {gib_txt(w.quota):>6s} {w.priority:6s} "
            f"{(str(w.share) + '%') if w.share else '-':>5s} {len(insts):4d} "
            f"{sum(1 for k in C.kills if k.get('wl') == w.key):5d} "
            f"{sum(i.counter('ooms') + i.counter('ooms_rt') for i in insts):6d} "
            f"{sum(i.counter('allocs') for i in insts):7d} {sum(i.counter('kernels') for i in insts):8d} "
            f"{(f'{m[0] / MIB:.0f}MiB') if m else '-':>9s} {(f'{m[1]:.3f}') if m else '-':>6s} "
            f"{mib(C.group_peak.get(w.key)):>11s} {max([i.max_gap for i in insts] or [0]):4.1f}s "
            f"{(f'{sum(ach) / len(ach):.1f}') if ach else '-':>5s}")
    return out


def write_outputs():
    done = {r[0] for r in C.results}
    for cid in IDS:
        if cid not in done:
            record(cid, N[cid], False, "-", "not reached: stopped, or a harness error (see the log)")
    rows = gpucommon.sorted_results(IDS)
    clean = gpucommon.clean
    with open(os.path.join(C.out, "soak.tsv"), "w") as f:
        f.write("id\tcheck\tverdict\tfigures\tnote\n")
        for row in rows:
            f.write("\t".join(clean(x) for x in row) + "\n")
        for line in workload_lines()[1:]:
            f.write(f"workload:{line.split()[0]}\tworkload\tINFO\t{clean(line)}\t\n")
        for k in C.kills:
            f.write(f"kill:{k['k']}\tkill -9\tINFO\t{clean(json.dumps(k, default=str))}\t\n")
        for c in C.quiet_checks:
            f.write(f"quiet:{c['seq']}\t{c['label']} pause\tINFO\t{clean(json.dumps(c, default=str))}\t\n")
        if C.nvml:
            for v in C.nvml.violations:
                f.write(f"nvml\tabove quota x{NVML_SLACK}\tFAIL\tt={v[0]:.2f}s {v[1]} pid {v[2]} "
                        f"{v[3]} B x{v[4]:.4f}\t\n")
        for h in C.hangs:
            f.write(f"hang\thang\tFAIL\tt={h[0]:.1f}s {h[1]}\t{clean(h[2])}\n")
        for e in C.crash_events:
            f.write(f"crash\tcrash\tFAIL\t{clean(e)}\t\n")
        for i in C.instances:
            f.write(f"instance:{i.name}\t{i.wl.key}\tINFO\tpid={i.pid} fate={i.fate} rc={i.rc} "
                    f"ready_s={(i.t_ready - i.t_spawn) if i.t_ready else None} hbs={i.hbs} "
                    f"max_gap={i.max_gap:.2f} ooms={i.counter('ooms')}+{i.counter('ooms_rt')} "
                    f"allocs={i.counter('allocs')} kernels={i.counter('kernels')}\t\n")
    for i in C.instances:
        log(f"\n=== {i.name} pid {i.pid}: {i.fate}, rc={i.rc}, heartbeats {i.hbs}, max gap {i.max_gap:.2f}s"
            + (f", error {i.error}" if i.error else "") + (f", other lines {i.odd[:3]}" if i.odd else ""))
        tail = i.stderr_tail(8)
        if tail:
            log("  stderr (last lines): " + tail)
    lines = [""] + [f"workloads ({'DRY RUN, simulated driver' if C.dry_run else 'GPU'}):"] + workload_lines()
    lines += gpucommon.table_lines(rows, "gpuslice soak " + time.strftime("%Y-%m-%d %H:%M:%S")
                                   + f"  (soak phase {C.soak_ran:.1f}s; NVML slack x{NVML_SLACK})")
    lines.append(gpucommon.summary_line(rows, f"; log {os.path.join(C.out, 'soak.log')}"))
    gpucommon.emit(lines)


# ----------------------------------------------------------------------------- cleanup

def cleanup():
    gpucommon.ignore_signals()
    clear_pause()
    for inst in C.instances:
        if inst.p is not None and inst.alive():
            inst.p.kill()
            inst.p.wait()
            if inst.fate == "running":
                inst.fate = "killed at cleanup"
    if C.nvml is not None:
        C.nvml.stop()
    stop_serve()
    gpucommon.sweep_token(TOKEN_VAR, C.token)
    if C.dry_run:
        # The shim never unlinks its per-device turn page; a simulated device's UUID is new in
        # every dry run, so its page would stay behind in /dev/shm for good.
        for uuid in C.uuids:
            page = f"/dev/shm/gpuslice-board4-{os.getuid()}-{uuid}"
            try:
                os.unlink(page)
                log(f"  cleanup: removed {page}")
            except OSError as e:
                log(f"  cleanup: {page}: {e}")


def main():
    ap = gpucommon.arg_parser(590.0)
    ap.add_argument("--bin", required=True, help="the gpuslice binary")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--ledger", required=True)
    ap.add_argument("--soak-s", type=float, default=540.0, help="length of the soak phase")
    ap.add_argument("--kill-every-s", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shim-log", default="info", help="GPUSLICE_LOG for the workloads")
    ap.add_argument("--ctl-log", default="info", help="GPUSLICE_LOG for gpuslice serve")
    ap.add_argument("--dry-run", action="store_true", help="simulated driver, stub workloads")
    ap.add_argument("--stub-dir", default=os.path.join(HERE, "dryrun"))
    args = ap.parse_args()
    gpucommon.setup("soak", args, "soak_runs", "soak.log")
    C.bin = os.path.abspath(args.bin)
    C.socket = os.path.abspath(args.socket)
    C.ledger = os.path.abspath(args.ledger)
    C.shim_log = args.shim_log
    C.ctl_log = args.ctl_log
    C.dry_run = args.dry_run
    C.stub_dir = os.path.abspath(args.stub_dir)
    C.seed = args.seed
    C.rng = random.Random(args.seed)
    C.soak_s_req = args.soak_s
    C.soak_s_max = args.soak_s
    C.soak_s = args.soak_s
    C.kill_every = args.kill_every_s
    C.token = os.environ.get(TOKEN_VAR, "")
    C.base_env = gpucommon.scrubbed_env(SCRUB_PREFIXES, SCRUB_NAMES)
    C.pause_file = os.path.join(C.runs_dir, "pause")
    C.wls = workloads(args.dry_run)
    # The run's state.
    C.instances, C.by_pid, C.current, C.spawns, C.respawn_at = [], {}, {}, {}, {}
    C.crash_streak, C.kill_order, C.kills, C.hangs, C.crash_events = {}, [], [], [], []
    C.quiet_checks, C.final, C.after, C.seq = [], None, None, 0
    C.status_checks, C.status_max, C.status_misses, C.ls_times, C.ls_failures = 0, 0.0, [], [], []
    C.ghosts, C.strangers, C.group_peak, C.achieved, C.group_seen = {}, set(), {}, {}, {}
    C.serve, C.serve_paths, C.nvml, C.soak_t0, C.soak_ran, C.stop_s = None, None, None, 0.0, 0.0, 0.0
    C.setup_problem, C.controller_died, C.uuids = "", "", set()
    clear_pause()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    log(f"\n##### soak: lib={C.lib} bin={C.bin} socket={C.socket} ledger={C.ledger} build={C.build} "
        f"out={C.out} python={PY} dry_run={C.dry_run} time left={remaining():.0f}s")
    try:
        if not os.access(C.bin, os.X_OK):
            C.missing.append("gpuslice binary")
            C.setup_problem = f"{C.bin} is not executable"
        elif not C.dry_run and not os.access(os.path.join(C.build, "soakload"), os.X_OK):
            C.missing.append("soakload")
            C.setup_problem = "soakload not built"
        else:
            soak()
    except Stopped as e:
        log(f"\n##### stopped by {e} with {remaining():.0f}s of the budget left")
        C.crashes.append(f"soak.py: stopped by {e}")
        C.soak_ran = C.soak_ran or (rel(now()) if C.soak_t0 else 0.0)
    except ControllerDied as e:
        log(f"\n##### {e}")
        C.controller_died = str(e)
        C.crashes.append(str(e))
        C.soak_ran = rel(now())
    except Exception as e:  # a harness bug must still leave a table behind
        gpucommon.harness_error(e)
        C.soak_ran = C.soak_ran or (rel(now()) if C.soak_t0 else 0.0)
    finally:
        cleanup()
    try:
        verdicts()
    except Exception as e:  # noqa: BLE001
        gpucommon.harness_error(e)
    write_outputs()
    return gpucommon.exit_status()


if __name__ == "__main__":
    sys.exit(main())
