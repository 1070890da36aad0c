/*
 * mgpu: a scriptable client for several devices and several processes (issue 20), linked with
 * -lcuda. Commands run left to right; each prints one line, `ok <cmd> key=value ...` or
 * `err <cmd> code=<CUresult> ...`. See tests/README.md for the table.
 *
 *   init                       cuInit(0)
 *   ctx D                      retain device D's primary context and make it current  -> dev=
 *   alloc N                    cuMemAlloc (kept as "the allocation")                  -> ptr=
 *   free                       cuMemFree of the allocation
 *   info                       cuMemGetInfo_v2                                        -> free= total=
 *   ipcexport FILE             cuIpcGetMemHandle of the allocation; its 64 bytes (hex) into FILE
 *   ipcopen FILE               wait for FILE, cuIpcOpenMemHandle_v2                   -> ptr=
 *   ipcclose                   cuIpcCloseMemHandle of the opened pointer
 *   vmmexport D N FILE         cuMemCreate on device D (POSIX fd and fabric handle types), map it,
 *                              export a POSIX fd; "pid fd size" into FILE             -> handle= fd=
 *   vmmrelease                 unmap + cuMemRelease + address free of the exported handle
 *   vmmimport FILE             wait for FILE, open the exporter's descriptor (/proc/PID/fd/FD),
 *                              cuMemImportFromShareableHandle, reserve + cuMemMap (the whole size)
 *                              + cuMemSetAccess                                       -> handle=
 *   vmmunimport                unmap + cuMemRelease + address free of the imported handle
 *   host TYPE N                cuMemCreate of N bytes at location TYPE (2 HOST, 3 HOST_NUMA id 0,
 *                              4 HOST_NUMA_CURRENT), mapped, then unmapped and released
 *                                                                                     -> create= map= release=
 *   nocontext D N              in a new thread with no current context: cuMemCreate of N bytes on
 *                              device D, cuMemAlloc, cuMemGetInfo_v2, cuLaunchKernel, cuMemRelease
 *                                                                                     -> create= alloc= info= launch= release=
 *   peer N                     contexts on devices 0 and 1 (N bytes on each): cuDeviceCanAccessPeer,
 *                              cuCtxEnablePeerAccess both ways, cuMemcpyPeer, cuMemcpyPeerAsync,
 *                              cuCtxDisablePeerAccess                                  -> can= enable= copy= async= disable=
 *   flood2 NS MS               one thread per device (0 and 1), each launching kernels of NS ns on
 *                              its device's stream 0 for MS wall ms, then synchronizing
 *                                                                                     -> share0= share1= (% of the
 *                                 device's time from the first launch to the synchronize's return)
 *   multicast N                contexts on devices 0 and 1; cuMemCreate of N bytes on each; a
 *                              multicast object of N bytes for both, each device's memory bound
 *                              to it; the free memory of each device (cuMemGetInfo_v2) before, with
 *                              it bound, and after unbinding and releasing everything
 *                                                                                     -> code= free0= bound0= after0= (and 1)
 *   waitfile PATH, touch PATH, sleep MS, pid
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUmodule;
typedef void *CUfunction;
typedef void *CUstream;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct { char reserved[64]; } CUipcMemHandle;
typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct { unsigned char compressionType, gpuDirectRDMACapable; unsigned short usage; unsigned char reserved[4]; } allocFlags;
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;

CUresult cuInit(unsigned);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemGetInfo_v2(size_t *, size_t *);
CUresult cuIpcGetMemHandle(CUipcMemHandle *, CUdeviceptr);
CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *, CUipcMemHandle, unsigned);
CUresult cuIpcCloseMemHandle(CUdeviceptr);
CUresult cuMemCreate(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
CUresult cuMemRelease(CUmemGenericAllocationHandle);
CUresult cuMemAddressReserve(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
CUresult cuMemAddressFree(CUdeviceptr, size_t);
CUresult cuMemMap(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
CUresult cuMemUnmap(CUdeviceptr, size_t);
CUresult cuMemSetAccess(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
CUresult cuMemExportToShareableHandle(void *, CUmemGenericAllocationHandle, int, unsigned long long);
CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *, void *, int);
CUresult cuDeviceCanAccessPeer(int *, CUdevice, CUdevice);
CUresult cuCtxEnablePeerAccess(CUcontext, unsigned);
CUresult cuCtxDisablePeerAccess(CUcontext);
CUresult cuMemcpyPeer(CUdeviceptr, CUcontext, CUdeviceptr, CUcontext, size_t);
CUresult cuMemcpyPeerAsync(CUdeviceptr, CUcontext, CUdeviceptr, CUcontext, size_t, CUstream);
CUresult cuModuleLoadData(CUmodule *, const void *);
CUresult cuModuleGetFunction(CUfunction *, CUmodule, const char *);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **, void **);
CUresult cuCtxSynchronize(void);
typedef struct { unsigned numDevices; size_t size; unsigned long long handleTypes, flags; } CUmulticastObjectProp;
CUresult cuMulticastCreate(CUmemGenericAllocationHandle *, const CUmulticastObjectProp *);
CUresult cuMulticastAddDevice(CUmemGenericAllocationHandle, CUdevice);
CUresult cuMulticastBindMem(CUmemGenericAllocationHandle, size_t, CUmemGenericAllocationHandle, size_t, size_t, unsigned long long);
CUresult cuMulticastUnbind(CUmemGenericAllocationHandle, CUdevice, size_t, size_t);

#define POSIX_FD 1
#define FABRIC 8
#define GRAN (2ull << 20)

static CUcontext g_ctx[16];
static CUdeviceptr g_alloc, g_opened;
static CUmemGenericAllocationHandle g_exported, g_imported;
static CUdeviceptr g_exported_va, g_imported_va;
static size_t g_exported_size, g_imported_size;

/* Bytes: a number with an optional binary K/M/G suffix. */
static unsigned long long size_arg(const char *s) {
    char *end;
    unsigned long long n = strtoull(s, &end, 0);
    switch (*end) {
    case 'K': case 'k': return n << 10;
    case 'M': case 'm': return n << 20;
    case 'G': case 'g': return n << 30;
    default: return n;
    }
}

