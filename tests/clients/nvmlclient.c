/* nvmlclient: an NVML-only program playing nvidia-smi. It never loads libcuda.so.1: it
 * dlopen()s libnvidia-ml.so.1 and dlsym()s what it calls (as pynvml does), then prints one
 * report of every device:
 *
 *   count v1=N v2=N
 *   dev I index=K uuid=U name=S
 *   mem I total= free= used=
 *   mem2 I total= reserved= free= used=
 *   compute1 I n=N PID:BYTES ...      (nvmlDeviceGetComputeRunningProcesses, v1 records)
 *   compute2 I ... / compute3 I ...  (_v2 / _v3)
 *   graphics3 I ...                  (nvmlDeviceGetGraphicsRunningProcesses_v3)
 *   detail0 I ... / detail1 I ...    (nvmlDeviceGetRunningProcessDetailList, compute / graphics)
 *   util I gpu= memory=
 *   putil I n=N PID ...               (nvmlDeviceGetProcessUtilization: the pids sampled)
 *   smiS I n=N PID:BYTES ...         (slot S of NVML's internal export table, as nvidia-smi
 *                                     lists processes: S = 213, 214, 215)
 *   byuuid UUID code=C index=K        (one per UUID given with --uuid)
 *
 * A query that fails prints `... err=CODE` instead of its figures.
 *   nvmlclient [--uuid UUID]... [--wait FILE]   --wait: report, wait for FILE (60 s), report again.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct { unsigned long long total, free, used; } mem_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } mem2_t;
typedef struct { unsigned pid; unsigned long long used; } proc1_t;
typedef struct { unsigned pid; unsigned long long used; unsigned gi, ci; } proc2_t;
typedef struct { unsigned gpu, memory; } util_t;
typedef struct { unsigned pid; unsigned long long used; unsigned gi, ci; unsigned long long cc; } detail_t;
typedef struct { unsigned version, mode, n; detail_t *procs; } detail_list_t;
typedef struct { unsigned pid; unsigned long long ts; unsigned sm, mem, enc, dec; } sample_t;

static void *lib;
static void *need(const char *name) {
    void *p = dlsym(lib, name);
    if (!p) {
        fprintf(stderr, "nvmlclient: %s missing\n", name);
        exit(3);
    }
    return p;
}

#define LIST(FN, T, LABEL, I, DEV)                                                              \
    do {                                                                                         \
        int (*f)(void *, unsigned *, T *) = (int (*)(void *, unsigned *, T *))need(FN);          \
        unsigned n = 0;                                                                          \
        int r = f(DEV, &n, NULL);                                                                \
        T *buf = NULL;                                                                           \
        if (r == 7) {                                                                            \
            unsigned room = n + 4;                                                               \
            buf = calloc(room, sizeof(T));                                                       \
            n = room;                                                                            \
            r = f(DEV, &n, buf);                                                                 \
        }                                                                                        \
        if (r != 0) {                                                                            \
            printf("%s %u err=%d\n", LABEL, I, r);                                               \
        } else {                                                                                 \
            printf("%s %u n=%u", LABEL, I, n);                                                   \
            for (unsigned k = 0; k < n; k++) printf(" %u:%llu", buf[k].pid, buf[k].used);        \
            printf("\n");                                                                        \
        }                                                                                        \
        free(buf);                                                                               \
    } while (0)

/* nvidia-smi's way to the process lists: one table from nvmlInternalGetExportTable, three of
 * its slots called with a room of entries of 4128 bytes (pid first, memory at byte 8). */
static const unsigned char SMI_TABLE_ID[16] = {0xc4, 0xfe, 0x3e, 0x6c, 0xc9, 0x8f, 0x6c, 0x4e,
                                               0xa3, 0x27, 0xee, 0x69, 0x6e, 0x12, 0xf7, 0xc4};
enum { SMI_ENTRY = 4128, SMI_ROOM = 64 };

static void smi_lists(unsigned i, void *dev) {
    const unsigned long *table = NULL;
    int r = ((int (*)(const void **, const unsigned char *))need("nvmlInternalGetExportTable"))((const void **)&table, SMI_TABLE_ID);
    for (unsigned slot = 213; slot <= 215; slot++) {
        if (r != 0 || !table || table[0] / 8 <= slot) {
            printf("smi%u %u err=%d\n", slot, i, r ? r : -1);
            continue;
        }
        int (*f)(void *, unsigned *, unsigned char *) = (int (*)(void *, unsigned *, unsigned char *))table[slot];
        unsigned char *buf = calloc(SMI_ROOM, SMI_ENTRY);
        unsigned n = SMI_ROOM;
        int rs = f(dev, &n, buf);
        if (rs != 0) {
            printf("smi%u %u err=%d\n", slot, i, rs);
        } else {
            printf("smi%u %u n=%u", slot, i, n);
            for (unsigned k = 0; k < n && k < SMI_ROOM; k++) {
                unsigned pid;
                unsigned long long used;
                memcpy(&pid, buf + (size_t)k * SMI_ENTRY, sizeof pid);
                memcpy(&used, buf + (size_t)k * SMI_ENTRY + 8, sizeof used);
                printf(" %u:%llu", pid, used);
            }
            printf("\n");
        }
        free(buf);
    }
}

