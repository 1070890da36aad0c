"""A stand-in for sharebench (tests/gpu/sharebench.cu) on the simulated driver, for the dry run
of tests/gpu/tenants.sh and guarantee.sh: `run` and `threads` with the options tenants.py and
guarantee.py use and the same
key=value output. A kernel lasts `--iters` nanoseconds on the simulated device."""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simdrv import Driver  # noqa: E402
from stubargs import opts, wait_go  # noqa: E402


def run(o):
    drv = Driver()
    ns, seconds = int(o["iters"]), float(o["seconds"])
    wait_go(o)
    end, warm = time.monotonic() + float(o.get("warmup-s", "0.3")), 0
    while time.monotonic() < end:
        drv.launch(ns)
        warm += 1
    drv.sync()
    # As sharebench: flushed, just before the timed phase (guarantee.py's G8 waits for it).
    print(f"warmup_kernels={warm}", flush=True)
    n, t0 = 0, time.monotonic()
    report_s, reported = float(o.get("report-ms", "0")) / 1000, t0
    while time.monotonic() < t0 + seconds:
        drv.launch(ns)
        n += 1
        if n % 32 == 0:
            drv.sync()
            # --report-ms (tests/gpu/guarantee.py): kernels known complete, as sharebench says.
            now = time.monotonic()
            if report_s and now - reported >= report_s:
                reported = now
                print(f"t={now - t0:.6f} kernels={n} mono={now:.6f}", flush=True)
    drv.sync()
    secs = time.monotonic() - t0
    print(f"kernels={n}\nseconds={secs:.6f}\nrate={n / secs:.3f}\ndone=1", flush=True)


def threads(o):
    drv = Driver()
    ns, seconds, count = int(o["iters"]), float(o["seconds"]), int(o["threads"])
    phase = [0]
    counts, spent, cpu = [0] * count, [0.0] * count, [0.0] * count

    def work(t):
        drv.cu.cuCtxSetCurrent(drv.ctx)
        while phase[0] == 0:
            drv.launch(ns)
        c0 = time.thread_time()
        while phase[0] == 1:
            a = time.monotonic()
            drv.launch(ns)
            spent[t] += time.monotonic() - a
            counts[t] += 1
        cpu[t] = time.thread_time() - c0

    ths = [threading.Thread(target=work, args=(t,)) for t in range(count)]
    for th in ths:
        th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    phase[0] = 1
    time.sleep(seconds)
    phase[0] = 2
    for th in ths:
        th.join()
    drv.sync()
    secs = time.monotonic() - t0
    n = sum(counts)
    print(f"threads={count}\nkernels={n}\nseconds={secs:.6f}\nrate={n / secs:.3f}", flush=True)
    print(f"host_ns_per_launch={sum(spent) * 1e9 / max(n, 1):.1f}\ncpu_ns_per_launch={sum(cpu) * 1e9 / max(n, 1):.1f}\ndone=1", flush=True)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    {"run": run, "threads": threads}[cmd](opts(rest))
