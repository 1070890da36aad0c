#!/usr/bin/env python3
"""gpuslice controller checks (issue 4). Started by tests/gpu/controller.sh after it built
sharebench; see the section "Controller (make gpu-ctl)" in tests/gpu/README.md for what each
check means.

    controller.py --lib ABS_libgpuslice.so --bin ABS_gpuslice --build BUILD_DIR --out OUT_DIR
                  --socket PATH --ledger PATH [--t0 EPOCH] [--budget-s 215]
                  [--shim-log info] [--ctl-log info]

Standard library only (the children it starts need torch and pynvml). Starts `gpuslice serve`
itself and stops it (SIGTERM) at the end. Writes OUT_DIR/controller.log (appends) and
OUT_DIR/controller.tsv; prints the results table last.
Exit status: 0 when every program behaved (whatever the verdicts), 1 when a program crashed
(signal, timeout, unexpected exit status, the controller died or would not stop), 2 when
something needed was missing.

Every child carries GPUTEST_CTL_TOKEN (inherited from controller.sh); at the end, and from the
shell's trap if this script itself is killed, every process still alive with that token in its
environment is killed by pid.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import gpucommon
from gpucommon import (C, HERE, PY, clip_lines, have, log, log_cmd, parse_kv, record, remaining,
                       settle)
from gpucommon import Stopped, dev0, num, on_signal

import shares  # sharebench runs and their report-line arithmetic (count_at, mono_points, ...)

MIB = 1 << 20
GIB = 1 << 30
GROUP = "pair"
LIMIT1_GIB = 6            # from the config file
LIMIT2_GIB = 10           # gpuslice set --group pair --memory 10GiB
NVML_SLACK = 1.01
A_TENSORS = 8             # process A holds 8 x 256 MiB = 2 GiB
TENSOR_MIB = 256
FILL_SLEEP_MS = 30        # between B's tensors, so the 20 ms NVML poll sees every step
FILL1_CAP = 40            # safety caps; B is expected to stop at the limit, not here
FILL2_CAP = 24            # 6 GiB more than the first limit allowed: still ends at the 10 GiB limit
FILL1_FLOOR = 4           # sanity floor: B gets at least 1 GiB under the 6 GiB limit
FILL2_MIN_MORE = 3        # check 2: at least 3 more tensors after the raise
OBEY_S = 0.1              # "running processes obey within 100 ms"
REGAIN_MAX_S = 1.0        # check 3
REGAIN_INTERVAL_MS = 20
SM_KERNEL_US = 200
SM_PAIR_S = 12.0
SM_BASE_S = 3.0
SM_FIRST = (30, 70)
SM_SECOND = (50, 50)
SM_SWITCH_AT = 6.0        # seconds after the go file
SM_WINDOWS = ((2.0, 5.0), (8.0, 11.0))
SM_TOL = 3.0
LS_AT = (2.5, 3.5, 4.5, 8.5, 9.5, 10.5)
CHILD_MAX_S = 150         # the torch children's own watchdog
TOKEN_VAR = "GPUTEST_CTL_TOKEN"

SCRUB_PREFIXES = ("GPUSLICE_", "CUDA_DEVICE_MEMORY_LIMIT", "CUDA_MPS_")
SCRUB_NAMES = ("LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_SM_LIMIT",
               "CUDA_LAUNCH_BLOCKING")
IDS = ["0", "1", "2", "3", "4", "5"]
N0 = "controller: serve starts, answers, stops on SIGTERM"
MEMBER = os.path.join(HERE, "torch_group_member.py")

# This script's fields of the shared context.
C.bin = ""
C.socket = ""
C.ledger = ""
C.ctl_log = "info"
C.cells = []          # controller.tsv detail rows: (id, check, verdict, figures, note)
C.children = []       # Child objects not finished yet
C.serve = None
C.serve_paths = None
C.token = ""


def gib(b):
    return "?" if b is None else f"{b / GIB:.2f}GiB"


def mib(b):
    return "?" if b is None else f"{b / MIB:.0f}MiB"


def f1(x, nd=1):
    return "?" if x is None else f"{x:.{nd}f}"


def cell(cid, name, verdict, figures, note=""):
    C.cells.append((cid, name, verdict, figures, note))


def env_shim(extra):
    env = gpucommon.env_for(True)
    env["GPUSLICE_SOCKET"] = C.socket
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- the CLI

class Cli:
    def __init__(self):
        self.rc = None
        self.out = ""
        self.err = ""
        self.secs = 0.0
        self.problem = ""  # timeout / signal / could not start

    def ok(self):
        return self.rc == 0 and not self.problem

    def why(self):
        if self.problem:
            return self.problem
        last = [l for l in self.err.strip().splitlines() if l.strip()]
        return f"rc={self.rc}" + (f": {last[-1][:200]}" if last else "")


def cli(sub, args, timeout=10.0, quiet=False):
    """gpuslice SUB --socket S ARGS...; a timeout or a signal counts as a crash."""
    argv = [C.bin, sub, "--socket", C.socket] + [str(a) for a in args]
    r = Cli()
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, env=C.base_env, capture_output=True, text=True,
                           timeout=timeout, cwd=C.build)
        r.rc, r.out, r.err = p.returncode, p.stdout, p.stderr
        if r.rc < 0:
            r.problem = f"gpuslice {sub}: killed by signal {-r.rc}"
            C.crashes.append(r.problem)
    except subprocess.TimeoutExpired as e:
        r.problem = f"gpuslice {sub}: TIMEOUT after {timeout:g}s"
        r.out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        C.crashes.append(r.problem)
    except OSError as e:
        r.problem = f"gpuslice {sub}: cannot start: {e}"
        C.crashes.append(r.problem)
    r.secs = time.monotonic() - t0
    if not quiet or not r.ok():
        log(f"  $ {' '.join(argv[1:])}  -> {r.problem or f'rc={r.rc}'} in {r.secs * 1000:.0f} ms")
        if r.out.strip():
            log("    stdout: " + clip_lines(r.out.strip(), 30, 10).replace("\n", "\n    "))
        if r.err.strip():
            log("    stderr: " + clip_lines(r.err.strip(), 20, 20).replace("\n", "\n    "))
    return r


def ls(quiet=True):
    """(parsed `gpuslice ls --json`, Cli, error text)."""
    r = cli("ls", ["--json"], timeout=5.0, quiet=quiet)
    if not r.ok():
        return None, r, r.why()
    try:
        js = json.loads(r.out)
    except ValueError as e:
        if quiet:
            log(f"  ls --json: not JSON ({e}): {r.out[:300]!r}")
        return None, r, f"ls --json: not JSON ({e})"
    if not isinstance(js, dict) or not isinstance(js.get("groups"), list):
        return None, r, "ls --json: no \"groups\" list"
    return js, r, ""


def find_group(js, name):
    for g in (js or {}).get("groups") or []:
        if isinstance(g, dict) and g.get("name") == name:
            return g
    return None


def find_proc(js, pid):
    for p in (js or {}).get("processes") or []:
        if isinstance(p, dict) and p.get("pid") == pid:
            return p
    return None


def group_figs(js, name):
    g = find_group(js, name)
    if g is None:
        return None, None, f"group {name} not in ls"
    d = dev0(g)
    return num(d, "used"), num(d, "limit"), ""


# ----------------------------------------------------------------------------- children

class Child:
    """A long-running child with a stdin pipe; stdout/stderr to files, read while it runs."""

    def __init__(self, name, argv, env, expect_rc=(0,)):
        self.r = gpucommon.Run(name)
        self.name = name
        self.env = env
        self.expect_rc = expect_rc
        self.out_path = os.path.join(C.runs_dir, name + ".out")
        self.err_path = os.path.join(C.runs_dir, name + ".err")
        self.finished = False
        self.killed = False  # we sent it SIGKILL on purpose
        log_cmd(name, argv, env)
        self.t0 = time.time()
        fo, fe = open(self.out_path, "w"), open(self.err_path, "w")
        try:
            self.p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=fo, stderr=fe,
                                      cwd=C.build, text=True)
        except OSError as e:
            fe.write(f"controller: cannot start: {e}\n")
            self.p = None
        fo.close()
        fe.close()
        C.children.append(self)

    @property
    def pid(self):
        return self.p.pid if self.p is not None else -1

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def kv(self):
        try:
            with open(self.out_path) as f:
                text = f.read()
        except OSError:
            return {}
        return parse_kv(text, skip=("ev ",))[0]

    def wait_key(self, key, timeout):
        """The output's key=value dict once `key` is there; None on timeout or exit."""
        end = time.monotonic() + timeout
        while True:
            kv = self.kv()
            if key in kv:
                return kv
            if not self.alive():
                kv = self.kv()
                return kv if key in kv else None
            if time.monotonic() > end:
                log(f"  {self.name}: no {key}= within {timeout:g}s")
                return None
            time.sleep(0.01)

    def send(self, line):
        log(f"  -> {self.name} stdin: {line}")
        try:
            self.p.stdin.write(line + "\n")
            self.p.stdin.flush()
            return True
        except (OSError, ValueError, AttributeError) as e:
            log(f"  {self.name}: cannot write to stdin: {e}")
            return False

    def finish(self, timeout, expect_rc=None):
        """Close stdin (the torch children exit on EOF), wait, judge, log."""
        if self.finished:
            return self.r
        self.finished = True
        if self in C.children:
            C.children.remove(self)
        if self.p is not None and self.p.stdin is not None:
            try:
                self.p.stdin.close()
            except OSError:
                pass
        rc = gpucommon.wait_proc(self.p, self.r, timeout)
        self.r.secs = time.time() - self.t0
        expected_kill = self.killed and rc == -signal.SIGKILL
        unexpected = settle(self.r, 0 if expected_kill else rc, self.out_path, self.err_path,
                            self.env, False, expect_rc or self.expect_rc)
        self.r.rc = rc
        self.r.kv = parse_kv(self.r.stdout, skip=("ev ",))[0]
        log(f"\n=== {self.name} ended: {self.r.status()} after {self.r.secs:.1f}s"
            + ("  ** UNEXPECTED **" if unexpected else ""))
        log("  --- stdout")
        log(clip_lines(self.r.stdout, 120, 120))
        log("  --- stderr")
        log(clip_lines(self.r.stderr, 40, 120))
        return self.r


