"""What harness.py (memory quotas, `make gpu-test`) and shares.py (SM shares, `make gpu-bench`)
share: the run context, the log, the scrubbed base environment, starting a program with its
output in files and settling its result, recording verdicts, and the table's frame.

Standard library only. Both scripts run with tests/gpu/ first on sys.path (python3 puts a
script's own directory there), so `import gpucommon` finds this file.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))  # tests/gpu
PY = sys.executable or "python3"


class Ctx:
    name = ""        # "harness" or "shares": the prefix of its own error lines
    lib = ""
    build = ""
    out = ""
    runs_dir = ""
    t0 = 0.0
    deadline = 0.0
    shim_log = "info"  # GPUSLICE_LOG for runs under the shim
    log = None
    base_env = {}
    crashes = []
    missing = []
    results = []  # (id, name, verdict, figures, note)


# The one context of this process; each script adds its own fields to it.
C = Ctx()


# ----------------------------------------------------------------------------- logging

def log(text=""):
    C.log.write(text + "\n")
    C.log.flush()


def clip_lines(text, head, tail):
    lines = text.splitlines()
    if len(lines) <= head + tail:
        return text.rstrip("\n")
    return "\n".join(lines[:head] + [f"... [{len(lines) - head - tail} lines left out] ..."]
                     + lines[-tail:])


def read_clipped(path, edge=2 << 20):
    """A file's text; only its first and last `edge` bytes when it is larger (chatty logs)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= 2 * edge:
            data = f.read()
        else:
            head = f.read(edge)
            f.seek(size - edge)
            data = head + f"\n... [{size - 2 * edge} bytes left out] ...\n".encode() + f.read()
    return data.decode("utf-8", errors="replace")


def remaining():
    return C.deadline - time.time()


# ----------------------------------------------------------------------------- setup

def arg_parser(budget_s):
    """The options both scripts take; each adds its own."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--build", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--t0", type=float, default=None, help="epoch seconds the whole run began")
    ap.add_argument("--budget-s", type=float, default=budget_s)
    return ap


def setup(name, args, runs_subdir, log_name):
    """Fill C from the parsed options; runs go to BUILD/runs_subdir, the log to OUT/log_name
    (appended: the shell entry point has written its part already)."""
    C.name = name
    C.lib = os.path.abspath(args.lib)
    C.build = os.path.abspath(args.build)
    C.out = os.path.abspath(args.out)
    C.runs_dir = os.path.join(C.build, runs_subdir)
    os.makedirs(C.runs_dir, exist_ok=True)
    os.makedirs(C.out, exist_ok=True)
    C.t0 = args.t0 if args.t0 else time.time()
    C.deadline = C.t0 + args.budget_s
    C.log = open(os.path.join(C.out, log_name), "a")


def scrubbed_env(prefixes, names):
    """os.environ without the inherited variables that would change what a run does."""
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(prefixes) or k in names:
            del env[k]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def env_for(shim, extra=None):
    env = dict(C.base_env)
    if shim:
        env["LD_PRELOAD"] = C.lib
        env["GPUSLICE_LOG"] = C.shim_log
    if extra:
        env.update(extra)
    return env


def env_delta(env):
    keys = sorted(k for k in env if env.get(k) != C.base_env.get(k))
    return " ".join(f"{k}={env[k]!r}" for k in keys) or "(base environment)"


def have(prog):
    path = os.path.join(C.build, prog)
    if os.access(path, os.X_OK):
        return path
    if prog not in C.missing:
        C.missing.append(prog)
    return None


# ----------------------------------------------------------------------------- running

class Run:
    """One program's run; the scripts add what they read from it."""

    def __init__(self, name):
        self.name = name
        self.rc = None
        self.kv = {}
        self.stdout = ""
        self.stderr = ""
        self.secs = 0.0
        self.timed_out = False
        self.cut = False  # stopped by the overall time budget, not by its own timeout
        self.skipped = False
        self.crashed = False
        self.preload_failed = False

    def get(self, key, default=None):
        return self.kv.get(key, default)

    def num(self, key, default=None):
        try:
            return float(self.kv[key])
        except (KeyError, ValueError):
            return default

    def status(self):
        if self.skipped:
            return "skipped (time budget)"
        if self.cut:
            return f"cut short by the time budget after {self.secs:.0f}s"
        if self.timed_out:
            return f"TIMEOUT after {self.secs:.0f}s"
        if self.rc is not None and self.rc < 0:
            try:
                return f"killed by {signal.Signals(-self.rc).name}"
            except ValueError:
                return f"killed by signal {-self.rc}"
        return f"rc={self.rc}"