static void wait_file(const char *path) {
    for (int i = 0; i < 60000 && access(path, F_OK) != 0; i++) usleep(1000);
}

/* Writes FILE whole or not at all (a reader polling for it never sees half of it). */
static void put_file(const char *path, const char *text) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

static CUmemAllocationProp prop_on(int type, int id, int handle_types) {
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = 1; /* CU_MEM_ALLOCATION_TYPE_PINNED */
    p.requestedHandleTypes = handle_types;
    p.location.type = type;
    p.location.id = id;
    return p;
}

/* Reserve, map and give device `dev` access; 0 or the failing code. */
static CUresult map_handle(CUmemGenericAllocationHandle h, size_t size, int dev, CUdeviceptr *va) {
    CUresult r = cuMemAddressReserve(va, size, 0, 0, 0);
    if (r) return r;
    r = cuMemMap(*va, size, 0, h, 0);
    if (r) return r;
    CUmemAccessDesc a = {{1, dev}, 3};
    return cuMemSetAccess(*va, size, &a, 1);
}

static CUresult unmap_release(CUmemGenericAllocationHandle h, CUdeviceptr va, size_t size) {
    CUresult r = cuMemUnmap(va, size);
    CUresult r2 = cuMemRelease(h);
    CUresult r3 = cuMemAddressFree(va, size);
    return r ? r : r2 ? r2 : r3;
}

struct nocontext_args {
    int dev;
    size_t size;
    CUresult create, alloc, info, launch, release;
};

