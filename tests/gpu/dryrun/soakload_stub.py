#!/usr/bin/env python3
"""Stand-in for soakload.cu in the soak's dry run (SOAK_DRY_RUN=1): the same options, steps and
output lines (see soakload.cu), on the simulated driver through ctypes (simdrv.py). A kernel of
N iterations lasts 16 N ns on the simulated device (about what soakload's FMA kernel, 4 blocks
per SM, takes on the H200).

SOAK_STUB_FAULT=FAULT@SEED[,FAULT@SEED...] makes the instance started with --seed SEED
misbehave, to show that the soak notices (never set by soak.sh): `held` reports 4096 bytes
more than it holds when quiet, `crash` exits 1 after 3 s, `hang` stops (no heartbeat, no
reaction to SIGTERM) after 3 s, `nopause` ignores the pause file.
"""
import math
import os
import random
import signal
import sys
import time

from simdrv import Driver

STOP = {"flag": False}
UNIT = 64 << 10


def line(kind, **kv):
    print(kind + "".join(f" {k}={v}" for k, v in kv.items()), flush=True)


def opts(argv):
    o = {"seed": 1, "min-mib": 1.0, "max-mib": 512.0, "hold-mib": 4096.0, "burst-min": 1,
         "burst-max": 4, "iters-min": 600, "iters-max": 1500, "sleep-max-us": 5000, "streams": 1,
         "pause-file": "", "hb-ms": 500.0, "max-s": 900.0}
    if len(argv) % 2:
        sys.exit(2)
    for k, v in zip(argv[::2], argv[1::2]):
        key = k[2:] if k.startswith("--") else None
        if key not in o:
            print(f"usage: unknown option {k}", file=sys.stderr)
            sys.exit(2)
        o[key] = type(o[key])(v)
    return o


def faults(seed):
    spec = os.environ.get("SOAK_STUB_FAULT", "")
    return {f.split("@")[0] for f in spec.split(",") if "@" in f and f.split("@")[1] == str(seed)}


def pause_seq(path):
    if not path:
        return None
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except OSError:
        return None
    except ValueError:
        return 0


def main():
    o = opts(sys.argv[1:])
    fault = faults(o["seed"])
    signal.signal(signal.SIGTERM, lambda *_: STOP.update(flag=True))
    signal.signal(signal.SIGINT, lambda *_: STOP.update(flag=True))
    with open("/proc/self/maps") as f:
        shim = int("gpuslice" in f.read())
    try:
        d = Driver()
    except Exception as e:  # noqa: BLE001
        line("error", where="init", name=type(e).__name__, msg=str(e).replace(" ", "_"))
        return 3
    live = []  # (ptr, bytes)
    c = {"held": 0, "allocs": 0, "frees": 0, "ooms": 0, "kernels": 0, "steps": 0}
    free_b, total_b = d.mem_info()
    line("ready", pid=os.getpid(), preloaded_gpuslice=shim, total_mib=f"{total_b / 2**20:.0f}",
         free_mib=f"{free_b / 2**20:.0f}", sms=132, grid=528)
    rng = random.Random(o["seed"])
    t_hb = [0.0]

    def hb(paused):
        t_hb[0] = time.monotonic()
        line("hb", t=f"{t_hb[0]:.6f}", held=c["held"], n=len(live), allocs=c["allocs"], frees=c["frees"],
             ooms=c["ooms"], kernels=c["kernels"], steps=c["steps"], paused=int(paused))

    def free_at(i):
        p, b = live.pop(i)
        d.free(p)
        c["held"] -= b
        c["frees"] += 1

    t0 = time.monotonic()
    hb(False)
    while not STOP["flag"]:
        if time.monotonic() - t0 > o["max-s"]:
            line("watchdog", t=f"{time.monotonic():.6f}")
            return 3
        if "crash" in fault and time.monotonic() - t0 > 3:
            return 1
        if "hang" in fault and time.monotonic() - t0 > 3:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        seq, said = (None if "nopause" in fault else pause_seq(o["pause-file"])), None
        while seq is not None and not STOP["flag"]:
            if seq != said:
                d.sync()
                lie = 4096 if "held" in fault else 0
                line("quiet", seq=seq, held=c["held"] + lie, n=len(live), t=f"{time.monotonic():.6f}")
                said = seq
            if time.monotonic() - t_hb[0] >= o["hb-ms"] / 1000:
                hb(True)
            time.sleep(0.01)
            seq = pause_seq(o["pause-file"])
        if STOP["flag"]:
            break
        c["steps"] += 1
        r = rng.random()
        if r < 0.01 and len(live) > 1:
            while live:
                free_at(len(live) - 1)
        elif r < 0.50:
            mib = math.exp(math.log(o["min-mib"]) + rng.random() * (math.log(o["max-mib"]) - math.log(o["min-mib"])))
            nbytes = (int(mib * 2**20) + UNIT - 1) // UNIT * UNIT
            if c["held"] + nbytes > o["hold-mib"] * 2**20 and live:
                free_at(rng.randrange(len(live)))
            else:
                p = d.alloc(nbytes)
                if p is None:
                    c["ooms"] += 1
                    if live:
                        free_at(rng.randrange(len(live)))
                else:
                    live.append((p, nbytes))
                    c["held"] += nbytes
                    c["allocs"] += 1
        elif r < 0.85 and live:
            free_at(rng.randrange(len(live)))
        k = rng.randint(o["burst-min"], o["burst-max"])
        for _ in range(k):
            d.launch(16 * rng.randint(o["iters-min"], o["iters-max"]))
            c["kernels"] += 1
        d.sync()
        if o["sleep-max-us"] > 0:
            time.sleep(rng.random() * o["sleep-max-us"] / 1e6)
        if time.monotonic() - t_hb[0] >= o["hb-ms"] / 1000:
            hb(False)
    d.sync()
    while live:
        free_at(len(live) - 1)
    line("bye", held=c["held"], allocs=c["allocs"], frees=c["frees"], ooms=c["ooms"], kernels=c["kernels"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
