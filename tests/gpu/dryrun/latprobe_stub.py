"""A stand-in for latprobe (tests/gpu/latprobe.cu) on the simulated driver, for the dry run of
tests/gpu/mps_managed.sh: `calibrate` and `run` with the options that script uses and the same
key=value output (p50_ms, p99_ms, busy_frac, ...). A kernel lasts `--iters` nanoseconds on the
simulated device; a request is `--kernels` of them, then a synchronize."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simdrv import Driver  # noqa: E402
from stubargs import opts, wait_go  # noqa: E402


def pctl(sorted_values, q):
    """Nearest rank, as latprobe's."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, int(q * len(sorted_values) + 0.999999) - 1))
    return sorted_values[k]


def calibrate(o):
    kernels = int(o.get("kernels", "10"))
    iters = int(float(o["request-us"]) * 1000 / kernels)
    print(f"kernels={kernels}\niters={iters}\ndone=1", flush=True)


def run(o):
    drv = Driver()
    ns, kernels = int(o["iters"]), int(o.get("kernels", "10"))
    period, seconds = float(o.get("period-ms", "10")) / 1000, float(o["seconds"])

    def request():
        t = time.monotonic()
        for _ in range(kernels):
            drv.launch(ns)
        drv.sync()
        return time.monotonic() - t

    request()
    wait_go(o)
    end = time.monotonic() + float(o.get("warmup-s", "0.5"))
    while time.monotonic() < end:
        request()
        time.sleep(period)
    lat, busy = [], 0.0
    t0 = time.monotonic()
    due = t0
    while due < t0 + seconds:
        time.sleep(max(0.0, due - time.monotonic()))
        start = time.monotonic()
        dev = request()
        lat.append((time.monotonic() - due) * 1000)
        busy += dev
        due = max(due + period, start)
    t_end = time.monotonic()
    s = sorted(lat)
    print(f"mono_start={t0:.6f}\nmono_end={t_end:.6f}\nrequests={len(lat)}", flush=True)
    print(f"p50_ms={pctl(s, 0.5):.4f}\np99_ms={pctl(s, 0.99):.4f}\nmin_ms={s[0] if s else 0:.4f}", flush=True)
    print(f"busy_frac={busy / max(t_end - t0, 1e-9):.4f}\ndone=1", flush=True)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    {"calibrate": calibrate, "run": run}[cmd](opts(rest))