class Trace:
    """nvml_trace.py in the background (not under the shim)."""

    def __init__(self, name):
        self.path = os.path.join(C.runs_dir, name + ".trace")
        self.err_path = os.path.join(C.runs_dir, name + ".trace.err")
        ready = os.path.join(C.runs_dir, name + ".trace.ready")
        for p in (self.path, ready):
            if os.path.exists(p):
                os.unlink(p)
        self.error = ""
        argv = [PY, os.path.join(HERE, "nvml_trace.py"), self.path, "--interval-ms", "20",
                "--ready", ready, "--max-s", "400"]
        log_cmd(name + " (NVML trace)", argv, C.base_env)
        with open(self.err_path, "w") as ef:
            self.p = subprocess.Popen(argv, env=C.base_env, stdout=subprocess.DEVNULL, stderr=ef)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if os.path.exists(ready):
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        self.error = "nvml_trace did not start: " + self._last_err()
        log("  " + self.error)
        self.stop()

    def _last_err(self):
        try:
            with open(self.err_path) as f:
                err = f.read().strip().splitlines()
        except OSError:
            err = []
        return err[-1] if err else f"rc={self.p.poll()}"

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    def read(self):
        """(baseline pids, [(mono, {pid: bytes})], errors, end line)."""
        base, samples, errors, end = set(), [], 0, ""
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except OSError:
            return base, samples, 0, "no trace file"
        for line in lines:
            if line.startswith("baseline pids="):
                base = {int(x) for x in line.split("=", 1)[1].split(",") if x.strip().isdigit()}
            elif line.startswith("s mono="):
                parts = line.split()
                try:
                    mono = float(parts[1].split("=", 1)[1])
                    used = {int(a): int(b) for a, b in (t.split(":") for t in parts[2:])}
                except (IndexError, ValueError):
                    continue
                samples.append((mono, used))
            elif line.startswith("err "):
                errors += 1
            elif line.startswith("end "):
                end = line
        return base, samples, errors, end

    def stats(self, pids, t0, t1):
        """Max over [t0, t1] of the summed NVML usage of `pids` (the pids not in the baseline
        when NVML never shows these pids: another pid namespace). Returns a dict or None."""
        if self.error:
            return None
        base, samples, errors, end = self.read()
        sel = [(m, u) for m, u in samples if t0 <= m <= t1]
        if not sel:
            if self.p.poll() is not None and not end:
                self.error = "nvml_trace died: " + self._last_err()
            return None
        seen = any(p in u for _, u in samples for p in pids)
        use = set(pids) if seen else {p for _, u in samples for p in u if p not in base}
        if not use:
            return {"max_sum": 0, "at": None, "per_pid": {}, "samples": len(sel), "errors": errors,
                    "how": "NVML never listed these processes (nor any new one)"}
        best, best_at, per = 0, None, {}
        for m, u in sel:
            s = sum(b for p, b in u.items() if p in use)
            if s > best:
                best, best_at = s, m
            for p in use:
                if p in u:
                    per[p] = max(per.get(p, 0), u[p])
        return {"max_sum": best, "at": best_at, "per_pid": per, "samples": len(sel),
                "errors": errors, "how": "pid" if seen else f"new pids {sorted(use)} (pid namespace?)"}


