// Issue 22: what the real driver's checkpoint API answers in the cases the controller's policy
// relies on but the simulated driver can only assume (docs/NOTES.md, branches suspnext and
// lockwait, stop 22):
//   1. cuCheckpointProcessGetState for a process that never called cuInit;
//   2. the same for a process that called cuInit but made no context;
//   3. cuCheckpointProcessLock with a 500 ms timeout on a process inside a 20 s kernel: how
//      long the call takes, its result, and the target's state afterwards (still running?);
//   4. the same lock on an idle process with a context: taken, then unlocked.
// Built by tests/gpu/ckpt_semantics.sh: nvcc -o ckpt_semantics ckpt_semantics.cu -lcuda
//   ckpt_semantics target none|init|ctx|spin SECONDS   (a target: prints "ready", then waits)
//   ckpt_semantics state PID                            (GetState: "state PID code=C value=V")
//   ckpt_semantics lock PID TIMEOUT_MS                  (Lock, then GetState, then Unlock if locked)
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

// Spins for `ns` of the GPU's global timer (no clock-rate query: CUDA 13 dropped clockRate).
__global__ void spin(unsigned long long ns) {
    unsigned long long start, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - start < ns);
}

static int target(const char *mode, int seconds) {
    if (strcmp(mode, "none") == 0) {
        printf("ready\n");
        fflush(stdout);
        sleep(seconds);
        return 0;
    }
    if (cuInit(0) != CUDA_SUCCESS) return 2;
    if (strcmp(mode, "init") == 0) {
        printf("ready\n");
        fflush(stdout);
        sleep(seconds);
        return 0;
    }
    cudaFree(0);  // the primary context
    if (strcmp(mode, "ctx") == 0) {
        printf("ready\n");
        fflush(stdout);
        sleep(seconds);
        return 0;
    }
    spin<<<1, 1>>>((unsigned long long)seconds * 1000000000ull);
    printf("ready\n");
    fflush(stdout);
    cudaError_t e = cudaDeviceSynchronize();
    printf("spin done: %s\n", cudaGetErrorName(e));
    return 0;
}

static void state(int pid, const char *tag) {
    CUprocessState s = (CUprocessState)-1;
    CUresult c = cuCheckpointProcessGetState(pid, &s);
    printf("%s pid=%d code=%d value=%d\n", tag, pid, (int)c, (int)s);
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "target") == 0) return target(argv[2], argc > 3 ? atoi(argv[3]) : 30);
    if (cuInit(0) != CUDA_SUCCESS) {
        printf("cuInit failed\n");
        return 2;
    }
    if (argc == 3 && strcmp(argv[1], "state") == 0) {
        state(atoi(argv[2]), "state");
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "lock") == 0) {
        int pid = atoi(argv[2]);
        CUcheckpointLockArgs args;
        memset(&args, 0, sizeof args);
        args.timeoutMs = (unsigned)atoi(argv[3]);
        double t0 = now_ms();
        CUresult c = cuCheckpointProcessLock(pid, &args);
        printf("lock pid=%d timeout_ms=%u code=%d took_ms=%.1f\n", pid, args.timeoutMs, (int)c, now_ms() - t0);
        state(pid, "after-lock");
        if (c == CUDA_SUCCESS) {
            CUcheckpointUnlockArgs u;
            memset(&u, 0, sizeof u);
            printf("unlock code=%d\n", (int)cuCheckpointProcessUnlock(pid, &u));
            state(pid, "after-unlock");
        }
        return 0;
    }
    fprintf(stderr, "usage: see the file's head\n");
    return 2;
}