def wait_ready(started, timeout_s):
    """Polls (every 10 ms, for at most `timeout_s`) until each (process, stdout path) of `started`
    has printed ready=1 or ended (a process of None counts as ready); returns who had, in order
    (all True unless the time ran out)."""
    ready_by = time.monotonic() + timeout_s
    while True:
        states = []
        for p, out_path in started:
            with open(out_path) as f:
                txt = f.read()
            states.append("ready=1" in txt or p is None or p.poll() is not None)
        if all(states) or time.monotonic() >= ready_by:
            return states
        time.sleep(0.01)


def parse_kv(text, skip=()):
    """key=value lines (keys of [A-Za-z0-9_]) -> ({key: last value}, {key: [values]});
    lines that start with one of `skip` are passed over."""
    kv, multi = {}, {}
    for line in text.splitlines():
        if "=" not in line or line.startswith(skip):
            continue
        k, v = line.split("=", 1)
        k = k.strip()
        if not re.fullmatch(r"[A-Za-z0-9_]+", k):
            continue
        kv[k] = v.strip()
        multi.setdefault(k, []).append(v.strip())
    return kv, multi


def budget(r, timeout, min_needed):
    """(timeout, capped) for a run that may start; None, with r marked skipped, when less than
    min_needed seconds of the time budget are left."""
    left = remaining()
    if left < min_needed:
        r.skipped = True
        log(f"\n=== {r.name}: SKIPPED, {left:.0f}s of the time budget left")
        return None
    return max(1.0, min(timeout, left)), left < timeout


def log_cmd(name, argv, env):
    log(f"\n=== {name}")
    log(f"  cmd: {' '.join(argv)}")
    log(f"  env: {env_delta(env)}")


def spawn(name, argv, env):
    """Start argv in the build folder, stdout/stderr to runs_dir/name.out/.err.
    Returns (Popen or None when it could not start, out_path, err_path)."""
    out_path = os.path.join(C.runs_dir, name + ".out")
    err_path = os.path.join(C.runs_dir, name + ".err")
    fo, fe = open(out_path, "w"), open(err_path, "w")
    try:
        p = subprocess.Popen(argv, env=env, stdout=fo, stderr=fe, cwd=C.build)
    except OSError as e:
        fe.write(f"{C.name}: cannot start: {e}\n")
        p = None
    fo.close()
    fe.close()
    return p, out_path, err_path


def wait_proc(p, r, timeout):
    if p is None:
        return 127
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        r.timed_out = True
        p.kill()
        return p.wait()


def settle(r, rc, out_path, err_path, env, capped, expect_rc=(0,)):
    """Read a finished run's output into r and judge how it ended; counts an unexpected end
    as a crash. Returns whether the end was unexpected."""
    r.rc = rc
    r.stdout = read_clipped(out_path)
    r.stderr = read_clipped(err_path)
    if env.get("LD_PRELOAD") and ("cannot be preloaded" in r.stderr or "ERROR: ld.so" in r.stderr):
        r.preload_failed = True
    if r.timed_out and capped:
        r.cut = True
    unexpected = not r.cut and (r.timed_out or r.rc < 0 or
                                (expect_rc is not None and r.rc not in expect_rc))
    if unexpected:
        r.crashed = True
        C.crashes.append(f"{r.name}: {r.status()}")
    return unexpected


# ----------------------------------------------------------------------------- report

def record(cid, name, ok, figures, note=""):
    verdict = ok if isinstance(ok, str) else ("PASS" if ok else "FAIL")
    C.results.append((cid, name, verdict, figures, note))
    log(f"--> [{cid}] {name}: {verdict}  {figures}" + (f"  ({note})" if note else ""))
    return verdict


