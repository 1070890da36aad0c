// Issue 22: what the real driver's checkpoint API answers in the cases the controller's policy
// relies on but the simulated driver can only assume (docs/NOTES.md, branches suspnext and
// lockwait, stop 22):
//   1. cuCheckpointProcessGetState for a process that never called cuInit;
//   2. the same for a process that called cuInit but made no context;
//   3. cuCheckpointProcessLock with a 500 ms timeout on a process inside a 20 s kernel: how
//      long the call takes, its result, and the target's state afterwards (still running?);
//   4. the same lock on an idle process with a context: taken, then unlocked;
//   5. legacy IPC: an exporter (cudaIpcGetMemHandle of 64 MiB) and an importer that reads the
//      mapping every 100 ms; the exporter locked, checkpointed, restored, unlocked: each call's
//      result, the exporter's state, and what the importer read meanwhile (fakeexp's open
//      question: does the driver refuse, or does the importer break?).
// Built by tests/gpu/ckpt_semantics.sh: nvcc -o ckpt_semantics ckpt_semantics.cu -lcuda
//   ckpt_semantics target none|init|ctx|spin SECONDS   (a target: prints "ready", then waits)
//   ckpt_semantics state PID                            (GetState: "state PID code=C value=V")
//   ckpt_semantics lock PID TIMEOUT_MS                  (Lock, then GetState, then Unlock if locked)
//   ckpt_semantics exporter FILE SECONDS                (writes the IPC handle to FILE, then waits)
//   ckpt_semantics importer FILE SECONDS                (maps it; a line per read: "read T ms: ...")
//   ckpt_semantics cycle PID                            (lock, checkpoint, restore, unlock: a line each)
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

#define IPC_BYTES (64u << 20)
#define PATTERN 0x5a

static int exporter(const char *file, int seconds) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, IPC_BYTES);
    if (e != cudaSuccess) { printf("exporter: cudaMalloc %s\n", cudaGetErrorName(e)); return 2; }
    cudaMemset(p, PATTERN, IPC_BYTES);
    cudaDeviceSynchronize();
    cudaIpcMemHandle_t h;
    e = cudaIpcGetMemHandle(&h, p);
    if (e != cudaSuccess) { printf("exporter: cudaIpcGetMemHandle %s\n", cudaGetErrorName(e)); return 2; }
    FILE *f = fopen(file, "wb");
    if (!f || fwrite(&h, sizeof h, 1, f) != 1) { printf("exporter: cannot write %s\n", file); return 2; }
    fclose(f);
    printf("ready\n");
    fflush(stdout);
    sleep(seconds);
    unsigned char b = 0;
    e = cudaMemcpy(&b, p, 1, cudaMemcpyDeviceToHost);
    printf("exporter: own read at the end: %s 0x%02x\n", cudaGetErrorName(e), b);
    return 0;
}

static int importer(const char *file, int seconds) {
    cudaIpcMemHandle_t h;
    FILE *f = fopen(file, "rb");
    if (!f || fread(&h, sizeof h, 1, f) != 1) { printf("importer: cannot read %s\n", file); return 2; }
    fclose(f);
    void *p = NULL;
    cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) { printf("importer: cudaIpcOpenMemHandle %s\n", cudaGetErrorName(e)); return 2; }
    printf("ready\n");
    fflush(stdout);
    double t0 = now_ms();
    const char *last = "";
    unsigned last_b = 0x100;
    while (now_ms() - t0 < seconds * 1e3) {
        unsigned char b = 0;
        double a = now_ms();
        e = cudaMemcpy(&b, (char *)p + IPC_BYTES - 1, 1, cudaMemcpyDeviceToHost);
        double took = now_ms() - a;
        // One line per change, and every read that took over 50 ms.
        if (strcmp(last, cudaGetErrorName(e)) != 0 || b != last_b || took > 50) {
            printf("read %.0f ms: %s 0x%02x (took %.1f ms)\n", a - t0, cudaGetErrorName(e), b, took);
            fflush(stdout);
            last = cudaGetErrorName(e);
            last_b = b;
        }
        if (e != cudaSuccess && e != cudaErrorNotReady) { cudaGetLastError(); }
        usleep(100000);
    }
    printf("importer: done\n");
    return 0;
}

static void state(int pid, const char *tag) {
    CUprocessState s = (CUprocessState)-1;
    CUresult c = cuCheckpointProcessGetState(pid, &s);
    printf("%s pid=%d code=%d value=%d\n", tag, pid, (int)c, (int)s);
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "target") == 0) return target(argv[2], argc > 3 ? atoi(argv[3]) : 30);
    if (argc == 4 && strcmp(argv[1], "exporter") == 0) return exporter(argv[2], atoi(argv[3]));
    if (argc == 4 && strcmp(argv[1], "importer") == 0) return importer(argv[2], atoi(argv[3]));
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
    if (argc == 3 && strcmp(argv[1], "cycle") == 0) {
        int pid = atoi(argv[2]);
        CUcheckpointLockArgs l;
        memset(&l, 0, sizeof l);
        l.timeoutMs = 5000;
        double t0 = now_ms();
        CUresult c = cuCheckpointProcessLock(pid, &l);
        printf("cycle lock code=%d took_ms=%.1f\n", (int)c, now_ms() - t0);
        state(pid, "cycle after-lock");
        if (c != CUDA_SUCCESS) return 0;
        CUcheckpointCheckpointArgs k;
        memset(&k, 0, sizeof k);
        t0 = now_ms();
        CUresult ck = cuCheckpointProcessCheckpoint(pid, &k);
        printf("cycle checkpoint code=%d took_ms=%.1f\n", (int)ck, now_ms() - t0);
        state(pid, "cycle after-checkpoint");
        fflush(stdout);
        sleep(1);  // the importer reads meanwhile
        if (ck == CUDA_SUCCESS) {
            CUcheckpointRestoreArgs r;
            memset(&r, 0, sizeof r);
            t0 = now_ms();
            c = cuCheckpointProcessRestore(pid, &r);
            printf("cycle restore code=%d took_ms=%.1f\n", (int)c, now_ms() - t0);
            state(pid, "cycle after-restore");
        }
        CUcheckpointUnlockArgs u;
        memset(&u, 0, sizeof u);
        printf("cycle unlock code=%d\n", (int)cuCheckpointProcessUnlock(pid, &u));
        state(pid, "cycle after-unlock");
        return 0;
    }
    fprintf(stderr, "usage: see the file's head\n");
    return 2;
}