static void *nocontext_thread(void *p) {
    struct nocontext_args *a = p;
    CUmemAllocationProp prop = prop_on(1, a->dev, 0);
    CUmemGenericAllocationHandle h = 0;
    a->create = cuMemCreate(&h, a->size, &prop, 0);
    CUdeviceptr d = 0;
    a->alloc = cuMemAlloc_v2(&d, 1 << 20);
    size_t free_b = 0, total = 0;
    a->info = cuMemGetInfo_v2(&free_b, &total);
    unsigned long long ns = 1000;
    void *params[] = {&ns};
    a->launch = cuLaunchKernel((CUfunction)0x1, 1, 1, 1, 1, 1, 1, 0, 0, params, 0);
    a->release = a->create ? -1 : cuMemRelease(h);
    return NULL;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

struct flood_args {
    int dev;
    unsigned long long ns;
    double ms, share;
    CUresult err;
};

static void *flood_thread(void *p) {
    struct flood_args *a = p;
    CUmodule m;
    CUfunction f;
    a->err = cuCtxSetCurrent(g_ctx[a->dev]);
    if (!a->err) a->err = cuModuleLoadData(&m, "simulated module image");
    if (!a->err) a->err = cuModuleGetFunction(&f, m, "busy");
    if (a->err) return NULL;
    void *params[] = {&a->ns};
    /* A warm-up that teaches the shim the kernel and spends the saved-up burst. */
    for (int i = 0; i < 40 && !a->err; i++) a->err = cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, 0, params, 0);
    if (!a->err) a->err = cuCtxSynchronize();
    double t0 = now_ms();
    unsigned long long n = 0;
    while (!a->err && now_ms() - t0 < a->ms) {
        a->err = cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, 0, params, 0);
        n++;
    }
    if (!a->err) a->err = cuCtxSynchronize();
    a->share = (double)n * a->ns / 1e6 / (now_ms() - t0) * 100.0;
    return NULL;
}