def harness_error(e):
    """A bug in the script itself: into the log and the crashes, so a table still follows."""
    import traceback
    log("HARNESS ERROR:\n" + traceback.format_exc())
    C.crashes.append(f"{C.name}: {type(e).__name__}: {e}")


def clean(s):
    return str(s).replace("\t", " ").replace("\n", " ")


def sorted_results(ids):
    order = {cid: i for i, cid in enumerate(ids)}
    return sorted(C.results, key=lambda r: order.get(r[0], 99))


def table_lines(rows, title, id_w=3):
    """The table: a blank line, the title, the header, a row a check (and its note under it
    when the verdict is neither PASS nor INFO); ids padded to id_w."""
    w = max(len(r[1]) for r in rows) if rows else 10
    lines = ["", title, f"{'id':{id_w}s} {'check':{w}s} {'verdict':7s} figures"]
    for cid, name, verdict, figs, note in rows:
        lines.append(f"{cid:{id_w}s} {name:{w}s} {verdict:7s} {figs}")
        if note and verdict not in ("PASS", "INFO"):
            lines.append(f"{'':{id_w}s} {'':{w}s} {'':7s} -> {note}")
    return lines


def crashes_and_missing():
    crashes = ", ".join(C.crashes[:4]) + (f" and {len(C.crashes) - 4} more" if len(C.crashes) > 4 else "")
    return (f"crashes: {crashes or 'none'}"
            + (f"; missing: {', '.join(C.missing)}" if C.missing else ""))


def summary_line(rows, tail=""):
    """The table's last line: judged checks passed, crashes and missing tools, the time since
    the start, then `tail`."""
    judged = [r for r in rows if r[2] in ("PASS", "FAIL")]
    npass = sum(1 for r in judged if r[2] == "PASS")
    return (f"{npass}/{len(judged)} PASS; {crashes_and_missing()}"
            f"; {time.time() - C.t0:.0f}s since the start" + tail)


def emit(lines):
    """The table last into the log (which it closes) and onto stdout."""
    text = "\n".join(lines)
    log(text)
    C.log.close()
    print(text, flush=True)


def exit_status():
    """1 when a program crashed, 2 when something needed was missing, else 0."""
    if C.crashes:
        return 1
    if C.missing:
        return 2
    return 0


# ----------------------------------------------------------------------------- cleanup

class Stopped(BaseException):
    """SIGTERM/SIGINT/SIGHUP while a script runs: it cleans up (children, daemons), still prints
    its table, and exits 1."""


def on_signal(signum, _frame):
    """The scripts' handler for SIGTERM/SIGINT/SIGHUP: raises Stopped."""
    raise Stopped(signal.Signals(signum).name)


def ignore_signals():
    """At the start of a cleanup: SIGTERM/SIGINT/SIGHUP are ignored from here on, so that it
    runs to its end."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def ancestors():
    """This process and its ancestors (the shell entry point and its `timeout` carry the run's
    token too)."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            pid = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def sweep_token(var, token):
    """Kill (by pid, SIGKILL) every process still alive whose environment has var=token, except
    this process and its ancestors; the kills go into the log."""
    if not token:
        return
    needle = f"{var}={token}".encode()
    mine = ancestors()
    killed = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in mine:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
            os.kill(int(d), signal.SIGKILL)
            killed.append(f"{d} ({cmd.strip()})")
        except (OSError, ValueError):
            continue
    if killed:
        log("  cleanup: killed left-over processes: " + "; ".join(killed))


# ----------------------------------------------------------------------------- a controller