static void report(void) {
    unsigned n1 = 0, n2 = 0;
    int r1 = ((int (*)(unsigned *))need("nvmlDeviceGetCount"))(&n1);
    int r2 = ((int (*)(unsigned *))need("nvmlDeviceGetCount_v2"))(&n2);
    printf("count v1=%u v2=%u codes=%d,%d\n", n1, n2, r1, r2);
    int (*by_index)(unsigned, void **) = (int (*)(unsigned, void **))need("nvmlDeviceGetHandleByIndex_v2");
    int (*by_index1)(unsigned, void **) = (int (*)(unsigned, void **))need("nvmlDeviceGetHandleByIndex");
    for (unsigned i = 0; i < n2; i++) {
        void *dev = NULL, *dev1 = NULL;
        int r = by_index(i, &dev);
        int r1b = by_index1(i, &dev1);
        if (r != 0 || r1b != 0 || dev != dev1) {
            printf("dev %u err=%d,%d same=%d\n", i, r, r1b, dev == dev1);
            continue;
        }
        char uuid[96] = "", name[96] = "";
        unsigned index = 99;
        ((int (*)(void *, char *, unsigned))need("nvmlDeviceGetUUID"))(dev, uuid, sizeof uuid);
        ((int (*)(void *, char *, unsigned))need("nvmlDeviceGetName"))(dev, name, sizeof name);
        ((int (*)(void *, unsigned *))need("nvmlDeviceGetIndex"))(dev, &index);
        printf("dev %u index=%u uuid=%s name=%s\n", i, index, uuid, name);
        mem_t m;
        r = ((int (*)(void *, mem_t *))need("nvmlDeviceGetMemoryInfo"))(dev, &m);
        if (r) printf("mem %u err=%d\n", i, r);
        else printf("mem %u total=%llu free=%llu used=%llu\n", i, m.total, m.free, m.used);
        mem2_t m2;
        memset(&m2, 0, sizeof m2);
        m2.version = (unsigned)sizeof(mem2_t) | (2u << 24);
        r = ((int (*)(void *, mem2_t *))need("nvmlDeviceGetMemoryInfo_v2"))(dev, &m2);
        if (r) printf("mem2 %u err=%d\n", i, r);
        else printf("mem2 %u total=%llu reserved=%llu free=%llu used=%llu\n", i, m2.total, m2.reserved, m2.free, m2.used);
        LIST("nvmlDeviceGetComputeRunningProcesses", proc1_t, "compute1", i, dev);
        LIST("nvmlDeviceGetComputeRunningProcesses_v2", proc2_t, "compute2", i, dev);
        LIST("nvmlDeviceGetComputeRunningProcesses_v3", proc2_t, "compute3", i, dev);
        LIST("nvmlDeviceGetGraphicsRunningProcesses_v3", proc2_t, "graphics3", i, dev);
        smi_lists(i, dev);
        for (unsigned mode = 0; mode < 2; mode++) {
            int (*f)(void *, detail_list_t *) = (int (*)(void *, detail_list_t *))need("nvmlDeviceGetRunningProcessDetailList");
            detail_list_t l = {(unsigned)sizeof(detail_list_t) | (1u << 24), mode, 0, NULL};
            int rd = f(dev, &l);
            if (rd == 7) {
                l.n += 4;
                l.procs = calloc(l.n, sizeof(detail_t));
                rd = f(dev, &l);
            }
            if (rd != 0) {
                printf("detail%u %u err=%d\n", mode, i, rd);
            } else {
                printf("detail%u %u n=%u", mode, i, l.n);
                for (unsigned k = 0; k < l.n; k++) printf(" %u:%llu", l.procs[k].pid, l.procs[k].used);
                printf("\n");
            }
            free(l.procs);
        }
        util_t u;
        r = ((int (*)(void *, util_t *))need("nvmlDeviceGetUtilizationRates"))(dev, &u);
        if (r) printf("util %u err=%d\n", i, r);
        else printf("util %u gpu=%u memory=%u\n", i, u.gpu, u.memory);
        {
            int (*f)(void *, sample_t *, unsigned *, unsigned long long) =
                (int (*)(void *, sample_t *, unsigned *, unsigned long long))need("nvmlDeviceGetProcessUtilization");
            unsigned n = 0;
            int rs = f(dev, NULL, &n, 0);
            sample_t *buf = NULL;
            if (rs == 7) {
                buf = calloc(n + 4, sizeof(sample_t));
                n += 4;
                rs = f(dev, buf, &n, 0);
            }
            if (rs != 0) {
                printf("putil %u err=%d\n", i, rs);
            } else {
                printf("putil %u n=%u", i, n);
                for (unsigned k = 0; k < n; k++) printf(" %u", buf[k].pid);
                printf("\n");
            }
            free(buf);
        }
    }
}

int main(int argc, char **argv) {
    const char *uuids[16];
    int nuuids = 0;
    const char *wait = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--uuid") && i + 1 < argc && nuuids < 16) uuids[nuuids++] = argv[++i];
        else if (!strcmp(argv[i], "--wait") && i + 1 < argc) wait = argv[++i];
        else {
            fprintf(stderr, "usage: nvmlclient [--uuid UUID]... [--wait FILE]\n");
            return 2;
        }
    }
    lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "nvmlclient: %s\n", dlerror());
        return 3;
    }
    int r = ((int (*)(void))need("nvmlInit_v2"))();
    if (r) {
        printf("init err=%d\n", r);
        return 1;
    }
    report();
    for (int k = 0; k < nuuids; k++) {
        void *dev = NULL;
        unsigned index = 99;
        int rc = ((int (*)(const char *, void **))need("nvmlDeviceGetHandleByUUID"))(uuids[k], &dev);
        if (rc == 0) ((int (*)(void *, unsigned *))need("nvmlDeviceGetIndex"))(dev, &index);
        printf("byuuid %s code=%d index=%u\n", uuids[k], rc, index);
    }
    if (wait) {
        fflush(stdout);
        for (int t = 0; t < 60000 && access(wait, F_OK) != 0; t++) usleep(1000);
        report();
    }
    ((int (*)(void))need("nvmlShutdown"))();
    return 0;
}