#define FAIL(r) do { printf("err %s code=%d\n", cmd, (int)(r)); continue; } while (0)

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc;) {
        const char *cmd = argv[i++];
        const char *a0 = i < argc ? argv[i] : "", *a1 = i + 1 < argc ? argv[i + 1] : "", *a2 = i + 2 < argc ? argv[i + 2] : "";
        CUresult r;
        if (!strcmp(cmd, "init")) {
            if ((r = cuInit(0))) FAIL(r);
            printf("ok init\n");
        } else if (!strcmp(cmd, "ctx")) {
            int d = atoi(a0);
            i++;
            if ((r = cuDevicePrimaryCtxRetain(&g_ctx[d & 15], d))) FAIL(r);
            if ((r = cuCtxSetCurrent(g_ctx[d & 15]))) FAIL(r);
            printf("ok ctx dev=%d\n", d);
        } else if (!strcmp(cmd, "alloc")) {
            i++;
            if ((r = cuMemAlloc_v2(&g_alloc, size_arg(a0)))) FAIL(r);
            printf("ok alloc ptr=0x%llx\n", g_alloc);
        } else if (!strcmp(cmd, "free")) {
            if ((r = cuMemFree_v2(g_alloc))) FAIL(r);
            printf("ok free\n");
        } else if (!strcmp(cmd, "info")) {
            size_t f = 0, t = 0;
            if ((r = cuMemGetInfo_v2(&f, &t))) FAIL(r);
            printf("ok info free=%zu total=%zu\n", f, t);
        } else if (!strcmp(cmd, "ipcexport")) {
            i++;
            CUipcMemHandle h;
            if ((r = cuIpcGetMemHandle(&h, g_alloc))) FAIL(r);
            char hex[129];
            for (int k = 0; k < 64; k++) sprintf(hex + 2 * k, "%02x", (unsigned char)h.reserved[k]);
            put_file(a0, hex);
            printf("ok ipcexport\n");
        } else if (!strcmp(cmd, "ipcopen")) {
            i++;
            wait_file(a0);
            CUipcMemHandle h;
            memset(&h, 0, sizeof h);
            FILE *f = fopen(a0, "r");
            for (int k = 0; f && k < 64; k++) {
                unsigned v = 0;
                if (fscanf(f, "%2x", &v) == 1) h.reserved[k] = (char)v;
            }
            if (f) fclose(f);
            if ((r = cuIpcOpenMemHandle_v2(&g_opened, h, 1))) FAIL(r);
            printf("ok ipcopen ptr=0x%llx\n", g_opened);
        } else if (!strcmp(cmd, "ipcclose")) {
            if ((r = cuIpcCloseMemHandle(g_opened))) FAIL(r);
            printf("ok ipcclose\n");
        } else if (!strcmp(cmd, "vmmexport")) {
            i += 3;
            int dev = atoi(a0);
            g_exported_size = size_arg(a1);
            CUmemAllocationProp p = prop_on(1, dev, POSIX_FD | FABRIC);
            if ((r = cuMemCreate(&g_exported, g_exported_size, &p, 0))) FAIL(r);
            if ((r = map_handle(g_exported, g_exported_size, dev, &g_exported_va))) FAIL(r);
            int fd = -1;
            if ((r = cuMemExportToShareableHandle(&fd, g_exported, POSIX_FD, 0))) FAIL(r);
            char text[64];
            snprintf(text, sizeof text, "%d %d %zu", (int)getpid(), fd, g_exported_size);
            put_file(a2, text);
            printf("ok vmmexport handle=0x%llx fd=%d\n", g_exported, fd);
        } else if (!strcmp(cmd, "vmmrelease")) {
            if ((r = unmap_release(g_exported, g_exported_va, g_exported_size))) FAIL(r);
            printf("ok vmmrelease\n");
        } else if (!strcmp(cmd, "vmmimport")) {
            i++;
            wait_file(a0);
            int pid = 0, fd = -1;
            size_t size = 0;
            FILE *f = fopen(a0, "r");
            if (!f || fscanf(f, "%d %d %zu", &pid, &fd, &size) != 3) FAIL(-1);
            fclose(f);
            char path[64];
            snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, fd);
            int mine = open(path, O_RDONLY | O_CLOEXEC);
            if (mine < 0) FAIL(-1);
            r = cuMemImportFromShareableHandle(&g_imported, (void *)(intptr_t)mine, POSIX_FD);
            close(mine);
            if (r) FAIL(r);
            g_imported_size = size;
            if ((r = map_handle(g_imported, g_imported_size, 0, &g_imported_va))) FAIL(r);
            printf("ok vmmimport handle=0x%llx\n", g_imported);
        } else if (!strcmp(cmd, "vmmunimport")) {
            if ((r = unmap_release(g_imported, g_imported_va, g_imported_size))) FAIL(r);
            printf("ok vmmunimport\n");
        } else if (!strcmp(cmd, "host")) {
            i += 2;
            size_t size = size_arg(a1);
            CUmemAllocationProp p = prop_on(atoi(a0), 0, 0);
            CUmemGenericAllocationHandle h = 0;
            CUdeviceptr va = 0;
            CUresult c = cuMemCreate(&h, size, &p, 0), m = -1, rel = -1;
            if (!c) {
                m = cuMemAddressReserve(&va, size, 0, 0, 0);
                if (!m) m = cuMemMap(va, size, 0, h, 0);
                rel = m ? cuMemRelease(h) : unmap_release(h, va, size);
            }
            printf("%s host create=%d map=%d release=%d\n", c || m || rel ? "err" : "ok", c, m, rel);
        } else if (!strcmp(cmd, "nocontext")) {
            i += 2;
            struct nocontext_args a = {atoi(a0), size_arg(a1), -1, -1, -1, -1, -1};
            pthread_t t;
            pthread_create(&t, NULL, nocontext_thread, &a);
            pthread_join(t, NULL);
            printf("ok nocontext create=%d alloc=%d info=%d launch=%d release=%d\n", a.create, a.alloc, a.info, a.launch, a.release);
        } else if (!strcmp(cmd, "peer")) {
            i++;
            size_t n = size_arg(a0);
            CUdeviceptr p0 = 0, p1 = 0;
            int can = -1;
            CUresult e = cuDevicePrimaryCtxRetain(&g_ctx[0], 0);
            if (!e) e = cuDevicePrimaryCtxRetain(&g_ctx[1], 1);
            if (!e) e = cuDeviceCanAccessPeer(&can, 0, 1);
            if (!e) e = cuCtxSetCurrent(g_ctx[1]);
            if (!e) e = cuMemAlloc_v2(&p1, n);
            if (!e) e = cuCtxSetCurrent(g_ctx[0]);
            if (!e) e = cuMemAlloc_v2(&p0, n);
            if (e) FAIL(e);
            CUresult en0 = cuCtxEnablePeerAccess(g_ctx[1], 0);
            cuCtxSetCurrent(g_ctx[1]);
            CUresult en1 = cuCtxEnablePeerAccess(g_ctx[0], 0);
            cuCtxSetCurrent(g_ctx[0]);
            CUresult cp = cuMemcpyPeer(p1, g_ctx[1], p0, g_ctx[0], n);
            CUresult as = cuMemcpyPeerAsync(p0, g_ctx[0], p1, g_ctx[1], n, 0);
            CUresult dis = cuCtxDisablePeerAccess(g_ctx[1]);
            cuMemFree_v2(p0);
            cuCtxSetCurrent(g_ctx[1]);
            cuMemFree_v2(p1);
            cuCtxSetCurrent(g_ctx[0]);
            printf("%s peer can=%d enable=%d,%d copy=%d async=%d disable=%d\n", en0 || en1 || cp || as || dis ? "err" : "ok", can, en0, en1, cp, as, dis);
        } else if (!strcmp(cmd, "flood2")) {
            i += 2;
            struct flood_args a[2];
            pthread_t t[2];
            CUresult e = 0;
            for (int d = 0; d < 2 && !e; d++) e = cuDevicePrimaryCtxRetain(&g_ctx[d], d);
            if (e) FAIL(e);
            for (int d = 0; d < 2; d++) {
                a[d] = (struct flood_args){d, size_arg(a0), atof(a1), 0, 0};
                pthread_create(&t[d], NULL, flood_thread, &a[d]);
            }
            for (int d = 0; d < 2; d++) pthread_join(t[d], NULL);
            if (a[0].err || a[1].err) FAIL(a[0].err ? a[0].err : a[1].err);
            printf("ok flood2 share0=%.1f share1=%.1f\n", a[0].share, a[1].share);
        } else if (!strcmp(cmd, "multicast")) {
            i++;
            size_t n = size_arg(a0);
            size_t f[3][2] = {{0}}, t = 0;
            CUmemGenericAllocationHandle h[2] = {0, 0}, mc = 0;
            CUresult e = 0;
            for (int d = 0; d < 2 && !e; d++) {
                e = cuDevicePrimaryCtxRetain(&g_ctx[d], d);
                if (!e) e = cuCtxSetCurrent(g_ctx[d]);
                if (!e) e = cuMemGetInfo_v2(&f[0][d], &t);
            }
            for (int d = 0; d < 2 && !e; d++) {
                CUmemAllocationProp p = prop_on(1, d, 0);
                e = cuMemCreate(&h[d], n, &p, 0);
            }
            CUmulticastObjectProp mp = {2, n, 0, 0};
            if (!e) e = cuMulticastCreate(&mc, &mp);
            for (int d = 0; d < 2 && !e; d++) e = cuMulticastAddDevice(mc, d);
            for (int d = 0; d < 2 && !e; d++) e = cuMulticastBindMem(mc, 0, h[d], 0, n, 0);
            for (int d = 0; d < 2 && !e; d++) {
                e = cuCtxSetCurrent(g_ctx[d]);
                if (!e) e = cuMemGetInfo_v2(&f[1][d], &t);
            }
            for (int d = 0; d < 2 && !e; d++) e = cuMulticastUnbind(mc, d, 0, n);
            if (!e) e = cuMemRelease(mc);
            for (int d = 0; d < 2 && !e; d++) e = cuMemRelease(h[d]);
            for (int d = 0; d < 2 && !e; d++) {
                e = cuCtxSetCurrent(g_ctx[d]);
                if (!e) e = cuMemGetInfo_v2(&f[2][d], &t);
            }
            if (e) FAIL(e);
            printf("ok multicast free0=%zu bound0=%zu after0=%zu free1=%zu bound1=%zu after1=%zu\n", f[0][0], f[1][0], f[2][0], f[0][1], f[1][1], f[2][1]);
        } else if (!strcmp(cmd, "waitfile")) {
            i++;
            wait_file(a0);
            printf("ok waitfile\n");
        } else if (!strcmp(cmd, "touch")) {
            i++;
            put_file(a0, "");
            printf("ok touch\n");
        } else if (!strcmp(cmd, "sleep")) {
            i++;
            usleep(atoi(a0) * 1000);
            printf("ok sleep\n");
        } else if (!strcmp(cmd, "pid")) {
            printf("ok pid pid=%d\n", (int)getpid());
        } else {
            fprintf(stderr, "mgpu: unknown command %s\n", cmd);
            return 2;
        }
    }
    return 0;
}
