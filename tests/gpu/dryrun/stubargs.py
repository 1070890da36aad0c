"""What the stand-ins for sharebench and latprobe share: their `--key value` options and the go
file they wait for, as the real programs do (gpucommon.cuh's `wait_go_file`)."""
import os
import time


def opts(argv):
    """`--key value` pairs as {key: value} (strings)."""
    d = {}
    for i in range(0, len(argv) - 1, 2):
        d[argv[i].lstrip("-")] = argv[i + 1]
    return d


def wait_go(o):
    """Prints ready=1, then waits for `--go-file` (if given), polling every 2 ms."""
    print("ready=1", flush=True)
    go = o.get("go-file")
    if go:
        while not os.path.exists(go):
            time.sleep(0.002)