# ----------------------------------------------------------------------------- the controller

def start_serve():
    """Start `gpuslice serve`; True once the socket exists and `gpuslice status` answers."""
    cfg = os.path.join(C.runs_dir, "controller.toml")
    with open(cfg, "w") as f:
        f.write(f'[groups.{GROUP}]\nmemory_limit = "{LIMIT1_GIB}GiB"\n')
    log(f"\n--- config file {cfg}:\n" + open(cfg).read().rstrip())
    if os.path.exists(C.socket):
        os.unlink(C.socket)
    env = dict(C.base_env)
    env["GPUSLICE_LOG"] = C.ctl_log
    argv = [C.bin, "serve", "--socket", C.socket, "--ledger", C.ledger, "--config", cfg]
    out_path = os.path.join(C.runs_dir, "serve.out")
    err_path = os.path.join(C.runs_dir, "serve.err")
    C.serve_paths = (out_path, err_path, env)
    log_cmd("gpuslice serve", argv, env)
    t0 = time.monotonic()
    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        try:
            C.serve = subprocess.Popen(argv, env=env, stdout=fo, stderr=fe, cwd=C.build)
        except OSError as e:
            record("0", N0, False, "-",
                   f"cannot start gpuslice serve: {e}")
            C.crashes.append(f"gpuslice serve: cannot start: {e}")
            return False, 0.0
    end = t0 + 15
    why = "socket never appeared"
    while time.monotonic() < end:
        if C.serve.poll() is not None:
            why = f"gpuslice serve exited rc={C.serve.returncode}"
            break
        if os.path.exists(C.socket):
            r = cli("status", [], timeout=5.0, quiet=True)
            if r.ok():
                up = time.monotonic() - t0
                log(f"  controller up after {up:.2f}s (socket + status rc=0)")
                cli("status", [], timeout=5.0)  # once more, into the log
                return True, up
            why = f"gpuslice status: {r.why()}"
        time.sleep(0.05)
    if C.serve.poll() is None:
        C.serve.kill()
    C.serve.wait()
    last = [l for l in gpucommon.read_clipped(err_path).splitlines() if l.strip()]
    if last:
        why += f": {last[-1].strip()[:200]}"
    log(f"  controller did not come up: {why}")
    log("  serve stderr:\n" + clip_lines(gpucommon.read_clipped(err_path), 40, 80))
    C.serve = None
    C.crashes.append(f"gpuslice serve: {why}")
    record("0", N0, False, "-", why)
    return False, 0.0


def serve_alive():
    return C.serve is not None and C.serve.poll() is None