class Controller:
    """`gpuslice serve` on a socket and ledger of its own (and a config file, if given), and the
    CLI against it, for the scripts that need a controller of their own (suspend.py,
    guarantee.py's G8). Its output goes to `out_path`; each CLI call is logged through `log`
    (a function of one string) with its wall time. `env` is the environment of the controller
    and of every CLI call (a scrubbed one: no LD_PRELOAD, no GPUSLICE_*). The constructor
    returns once `gpuslice status` answers, or raises RuntimeError (the controller is then
    stopped)."""

    def __init__(self, bin, socket, ledger, env, out_path, log, config=None, up_s=20.0, cli_timeout=30.0):
        self.bin, self.socket, self.env, self.log, self.cli_timeout = bin, socket, env, log, cli_timeout
        self.out_path = out_path
        argv = [bin, "serve", "--socket", socket, "--ledger", ledger] + (["--config", config] if config else [])
        log(f"$ {' '.join(argv)}  (output: {out_path})")
        self.out = open(out_path, "w")
        self.p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() < t0 + up_s:
            if self.p.poll() is not None:
                break
            if os.path.exists(socket) and self.cli("status", quiet=True).returncode == 0:
                log(f"  controller up after {time.monotonic() - t0:.2f} s")
                return
            time.sleep(0.05)
        why = f"exited rc={self.p.returncode}" if self.p.poll() is not None else f"did not answer within {up_s:g} s"
        self.stop()
        with open(out_path) as f:
            last = [line for line in f.read().splitlines() if line.strip()]
        raise RuntimeError(f"gpuslice serve {why}" + (f": {last[-1].strip()[:200]}" if last else ""))

    def cli(self, sub, *args, check=False, quiet=False, timeout=None):
        """gpuslice SUB --socket S ARGS...: the CompletedProcess, with `t0` and `t1` (CLOCK_MONOTONIC
        s around the call: time.monotonic is that clock on Linux) and `secs`. check: a non-zero
        status raises RuntimeError. quiet: logged only when it fails."""
        argv = [self.bin, sub, "--socket", self.socket, *[str(a) for a in args]]
        t0 = time.monotonic()
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout or self.cli_timeout)
        r.t0, r.t1 = t0, time.monotonic()
        r.secs = r.t1 - t0
        if not quiet or r.returncode != 0:
            self.log(f"$ {' '.join(argv)}  -> rc={r.returncode} in {r.secs * 1000:.0f} ms\n{r.stdout.rstrip()}\n{r.stderr.rstrip()}")
        if check and r.returncode != 0:
            raise RuntimeError(f"gpuslice {sub} {' '.join(str(a) for a in args)}: {r.stderr.strip()[-300:]}")
        return r

    def ls(self):
        """`gpuslice ls --json`, parsed; {} when it failed."""
        r = self.cli("ls", "--json", quiet=True)
        try:
            return json.loads(r.stdout) if r.returncode == 0 else {}
        except ValueError:
            return {}

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s; returns its exit status."""
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.out.close()
        return self.p.returncode


# ----------------------------------------------------------------------------- NVML pollers

def poller_args(ap, max_s):
    """The options nvml_trace.py and nvml_watch.py share: --interval-ms, --ready, --max-s."""
    ap.add_argument("--interval-ms", type=float, default=20.0)
    ap.add_argument("--ready", default=None)
    ap.add_argument("--max-s", type=float, default=max_s)


def stop_flag_on_signals():
    """A poller's stop request: a dict whose "flag" turns True, with "why" the signal's name,
    at SIGTERM or SIGINT (the poll loop finishes its round and writes its result)."""
    stop = {"flag": False, "why": ""}

    def on_stop(signum, _frame):
        stop["flag"] = True
        stop["why"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    return stop


def nvml_open():
    """pynvml, initialised, and a handle for every device. Imported here, not at the top: only
    the pollers (never under the shim) need it."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]


def nvml_close(pynvml):
    try:
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - the result is written either way
        pass


def write_ready(path):
    """--ready FILE: written once the baseline poll is done, so the caller starts its target."""
    if path:
        with open(path, "w") as f:
            f.write("ready\n")


# ----------------------------------------------------------------------------- gpuslice ls --json

def dev0(entry):
    """The entry's device 0 (or its first device) as a dict; {} when there is none."""
    devs = [d for d in ((entry or {}).get("devices") or []) if isinstance(d, dict)]
    for d in devs:
        if d.get("device") == 0:
            return d
    return devs[0] if devs else {}


def num(d, key):
    """d[key] when it is a number (not a bool), else None."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