def stop_serve(up_s):
    if C.serve is None:
        return
    died = C.serve.poll()
    stop_s, note = None, ""
    if died is None:
        t0 = time.monotonic()
        C.serve.send_signal(signal.SIGTERM)
        try:
            rc = C.serve.wait(timeout=10)
            stop_s = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            C.serve.kill()
            rc = C.serve.wait()
            note = "did not stop within 10 s of SIGTERM (killed)"
            C.crashes.append("gpuslice serve: " + note)
        if rc not in (0, -signal.SIGTERM, 128 + signal.SIGTERM) and not note:
            note = f"exited rc={rc} on SIGTERM"
            C.crashes.append("gpuslice serve: " + note)
    else:
        rc = died
        note = f"controller exited by itself during the run (rc={rc})"
        C.crashes.append("gpuslice serve: " + note)
    out_path, err_path, env = C.serve_paths
    log(f"\n=== gpuslice serve ended: rc={rc}" + (f" {stop_s:.2f}s after SIGTERM" if stop_s else ""))
    log("  --- stdout\n" + clip_lines(gpucommon.read_clipped(out_path), 40, 40))
    log("  --- stderr\n" + clip_lines(gpucommon.read_clipped(err_path), 150, 250))
    if up_s:
        record("0", N0, not note,
               f"up in {up_s:.2f}s; stopped in {f1(stop_s, 2)}s rc={rc}", note)
    C.serve = None


# ----------------------------------------------------------------------------- checks 1-3

def fail_all(ids_names, why):
    for cid, name in ids_names:
        record(cid, name, False, "-", why)


N1 = f"group {GROUP} limit {LIMIT1_GIB}GiB (config): A 2GiB + B to OOM, NVML sum"
N2 = f"set --group {GROUP} --memory {LIMIT2_GIB}GiB: B allocates more, no restart"
N3 = "kill -9 A: its memory back to the group within 1 s"


def check_memory():
    names = [("1", N1), ("2", N2), ("3", N3)]
    if remaining() < 70:
        fail_all(names, "skipped: time budget spent")
        return
    trace = Trace("mem")
    t_trace0 = time.monotonic()
    member_env = env_shim({"GPUSLICE_GROUP": GROUP})
    a = Child("memA_hold", [PY, MEMBER, "hold", "--tensors", str(A_TENSORS),
                            "--max-s", str(CHILD_MAX_S)], member_env)
    b = Child("memB_worker", [PY, MEMBER, "worker", "--max-s", str(CHILD_MAX_S)], member_env)
    try:
        _memory_steps(trace, t_trace0, a, b, names)
    finally:
        if b.alive():
            b.send("quit")
        b.finish(30)
        a.finish(30)
        trace.stop()
        _, samples, errors, end = trace.read()
        log(f"  NVML trace: {len(samples)} samples, {errors} errors, {end or 'no end line'}"
            + (f" ({trace.error})" if trace.error else ""))


def _memory_steps(trace, t_trace0, a, b, names):
    ka = a.wait_key("ready", 90)
    kb = b.wait_key("ready", 90)
    if ka is None or kb is None:
        who = " and ".join(n for n, k in (("A", ka), ("B", kb)) if k is None)
        fail_all(names, f"{who} never got ready (see {C.runs_dir}/memA_hold.err, memB_worker.err)")
        return
    probs = [f"{n}: preloaded_gpuslice={k.get('preloaded_gpuslice')}"
             for n, k in (("A", ka), ("B", kb)) if k.get("preloaded_gpuslice") != "1"]
    a_mib = int(ka.get("held_mib", "0") or 0)
    a_note = "" if ka.get("hold_ok") == "1" else (
        f"A held only {a_mib} MiB ({ka.get('hold_stop')}: {ka.get('hold_error_type')} "
        f"{ka.get('hold_error')})")
    js0, _, lerr = ls(quiet=False)
    g0 = find_group(js0, GROUP)
    members0 = g0.get("members") if isinstance(g0, dict) else None
    log(f"  ls before the fill: group {GROUP} members={members0} used/limit="
        f"{group_figs(js0, GROUP)[:2]} {lerr}")

    # ---- check 1: B fills to the 6 GiB group limit
    b.send(f"fill {FILL1_CAP} {FILL_SLEEP_MS} f1")
    kb = b.wait_key("f1_done", 60)
    if kb is None:
        fail_all(names, "B did not finish its first fill (crashed or hung)")
        return
    time.sleep(0.3)  # let NVML see the peak
    js1, _, lerr1 = ls(quiet=False)
    used1, limit1, gnote1 = group_figs(js1, GROUP)
    t_set0 = time.monotonic()
    st1 = trace.stats([a.pid, b.pid], t_trace0, t_set0)
    b1 = int(kb.get("f1_tensors", "0") or 0)
    stop1, etype1 = kb.get("f1_stop"), kb.get("f1_error_type", "")
    bound1 = LIMIT1_GIB * GIB * NVML_SLACK
    oom1 = stop1 == "oom" and etype1.endswith("OutOfMemoryError")
    notes = list(probs) + ([a_note] if a_note else [])
    if not oom1:
        notes.append(f"B stopped by {stop1} ({etype1} {kb.get('f1_error', '')})".strip())
    if b1 < FILL1_FLOOR:
        notes.append(f"B got only {b1} tensors (< {FILL1_FLOOR}: refuses too early?)")
    if st1 is None:
        notes.append(trace.error or "no NVML samples")
    elif st1["how"] != "pid":
        notes.append("NVML: " + st1["how"])
    if limit1 is not None and limit1 != LIMIT1_GIB * GIB:
        notes.append(f"ls shows limit {gib(limit1)}, not {LIMIT1_GIB}GiB")
    if gnote1 or lerr1:
        notes.append(gnote1 or lerr1)
    per1 = st1["per_pid"] if st1 else {}
    figs1 = (f"A={a_mib}MiB B={b1 * TENSOR_MIB}MiB ({b1} tensors, {etype1.rsplit('.', 1)[-1] or stop1}) "
             f"NVML max sum={mib(st1['max_sum'] if st1 else None)} <= {bound1 / MIB:.0f} "
             f"(A {mib(per1.get(a.pid))}, B {mib(per1.get(b.pid))}; {st1['samples'] if st1 else 0} samples) "
             f"ls used={gib(used1)} limit={gib(limit1)}")
    ok1 = (st1 is not None and 0 < st1["max_sum"] <= bound1 and oom1 and b1 >= FILL1_FLOOR
           and not probs and not a_note)
    record("1", N1, ok1, figs1, "; ".join(notes))
    oom_first = [l for l in kb.get("f1_error_full", "").split(" | ") if "capacity" in l or "limit" in l]
    if oom_first:
        log(f"  B's OOM message (capacity line): {oom_first[0]}")

    # ---- check 2: raise the limit to 10 GiB while B lives
    s = cli("set", ["--group", GROUP, "--memory", f"{LIMIT2_GIB}GiB"])
    t_set1 = time.monotonic()
    time.sleep(OBEY_S)
    b.send(f"fill {FILL2_CAP} {FILL_SLEEP_MS} f2")
    kb = b.wait_key("f2_done", 60)
    if kb is None:
        fail_all(names[1:], "B did not finish its second fill (crashed or hung)")
        return
    time.sleep(0.3)
    js2, _, lerr2 = ls(quiet=False)
    used2, limit2, gnote2 = group_figs(js2, GROUP)
    t_pre_kill = time.monotonic()
    st2 = trace.stats([a.pid, b.pid], t_set0, t_pre_kill)
    b2 = int(kb.get("f2_tensors", "0") or 0)
    stop2, etype2 = kb.get("f2_stop"), kb.get("f2_error_type", "")
    bound2 = LIMIT2_GIB * GIB * NVML_SLACK
    notes = []
    if not s.ok():
        notes.append(f"set: {s.why()}")
    if stop2 == "error":
        notes.append(f"B's allocation failed with {etype2} {kb.get('f2_error', '')}")
    if b2 < FILL2_MIN_MORE:
        notes.append(f"only {b2} more tensors")
    if st2 is None:
        notes.append(trace.error or "no NVML samples")
    if limit2 is not None and limit2 != LIMIT2_GIB * GIB:
        notes.append(f"ls shows limit {gib(limit2)}, not {LIMIT2_GIB}GiB")
    if gnote2 or lerr2:
        notes.append(gnote2 or lerr2)
    first_new = kb.get("f2_t0_mono")
    figs2 = (f"set rc={s.rc} ({s.secs * 1000:.0f}ms); B +{b2} tensors (+{b2 * TENSOR_MIB}MiB, stop={stop2}"
             f"{', ' + etype2.rsplit('.', 1)[-1] if etype2 else ''}; first try "
             f"{(float(first_new) - t_set1) * 1000 if first_new else float('nan'):.0f}ms after set) "
             f"NVML max sum={mib(st2['max_sum'] if st2 else None)} <= {bound2 / MIB:.0f} "
             f"ls used={gib(used2)} limit={gib(limit2)}")
    ok2 = (s.ok() and b2 >= FILL2_MIN_MORE and stop2 in ("oom", "cap") and st2 is not None
           and 0 < st2["max_sum"] <= bound2)
    record("2", N2, ok2, figs2, "; ".join(notes))

    # ---- check 3: kill -9 A; B regains A's 2 GiB
    _check_kill(trace, a, b, a_mib, js2)


def _check_kill(trace, a, b, a_mib, js_pre):
    if not a.alive():
        record("3", N3, False, "-", f"A is not alive before the kill ({a.p.poll() if a.p else '-'})")
        return
    need = max(1, a_mib // TENSOR_MIB)
    a_bytes = need * TENSOR_MIB * MIB
    g_pre, _, _ = group_figs(js_pre, GROUP)
    pb, pa = find_proc(js_pre, b.pid), find_proc(js_pre, a.pid)
    b_pre = num(dev0(pb), "used") if pb else None
    log(f"  before the kill: group used={gib(g_pre)} B used={gib(b_pre)} "
        f"A used={gib(num(dev0(pa), 'used') if pa else None)}")
    b.send(f"regain {need} 4.0 {REGAIN_INTERVAL_MS} r3")
    if b.wait_key("r3_started", 10) is None:
        record("3", N3, False, "-", "B did not start its retries")
        return
    time.sleep(0.1)  # B is refused a few times first: it is at the limit
    t_kill = time.monotonic()
    a.killed = True
    os.kill(a.pid, signal.SIGKILL)
    reaper = threading.Thread(target=lambda: a.p.wait(), daemon=True)  # no zombie left to look alive
    reaper.start()
    log(f"  kill -9 A (pid {a.pid}) at mono={t_kill:.6f}")
    # Poll ls until A's part of the group's usage is gone (B refilling does not hide it).
    t_ls, how, polls, last = None, "", 0, ""
    while time.monotonic() - t_kill < 3.0:
        js, _, err = ls()
        polls += 1
        t = time.monotonic() - t_kill
        if js is None:
            last = err
            continue
        g_used, _, gerr = group_figs(js, GROUP)
        pb = find_proc(js, b.pid)
        b_used = num(dev0(pb), "used") if pb else None
        g = find_group(js, GROUP) or {}
        a_listed = a.pid in (g.get("members") or []) or find_proc(js, a.pid) is not None
        if g_used is not None and b_used is not None and g_pre is not None and b_pre is not None:
            last = f"group-B={gib(g_used - b_used)}"
            if g_used - b_used <= (g_pre - b_pre) - a_bytes:
                t_ls, how = t, "group used - B used fell by A's 2 GiB"
                break
        elif not a_listed:
            t_ls, how = t, "A no longer listed (ls shows no per-process used for B)"
            break
        else:
            last = gerr or f"group used={gib(g_used)} (no per-process used for B)"
        time.sleep(0.01)
    log(f"  ls after the kill: {polls} polls; " + (f"A's memory gone at +{t_ls * 1000:.0f} ms ({how})"
                                                    if t_ls is not None else f"never gone in 3 s (last: {last})"))
    kb = b.wait_key("r3_done", 10)
    reaper.join(timeout=10)
    ls(quiet=False)
    if kb is None:
        record("3", N3, False, f"ls={f1(t_ls and t_ls * 1000, 0)}ms", "B did not finish its retries")
        return
    succ = [float(x) for x in kb.get("r3_success_monos", "").split(",") if x]
    fails = [float(x) for x in kb.get("r3_fail_monos", "").split(",") if x]
    got = int(kb.get("r3_got", "0") or 0)
    before = sum(1 for x in succ if x < t_kill)
    fails_before = sum(1 for x in fails if x < t_kill)
    t_all = (succ[need - 1] - t_kill) if got >= need and len(succ) >= need else None
    t_first = next((x - t_kill for x in succ if x >= t_kill), None)
    st = trace.stats([a.pid, b.pid], t_kill, time.monotonic())
    notes = []
    if kb.get("r3_stop") == "error":
        notes.append(f"B's allocation failed: {kb.get('r3_error_type')}")
    if got < need:
        notes.append(f"B got only {got}/{need} tensors in 4 s")
    if t_ls is None:
        notes.append(f"ls never showed A's memory gone within 3 s ({last})")
    if fails_before == 0:
        notes.append(f"B was not refused before the kill ({before} tensors came before it): "
                     "not at its limit, the figure overstates the speed")
    ok = (t_all is not None and t_all <= REGAIN_MAX_S and t_ls is not None and t_ls <= REGAIN_MAX_S)
    figs = (f"B +{need * TENSOR_MIB}MiB at +{f1(t_all and t_all * 1000, 0)}ms (first +"
            f"{f1(t_first and t_first * 1000, 0)}ms; refused {fails_before}x before the kill); "
            f"ls shows A's {a_mib}MiB gone at +{f1(t_ls and t_ls * 1000, 0)}ms ({polls} polls); "
            f"NVML max sum after kill={mib(st['max_sum'] if st else None)} (info)")
    record("3", N3, ok, figs, "; ".join(notes))


# ----------------------------------------------------------------------------- check 4

N4 = (f"SM shares via set --pid: {SM_FIRST[0]}+{SM_FIRST[1]}, then "
      f"{SM_SECOND[0]}+{SM_SECOND[1]} at +{SM_SWITCH_AT:g}s, {SM_KERNEL_US}us")


def set_sm(pid, share, retry_s=0.0):
    """gpuslice set --pid PID --sm SHARE, retried every 100 ms for retry_s when refused
    (the process may not have registered yet). Returns the last Cli."""
    end = time.monotonic() + retry_s
    while True:
        r = cli("set", ["--pid", pid, "--sm", share], timeout=5.0)
        if r.ok() or r.problem or time.monotonic() >= end:
            return r
        time.sleep(0.1)


def proc_share(js, pid):
    """(achieved_share, share) that ls shows for a process alone: its process entry, else
    its group pid-<PID>."""
    p = find_proc(js, pid)
    g = find_group(js, f"pid-{pid}")
    ach = num(dev0(p), "achieved_share") if p else None
    if ach is None and g:
        ach = num(dev0(g), "achieved_share")
    share = num(dev0(g), "share") if g else None
    return ach, share


def check_sm():
    prog = have("sharebench")
    if not prog:
        record("4", N4, False, "-", "sharebench not built")
        return
    if remaining() < SM_PAIR_S + 2 * SM_BASE_S + 45:
        record("4", N4, False, "-", "skipped: time budget spent")
        return
    cal = shares.run(f"ctl_calibrate_{SM_KERNEL_US}us", [prog, "calibrate", str(SM_KERNEL_US)],
                     gpucommon.env_for(False), 60, 10)
    prob = shares.run_problem(cal, shim=False, need_rate=False)
    iters, kus = cal.num("iters"), cal.num("kernel_us")
    if prob or not iters or not kus or abs(kus - SM_KERNEL_US) > 0.05 * SM_KERNEL_US:
        record("4", N4, False, f"iters={iters} kernel_us={kus}",
               prob or f"calibration: kernel_us not within 5% of {SM_KERNEL_US}")
        return
    iters = int(iters)
    base_argv = shares.sb_argv(prog, iters, SM_BASE_S)
    base_a = shares.run("ctl_base_a", base_argv, gpucommon.env_for(False), SM_BASE_S + 30,
                        SM_BASE_S + 10)

    go = os.path.join(C.runs_dir, "ctl_pair.go")
    if os.path.exists(go):
        os.unlink(go)
    env = env_shim({})
    argv = shares.sb_argv(prog, iters, SM_PAIR_S, go_file=go)
    rs, procs = [], []
    t_start = time.time()
    for tag in ("A", "B"):
        r = shares.Run(f"ctl_pair_{tag}")
        p, op, ep = shares.start(r.name, argv, env)
        rs.append(r)
        procs.append((p, op, ep))
    sets, notes, ls_rows = [], [], []
    pids, t_switch, t_go = [], None, None
    try:
        gpucommon.wait_ready([(p, op) for p, op, _ in procs], 60)
        pids = [p.pid if p else -1 for p, _, _ in procs]
        log(f"  pair: both ready {time.time() - t_start:.2f}s after the start (pids {pids})")
        for pid, s in zip(pids, SM_FIRST):
            sets.append(("before go", pid, s, set_sm(pid, s, retry_s=2.0)))
        time.sleep(0.2)  # the shims obey within 100 ms
        js, _, _ = ls(quiet=False)
        for pid, s in zip(pids, SM_FIRST):
            ls_rows.append(("before go", pid) + proc_share(js, pid))
        with open(go, "w") as f:
            f.write("go\n")
        t_go = time.monotonic()
        log(f"  pair: go file written at mono={t_go:.6f}")
        # The schedule: ls samples in both windows, the switch to 50/50 between them.
        events = [(t, "ls") for t in LS_AT] + [(SM_SWITCH_AT, "switch")]
        for at, what in sorted(events):
            delay = t_go + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if what == "switch":
                t_switch = time.monotonic() - t_go
                for pid, s in zip(pids, SM_SECOND):
                    sets.append((f"+{at:g}s", pid, s, set_sm(pid, s)))
                log(f"  pair: switched to {SM_SECOND} at +{t_switch:.3f}s")
            else:
                js, _, err = ls()
                for pid in pids:
                    ls_rows.append((f"+{at:g}s", pid) + (proc_share(js, pid) if js else (None, None)))
        for (p, op, ep), r in zip(procs, rs):
            left = max(5.0, t_go + SM_PAIR_S + 40 - time.monotonic())
            rc = gpucommon.wait_proc(p, r, left)
            r.secs = time.time() - t_start
            shares.finish(r, rc, op, ep, env, False)
    finally:
        for p, _, _ in procs:  # only when something above went wrong
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    base_b = shares.run("ctl_base_b", base_argv, gpucommon.env_for(False), SM_BASE_S + 30,
                        SM_BASE_S + 10)
    r0, drift, bnote = shares.baseline_pair("200us alone", [base_a, base_b])
    if bnote:
        notes.append(bnote)
    if drift is not None and abs(drift) > 0.02:
        notes.append(f"no-shim baseline drifted {drift * 100:+.1f}%")
    for when, pid, s, r in sets:
        if not r.ok():
            notes.append(f"set --pid {pid} --sm {s} ({when}): {r.why()}")
    if t_switch is not None and t_switch > SM_SWITCH_AT + 0.5:
        notes.append(f"the switch came late (+{t_switch:.2f}s)")
    probs = [shares.run_problem(r, shim=True) for r in rs]
    probs = [p for p in probs if p]
    ls_txt = _ls_summary(ls_rows, pids)
    if probs or r0 is None:
        record("4", N4, False, ls_txt, "; ".join(probs + notes) or "no baseline")
        return
    starts = [r.num("mono_start") for r in rs]
    ends = [r.num("mono_end") for r in rs]
    lo, hi = max(starts), min(ends)
    parts, bad = [], []
    for wi, ((w0, w1), targets) in enumerate(zip(SM_WINDOWS, (SM_FIRST, SM_SECOND))):
        a0, a1 = max(t_go + w0, lo), min(t_go + w1, hi)
        if a1 - a0 < 1.5:
            bad.append(f"window {w0:g}-{w1:g}s: both ran together for only {a1 - a0:.2f}s of it")
            parts.append(f"w{wi + 1}:?")
            continue
        achs = []
        for tag, r, s in zip("AB", rs, targets):
            pts = shares.mono_points(r)
            rate = (shares.count_at(pts, a1) - shares.count_at(pts, a0)) / (a1 - a0)
            ach = rate / r0 * 100.0
            achs.append(ach)
            ok = abs(ach - s) <= SM_TOL
            if not ok:
                bad.append(f"w{wi + 1} {tag} {s}% -> {ach:.1f}%")
            cell(f"4.w{wi + 1}.{tag}", f"window {w0:g}-{w1:g}s process {tag} at {s}%",
                 "PASS" if ok else "FAIL",
                 f"achieved={ach:.2f}% target={s} rate={rate:.1f}/s R0={r0:.1f}/s "
                 f"window={a1 - a0:.2f}s clk={shares.clock_of(r)}")
        parts.append(f"w{wi + 1}({w0:g}-{w1:g}s) " + " ".join(
            f"{s}:{x:.1f}" for s, x in zip(targets, achs)) + f" sum={sum(achs):.1f}")
    figs = (" | ".join(parts) + f" | R0={r0:.0f}/s"
            + (f" drift={drift * 100:+.1f}%" if drift is not None else "") + f" | {ls_txt}")
    record("4", N4, not bad and not any(not r.ok() for _, _, _, r in sets), figs,
           "; ".join(bad + notes))


def _ls_summary(rows, pids):
    """ls's achieved_share per process and window (as ls prints it), for comparison."""
    out = []
    for tag, pid in zip("AB", pids):
        w1 = [a for when, p, a, _ in rows if p == pid and a is not None
              and when.startswith("+") and float(when[1:-1]) < SM_SWITCH_AT]
        w2 = [a for when, p, a, _ in rows if p == pid and a is not None
              and when.startswith("+") and float(when[1:-1]) > SM_SWITCH_AT]
        shares_seen = sorted({s for when, p, _, s in rows if p == pid and s is not None})
        out.append(f"{tag}: {f1(statistics.mean(w1), 3) if w1 else '?'}/"
                   f"{f1(statistics.mean(w2), 3) if w2 else '?'}"
                   + (f" (share {','.join(str(s) for s in shares_seen)})" if shares_seen else ""))
    return "ls achieved_share w1/w2 " + " ".join(out)


# ----------------------------------------------------------------------------- check 5

N5 = "gpuslice run --memory 1GiB -- python (extra)"


def check_run():
    if remaining() < 40:
        record("5", N5, False, "-", "skipped: time budget spent")
        return
    env = dict(C.base_env)
    env["GPUSLICE_SOCKET"] = C.socket
    env["GPUSLICE_LIB"] = C.lib
    env["GPUSLICE_LOG"] = C.shim_log
    argv = [C.bin, "run", "--memory", "1GiB", "--", PY, MEMBER, "probe", "--hold-s", "2",
            "--cap", "8", "--max-s", "90"]
    c = Child("run_probe", argv, env)
    notes = []
    k = c.wait_key("ready", 60)
    seen = None
    if k is not None:
        pid = int(k.get("pid", "-1"))
        if pid != c.pid:
            notes.append(f"the program's pid {pid} is not run's pid {c.pid} (run did not exec)")
        end = time.monotonic() + 1.5
        while time.monotonic() < end and seen is None:
            js, _, _ = ls()
            p = find_proc(js, pid)
            if p is not None:
                seen = (p.get("group"), num(dev0(p), "limit"))
            time.sleep(0.1)
        ls(quiet=False)
    r = c.finish(60)
    kv = r.kv
    total = kv.get("total_mib")
    ok = (not r.crashed and kv.get("done") == "1" and kv.get("preloaded_gpuslice") == "1"
          and total is not None and abs(float(total) - 1024) < 0.5 and kv.get("fill_stop") == "oom"
          and seen is not None)
    if kv.get("preloaded_gpuslice") != "1":
        notes.append(f"preloaded_gpuslice={kv.get('preloaded_gpuslice')}")
    if seen is None:
        notes.append("its pid never showed in ls --json")
    if kv.get("fill_stop") != "oom":
        notes.append(f"fill ended by {kv.get('fill_stop')} {kv.get('fill_error_type', '')}")
    if r.crashed:
        notes.append(r.status())
    figs = (f"rc={r.rc} total={total}MiB tensors={kv.get('fill_tensors')} stop={kv.get('fill_stop')} "
            f"ls: group={seen[0] if seen else '?'} limit={gib(seen[1]) if seen else '?'}")
    record("5", N5, ok, figs, "; ".join(notes))


# ----------------------------------------------------------------------------- cleanup, report

def sweep():
    """Kill (by pid) every process still alive that carries this run's token."""
    gpucommon.sweep_token(TOKEN_VAR, C.token)


def cleanup(up_s):
    gpucommon.ignore_signals()
    for c in list(C.children):
        try:
            c.finish(5)
        except Exception as e:  # noqa: BLE001 - keep cleaning up
            log(f"  cleanup of {c.name}: {e}")
    stop_serve(up_s)
    sweep()


def write_results_and_table():
    done = {r[0] for r in C.results}
    for cid in IDS:
        if cid not in done:
            names = {"0": N0, "1": N1, "2": N2, "3": N3, "4": N4, "5": N5}
            record(cid, names[cid], False, "-", "not reached: stopped, or a harness error (see the log)")
    rows = gpucommon.sorted_results(IDS)
    clean = gpucommon.clean
    with open(os.path.join(C.out, "controller.tsv"), "w") as f:
        f.write("id\tcheck\tverdict\tfigures\tnote\n")
        for row in rows:
            f.write("\t".join(clean(x) for x in row) + "\n")
        for row in C.cells:
            f.write("\t".join(clean(x) for x in row) + "\n")
    lines = gpucommon.table_lines(rows, "gpuslice controller " + time.strftime("%Y-%m-%d %H:%M:%S")
                                  + f"  (NVML slack x{NVML_SLACK}; shares +-{SM_TOL:g} points)")
    lines.append(gpucommon.summary_line(rows))
    gpucommon.emit(lines)


def main():
    ap = gpucommon.arg_parser(215.0)
    ap.add_argument("--bin", required=True, help="the gpuslice binary")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--ledger", required=True)
    ap.add_argument("--shim-log", default="info", help="GPUSLICE_LOG for runs under the shim")
    ap.add_argument("--ctl-log", default="info", help="GPUSLICE_LOG for gpuslice serve")
    args = ap.parse_args()
    gpucommon.setup("controller", args, "ctl_runs", "controller.log")
    C.bin = os.path.abspath(args.bin)
    C.socket = os.path.abspath(args.socket)
    C.ledger = os.path.abspath(args.ledger)
    C.shim_log = args.shim_log
    C.ctl_log = args.ctl_log
    C.mono_to_epoch = time.time() - time.monotonic()
    C.token = os.environ.get(TOKEN_VAR, "")
    C.base_env = gpucommon.scrubbed_env(SCRUB_PREFIXES, SCRUB_NAMES)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    log(f"\n##### controller: lib={C.lib} bin={C.bin} socket={C.socket} ledger={C.ledger} "
        f"build={C.build} out={C.out} python={PY} time left={remaining():.0f}s")
    up_s = 0.0
    try:
        if not os.access(C.bin, os.X_OK):
            C.missing.append("gpuslice binary")
            record("0", N0, False, "-",
                   f"{C.bin} is not executable")
        else:
            ok, up_s = start_serve()
            if ok:
                check_memory()
                if not serve_alive():
                    log("  the controller died during checks 1-3")
                check_sm()
                check_run()
            else:
                fail_all([("1", N1), ("2", N2), ("3", N3), ("4", N4), ("5", N5)],
                         "the controller did not start")
    except Stopped as e:
        log(f"\n##### stopped by {e} with {remaining():.0f}s of the budget left")
        C.crashes.append(f"controller.py: stopped by {e}")
    except Exception as e:  # a harness bug must still leave a table behind
        gpucommon.harness_error(e)
    finally:
        cleanup(up_s)
    write_results_and_table()
    return gpucommon.exit_status()


if __name__ == "__main__":
    sys.exit(main())
