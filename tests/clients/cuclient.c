/*
 * cuclient: a scriptable CUDA driver API client for the gpuslice tests.
 *
 * One source, several builds that reach the driver the ways real programs do:
 *   -DROUTE_LINK      linked with -lcuda, calls the versioned exports directly (cuMemAlloc_v2, ...)
 *   -DROUTE_DLSYM     dlopen("libcuda.so.1") + dlsym by versioned name (like PyTorch)
 *   -DROUTE_PROCADDR  dlsym of cuGetProcAddress_v2 only, asks it for "cuGetProcAddress" (12000), then
 *                     resolves everything by base name with cudaVersion 13000 (like cudart);
 *                     add -DPTSZ for flags = CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM.
 * NVML is always dlopen("libnvidia-ml.so.1") + dlsym.
 *
 * Usage: cuclient CMD [ARGS] CMD ...   (see tests/README.md). One output line per command:
 *   ok <cmd> key=value ...   or   err <cmd> code=<CUresult> ...
 * Exit status 0 unless the command line is bad (2) or the driver library cannot be loaded (3).
 *
 * Commands for multi-process tests (the controller's), besides those in tests/README.md:
 *   waitfile PATH          block until PATH exists (polled every 1 ms; gives up after 60 s:
 *                          `err waitfile code=-1 timeout=1`)                    -> ms=
 *   touch PATH             create PATH (empty)                                   ->
 *   churn SIZE STOPFILE    cuMemAlloc(SIZE) + cuMemFree in a loop until STOPFILE exists (checked
 *                          every 16 rounds; 60 s at most)                        -> count= failures=
 *   allocwait SIZE EVERY_MS TIMEOUT_MS
 *                          cuMemAlloc(SIZE), retried every EVERY_MS while it answers
 *                          CUDA_ERROR_OUT_OF_MEMORY, for at most TIMEOUT_MS (kept as an id)
 *                          -> id= ptr= tries= at= (CLOCK_MONOTONIC ns right after the success);
 *                             on failure `err allocwait code= tries=`
 *   now                    CLOCK_MONOTONIC                                       -> ns=
 *
 * Commands for latency and throughput figures (priority classes):
 *   probe N NS GAP_US      N requests, each one kernel of NS ns on stream 0 then cuCtxSynchronize;
 *                          the latency of a request is launch-to-synchronized wall time; its device
 *                          latency, from an event recorded just before the launch to one recorded
 *                          just after it (when the kernel ended on the device timeline: the wait
 *                          for other work plus NS, whatever the CPU did meanwhile); between
 *                          requests a pseudo-random pause of GAP_US/2 .. 3*GAP_US/2 (fixed seed)
 *                          -> n= min_us= p50_us= p90_us= p99_us= max_us= mean_us= (p99: nearest
 *                             rank) dev_p50_us= dev_p99_us= dev_max_us= t0= t1= (CLOCK_MONOTONIC
 *                             ns of the first launch, last sync)
 *   pprobe N NS PERIOD_US  the same on a schedule: request i is due PERIOD_US * i after the first (a
 *                          camera's frames, a control loop); one running late starts at once; a
 *                          later pprobe goes on with the schedule (its first request is due one
 *                          period after the last one's) -> a probe line
 *   flood NS BUCKET_MS STOPFILE
 *                          launches kernels of NS ns on stream 0 without waiting for them, until
 *                          STOPFILE exists, or for MS ms of the driver's clock when STOPFILE is
 *                          "+MS" (checked before each launch; 60 s at most), recording an
 *                          event after each launch to learn when each kernel ended on the device
 *                          timeline; then synchronizes. Kernel i occupied [end_i - NS, end_i].
 *                          -> n= (launched) done= (ended by the stop) t0= (CLOCK_MONOTONIC ns at the
 *                             start; the simulated clock's when it is on) ms= (ms from the start to the stop) bucket_ms=
 *                             busy=B0,B1,... (µs of this process's kernels on the device in each
 *                             BUCKET_MS bucket from t0 up to the stop; the last may be partial)
 *   floodmix NS,NS,... HOST_US BUCKET_MS STOPFILE
 *                          the same with kernels of those lengths in turn (each position its own
 *                          shape: 16 bytes of dynamic shared memory per position), and HOST_US of
 *                          the driver's clock before each launch (a framework's time per operator);
 *                          a length written NS+US has US more before its launch (a pause of the
 *                          program's own: an optimizer step, Python between iterations)
 *                          -> as flood, "ok floodmix ..."
 *   fork ... endchild      fork(): the child prints "ok forked pid=" and runs the commands up to
 *                          `endchild`, then exits 0; the parent waits for it, prints
 *                          "ok fork child= status=" and goes on after `endchild`.
 *
 *   poke ID BYTE / peek ID  cuMemsetD8_v2 of a whole `alloc` id / cuMemcpyDtoH_v2 of it
 *                          -> peek: first= (the first byte) all_same= (1: every byte equals it)
 *   pokepat ID SEED / peekpat ID SEED
 *                          a pattern of SEED into a whole `alloc` id (cuMemcpyHtoD_v2) / read
 *                          back and compared (cuMemcpyDtoH_v2) -> peekpat: bad= (bytes that differ)
 *   allocbench N SIZE      N pairs of cuMemAlloc + cuMemFree of SIZE -> ns= (per pair, wall clock:
 *                          a measurement to record, never a test's judgement)
 *   range ID               cuMemGetAddressRange_v2 of the middle of an `alloc` id
 *                          -> base_ok= (1: the allocation's pointer) size=
 *   ipcget ID              cuIpcGetMemHandle of an `alloc` id -> ok, or err code=
 *   ckpt ACTION PID TIMEOUT_MS
 *                          the driver's checkpoint API on process PID: ACTION lock (with
 *                          TIMEOUT_MS; 0 = none), checkpoint, restore, unlock, state, tid
 *                          -> action= value= (the CUprocessState, or the restore thread id)
 *
 * Commands for the suspend gate (tests/integration/tests/gate.rs; the shim's knob
 * GPUSLICE_TEST_GATE=1 closes and opens it):
 *   gateargs               the echo functions (a float pair; 12 arguments) on this thread and a new one
 *                          -> thunk= (1: the pointer is in libgpuslice) floats= stack= thread_floats= thread_stack=
 *   gateblock MS           two threads ready, close, then a cuMemcpyHtoD (thunk) and a cuMemAlloc
 *                          (hook) on them; MS ms later, open -> close= closed= exempt= held= copy= alloc= open=
 *   gatebusy KMS TMS       a KMS ms kernel, cuStreamSynchronize on another thread, close(TMS ms)
 *                          -> busy= (0 or minus the threads inside) reopened= sync= after=
 *   gatefork               close, fork: the child says closed= query=, the parent close= closed= child_exit=
 *   gateloop N             N cuDriverGetVersion, N cuStreamQuery -> version_ns= query_ns= (CPU ns per call)
 *   gatestate              -> fast= (fast_suspendable) unknown= export= (the holes counted)
 *
 * Commands for fault injection (tests/integration/tests/faults.rs):
 *   storm T NS SEED STOPFILE
 *                          T threads, each with a ring of 8 allocations: every round frees one it
 *                          holds or makes one (cuMemAlloc, 1 in 8 cuMemCreate, 1 in 8 an array;
 *                          256 KiB to 4 MiB) and launches a kernel of NS ns; until STOPFILE exists
 *                          (60 s at most), then frees what it holds  -> rounds= allocs= refusals= failures=
 *   hammer T ROUNDS CHUNK CHURN NS
 *                          T threads, ROUNDS rounds of: all fill with CHUNK-byte cuMemAlloc (+ a
 *                          launch each) until each is refused once; then each does CHURN steps of
 *                          (free one of its own, or cuMemAlloc 4 KiB..CHUNK) + a launch; between
 *                          rounds everything is freed; the last round's allocations are kept as ids
 *                          -> threads= refusals= (all OOMs seen) failures= held= (bytes kept)
 *                             granted=G1,G2,... (chunks granted in each round's fill)
 *   forkstorm T FORKS TIMEOUT_MS NS
 *                          T storm threads (as `storm`) while the main thread forks FORKS times;
 *                          each child does cuMemAlloc(1 MiB), a launch, cuMemFree, cuCtxSynchronize
 *                          and exits (10 + the failed step on error); a child not done within
 *                          TIMEOUT_MS is killed and counted as hung
 *                          -> forks= fine= hung= failed= codes= max_ms= rounds= failures=
 *   exec PATH ARGS...      execv(PATH, [PATH, ARGS...]): the rest of the line is the new program's.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if !defined(ROUTE_LINK) && !defined(ROUTE_DLSYM) && !defined(ROUTE_PROCADDR)
#error "define one of ROUTE_LINK, ROUTE_DLSYM, ROUTE_PROCADDR"
#endif

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef void *CUcontext, *CUstream, *CUevent, *CUmodule, *CUfunction, *CUarray, *CUmipmappedArray,
    *CUmemoryPool, *CUgraph, *CUgraphExec;

typedef struct {
    size_t Width, Height;
    unsigned Format, NumChannels;
} CUDA_ARRAY_DESCRIPTOR;
typedef struct {
    size_t Width, Height, Depth;
    unsigned Format, NumChannels, Flags;
} CUDA_ARRAY3D_DESCRIPTOR;
typedef struct {
    int type;
    int id;
} CUmemLocation;
typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType, gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;
typedef struct {
    CUmemLocation location;
    int flags;
} CUmemAccessDesc;
typedef struct {
    unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    CUstream hStream;
    void *attrs;
    unsigned numAttrs;
} CUlaunchConfig;

#define CU_AD_FORMAT_UNSIGNED_INT8 1
#define CU_MEM_ATTACH_GLOBAL 1
#define CU_MEM_ALLOCATION_TYPE_PINNED 1
#define CU_MEM_LOCATION_TYPE_DEVICE 1
#define CU_MEM_ACCESS_FLAGS_PROT_READWRITE 3

/* X(base name, versioned export, return type, parameter list) */
#define CU_FUNCS(X)                                                                               \
    X(cuInit, cuInit, CUresult, (unsigned))                                                       \
    X(cuDriverGetVersion, cuDriverGetVersion, CUresult, (int *))                                  \
    X(cuDeviceGetCount, cuDeviceGetCount, CUresult, (int *))                                      \
    X(cuDeviceGet, cuDeviceGet, CUresult, (CUdevice *, int))                                      \
    X(cuDeviceGetUuid, cuDeviceGetUuid_v2, CUresult, (unsigned char *, CUdevice))                 \
    X(cuDeviceTotalMem, cuDeviceTotalMem_v2, CUresult, (size_t *, CUdevice))                      \
    X(cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain, CUresult, (CUcontext *, CUdevice))      \
    X(cuDevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease_v2, CUresult, (CUdevice))              \
    X(cuCtxCreate, cuCtxCreate_v4, CUresult, (CUcontext *, void *, unsigned, CUdevice))           \
    X(cuCtxDestroy, cuCtxDestroy_v2, CUresult, (CUcontext))                                       \
    X(cuCtxSetCurrent, cuCtxSetCurrent, CUresult, (CUcontext))                                    \
    X(cuCtxGetCurrent, cuCtxGetCurrent, CUresult, (CUcontext *))                                  \
    X(cuCtxGetDevice, cuCtxGetDevice, CUresult, (CUdevice *))                                     \
    X(cuCtxSynchronize, cuCtxSynchronize, CUresult, (void))                                       \
    X(cuMemGetInfo, cuMemGetInfo_v2, CUresult, (size_t *, size_t *))                              \
    X(cuMemAlloc, cuMemAlloc_v2, CUresult, (CUdeviceptr *, size_t))                               \
    X(cuMemAllocPitch, cuMemAllocPitch_v2, CUresult,                                              \
      (CUdeviceptr *, size_t *, size_t, size_t, unsigned))                                        \
    X(cuMemAllocManaged, cuMemAllocManaged, CUresult, (CUdeviceptr *, size_t, unsigned))          \
    X(cuMemAllocAsync, cuMemAllocAsync, CUresult, (CUdeviceptr *, size_t, CUstream))              \
    X(cuMemAllocFromPoolAsync, cuMemAllocFromPoolAsync, CUresult,                                 \
      (CUdeviceptr *, size_t, CUmemoryPool, CUstream))                                            \
    X(cuDeviceGetDefaultMemPool, cuDeviceGetDefaultMemPool, CUresult, (CUmemoryPool *, CUdevice)) \
    X(cuMemFree, cuMemFree_v2, CUresult, (CUdeviceptr))                                           \
    X(cuMemFreeAsync, cuMemFreeAsync, CUresult, (CUdeviceptr, CUstream))                          \
    X(cuMemGetAllocationGranularity, cuMemGetAllocationGranularity, CUresult,                     \
      (size_t *, const CUmemAllocationProp *, int))                                               \
    X(cuMemCreate, cuMemCreate, CUresult,                                                         \
      (CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long))  \
    X(cuMemRelease, cuMemRelease, CUresult, (CUmemGenericAllocationHandle))                       \
    X(cuMemAddressReserve, cuMemAddressReserve, CUresult,                                         \
      (CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long))                           \
    X(cuMemAddressFree, cuMemAddressFree, CUresult, (CUdeviceptr, size_t))                        \
    X(cuMemMap, cuMemMap, CUresult,                                                               \
      (CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long))            \
    X(cuMemUnmap, cuMemUnmap, CUresult, (CUdeviceptr, size_t))                                    \
    X(cuMemSetAccess, cuMemSetAccess, CUresult,                                                   \
      (CUdeviceptr, size_t, const CUmemAccessDesc *, size_t))                                     \
    X(cuArrayCreate, cuArrayCreate_v2, CUresult, (CUarray *, const CUDA_ARRAY_DESCRIPTOR *))      \
    X(cuArray3DCreate, cuArray3DCreate_v2, CUresult,                                              \
      (CUarray *, const CUDA_ARRAY3D_DESCRIPTOR *))                                               \
    X(cuMipmappedArrayCreate, cuMipmappedArrayCreate, CUresult,                                   \
      (CUmipmappedArray *, const CUDA_ARRAY3D_DESCRIPTOR *, unsigned))                            \
    X(cuArrayDestroy, cuArrayDestroy, CUresult, (CUarray))                                        \
    X(cuMipmappedArrayDestroy, cuMipmappedArrayDestroy, CUresult, (CUmipmappedArray))             \
    X(cuModuleLoadData, cuModuleLoadData, CUresult, (CUmodule *, const void *))                   \
    X(cuModuleGetFunction, cuModuleGetFunction, CUresult, (CUfunction *, CUmodule, const char *)) \
    X(cuModuleLoad, cuModuleLoad, CUresult, (CUmodule *, const char *))                           \
    X(cuModuleLoadDataEx, cuModuleLoadDataEx, CUresult,                                           \
      (CUmodule *, const void *, unsigned, int *, void **))                                       \
    X(cuModuleLoadFatBinary, cuModuleLoadFatBinary, CUresult, (CUmodule *, const void *))         \
    X(cuModuleUnload, cuModuleUnload, CUresult, (CUmodule))                                       \
    X(cuLibraryLoadData, cuLibraryLoadData, CUresult,                                             \
      (void **, const void *, int *, void **, unsigned, int *, void **, unsigned))                \
    X(cuLibraryLoadFromFile, cuLibraryLoadFromFile, CUresult,                                     \
      (void **, const char *, int *, void **, unsigned, int *, void **, unsigned))                \
    X(cuLibraryUnload, cuLibraryUnload, CUresult, (void *))                                       \
    X(cuLaunchKernel, cuLaunchKernel, CUresult,                                                   \
      (CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,          \
       CUstream, void **, void **))                                                               \
    X(cuLaunchKernelEx, cuLaunchKernelEx, CUresult,                                               \
      (const CUlaunchConfig *, CUfunction, void **, void **))                                     \
    X(cuStreamCreate, cuStreamCreate, CUresult, (CUstream *, unsigned))                           \
    X(cuStreamSynchronize, cuStreamSynchronize, CUresult, (CUstream))                             \
    X(cuStreamDestroy, cuStreamDestroy_v2, CUresult, (CUstream))                                  \
    X(cuEventCreate, cuEventCreate, CUresult, (CUevent *, unsigned))                              \
    X(cuEventRecord, cuEventRecord, CUresult, (CUevent, CUstream))                                \
    X(cuEventSynchronize, cuEventSynchronize, CUresult, (CUevent))                                \
    X(cuEventQuery, cuEventQuery, CUresult, (CUevent))                                            \
    X(cuEventElapsedTime, cuEventElapsedTime_v2, CUresult, (float *, CUevent, CUevent))           \
    X(cuEventDestroy, cuEventDestroy_v2, CUresult, (CUevent))                                     \
    X(cuStreamBeginCapture, cuStreamBeginCapture_v2, CUresult, (CUstream, int))                   \
    X(cuStreamEndCapture, cuStreamEndCapture, CUresult, (CUstream, CUgraph *))                    \
    X(cuGraphInstantiate, cuGraphInstantiateWithFlags, CUresult,                                  \
      (CUgraphExec *, CUgraph, unsigned long long))                                               \
    X(cuGraphLaunch, cuGraphLaunch, CUresult, (CUgraphExec, CUstream))                            \
    X(cuGraphExecDestroy, cuGraphExecDestroy, CUresult, (CUgraphExec))                            \
    X(cuGraphDestroy, cuGraphDestroy, CUresult, (CUgraph))                                        \
    X(cuStreamQuery, cuStreamQuery, CUresult, (CUstream))                                         \
    X(cuMemcpyHtoD, cuMemcpyHtoD_v2, CUresult, (CUdeviceptr, const void *, size_t))               \
    X(cuTexRefSetMipmapLevelClamp, cuTexRefSetMipmapLevelClamp, CUresult, (void *, float, float)) \
    X(cuTensorMapEncodeTiled, cuTensorMapEncodeTiled, CUresult,                                   \
      (void *, unsigned, unsigned, void *, const void *, const void *, const void *, const void *,\
       unsigned, unsigned, unsigned, unsigned))

/* The 32-bit-era entry points (no _v2): unsigned int device pointers and sizes. Resolved by
 * their own names (cuGetProcAddress with cudaVersion 2000 in the procaddr routes). */
typedef struct {
    unsigned Width, Height, Format, NumChannels;
} CUDA_ARRAY_DESCRIPTOR_v1;
typedef struct {
    unsigned Width, Height, Depth, Format, NumChannels, Flags;
} CUDA_ARRAY3D_DESCRIPTOR_v1;
#define LEGACY_FUNCS(X)                                                                           \
    X(cuMemAlloc, CUresult, (unsigned *, unsigned))                                               \
    X(cuMemAllocPitch, CUresult, (unsigned *, unsigned *, unsigned, unsigned, unsigned))          \
    X(cuMemFree, CUresult, (unsigned))                                                            \
    X(cuMemGetInfo, CUresult, (unsigned *, unsigned *))                                           \
    X(cuDeviceTotalMem, CUresult, (unsigned *, CUdevice))                                         \
    X(cuArrayCreate, CUresult, (CUarray *, const CUDA_ARRAY_DESCRIPTOR_v1 *))                     \
    X(cuArray3DCreate, CUresult, (CUarray *, const CUDA_ARRAY3D_DESCRIPTOR_v1 *))                 \
    X(cuCtxCreate, CUresult, (CUcontext *, unsigned, CUdevice))                                   \
    X(cuCtxDestroy, CUresult, (CUcontext))

typedef CUresult (*pfn_getproc_v2)(const char *, void **, int, unsigned long long, int *);

#define DECLARE_PTR(base, ver, ret, params) \
    typedef ret(*pfn_##base) params;        \
    static pfn_##base p_##base;
CU_FUNCS(DECLARE_PTR)
#define DECLARE_LEGACY_PTR(name, ret, params) \
    typedef ret(*pfn_v1_##name) params;       \
    static pfn_v1_##name v1_##name;
LEGACY_FUNCS(DECLARE_LEGACY_PTR)
static pfn_getproc_v2 p_cuGetProcAddress; /* v2 ABI in every route */

#ifdef ROUTE_LINK
#define DECLARE_EXTERN(base, ver, ret, params) extern ret ver params;
CU_FUNCS(DECLARE_EXTERN)
#define DECLARE_LEGACY_EXTERN(name, ret, params) extern ret name params;
LEGACY_FUNCS(DECLARE_LEGACY_EXTERN)
extern CUresult cuGetProcAddress_v2(const char *, void **, int, unsigned long long, int *);
static const char *ROUTE = "link";
#elif defined(ROUTE_DLSYM)
static const char *ROUTE = "dlsym";
#else
#ifdef PTSZ
static const char *ROUTE = "procaddr-ptsz";
static const unsigned long long GPA_FLAGS = 2; /* CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM */
#else
static const char *ROUTE = "procaddr";
static const unsigned long long GPA_FLAGS = 0;
#endif
#endif

static void *libcuda;

static void resolve_driver(void) {
#ifdef ROUTE_LINK
#define ASSIGN_LINK(base, ver, ret, params) p_##base = ver;
    CU_FUNCS(ASSIGN_LINK)
#define ASSIGN_LEGACY_LINK(name, ret, params) v1_##name = name;
    LEGACY_FUNCS(ASSIGN_LEGACY_LINK)
    p_cuGetProcAddress = cuGetProcAddress_v2;
    libcuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
#else
    libcuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!libcuda) {
        fprintf(stderr, "cuclient: dlopen libcuda.so.1: %s\n", dlerror());
        exit(3);
    }
#ifdef ROUTE_DLSYM
#define ASSIGN_DLSYM(base, ver, ret, params) p_##base = (pfn_##base)dlsym(libcuda, #ver);
    CU_FUNCS(ASSIGN_DLSYM)
#define ASSIGN_LEGACY_DLSYM(name, ret, params) v1_##name = (pfn_v1_##name)dlsym(libcuda, #name);
    LEGACY_FUNCS(ASSIGN_LEGACY_DLSYM)
    p_cuGetProcAddress = (pfn_getproc_v2)dlsym(libcuda, "cuGetProcAddress_v2");
#else
    pfn_getproc_v2 first = (pfn_getproc_v2)dlsym(libcuda, "cuGetProcAddress_v2");
    if (!first) {
        fprintf(stderr, "cuclient: no cuGetProcAddress_v2 in libcuda.so.1\n");
        exit(3);
    }
    int st = -1;
    void *p = NULL;
    CUresult r = first("cuGetProcAddress", &p, 12000, 0, &st);
    if (r != 0 || !p) {
        fprintf(stderr, "cuclient: cuGetProcAddress(\"cuGetProcAddress\") failed: %d status %d\n", r, st);
        exit(3);
    }
    p_cuGetProcAddress = (pfn_getproc_v2)p;
#define ASSIGN_PROC(base, ver, ret, params)                                                      \
    {                                                                                            \
        void *fp = NULL;                                                                         \
        int s = -1;                                                                              \
        if (p_cuGetProcAddress(#base, &fp, 13000, GPA_FLAGS, &s) == 0) p_##base = (pfn_##base)fp; \
    }
    CU_FUNCS(ASSIGN_PROC)
#define ASSIGN_LEGACY_PROC(name, ret, params)                                                     \
    {                                                                                            \
        void *fp = NULL;                                                                         \
        int s = -1;                                                                              \
        if (p_cuGetProcAddress(#name, &fp, 2000, GPA_FLAGS, &s) == 0) v1_##name = (pfn_v1_##name)fp; \
    }
    LEGACY_FUNCS(ASSIGN_LEGACY_PROC)
#endif
#endif
}

/* ---------------------------------------------------------------- NVML */
typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;
typedef struct {
    unsigned version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
    unsigned pid;
    unsigned long long usedGpuMemory;
    unsigned gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
static int (*n_init)(void);
static int (*n_handle)(unsigned, void **);
static int (*n_meminfo)(void *, nvmlMemory_t *);
static int (*n_meminfo2)(void *, nvmlMemory_v2_t *);
static int (*n_uuid)(void *, char *, unsigned);
static int (*n_procs)(void *, unsigned *, nvmlProcessInfo_t *);
static int (*n_by_uuid)(const char *, void **);
static int (*n_index)(void *, unsigned *);

static int nvml_ready(void) {
    static int state = 0; /* 0 untried, 1 ok, <0 failed (negated code) */
    if (state) return state;
    void *h = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!h) {
        fprintf(stderr, "cuclient: dlopen libnvidia-ml.so.1: %s\n", dlerror());
        return state = -9;
    }
    n_init = (int (*)(void))dlsym(h, "nvmlInit_v2");
    n_handle = (int (*)(unsigned, void **))dlsym(h, "nvmlDeviceGetHandleByIndex_v2");
    n_meminfo = (int (*)(void *, nvmlMemory_t *))dlsym(h, "nvmlDeviceGetMemoryInfo");
    n_meminfo2 = (int (*)(void *, nvmlMemory_v2_t *))dlsym(h, "nvmlDeviceGetMemoryInfo_v2");
    n_uuid = (int (*)(void *, char *, unsigned))dlsym(h, "nvmlDeviceGetUUID");
    n_procs = (int (*)(void *, unsigned *, nvmlProcessInfo_t *))dlsym(h, "nvmlDeviceGetComputeRunningProcesses_v3");
    n_by_uuid = (int (*)(const char *, void **))dlsym(h, "nvmlDeviceGetHandleByUUID");
    n_index = (int (*)(void *, unsigned *))dlsym(h, "nvmlDeviceGetIndex");
    if (!n_init || !n_handle || !n_meminfo || !n_meminfo2 || !n_uuid || !n_procs || !n_by_uuid || !n_index)
        return state = -999;
    int r = n_init();
    if (r != 0) return state = -r;
    return state = 1;
}

/* ---------------------------------------------------------------- bookkeeping */
enum kind { K_ALLOC, K_PITCH, K_MANAGED, K_ASYNC, K_POOL, K_VMM, K_VMMMAP, K_ARRAY, K_ARRAY3D, K_MIPMAP, K_MODULE, K_LIBRARY, K_V1ALLOC };
struct obj {
    enum kind kind;
    CUdeviceptr ptr; /* device pointer, VA of a vmmmap */
    void *handle;    /* array / mipmap */
    CUmemGenericAllocationHandle vmm;
    size_t size;
    int freed;
};
static struct obj *objs;
static int nobjs, capobjs;
static pthread_mutex_t objs_lock = PTHREAD_MUTEX_INITIALIZER;

/* The cuMemAlloc object `id` (1-based, as `alloc` printed it), or NULL after an error line. */
static struct obj *alloc_by_id(const char *cmd, unsigned long long id) {
    if (id < 1 || id > (unsigned long long)nobjs || objs[id - 1].kind != K_ALLOC) {
        printf("err %s code=-1 unknown_id=%llu\n", cmd, id);
        return NULL;
    }
    return &objs[id - 1];
}

static int add_obj(struct obj o) {
    pthread_mutex_lock(&objs_lock);
    if (nobjs == capobjs) {
        capobjs = capobjs ? capobjs * 2 : 64;
        objs = realloc(objs, sizeof(struct obj) * capobjs);
        if (!objs) abort();
    }
    objs[nobjs] = o;
    int id = ++nobjs; /* ids start at 1 */
    pthread_mutex_unlock(&objs_lock);
    return id;
}

static CUcontext g_ctx;
static CUmodule g_module;
static CUfunction g_func;
/* When the next pprobe request is due (0: at once); successive pprobes keep one schedule. */
static unsigned long long g_pprobe_next;

/* The grid of the launches of launch, plaunch, events, graph, probe and flood (`grid X Y Z`). */
static unsigned int g_grid[3] = {132, 1, 1};
static struct timespec g_mark;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static unsigned long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
}

/* The simulated driver's clock (SIMCUDA_CLOCK, tests/simcuda/src/clock.rs), when it is on:
 * `flood`, `sleep`, `mark` and `elapsed` then run on virtual time, and a thread that waits for
 * other threads (`plaunch`) parks so that time moves without it. NULL on any other driver. */
static unsigned long long (*p_clock_now)(void);
static void (*p_clock_sleep_until)(unsigned long long);
static void (*p_clock_park)(void);
static void (*p_clock_unpark)(void);
static void (*p_clock_join)(void);
static void (*p_clock_counts)(unsigned long long *, int);
static unsigned long long g_mark_ns;

static void resolve_clock(void) {
    void *h = libcuda ? libcuda : dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!h) return;
    int (*enabled)(void) = (int (*)(void))dlsym(h, "simcuda_clock_enabled");
    if (!enabled || !enabled()) return;
    p_clock_now = (unsigned long long (*)(void))dlsym(h, "simcuda_clock_now_ns");
    p_clock_sleep_until = (void (*)(unsigned long long))dlsym(h, "simcuda_clock_sleep_until_ns");
    p_clock_park = (void (*)(void))dlsym(h, "simcuda_clock_park");
    p_clock_unpark = (void (*)(void))dlsym(h, "simcuda_clock_unpark");
    p_clock_join = (void (*)(void))dlsym(h, "simcuda_clock_join");
    p_clock_counts = (void (*)(unsigned long long *, int))dlsym(h, "simcuda_clock_counts");
    if (!p_clock_now || !p_clock_sleep_until || !p_clock_park || !p_clock_unpark || !p_clock_join) p_clock_now = NULL;
}

/* Nanoseconds on the driver's clock: the simulated one if it is on, else CLOCK_MONOTONIC. */
static unsigned long long clock_ns(void) { return p_clock_now ? p_clock_now() : now_ns(); }
static double clock_ms(void) { return clock_ns() / 1e6; }
static void clock_sleep_us(unsigned long long us) {
    if (p_clock_now) p_clock_sleep_until(clock_ns() + us * 1000ULL);
    else usleep((useconds_t)us);
}

/* How long waitfile and churn wait for their file at most: a test that died must not leave
 * clients behind for ever. */
#define WAIT_CAP_MS 60000.0

/* ---------------------------------------------------------------- argument parsing */
static int parse_size(const char *s, unsigned long long *out) {
    char *end;
    if (!*s || *s == '-') return -1;
    unsigned long long v = strtoull(s, &end, 0);
    if (end == s) return -1;
    unsigned long long mul = 1;
    switch (*end) {
    case 0: break;
    case 'k': case 'K': mul = 1ULL << 10; end++; break;
    case 'm': case 'M': mul = 1ULL << 20; end++; break;
    case 'g': case 'G': mul = 1ULL << 30; end++; break;
    case 't': case 'T': mul = 1ULL << 40; end++; break;
    default: return -1;
    }
    if (mul > 1 && (*end == 'i' || *end == 'I')) end++;
    if (mul > 1 && (*end == 'b' || *end == 'B')) end++;
    if (*end) return -1;
    *out = v * mul;
    return 0;
}

/* command name, number of arguments, argument kinds: n = size, x = address, s = string */
struct cmdspec {
    const char *name;
    const char *args;
};
static const struct cmdspec CMDS[] = {
    {"init", ""},         {"version", ""},       {"count", ""},          {"ctx", "n"},
    {"ctxcreate", "n"},   {"ctxdestroy", ""},    {"ctxrelease", "n"},    {"alloc", "n"},
    {"pitch", "nnn"},     {"managed", "n"},      {"async", "n"},         {"pool", "n"},
    {"vmm", "n"},         {"vmmmap", "n"},       {"array", "nn"},        {"array3d", "nnn"},
    {"mipmap", "nnn"},    {"free", "n"},         {"freeraw", "x"},       {"freeall", ""},
    {"fill", "n"},        {"info", ""},          {"totalmem", "n"},      {"nvml", "n"},
    {"nvmlprocs", "n"},   {"uuid", "n"},         {"threads", "nnn"},     {"launch", "nn"},       {"plaunch", "nnn"},
    {"launchex", "nn"},   {"events", "nn"},      {"graph", "nnn"},       {"sync", ""},
    {"sleep", "n"},       {"mark", ""},          {"elapsed", ""},        {"procaddr", "snn"},
    {"dlsym", "s"},       {"pid", ""},
    {"waitfile", "s"},    {"touch", "s"},        {"churn", "ns"},        {"allocwait", "nnn"},
    {"now", ""},          {"probe", "nnn"},      {"pprobe", "nnn"},      {"mprobe", "nnnnn"},   {"flood", "nns"},     {"floodmix", "snns"},
    {"fork", ""},         {"endchild", ""},      {"getenv", "s"},
    {"modthreads", "nnn"}, {"modload", "sn"},    {"ptxload", "n"},      {"modimage", "s"},      {"modfile", "s"},      {"libload", "n"},       {"libfile", "s"},
    {"image", "sn"},      {"v1alloc", "n"},      {"v1pitch", "nnn"},     {"v1free", "x"},
    {"v1info", ""},       {"v1total", "n"},      {"v1array", "nn"},      {"v1array3d", "nnn"},
    {"v1ctxcreate", "n"}, {"v1ctxdestroy", ""},  {"dlvsym", "ss"},
    {"storm", "nnns"},    {"hammer", "nnnnn"},   {"forkstorm", "nnnn"},  {"exec", "s"},
    {"ckpt", "snn"},      {"poke", "nn"},        {"peek", "n"},
    {"allocbench", "nn"}, {"pokepat", "nn"},    {"peekpat", "nn"},     {"range", "n"},         {"ipcget", "n"},
    {"grid", "nnn"},      {"usefunc", "sss"},    {"launchpacked", "nn"},
    {"gateargs", ""},     {"gateblock", "n"},    {"gatebusy", "nn"},     {"gatefork", ""},
    {"gateloop", "n"},    {"gatestate", ""},     {"gatecall", "snn"},
};

static const struct cmdspec *find_cmd(const char *name) {
    for (size_t i = 0; i < sizeof(CMDS) / sizeof(CMDS[0]); i++)
        if (!strcmp(CMDS[i].name, name)) return &CMDS[i];
    return NULL;
}

static int validate(int argc, char **argv) {
    int i = 1;
    while (i < argc) {
        const struct cmdspec *c = find_cmd(argv[i]);
        if (!c) {
            fprintf(stderr, "cuclient: unknown command '%s'\n", argv[i]);
            return -1;
        }
        i++;
        if (!strcmp(c->name, "exec")) return i < argc ? 0 : -1; /* the rest is the new program's */
        for (const char *k = c->args; *k; k++, i++) {
            if (i >= argc) {
                fprintf(stderr, "cuclient: '%s' needs %zu argument(s)\n", c->name, strlen(c->args));
                return -1;
            }
            unsigned long long v;
            if ((*k == 'n' || *k == 'x') && parse_size(argv[i], &v)) {
                fprintf(stderr, "cuclient: bad number '%s' for '%s'\n", argv[i], c->name);
                return -1;
            }
        }
    }
    return 0;
}

static unsigned long long num(const char *s) {
    unsigned long long v = 0;
    parse_size(s, &v);
    return v;
}

/* ---------------------------------------------------------------- commands */
#define NEED(fn)                                                          \
    if (!p_##fn) {                                                        \
        printf("err %s code=-1 missing=%s\n", cmd, #fn);                  \
        return;                                                           \
    }
#define NEED_V1(fn)                                                       \
    if (!v1_##fn) {                                                       \
        printf("err %s code=-1 missing=%s\n", cmd, #fn);                  \
        return;                                                           \
    }
#define CHECK(call)                                  \
    do {                                             \
        CUresult r_ = (call);                        \
        if (r_ != 0) {                               \
            printf("err %s code=%d\n", cmd, r_);     \
            return;                                  \
        }                                            \
    } while (0)

static void print_alloc(const char *cmd, struct obj o) {
    int id = add_obj(o);
    printf("ok %s id=%d ptr=0x%llx\n", cmd, id, (unsigned long long)(o.ptr ? o.ptr : (CUdeviceptr)(uintptr_t)o.handle));
}

static int current_device(CUdevice *dev) {
    if (!p_cuCtxGetDevice) return -1;
    return p_cuCtxGetDevice(dev);
}

static void ensure_function(const char *cmd, int *ok) {
    *ok = 0;
    NEED(cuModuleLoadData);
    NEED(cuModuleGetFunction);
    if (!g_func) {
        static const char image[] = "simulated module image";
        CHECK(p_cuModuleLoadData(&g_module, image));
        CHECK(p_cuModuleGetFunction(&g_func, g_module, "busy"));
    }
    *ok = 1;
}

static CUresult do_free(struct obj *o) {
    CUresult r = 0;
    switch (o->kind) {
    case K_ALLOC: case K_PITCH: case K_MANAGED:
        if (!p_cuMemFree) return -1;
        r = p_cuMemFree(o->ptr);
        break;
    case K_ASYNC: case K_POOL:
        if (!p_cuMemFreeAsync || !p_cuStreamSynchronize) return -1;
        r = p_cuMemFreeAsync(o->ptr, 0);
        if (r == 0) r = p_cuStreamSynchronize(0);
        break;
    case K_VMM:
        if (!p_cuMemRelease) return -1;
        r = p_cuMemRelease(o->vmm);
        break;
    case K_VMMMAP:
        if (!p_cuMemUnmap || !p_cuMemAddressFree || !p_cuMemRelease) return -1;
        r = p_cuMemUnmap(o->ptr, o->size);
        if (r == 0) r = p_cuMemRelease(o->vmm);
        if (r == 0) r = p_cuMemAddressFree(o->ptr, o->size);
        break;
    case K_ARRAY: case K_ARRAY3D:
        if (!p_cuArrayDestroy) return -1;
        r = p_cuArrayDestroy(o->handle);
        break;
    case K_MIPMAP:
        if (!p_cuMipmappedArrayDestroy) return -1;
        r = p_cuMipmappedArrayDestroy(o->handle);
        break;
    case K_MODULE:
        if (!p_cuModuleUnload) return -1;
        r = p_cuModuleUnload(o->handle);
        break;
    case K_LIBRARY:
        if (!p_cuLibraryUnload) return -1;
        r = p_cuLibraryUnload(o->handle);
        break;
    case K_V1ALLOC:
        if (!v1_cuMemFree) return -1;
        r = v1_cuMemFree((unsigned)o->ptr);
        break;
    }
    return r;
}

/* Starts `main` on T threads, each on its own element of `args` (T structs of `size` bytes
 * with an int `failures` at `failures_at`), joins them and returns the sum of their failures.
 * RUN_THREADS(t, args, main) fills in the size and the offset. */
static int run_threads(unsigned long long t, void *args, size_t size, size_t failures_at, void *(*main)(void *)) {
    pthread_t *th = calloc(t, sizeof *th);
    char *base = args;
    for (unsigned long long i = 0; i < t; i++) pthread_create(&th[i], NULL, main, base + i * size);
    int failures = 0;
    for (unsigned long long i = 0; i < t; i++) {
        pthread_join(th[i], NULL);
        failures += *(int *)(base + i * size + failures_at);
    }
    free(th);
    return failures;
}
#define RUN_THREADS(t, args, main) run_threads((t), (args), sizeof *(args), offsetof(__typeof__(*(args)), failures), (main))

struct thread_arg {
    unsigned long long iters, size;
    int failures;
};

static void *thread_main(void *p) {
    struct thread_arg *a = p;
    if (p_cuCtxSetCurrent(g_ctx) != 0) {
        a->failures++;
        return NULL;
    }
    for (unsigned long long i = 0; i < a->iters; i++) {
        CUdeviceptr d = 0;
        if (p_cuMemAlloc(&d, a->size) != 0) {
            a->failures++;
            continue;
        }
        if (p_cuMemFree(d) != 0) a->failures++;
    }
    CUdeviceptr d = 0;
    if (p_cuMemAlloc(&d, a->size) != 0) {
        a->failures++;
    } else {
        struct obj o = {K_ALLOC, d, NULL, 0, a->size, 0};
        add_obj(o);
    }
    return NULL;
}

/* modthreads: even threads load N modules of BYTES each (kept), odd threads allocate and free
 * N times (one allocation kept at the end), all at once. */
struct modthread_arg {
    unsigned long long rounds, bytes, index;
    int failures;
};

static void *modthread_main(void *p) {
    struct modthread_arg *a = p;
    if (p_cuCtxSetCurrent(g_ctx) != 0) {
        a->failures++;
        return NULL;
    }
    char image[64];
    snprintf(image, sizeof image, "SIMMODULE %llu", a->bytes);
    CUdeviceptr kept = 0;
    for (unsigned long long i = 0; i < a->rounds; i++) {
        if (a->index % 2 == 0) {
            struct obj o = {K_MODULE, 0, NULL, 0, a->bytes, 0};
            if (p_cuModuleLoadData(&o.handle, image) != 0) {
                a->failures++;
                continue;
            }
            add_obj(o);
        } else {
            CUdeviceptr d = 0;
            if (p_cuMemAlloc(&d, (a->index + 1) * 65536 + i * 4096) != 0) {
                a->failures++;
                continue;
            }
            if (kept && p_cuMemFree(kept) != 0) a->failures++;
            kept = d;
        }
    }
    if (kept) {
        struct obj o = {K_ALLOC, kept, NULL, 0, 0, 0};
        add_obj(o);
    }
    return NULL;
}


/* ---------------------------------------------------------------- the suspend gate (issue 22) */
/* The shim's test knob (GPUSLICE_TEST_GATE=1): 1 close(ms), 2 open, 3 is_closed,
 * 4 fast_suspendable, 5 unknown names, 6 export tables. */
static long long gate_knob(int action, unsigned long long ms) {
    long long (*knob)(int, unsigned long long) = (long long (*)(int, unsigned long long))dlsym(RTLD_DEFAULT, "gpuslice_test_gate");
    return knob ? knob(action, ms) : -999999;
}

static unsigned float_bits(float f) {
    unsigned u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Calls the two echo functions and checks what the simulated driver recorded: floats in xmm
 * registers, and the 7th to 12th arguments on the stack. */
static void *gate_echo_check(void *out) {
    int (*echo)(unsigned long long *, int) = (int (*)(unsigned long long *, int))dlsym(libcuda ? libcuda : RTLD_DEFAULT, "simcuda_echo");
    unsigned long long v[16] = {0};
    int *ok = out;
    ok[0] = ok[1] = 0;
    if (!echo) return NULL;
    if (p_cuTexRefSetMipmapLevelClamp((void *)0x1234, 1.5f, -2.25f) == 0 && echo(v, 16) == 3)
        ok[0] = v[0] == 0x1234 && v[1] == float_bits(1.5f) && v[2] == float_bits(-2.25f);
    if (p_cuTensorMapEncodeTiled((void *)0x11, 2, 3, (void *)0x44, (void *)0x55, (void *)0x66, (void *)0x77, (void *)0x88,
                                 9, 10, 11, 0xfffffff0u) == 0 &&
        echo(v, 16) == 12) {
        const unsigned long long want[12] = {0x11, 2, 3, 0x44, 0x55, 0x66, 0x77, 0x88, 9, 10, 11, 0xfffffff0u};
        ok[1] = !memcmp(v, want, sizeof want);
    }
    return NULL;
}

static volatile int g_gate_done[2];
/* gateblock's threads: ready (each made a driver call, so its next one takes the thunk's fast
 * path) and go (the gate is closed now). */
static volatile int g_gate_ready, g_gate_go;
static void gate_ready_then_wait_go(void) {
    __atomic_add_fetch(&g_gate_ready, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&g_gate_go, __ATOMIC_SEQ_CST)) usleep(1000);
}
static CUdeviceptr g_gate_dev;
/* The main thread's context, made current on the gate tests' threads. */
static CUcontext g_gate_ctx;

static void *gate_copy_thread(void *unused) {
    (void)unused;
    p_cuCtxSetCurrent(g_gate_ctx);
    gate_ready_then_wait_go();
    char buf[64] = "through the gate";
    int r = p_cuMemcpyHtoD(g_gate_dev, buf, sizeof buf);
    __atomic_store_n(&g_gate_done[0], r == 0 ? 1 : -1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* gatecall: a driver function found by name, called from a thread while the gate is closed. */
static int (*g_gatecall_fn)(int);
static volatile int g_gatecall_result = -1;
static volatile int g_gatecall_done;

static void *gatecall_thread(void *arg) {
    int r = g_gatecall_fn((int)(long)arg);
    g_gatecall_result = r;
    __atomic_store_n(&g_gatecall_done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void *gate_alloc_thread(void *unused) {
    (void)unused;
    p_cuCtxSetCurrent(g_gate_ctx);
    gate_ready_then_wait_go();
    CUdeviceptr d = 0;
    int r = p_cuMemAlloc(&d, 4096);
    __atomic_store_n(&g_gate_done[1], r == 0 ? 1 : -1, __ATOMIC_SEQ_CST);
    return NULL;
}

static volatile int g_gate_syncing;
static void *gate_sync_thread(void *unused) {
    (void)unused;
    p_cuCtxSetCurrent(g_gate_ctx);
    __atomic_store_n(&g_gate_syncing, 1, __ATOMIC_SEQ_CST);
    int r = p_cuStreamSynchronize(0);
    __atomic_store_n(&g_gate_syncing, r == 0 ? 2 : -1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void launch_n(const char *cmd, unsigned long long n, unsigned long long ns, CUstream s, int ex);

static void launch_n(const char *cmd, unsigned long long n, unsigned long long ns, CUstream s, int ex) {
    int ok;
    ensure_function(cmd, &ok);
    if (!ok) return;
    if (ex) {
        NEED(cuLaunchKernelEx);
    } else {
        NEED(cuLaunchKernel);
    }
    unsigned long long dur = ns;
    void *params[] = {&dur};
    for (unsigned long long i = 0; i < n; i++) {
        if (ex) {
            CUlaunchConfig c = {1, 1, 1, 32, 1, 1, 0, s, NULL, 0};
            CHECK(p_cuLaunchKernelEx(&c, g_func, params, NULL));
        } else {
            CHECK(p_cuLaunchKernel(g_func, g_grid[0], g_grid[1], g_grid[2], 256, 1, 1, 0, s, params, NULL));
        }
    }
    printf("ok %s n=%llu\n", cmd, n);
}

struct launch_arg {
    unsigned long long n, ns;
    int failures;
    /* CPU time of this thread's launch loop (CLOCK_THREAD_CPUTIME_ID), ns. */
    unsigned long long cpu_ns;
};

static unsigned long long thread_cpu_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
}

/* plaunch threads that have started (joined the simulated clock, when it is on). */
static int g_launchers_started;

/* One thread of `plaunch`: its own stream, n kernels of ns each, then a stream sync. */
static void *launch_thread(void *p) {
    struct launch_arg *a = p;
    if (p_clock_join) p_clock_join();
    __atomic_add_fetch(&g_launchers_started, 1, __ATOMIC_SEQ_CST);
    CUstream s;
    if (p_cuCtxSetCurrent(g_ctx) != 0 || p_cuStreamCreate(&s, 0) != 0) {
        a->failures++;
        return NULL;
    }
    unsigned long long dur = a->ns;
    void *params[] = {&dur};
    unsigned long long cpu0 = thread_cpu_ns();
    for (unsigned long long i = 0; i < a->n; i++)
        if (p_cuLaunchKernel(g_func, g_grid[0], g_grid[1], g_grid[2], 256, 1, 1, 0, s, params, NULL) != 0) a->failures++;
    a->cpu_ns = thread_cpu_ns() - cpu0;
    if (p_cuStreamSynchronize(s) != 0) a->failures++;
    p_cuStreamDestroy(s);
    return NULL;
}

/* ---------------------------------------------------------------- fault injection (faults.rs) */
static unsigned long long xorshift(unsigned long long *s) {
    unsigned long long x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* One allocation of `kind` (K_ALLOC, K_VMM or K_ARRAY) of about `size` bytes into *o; VMM sizes
 * are rounded up to `gran`, arrays are size x 1 bytes. Returns the driver's code. */
static CUresult fault_alloc(struct obj *o, enum kind kind, size_t size, size_t gran, CUdevice dev) {
    memset(o, 0, sizeof *o);
    o->kind = kind;
    if (kind == K_VMM && p_cuMemCreate && gran) {
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof prop);
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = dev;
        o->size = (size + gran - 1) / gran * gran;
        return p_cuMemCreate(&o->vmm, o->size, &prop, 0);
    }
    if (kind == K_ARRAY && p_cuArrayCreate) {
        CUDA_ARRAY_DESCRIPTOR d = {size, 1, CU_AD_FORMAT_UNSIGNED_INT8, 1};
        o->size = size;
        return p_cuArrayCreate(&o->handle, &d);
    }
    o->kind = K_ALLOC;
    o->size = size;
    return p_cuMemAlloc(&o->ptr, size);
}

#define STORM_RING 8
struct storm_arg {
    unsigned long long ns, seed;
    const char *stopfile;      /* stop when it exists (checked every 16 rounds), or */
    volatile int *stop;        /* when this becomes non-zero */
    unsigned long long rounds, allocs, refusals, failures;
};

/* One thread of `storm` (and of `forkstorm`): a ring of STORM_RING allocations, each round frees
 * one held entry or makes a new one (mostly cuMemAlloc, some cuMemCreate and arrays, 256 KiB to
 * 4 MiB) and launches a kernel of `ns`; at the stop it frees what it holds. */
static void *storm_thread(void *p) {
    struct storm_arg *a = p;
    if (p_cuCtxSetCurrent(g_ctx) != 0) {
        a->failures++;
        return NULL;
    }
    CUdevice dev = 0;
    current_device(&dev);
    size_t gran = 0;
    if (p_cuMemGetAllocationGranularity) {
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof prop);
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = dev;
        if (p_cuMemGetAllocationGranularity(&gran, &prop, 0) != 0) gran = 0;
    }
    struct obj ring[STORM_RING];
    int held[STORM_RING] = {0};
    unsigned long long s = a->seed | 1, dur = a->ns;
    void *params[] = {&dur};
    double t0 = now_ms();
    for (;; a->rounds++) {
        if (a->rounds % 16 == 0) {
            if (a->stop ? *a->stop : access(a->stopfile, F_OK) == 0) break;
            if (now_ms() - t0 > WAIT_CAP_MS) break;
        }
        unsigned long long x = xorshift(&s);
        int i = (int)(x % STORM_RING);
        if (held[i]) {
            if (do_free(&ring[i]) != 0) a->failures++;
            held[i] = 0;
        } else {
            unsigned k = (unsigned)((x >> 16) % 8);
            enum kind kind = k == 0 ? K_VMM : k == 1 ? K_ARRAY : K_ALLOC;
            size_t size = (size_t)((x >> 24) % 16 + 1) << 18;
            CUresult r = fault_alloc(&ring[i], kind, size, gran, dev);
            if (r == 0) {
                held[i] = 1;
                a->allocs++;
            } else if (r == 2) {
                a->refusals++;
            } else {
                a->failures++;
            }
        }
        if (g_func && p_cuLaunchKernel(g_func, 1, 1, 1, 32, 1, 1, 0, 0, params, NULL) != 0) a->failures++;
    }
    for (int i = 0; i < STORM_RING; i++)
        if (held[i] && do_free(&ring[i]) != 0) a->failures++;
    return NULL;
}

static void storm_totals(struct storm_arg *args, unsigned long long t, unsigned long long *tot) {
    tot[0] = tot[1] = tot[2] = tot[3] = 0;
    for (unsigned long long i = 0; i < t; i++) {
        tot[0] += args[i].rounds;
        tot[1] += args[i].allocs;
        tot[2] += args[i].refusals;
        tot[3] += args[i].failures;
    }
}

/* `hammer`: threads filling to the limit together, then churning, round after round. */
struct hammer_shared {
    pthread_barrier_t barrier;
    unsigned long long rounds, chunk, churn, ns;
};
struct hammer_arg {
    struct hammer_shared *sh;
    unsigned long long seed;
    unsigned long long *granted; /* per round, this thread's chunks in the fill */
    unsigned long long refusals, failures, held;
    struct obj *objs;
    int nobjs, cap;
};

static void hammer_push(struct hammer_arg *a, struct obj o) {
    if (a->nobjs == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 64;
        a->objs = realloc(a->objs, sizeof(struct obj) * a->cap);
        if (!a->objs) abort();
    }
    a->objs[a->nobjs++] = o;
}

static void *hammer_thread(void *p) {
    struct hammer_arg *a = p;
    struct hammer_shared *sh = a->sh;
    int ok = p_cuCtxSetCurrent(g_ctx) == 0;
    if (!ok) a->failures++;
    unsigned long long s = a->seed | 1, dur = sh->ns;
    void *params[] = {&dur};
    for (unsigned long long r = 0; r < sh->rounds; r++) {
        pthread_barrier_wait(&sh->barrier);
        /* Fill: chunks until the first refusal. Nothing is freed meanwhile, so the group's use
           only grows and every thread's first refusal means the limit is reached. */
        while (ok) {
            struct obj o = {K_ALLOC, 0, NULL, 0, sh->chunk, 0};
            CUresult c = p_cuMemAlloc(&o.ptr, o.size);
            if (c == 2) {
                a->refusals++;
                break;
            }
            if (c != 0) {
                a->failures++;
                break;
            }
            hammer_push(a, o);
            a->granted[r]++;
            if (p_cuLaunchKernel(g_func, 1, 1, 1, 32, 1, 1, 0, 0, params, NULL) != 0) a->failures++;
        }
        pthread_barrier_wait(&sh->barrier);
        /* Churn: free one of ours or allocate 4 KiB .. chunk, and launch. */
        for (unsigned long long k = 0; ok && k < sh->churn; k++) {
            unsigned long long x = xorshift(&s);
            if (a->nobjs && (x & 1)) {
                int i = (int)((x >> 8) % (unsigned long long)a->nobjs);
                if (p_cuMemFree(a->objs[i].ptr) != 0) a->failures++;
                a->objs[i] = a->objs[--a->nobjs];
            } else {
                struct obj o = {K_ALLOC, 0, NULL, 0, ((x >> 8) % (sh->chunk >> 12) + 1) << 12, 0};
                CUresult c = p_cuMemAlloc(&o.ptr, o.size);
                if (c == 0) hammer_push(a, o);
                else if (c == 2) a->refusals++;
                else a->failures++;
            }
            if (p_cuLaunchKernel(g_func, 1, 1, 1, 32, 1, 1, 0, 0, params, NULL) != 0) a->failures++;
        }
        pthread_barrier_wait(&sh->barrier);
        if (r + 1 < sh->rounds) {
            for (int i = 0; i < a->nobjs; i++)
                if (p_cuMemFree(a->objs[i].ptr) != 0) a->failures++;
            a->nobjs = 0;
        }
    }
    a->held = 0;
    for (int i = 0; i < a->nobjs; i++) {
        a->held += a->objs[i].size;
        add_obj(a->objs[i]);
    }
    free(a->objs);
    return NULL;
}

/* `forkstorm`: one child, run right after fork() while the storm threads go on in the parent.
 * Exit codes: 0 fine, 10 + the step that failed. */
static void forked_child(unsigned long long ns) {
    CUdeviceptr d = 0;
    unsigned long long dur = ns;
    void *params[] = {&dur};
    if (p_cuMemAlloc(&d, 1 << 20) != 0) exit(10);
    if (p_cuLaunchKernel(g_func, 1, 1, 1, 32, 1, 1, 0, 0, params, NULL) != 0) exit(11);
    if (p_cuMemFree(d) != 0) exit(12);
    if (p_cuCtxSynchronize() != 0) exit(13);
    exit(0);
}

static int cmp_ull(const void *x, const void *y) {
    unsigned long long a = *(const unsigned long long *)x, b = *(const unsigned long long *)y;
    return a < b ? -1 : a > b;
}

/* Nearest-rank percentile of n sorted values. */
static unsigned long long pct(const unsigned long long *v, unsigned long long n, unsigned p) {
    unsigned long long rank = (n * p + 99) / 100;
    return v[rank ? rank - 1 : 0];
}

/* `flood`: adds the part of [start, end] inside [t0, stop] to the buckets (ns). */
static void flood_account(unsigned long long *busy, unsigned long long nb, unsigned long long bucket_ns,
                          unsigned long long t0, unsigned long long stop, unsigned long long start,
                          unsigned long long end) {
    if (start < t0) start = t0;
    if (end > stop) end = stop;
    while (start < end) {
        unsigned long long b = (start - t0) / bucket_ns;
        if (b >= nb) break;
        unsigned long long edge = t0 + (b + 1) * bucket_ns;
        unsigned long long upto = end < edge ? end : edge;
        busy[b] += upto - start;
        start = upto;
    }
}

/* `flood` and `floodmix`: kernels of durs[0], durs[1], ... (ns, in turn) on stream 0 without
 * waiting for them, host_us of the driver's clock before each launch (a framework's own time
 * per operator), until STOPFILE (or "+MS"); see the usage at the top. */
static void flood(const char *cmd, const unsigned long long *durs, const unsigned long long *pauses_us, int ndurs,
                  unsigned long long host_us, unsigned long long bucket_ms, const char *stopfile) {
    NEED(cuLaunchKernel);
    NEED(cuCtxSynchronize);
    NEED(cuEventCreate);
    NEED(cuEventRecord);
    NEED(cuEventQuery);
    NEED(cuEventSynchronize);
    NEED(cuEventElapsedTime);
    NEED(cuEventDestroy);
    int ok;
    ensure_function(cmd, &ok);
    if (!ok) return;
    enum { RING = 1024 };
    unsigned long long dur = durs[0], bucket_ns = bucket_ms * 1000000ULL;
    if (!bucket_ns) {
        printf("err %s code=-1 bucket_ms=0\n", cmd);
        return;
    }
    void *params[] = {&dur};
    CUevent base, ring[RING];
    CHECK(p_cuCtxSynchronize());
    CHECK(p_cuEventCreate(&base, 0));
    for (int i = 0; i < RING; i++) CHECK(p_cuEventCreate(&ring[i], 0));
    /* This process's waits on the simulated clock during the flood (sleeps, futex waits,
     * futex wakes, blocked): the shim's wake-ups, counted where they happen. */
    unsigned long long waits0[4] = {0}, waits1[4] = {0};
    if (p_clock_counts) p_clock_counts(waits0, 4);
    unsigned long long t0 = clock_ns();
    /* "+MS": stop after MS ms of the driver's clock instead of at a file. */
    unsigned long long for_ns = stopfile[0] == '+' ? num(stopfile + 1) * 1000000ULL : 0;
    CHECK(p_cuEventRecord(base, 0));
    /* Kernel end times (ns after t0), grown as needed; accounted into buckets at the end. */
    unsigned long long *ends = NULL, nends = 0, capends = 0, head = 0, tail = 0, launched = 0;
    int timeout = 0;
    CUresult r = 0;
#define FLOOD_HARVEST(wait)                                                            \
do {                                                                               \
    CUevent e_ = ring[head % RING];                                                \
    if (wait) p_cuEventSynchronize(e_);                                            \
    else if (p_cuEventQuery(e_) != 0) break;                                       \
    float ms_ = 0;                                                                 \
    if (p_cuEventElapsedTime(&ms_, base, e_) != 0) ms_ = -1;                       \
    if (nends == capends) {                                                        \
        capends = capends ? capends * 2 : 4096;                                    \
        ends = realloc(ends, capends * sizeof *ends);                              \
        if (!ends) abort();                                                        \
    }                                                                              \
    ends[nends++] = ms_ < 0 ? 0 : (unsigned long long)((double)ms_ * 1e6);         \
    head++;                                                                        \
} while (0)
    for (;;) {
        if (for_ns ? clock_ns() - t0 >= for_ns : access(stopfile, F_OK) == 0) break;
        if ((clock_ns() - t0) / 1e6 > WAIT_CAP_MS) {
            timeout = 1;
            break;
        }
        if (tail - head == RING) FLOOD_HARVEST(1);
        unsigned long long pause_us = host_us + (pauses_us ? pauses_us[launched % ndurs] : 0);
        if (pause_us) clock_sleep_us(pause_us);
        dur = durs[launched % ndurs];
        /* Each length of a mix is its own shape (as a GEMM and a norm are): 16 bytes of
         * dynamic shared memory per position in the list. */
        unsigned shared = ndurs > 1 ? (unsigned)(launched % ndurs) * 16 : 0;
        r = p_cuLaunchKernel(g_func, g_grid[0], g_grid[1], g_grid[2], 256, 1, 1, shared, 0, params, NULL);
        if (r != 0) break;
        launched++;
        r = p_cuEventRecord(ring[tail % RING], 0);
        if (r != 0) break;
        tail++;
        while (head < tail) {
            unsigned long long before = head;
            FLOOD_HARVEST(0);
            if (head == before) break;
        }
    }
    unsigned long long stop = clock_ns();
    if (p_clock_counts) p_clock_counts(waits1, 4);
    if (r == 0) r = p_cuCtxSynchronize();
    while (head < tail) FLOOD_HARVEST(1);
#undef FLOOD_HARVEST
    for (int i = 0; i < RING; i++) p_cuEventDestroy(ring[i]);
    p_cuEventDestroy(base);
    if (r != 0 || timeout) {
        printf("err %s code=%d timeout=%d n=%llu\n", cmd, r ? r : -1, timeout, launched);
        free(ends);
        return;
    }
    unsigned long long nb = (stop - t0 + bucket_ns - 1) / bucket_ns, done = 0;
    unsigned long long *busy = calloc(nb ? nb : 1, sizeof *busy);
    for (unsigned long long i = 0; i < nends; i++) {
        unsigned long long end = t0 + ends[i], d = durs[i % ndurs];
        if (end <= stop) done++;
        flood_account(busy, nb, bucket_ns, t0, stop, end > d ? end - d : 0, end);
    }
    printf("ok %s n=%llu done=%llu t0=%llu ms=%.3f sleeps=%llu futex_waits=%llu futex_wakes=%llu blocked=%llu bucket_ms=%llu busy=",
           cmd, launched, done, t0, (stop - t0) / 1e6, waits1[0] - waits0[0], waits1[1] - waits0[1],
           waits1[2] - waits0[2], waits1[3] - waits0[3], bucket_ns / 1000000ULL);
    for (unsigned long long b = 0; b < nb; b++) printf("%s%llu", b ? "," : "", busy[b] / 1000);
    printf("\n");
    free(busy);
    free(ends);
}

static void run(const char *cmd, char **a) {
    if (!strcmp(cmd, "init")) {
        NEED(cuInit);
        CHECK(p_cuInit(0));
        printf("ok init route=%s\n", ROUTE);
    } else if (!strcmp(cmd, "version")) {
        NEED(cuDriverGetVersion);
        int v = 0;
        CHECK(p_cuDriverGetVersion(&v));
        printf("ok version version=%d\n", v);
    } else if (!strcmp(cmd, "count")) {
        NEED(cuDeviceGetCount);
        int n = 0;
        CHECK(p_cuDeviceGetCount(&n));
        printf("ok count count=%d\n", n);
    } else if (!strcmp(cmd, "ctx")) {
        NEED(cuDeviceGet);
        NEED(cuDevicePrimaryCtxRetain);
        NEED(cuCtxSetCurrent);
        CUdevice dev;
        CHECK(p_cuDeviceGet(&dev, (int)num(a[0])));
        CHECK(p_cuDevicePrimaryCtxRetain(&g_ctx, dev));
        CHECK(p_cuCtxSetCurrent(g_ctx));
        printf("ok ctx dev=%d\n", dev);
    } else if (!strcmp(cmd, "ctxcreate")) {
        NEED(cuDeviceGet);
        NEED(cuCtxCreate);
        CUdevice dev;
        CHECK(p_cuDeviceGet(&dev, (int)num(a[0])));
        CHECK(p_cuCtxCreate(&g_ctx, NULL, 0, dev));
        printf("ok ctxcreate dev=%d\n", dev);
    } else if (!strcmp(cmd, "ctxdestroy")) {
        NEED(cuCtxDestroy);
        CHECK(p_cuCtxDestroy(g_ctx));
        g_ctx = NULL;
        g_func = NULL;
        printf("ok ctxdestroy\n");
    } else if (!strcmp(cmd, "ctxrelease")) {
        NEED(cuDevicePrimaryCtxRelease);
        CHECK(p_cuDevicePrimaryCtxRelease((int)num(a[0])));
        printf("ok ctxrelease\n");
    } else if (!strcmp(cmd, "alloc")) {
        NEED(cuMemAlloc);
        struct obj o = {K_ALLOC, 0, NULL, 0, num(a[0]), 0};
        CHECK(p_cuMemAlloc(&o.ptr, o.size));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "pitch")) {
        NEED(cuMemAllocPitch);
        size_t pitch = 0;
        struct obj o = {K_PITCH, 0, NULL, 0, 0, 0};
        CHECK(p_cuMemAllocPitch(&o.ptr, &pitch, num(a[0]), num(a[1]), (unsigned)num(a[2])));
        o.size = pitch * num(a[1]);
        int id = add_obj(o);
        printf("ok pitch id=%d ptr=0x%llx pitch=%zu\n", id, o.ptr, pitch);
    } else if (!strcmp(cmd, "managed")) {
        NEED(cuMemAllocManaged);
        struct obj o = {K_MANAGED, 0, NULL, 0, num(a[0]), 0};
        CHECK(p_cuMemAllocManaged(&o.ptr, o.size, CU_MEM_ATTACH_GLOBAL));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "async")) {
        NEED(cuMemAllocAsync);
        NEED(cuStreamSynchronize);
        struct obj o = {K_ASYNC, 0, NULL, 0, num(a[0]), 0};
        CHECK(p_cuMemAllocAsync(&o.ptr, o.size, 0));
        CHECK(p_cuStreamSynchronize(0));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "pool")) {
        NEED(cuMemAllocFromPoolAsync);
        NEED(cuDeviceGetDefaultMemPool);
        NEED(cuStreamSynchronize);
        CUdevice dev = 0;
        CHECK(current_device(&dev));
        CUmemoryPool pool;
        CHECK(p_cuDeviceGetDefaultMemPool(&pool, dev));
        struct obj o = {K_POOL, 0, NULL, 0, num(a[0]), 0};
        CHECK(p_cuMemAllocFromPoolAsync(&o.ptr, o.size, pool, 0));
        CHECK(p_cuStreamSynchronize(0));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "vmm") || !strcmp(cmd, "vmmmap")) {
        NEED(cuMemCreate);
        NEED(cuMemGetAllocationGranularity);
        CUdevice dev = 0;
        CHECK(current_device(&dev));
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof prop);
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = dev;
        size_t gran = 0;
        CHECK(p_cuMemGetAllocationGranularity(&gran, &prop, 0));
        struct obj o = {K_VMM, 0, NULL, 0, num(a[0]), 0};
        CHECK(p_cuMemCreate(&o.vmm, o.size, &prop, 0));
        if (!strcmp(cmd, "vmmmap")) {
            NEED(cuMemAddressReserve);
            NEED(cuMemMap);
            NEED(cuMemSetAccess);
            o.kind = K_VMMMAP;
            CHECK(p_cuMemAddressReserve(&o.ptr, o.size, 0, 0, 0));
            CHECK(p_cuMemMap(o.ptr, o.size, 0, o.vmm, 0));
            CUmemAccessDesc acc = {{CU_MEM_LOCATION_TYPE_DEVICE, dev}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
            CHECK(p_cuMemSetAccess(o.ptr, o.size, &acc, 1));
        }
        int id = add_obj(o);
        printf("ok %s id=%d handle=0x%llx gran=%zu\n", cmd, id, o.vmm, gran);
    } else if (!strcmp(cmd, "array")) {
        NEED(cuArrayCreate);
        CUDA_ARRAY_DESCRIPTOR d = {num(a[0]), num(a[1]), CU_AD_FORMAT_UNSIGNED_INT8, 1};
        struct obj o = {K_ARRAY, 0, NULL, 0, d.Width * (d.Height ? d.Height : 1), 0};
        CHECK(p_cuArrayCreate(&o.handle, &d));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "array3d")) {
        NEED(cuArray3DCreate);
        CUDA_ARRAY3D_DESCRIPTOR d = {num(a[0]), num(a[1]), num(a[2]), CU_AD_FORMAT_UNSIGNED_INT8, 1, 0};
        struct obj o = {K_ARRAY3D, 0, NULL, 0, 0, 0};
        CHECK(p_cuArray3DCreate(&o.handle, &d));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "mipmap")) {
        NEED(cuMipmappedArrayCreate);
        CUDA_ARRAY3D_DESCRIPTOR d = {num(a[0]), num(a[1]), 0, CU_AD_FORMAT_UNSIGNED_INT8, 1, 0};
        struct obj o = {K_MIPMAP, 0, NULL, 0, 0, 0};
        CHECK(p_cuMipmappedArrayCreate(&o.handle, &d, (unsigned)num(a[2])));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "free")) {
        unsigned long long id = num(a[0]);
        if (id < 1 || id > (unsigned long long)nobjs) {
            printf("err free code=-1 unknown_id=%llu\n", id);
            return;
        }
        struct obj *o = &objs[id - 1];
        CUresult r = do_free(o); /* freed again on purpose if asked twice: the driver must refuse */
        if (r != 0) {
            printf("err free code=%d id=%llu\n", r, id);
            return;
        }
        o->freed = 1;
        printf("ok free id=%llu\n", id);
    } else if (!strcmp(cmd, "freeraw")) {
        NEED(cuMemFree);
        CHECK(p_cuMemFree((CUdeviceptr)num(a[0])));
        printf("ok freeraw\n");
    } else if (!strcmp(cmd, "freeall")) {
        int count = 0, failures = 0;
        for (int i = 0; i < nobjs; i++) {
            if (objs[i].freed) continue;
            if (do_free(&objs[i]) == 0) {
                objs[i].freed = 1;
                count++;
            } else {
                failures++;
            }
        }
        printf("ok freeall count=%d failures=%d\n", count, failures);
    } else if (!strcmp(cmd, "fill")) {
        NEED(cuMemAlloc);
        unsigned long long chunk = num(a[0]), count = 0;
        CUresult r;
        for (;;) {
            struct obj o = {K_ALLOC, 0, NULL, 0, chunk, 0};
            r = p_cuMemAlloc(&o.ptr, chunk);
            if (r != 0) break;
            add_obj(o);
            count++;
        }
        printf("ok fill count=%llu bytes=%llu err=%d\n", count, count * chunk, r);
    } else if (!strcmp(cmd, "info")) {
        NEED(cuMemGetInfo);
        size_t f = 0, t = 0;
        CHECK(p_cuMemGetInfo(&f, &t));
        printf("ok info free=%zu total=%zu\n", f, t);
    } else if (!strcmp(cmd, "totalmem")) {
        NEED(cuDeviceTotalMem);
        size_t t = 0;
        CHECK(p_cuDeviceTotalMem(&t, (int)num(a[0])));
        printf("ok totalmem total=%zu\n", t);
    } else if (!strcmp(cmd, "nvml") || !strcmp(cmd, "nvmlprocs") || !strcmp(cmd, "uuid")) {
        int st = nvml_ready();
        if (st < 0) {
            printf("err %s code=%d nvml=1\n", cmd, -st);
            return;
        }
        void *h = NULL;
        int r = n_handle((unsigned)num(a[0]), &h);
        if (r) {
            printf("err %s code=%d nvml=1\n", cmd, r);
            return;
        }
        if (!strcmp(cmd, "nvml")) {
            nvmlMemory_t m;
            nvmlMemory_v2_t m2;
            memset(&m2, 0, sizeof m2);
            m2.version = (unsigned)sizeof(nvmlMemory_v2_t) | (2u << 24);
            if ((r = n_meminfo(h, &m)) || (r = n_meminfo2(h, &m2))) {
                printf("err %s code=%d nvml=1\n", cmd, r);
                return;
            }
            printf("ok nvml total=%llu free=%llu used=%llu v2total=%llu v2free=%llu v2used=%llu\n", m.total,
                   m.free, m.used, m2.total, m2.free, m2.used);
        } else if (!strcmp(cmd, "nvmlprocs")) {
            unsigned n = 0;
            r = n_procs(h, &n, NULL);
            if (r != 0 && r != 7) {
                printf("err %s code=%d nvml=1\n", cmd, r);
                return;
            }
            nvmlProcessInfo_t *infos = calloc(n + 1, sizeof *infos);
            if (n && (r = n_procs(h, &n, infos))) {
                printf("err %s code=%d nvml=1\n", cmd, r);
                free(infos);
                return;
            }
            long long self = -1;
            for (unsigned i = 0; i < n; i++)
                if (infos[i].pid == (unsigned)getpid()) self = (long long)infos[i].usedGpuMemory;
            printf("ok nvmlprocs count=%u self=%lld\n", n, self);
            free(infos);
        } else {
            NEED(cuDeviceGetUuid);
            unsigned char u[16];
            char nv[96];
            CHECK(p_cuDeviceGetUuid(u, (int)num(a[0])));
            if ((r = n_uuid(h, nv, sizeof nv))) {
                printf("err %s code=%d nvml=1\n", cmd, r);
                return;
            }
            char cu[64];
            snprintf(cu, sizeof cu, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                     u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
                     u[14], u[15]);
            void *byu = NULL;
            unsigned idx = 0;
            if ((r = n_by_uuid(cu, &byu)) || (r = n_index(byu, &idx))) {
                printf("err %s code=%d nvml=1\n", cmd, r);
                return;
            }
            printf("ok uuid cu=%s nvml=%s index=%u\n", cu, nv, idx);
        }
    } else if (!strcmp(cmd, "threads")) {
        NEED(cuMemAlloc);
        NEED(cuMemFree);
        NEED(cuCtxSetCurrent);
        unsigned long long t = num(a[0]);
        struct thread_arg *args = calloc(t, sizeof *args);
        for (unsigned long long i = 0; i < t; i++) {
            args[i].iters = num(a[1]);
            args[i].size = num(a[2]);
        }
        int failures = RUN_THREADS(t, args, thread_main);
        free(args);
        printf("ok threads failures=%d\n", failures);
    } else if (!strcmp(cmd, "modthreads")) {
        NEED(cuModuleLoadData);
        NEED(cuMemAlloc);
        NEED(cuMemFree);
        NEED(cuCtxSetCurrent);
        unsigned long long t = num(a[0]);
        struct modthread_arg *args = calloc(t, sizeof *args);
        for (unsigned long long i = 0; i < t; i++) {
            args[i].rounds = num(a[1]);
            args[i].bytes = num(a[2]);
            args[i].index = i;
        }
        int failures = RUN_THREADS(t, args, modthread_main);
        free(args);
        printf("ok modthreads failures=%d\n", failures);
    } else if (!strcmp(cmd, "gateargs")) {
        /* Arguments through the thunks, on this thread and on a fresh one (whose first driver
         * call takes the thunk's slow path, registering its record). */
        NEED(cuTexRefSetMipmapLevelClamp);
        NEED(cuTensorMapEncodeTiled);
        Dl_info info;
        int thunk = dladdr((void *)p_cuTensorMapEncodeTiled, &info) && info.dli_fname && strstr(info.dli_fname, "gpuslice");
        int here[2], there[2];
        gate_echo_check(here);
        pthread_t th;
        pthread_create(&th, NULL, gate_echo_check, there);
        pthread_join(th, NULL);
        printf("ok gateargs thunk=%d floats=%d stack=%d thread_floats=%d thread_stack=%d\n", thunk, here[0], here[1], there[0], there[1]);
    } else if (!strcmp(cmd, "gateblock")) {
        /* Close the gate; a thread's cuMemcpyHtoD (thunk) and another's cuMemAlloc (hook) wait
         * until it opens; this thread (the closer) passes its own gate. */
        NEED(cuMemcpyHtoD);
        NEED(cuMemAlloc);
        NEED(cuStreamQuery);
        CHECK(p_cuCtxGetCurrent(&g_gate_ctx));
        CHECK(p_cuMemAlloc(&g_gate_dev, 4096));
        pthread_t t1, t2;
        pthread_create(&t1, NULL, gate_copy_thread, NULL);
        pthread_create(&t2, NULL, gate_alloc_thread, NULL);
        while (__atomic_load_n(&g_gate_ready, __ATOMIC_SEQ_CST) < 2) usleep(1000);
        long long closed = gate_knob(1, 5000);
        int exempt = p_cuStreamQuery(0) == 0;
        __atomic_store_n(&g_gate_go, 1, __ATOMIC_SEQ_CST);
        usleep((useconds_t)(num(a[0]) * 1000));
        int held = __atomic_load_n(&g_gate_done[0], __ATOMIC_SEQ_CST) == 0 && __atomic_load_n(&g_gate_done[1], __ATOMIC_SEQ_CST) == 0;
        long long was_closed = gate_knob(3, 0);
        gate_knob(2, 0);
        pthread_join(t1, NULL);
        pthread_join(t2, NULL);
        printf("ok gateblock close=%lld closed=%lld exempt=%d held=%d copy=%d alloc=%d open=%lld\n", closed, was_closed, exempt, held,
               g_gate_done[0], g_gate_done[1], 1 - gate_knob(3, 0));
    } else if (!strcmp(cmd, "gatebusy")) {
        /* A thread in cuStreamSynchronize behind a kernel of a[0] ms keeps close(a[1] ms)
         * waiting until it times out; after the thread left, close succeeds. */
        NEED(cuStreamSynchronize);
        CHECK(p_cuCtxGetCurrent(&g_gate_ctx));
        launch_n("launch", 1, num(a[0]) * 1000000ULL, 0, 0);
        pthread_t t;
        pthread_create(&t, NULL, gate_sync_thread, NULL);
        while (__atomic_load_n(&g_gate_syncing, __ATOMIC_SEQ_CST) == 0) usleep(1000);
        usleep(50000);
        long long busy = gate_knob(1, num(a[1]));
        long long reopened = 1 - gate_knob(3, 0);
        pthread_join(t, NULL);
        long long after = gate_knob(1, 1000);
        gate_knob(2, 0);
        printf("ok gatebusy busy=%lld reopened=%lld sync=%d after=%lld\n", busy, reopened, g_gate_syncing, after);
    } else if (!strcmp(cmd, "gatefork")) {
        /* A child forked while the gate is closed starts with it open. */
        NEED(cuStreamQuery);
        long long closed = gate_knob(1, 1000);
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            long long child_closed = gate_knob(3, 0);
            int q = p_cuStreamQuery(0);
            printf("ok gatefork child closed=%lld query=%d\n", child_closed, q);
            fflush(stdout);
            _exit(0);
        }
        int st = 0;
        waitpid(pid, &st, 0);
        long long parent_closed = gate_knob(3, 0);
        gate_knob(2, 0);
        printf("ok gatefork parent close=%lld closed=%lld child_exit=%d\n", closed, parent_closed, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    } else if (!strcmp(cmd, "gateloop")) {
        /* CPU ns per call of two unhooked functions (thunks under the shim): cuDriverGetVersion
         * (no lock in the simulated driver) and cuStreamQuery. */
        NEED(cuDriverGetVersion);
        NEED(cuStreamQuery);
        unsigned long long n = num(a[0]);
        int v = 0, failures = 0;
        unsigned long long t0 = thread_cpu_ns();
        for (unsigned long long i = 0; i < n; i++) failures += p_cuDriverGetVersion(&v) != 0;
        unsigned long long t1 = thread_cpu_ns();
        for (unsigned long long i = 0; i < n; i++) failures += p_cuStreamQuery(0) != 0;
        unsigned long long t2 = thread_cpu_ns();
        printf("ok gateloop failures=%d version_ns=%.1f query_ns=%.1f\n", failures, n ? (double)(t1 - t0) / n : 0.0, n ? (double)(t2 - t1) / n : 0.0);
    } else if (!strcmp(cmd, "gatestate")) {
        printf("ok gatestate fast=%lld unknown=%lld export=%lld spares=%lld\n", gate_knob(4, 0), gate_knob(5, 0), gate_knob(6, 0), gate_knob(7, 0));
    } else if (!strcmp(cmd, "gatecall")) {
        /* gatecall NAME X MS: the driver function NAME (int f(int)) found by dlsym; whether the
         * program got a gpuslice thunk, its answer for X, and whether a call from another thread
         * waited MS ms at the closed gate before it went through. */
        void *h = libcuda ? libcuda : dlopen("libcuda.so.1", RTLD_NOW);
        g_gatecall_fn = h ? (int (*)(int))dlsym(h, a[0]) : NULL;
        if (!g_gatecall_fn) { printf("err gatecall code=-1 name=%s\n", a[0]); return; }
        Dl_info info;
        int thunk = dladdr((void *)g_gatecall_fn, &info) && info.dli_fname && strstr(info.dli_fname, "gpuslice");
        int x = (int)num(a[1]);
        int direct = g_gatecall_fn(x);
        long long closed = gate_knob(1, 5000);
        pthread_t t;
        pthread_create(&t, NULL, gatecall_thread, (void *)(long)x);
        usleep((useconds_t)(num(a[2]) * 1000));
        int held = __atomic_load_n(&g_gatecall_done, __ATOMIC_SEQ_CST) == 0;
        gate_knob(2, 0);
        pthread_join(t, NULL);
        printf("ok gatecall thunk=%d result=%d close=%lld held=%d after=%d\n", thunk, direct, closed, held, g_gatecall_result);
    } else if (!strcmp(cmd, "plaunch")) {
        /* plaunch T N NS: T threads, each on its own stream, N kernels of NS ns each. */
        NEED(cuStreamCreate);
        NEED(cuStreamSynchronize);
        NEED(cuStreamDestroy);
        NEED(cuLaunchKernel);
        int ok;
        ensure_function(cmd, &ok);
        if (!ok) return;
        unsigned long long t = num(a[0]);
        /* Not RUN_THREADS: on the simulated clock this thread parks while the launchers run. */
        __atomic_store_n(&g_launchers_started, 0, __ATOMIC_SEQ_CST);
        pthread_t *th = calloc(t, sizeof *th);
        struct launch_arg *args = calloc(t, sizeof *args);
        for (unsigned long long i = 0; i < t; i++) {
            args[i].n = num(a[1]);
            args[i].ns = num(a[2]);
            pthread_create(&th[i], NULL, launch_thread, &args[i]);
        }
        int failures = 0;
        unsigned long long cpu_ns = 0;
        /* On the simulated clock, time waits for every launcher before this thread lets it run. */
        while (p_clock_park && __atomic_load_n(&g_launchers_started, __ATOMIC_SEQ_CST) < (int)t) usleep(100);
        if (p_clock_park) p_clock_park();
        for (unsigned long long i = 0; i < t; i++) {
            pthread_join(th[i], NULL);
            failures += args[i].failures;
            cpu_ns += args[i].cpu_ns;
        }
        if (p_clock_unpark) p_clock_unpark();
        free(th);
        free(args);
        printf("ok plaunch failures=%d cpu_ns_per_launch=%.0f\n", failures, t * num(a[1]) ? (double)cpu_ns / (double)(t * num(a[1])) : 0.0);
    } else if (!strcmp(cmd, "grid")) {
        /* grid X Y Z: the grid of the launches that follow */
        g_grid[0] = (unsigned int)num(a[0]);
        g_grid[1] = (unsigned int)num(a[1]);
        g_grid[2] = (unsigned int)num(a[2]);
        printf("ok grid %u %u %u\n", g_grid[0], g_grid[1], g_grid[2]);
    } else if (!strcmp(cmd, "usefunc")) {
        /* usefunc HOW PATH NAME: load the module file PATH (HOW: data = read it and
         * cuModuleLoadData, fatbin = read it and cuModuleLoadFatBinary, file = cuModuleLoad) and
         * launch its kernel NAME from now on */
        NEED(cuModuleLoadData);
        NEED(cuModuleLoadFatBinary);
        NEED(cuModuleLoad);
        NEED(cuModuleGetFunction);
        CUmodule m = NULL;
        CUresult r;
        if (!strcmp(a[0], "file")) {
            r = p_cuModuleLoad(&m, a[1]);
        } else {
            FILE *f = fopen(a[1], "rb");
            if (!f) {
                printf("err usefunc code=-1 path=%s\n", a[1]);
                return;
            }
            fseek(f, 0, SEEK_END);
            long n = ftell(f);
            fseek(f, 0, SEEK_SET);
            char *image = calloc(1, (size_t)(n > 0 ? n : 0) + 1);
            size_t got = image ? fread(image, 1, (size_t)(n > 0 ? n : 0), f) : 0;
            fclose(f);
            if (!image || (long)got != n) r = (CUresult)-1;
            else if (!strcmp(a[0], "fatbin")) r = p_cuModuleLoadFatBinary(&m, image);
            else r = p_cuModuleLoadData(&m, image);
            free(image);
        }
        if (r == 0) r = p_cuModuleGetFunction(&g_func, m, a[2]);
        if (r != 0) {
            printf("err usefunc code=%d\n", r);
            return;
        }
        g_module = m;
        printf("ok usefunc name=%s\n", a[2]);
    } else if (!strcmp(cmd, "launchpacked")) {
        /* launchpacked N NS: N launches passing the duration through a packed `extra` buffer */
        NEED(cuLaunchKernel);
        int ok;
        ensure_function(cmd, &ok);
        if (!ok) return;
        unsigned long long dur = num(a[1]);
        size_t size = sizeof dur;
        void *extra[] = {(void *)1 /* BUFFER_POINTER */, &dur, (void *)2 /* BUFFER_SIZE */, &size, (void *)0};
        for (unsigned long long i = 0; i < num(a[0]); i++)
            CHECK(p_cuLaunchKernel(g_func, g_grid[0], g_grid[1], g_grid[2], 256, 1, 1, 0, 0, NULL, extra));
        printf("ok launchpacked n=%llu\n", num(a[0]));
    } else if (!strcmp(cmd, "launch") || !strcmp(cmd, "launchex")) {
        launch_n(cmd, num(a[0]), num(a[1]), 0, !strcmp(cmd, "launchex"));
    } else if (!strcmp(cmd, "events")) {
        NEED(cuEventCreate);
        NEED(cuEventRecord);
        NEED(cuEventSynchronize);
        NEED(cuEventElapsedTime);
        NEED(cuEventDestroy);
        int ok;
        ensure_function(cmd, &ok);
        if (!ok) return;
        NEED(cuLaunchKernel);
        CUevent e0, e1;
        CHECK(p_cuEventCreate(&e0, 0));
        CHECK(p_cuEventCreate(&e1, 0));
        CHECK(p_cuEventRecord(e0, 0));
        unsigned long long dur = num(a[1]);
        void *params[] = {&dur};
        for (unsigned long long i = 0; i < num(a[0]); i++)
            CHECK(p_cuLaunchKernel(g_func, g_grid[0], g_grid[1], g_grid[2], 256, 1, 1, 0, 0, params, NULL));
        CHECK(p_cuEventRecord(e1, 0));
        CHECK(p_cuEventSynchronize(e1));
        float ms = 0;
        CHECK(p_cuEventElapsedTime(&ms, e0, e1));
        p_cuEventDestroy(e0);
        p_cuEventDestroy(e1);
        printf("ok events ms=%.3f\n", ms);
    } else if (!strcmp(cmd, "graph")) {
        NEED(cuStreamCreate);
        NEED(cuStreamBeginCapture);
        NEED(cuStreamEndCapture);
        NEED(cuGraphInstantiate);
        NEED(cuGraphLaunch);
        NEED(cuStreamSynchronize);
        NEED(cuGraphExecDestroy);
        NEED(cuGraphDestroy);
        NEED(cuStreamDestroy);
        int ok;
        ensure_function(cmd, &ok);
        if (!ok) return;
        NEED(cuLaunchKernel);
        CUstream s;
        CUgraph g;
        CUgraphExec ge;
        CHECK(p_cuStreamCreate(&s, 0));
        CHECK(p_cuStreamBeginCapture(s, 0));
        unsigned long long dur = num(a[1]);
        void *params[] = {&dur};
        for (unsigned long long i = 0; i < num(a[0]); i++)
            CHECK(p_cuLaunchKernel(g_func, g_grid[0], g_grid[1], g_grid[2], 256, 1, 1, 0, s, params, NULL));
        CHECK(p_cuStreamEndCapture(s, &g));
        CHECK(p_cuGraphInstantiate(&ge, g, 0));
        double t0 = clock_ms();
        for (unsigned long long i = 0; i < num(a[2]); i++) CHECK(p_cuGraphLaunch(ge, s));
        CHECK(p_cuStreamSynchronize(s));
        double t1 = clock_ms();
        p_cuGraphExecDestroy(ge);
        p_cuGraphDestroy(g);
        p_cuStreamDestroy(s);
        printf("ok graph ms=%.3f\n", t1 - t0);
    } else if (!strcmp(cmd, "sync")) {
        NEED(cuCtxSynchronize);
        double t0 = clock_ms();
        CHECK(p_cuCtxSynchronize());
        printf("ok sync ms=%.3f\n", clock_ms() - t0);
    } else if (!strcmp(cmd, "sleep")) {
        clock_sleep_us(num(a[0]) * 1000);
        printf("ok sleep\n");
    } else if (!strcmp(cmd, "mark")) {
        clock_gettime(CLOCK_MONOTONIC, &g_mark);
        g_mark_ns = clock_ns();
        printf("ok mark\n");
    } else if (!strcmp(cmd, "elapsed")) {
        double m = g_mark.tv_sec * 1e3 + g_mark.tv_nsec / 1e6;
        printf("ok elapsed ms=%.3f\n", p_clock_now ? (clock_ns() - g_mark_ns) / 1e6 : now_ms() - m);
    } else if (!strcmp(cmd, "procaddr")) {
        NEED(cuGetProcAddress);
        void *p = NULL;
        int st = -1;
        CUresult r = p_cuGetProcAddress(a[0], &p, (int)num(a[1]), num(a[2]), &st);
        if (r != 0) {
            printf("err procaddr code=%d status=%d ptr=%p\n", r, st, p);
            return;
        }
        printf("ok procaddr name=%s ptr=%p status=%d\n", a[0], p, st);
    } else if (!strcmp(cmd, "modload")) {
        /* modload HOW BYTES: a simulated image declaring BYTES of __device__ data, loaded with
         * cuModuleLoadData (data), cuModuleLoadDataEx (ex) or cuModuleLoadFatBinary (fatbin). */
        char image[64];
        snprintf(image, sizeof image, "SIMMODULE %llu", num(a[1]));
        struct obj o = {K_MODULE, 0, NULL, 0, num(a[1]), 0};
        if (!strcmp(a[0], "data")) {
            NEED(cuModuleLoadData);
            CHECK(p_cuModuleLoadData(&o.handle, image));
        } else if (!strcmp(a[0], "ex")) {
            NEED(cuModuleLoadDataEx);
            CHECK(p_cuModuleLoadDataEx(&o.handle, image, 0, NULL, NULL));
        } else if (!strcmp(a[0], "fatbin")) {
            NEED(cuModuleLoadFatBinary);
            CHECK(p_cuModuleLoadFatBinary(&o.handle, image));
        } else {
            printf("err modload code=-1 how=%s\n", a[0]);
            return;
        }
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "ptxload")) {
        /* ptxload BYTES: cuModuleLoadData of PTX text declaring a BYTES-byte __device__ array
         * (the simulated driver takes SIMCUDA_MODULE_BYTES for it, like a lazy driver) */
        NEED(cuModuleLoadData);
        char ptx[256];
        snprintf(ptx, sizeof ptx,
                 ".version 8.0\n.target sm_90\n.address_size 64\n\n.global .align 1 .b8 big[%llu];\n",
                 num(a[0]));
        struct obj o = {K_MODULE, 0, NULL, 0, num(a[0]), 0};
        CHECK(p_cuModuleLoadData(&o.handle, ptx));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "modimage")) {
        /* modimage PATH: read an image file (cubin, PTX, ...) and cuModuleLoadData it */
        NEED(cuModuleLoadData);
        FILE *f = fopen(a[0], "rb");
        if (!f) {
            printf("err modimage code=-1 path=%s\n", a[0]);
            return;
        }
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *image = calloc(1, (size_t)(n > 0 ? n : 0) + 1); /* NUL-terminated, for PTX */
        size_t got = image ? fread(image, 1, (size_t)(n > 0 ? n : 0), f) : 0;
        fclose(f);
        if (!image || (long)got != n) {
            free(image);
            printf("err modimage code=-1 path=%s\n", a[0]);
            return;
        }
        struct obj o = {K_MODULE, 0, NULL, 0, 0, 0};
        CUresult r = p_cuModuleLoadData(&o.handle, image);
        free(image); /* the driver has its own copy once the load returns */
        if (r != 0) {
            printf("err modimage code=%d\n", r);
            return;
        }
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "modfile")) {
        NEED(cuModuleLoad);
        struct obj o = {K_MODULE, 0, NULL, 0, 0, 0};
        CHECK(p_cuModuleLoad(&o.handle, a[0]));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "libload")) {
        NEED(cuLibraryLoadData);
        char image[64];
        snprintf(image, sizeof image, "SIMMODULE %llu", num(a[0]));
        struct obj o = {K_LIBRARY, 0, NULL, 0, num(a[0]), 0};
        CHECK(p_cuLibraryLoadData(&o.handle, image, NULL, NULL, 0, NULL, NULL, 0));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "libfile")) {
        NEED(cuLibraryLoadFromFile);
        struct obj o = {K_LIBRARY, 0, NULL, 0, 0, 0};
        CHECK(p_cuLibraryLoadFromFile(&o.handle, a[0], NULL, NULL, 0, NULL, NULL, 0));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "image")) {
        /* image PATH BYTES: write a simulated image file declaring BYTES */
        FILE *f = fopen(a[0], "w");
        if (!f || fprintf(f, "SIMMODULE %llu\n", num(a[1])) < 0 || fclose(f)) {
            printf("err image code=-1 path=%s\n", a[0]);
            return;
        }
        printf("ok image path=%s\n", a[0]);
    } else if (!strcmp(cmd, "v1alloc")) {
        NEED_V1(cuMemAlloc);
        unsigned p = 0;
        CHECK(v1_cuMemAlloc(&p, (unsigned)num(a[0])));
        struct obj o = {K_V1ALLOC, p, NULL, 0, num(a[0]), 0};
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "v1pitch")) {
        NEED_V1(cuMemAllocPitch);
        unsigned p = 0, pitch = 0;
        CHECK(v1_cuMemAllocPitch(&p, &pitch, (unsigned)num(a[0]), (unsigned)num(a[1]), (unsigned)num(a[2])));
        struct obj o = {K_V1ALLOC, p, NULL, 0, (size_t)pitch * num(a[1]), 0};
        int id = add_obj(o);
        printf("ok v1pitch id=%d ptr=0x%x pitch=%u\n", id, p, pitch);
    } else if (!strcmp(cmd, "v1free")) {
        NEED_V1(cuMemFree);
        CHECK(v1_cuMemFree((unsigned)num(a[0])));
        printf("ok v1free\n");
    } else if (!strcmp(cmd, "v1info")) {
        NEED_V1(cuMemGetInfo);
        unsigned f = 0, t = 0;
        CHECK(v1_cuMemGetInfo(&f, &t));
        printf("ok v1info free=%u total=%u\n", f, t);
    } else if (!strcmp(cmd, "v1total")) {
        NEED_V1(cuDeviceTotalMem);
        unsigned t = 0;
        CHECK(v1_cuDeviceTotalMem(&t, (int)num(a[0])));
        printf("ok v1total total=%u\n", t);
    } else if (!strcmp(cmd, "v1array")) {
        NEED_V1(cuArrayCreate);
        CUDA_ARRAY_DESCRIPTOR_v1 d = {(unsigned)num(a[0]), (unsigned)num(a[1]), CU_AD_FORMAT_UNSIGNED_INT8, 1};
        struct obj o = {K_ARRAY, 0, NULL, 0, 0, 0};
        CHECK(v1_cuArrayCreate(&o.handle, &d));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "v1array3d")) {
        NEED_V1(cuArray3DCreate);
        CUDA_ARRAY3D_DESCRIPTOR_v1 d = {(unsigned)num(a[0]), (unsigned)num(a[1]), (unsigned)num(a[2]),
                                        CU_AD_FORMAT_UNSIGNED_INT8, 1, 0};
        struct obj o = {K_ARRAY3D, 0, NULL, 0, 0, 0};
        CHECK(v1_cuArray3DCreate(&o.handle, &d));
        print_alloc(cmd, o);
    } else if (!strcmp(cmd, "v1ctxcreate")) {
        NEED_V1(cuCtxCreate);
        NEED(cuDeviceGet);
        CUdevice dev;
        CHECK(p_cuDeviceGet(&dev, (int)num(a[0])));
        CHECK(v1_cuCtxCreate(&g_ctx, 0, dev));
        printf("ok v1ctxcreate dev=%d\n", dev);
    } else if (!strcmp(cmd, "v1ctxdestroy")) {
        NEED_V1(cuCtxDestroy);
        CHECK(v1_cuCtxDestroy(g_ctx));
        g_ctx = NULL;
        g_func = NULL;
        printf("ok v1ctxdestroy\n");
    } else if (!strcmp(cmd, "dlvsym")) {
        /* dlvsym NAME VERSION on the libcuda.so.1 handle (or $CUCLIENT_DLVSYM_LIBRARY's); same=1 when dlsym gives the same; lib=
         * the file the address is in */
        const char *other = getenv("CUCLIENT_DLVSYM_LIBRARY"); /* another library to look in */
        void *h = other ? dlopen(other, RTLD_NOW) : libcuda ? libcuda : dlopen("libcuda.so.1", RTLD_NOW);
        void *p = h ? dlvsym(h, a[0], a[1]) : NULL;
        if (!p) {
            printf("err dlvsym code=-1 name=%s\n", a[0]);
            return;
        }
        Dl_info where;
        const char *lib = dladdr(p, &where) && where.dli_fname ? strrchr(where.dli_fname, '/') : NULL;
        printf("ok dlvsym name=%s ptr=%p same=%d lib=%s\n", a[0], p, p == dlsym(h, a[0]),
               lib ? lib + 1 : "?");
    } else if (!strcmp(cmd, "dlsym")) {
        void *h = libcuda ? libcuda : dlopen("libcuda.so.1", RTLD_NOW);
        void *p = h ? dlsym(h, a[0]) : NULL;
        if (!p) {
            printf("err dlsym code=-1 name=%s\n", a[0]);
            return;
        }
        printf("ok dlsym name=%s ptr=%p\n", a[0], p);
    } else if (!strcmp(cmd, "poke") || !strcmp(cmd, "peek")) {
        /* The bytes of a cuMemAlloc id (issue 22: data that must survive a suspension), through
         * cuMemsetD8_v2 / cuMemcpyDtoH_v2 found by name. */
        void *h = libcuda ? libcuda : dlopen("libcuda.so.1", RTLD_NOW);
        unsigned long long id = num(a[0]);
        struct obj *o = alloc_by_id(cmd, id);
        if (!o) return;
        CUresult r;
        if (!strcmp(cmd, "poke")) {
            CUresult (*memset8)(CUdeviceptr, unsigned char, size_t) = h ? dlsym(h, "cuMemsetD8_v2") : NULL;
            if (!memset8) { printf("err poke code=-1 missing=cuMemsetD8_v2\n"); return; }
            if ((r = memset8(o->ptr, (unsigned char)num(a[1]), o->size))) { printf("err poke code=%d\n", r); return; }
            printf("ok poke id=%llu\n", id);
        } else {
            CUresult (*dtoh)(void *, CUdeviceptr, size_t) = h ? dlsym(h, "cuMemcpyDtoH_v2") : NULL;
            if (!dtoh) { printf("err peek code=-1 missing=cuMemcpyDtoH_v2\n"); return; }
            unsigned char *buf = malloc(o->size ? o->size : 1);
            if ((r = dtoh(buf, o->ptr, o->size))) { printf("err peek code=%d\n", r); free(buf); return; }
            int same = 1;
            for (size_t i = 1; i < o->size; i++) same &= buf[i] == buf[0];
            printf("ok peek id=%llu first=%d all_same=%d\n", id, o->size ? buf[0] : -1, same);
            free(buf);
        }
    } else if (!strcmp(cmd, "pokepat") || !strcmp(cmd, "peekpat") || !strcmp(cmd, "range") || !strcmp(cmd, "ipcget")) {
        /* Issue 22: data through a VMM-backed allocation, and what the program sees of it. */
        void *h = libcuda ? libcuda : dlopen("libcuda.so.1", RTLD_NOW);
        unsigned long long id = num(a[0]);
        struct obj *o = alloc_by_id(cmd, id);
        if (!o) return;
        unsigned seed = !strcmp(cmd, "pokepat") || !strcmp(cmd, "peekpat") ? (unsigned)num(a[1]) : 0;
        CUresult r;
        if (!strcmp(cmd, "range")) {
            CUresult (*range)(CUdeviceptr *, size_t *, CUdeviceptr) = h ? dlsym(h, "cuMemGetAddressRange_v2") : NULL;
            if (!range) { printf("err range code=-1 missing=cuMemGetAddressRange_v2\n"); return; }
            CUdeviceptr base = 0;
            size_t size = 0;
            if ((r = range(&base, &size, o->ptr + o->size / 2))) { printf("err range code=%d\n", r); return; }
            printf("ok range id=%llu base_ok=%d size=%zu\n", id, base == o->ptr, size);
            return;
        }
        if (!strcmp(cmd, "ipcget")) {
            CUresult (*get)(void *, CUdeviceptr) = h ? dlsym(h, "cuIpcGetMemHandle") : NULL;
            if (!get) { printf("err ipcget code=-1 missing=cuIpcGetMemHandle\n"); return; }
            unsigned char handle[64];
            if ((r = get(handle, o->ptr))) { printf("err ipcget code=%d\n", r); return; }
            printf("ok ipcget id=%llu\n", id);
            return;
        }
        unsigned char *buf = malloc(o->size ? o->size : 1);
        if (!buf) { printf("err %s code=-1 nomem\n", cmd); return; }
        if (!strcmp(cmd, "pokepat")) {
            CUresult (*htod)(CUdeviceptr, const void *, size_t) = h ? dlsym(h, "cuMemcpyHtoD_v2") : NULL;
            if (!htod) { printf("err pokepat code=-1 missing=cuMemcpyHtoD_v2\n"); free(buf); return; }
            for (size_t i = 0; i < o->size; i++) buf[i] = (unsigned char)(i * 131u + seed * 7u + (i >> 8) + 1u);
            if ((r = htod(o->ptr, buf, o->size))) { printf("err pokepat code=%d\n", r); free(buf); return; }
            printf("ok pokepat id=%llu\n", id);
        } else {
            CUresult (*dtoh)(void *, CUdeviceptr, size_t) = h ? dlsym(h, "cuMemcpyDtoH_v2") : NULL;
            if (!dtoh) { printf("err peekpat code=-1 missing=cuMemcpyDtoH_v2\n"); free(buf); return; }
            if ((r = dtoh(buf, o->ptr, o->size))) { printf("err peekpat code=%d\n", r); free(buf); return; }
            size_t bad = 0;
            for (size_t i = 0; i < o->size; i++) bad += buf[i] != (unsigned char)(i * 131u + seed * 7u + (i >> 8) + 1u);
            printf("ok peekpat id=%llu bad=%zu\n", id, bad);
        }
        free(buf);
    } else if (!strcmp(cmd, "ckpt")) {
        /* The driver's checkpoint API on another process (issue 22), found by name: args are
         * 64 zeroed bytes but for the lock's timeout (cuda.h's CUcheckpoint*Args). */
        void *h = libcuda ? libcuda : dlopen("libcuda.so.1", RTLD_NOW);
        int pid = (int)strtoull(a[1], NULL, 0);
        unsigned long long args[8] = {0};
        const char *action = a[0];
        char name[64];
        snprintf(name, sizeof name, "cuCheckpointProcess%s",
                 !strcmp(action, "lock") ? "Lock" : !strcmp(action, "checkpoint") ? "Checkpoint" :
                 !strcmp(action, "restore") ? "Restore" : !strcmp(action, "unlock") ? "Unlock" :
                 !strcmp(action, "tid") ? "GetRestoreThreadId" : "GetState");
        void *f = h ? dlsym(h, name) : NULL;
        if (!f) {
            printf("err ckpt code=-1 missing=%s\n", name);
            return;
        }
        CUresult r;
        int out = -1;
        if (!strcmp(action, "state") || !strcmp(action, "tid")) {
            r = ((CUresult (*)(int, int *))f)(pid, &out);
        } else {
            if (!strcmp(action, "lock")) args[0] = strtoull(a[2], NULL, 0) & 0xffffffffULL; /* timeoutMs */
            r = ((CUresult (*)(int, void *))f)(pid, args);
        }
        if (r) {
            printf("err ckpt code=%d action=%s\n", r, action);
            return;
        }
        printf("ok ckpt action=%s value=%d\n", action, out);
    } else if (!strcmp(cmd, "pid")) {
        printf("ok pid pid=%d\n", (int)getpid());
    } else if (!strcmp(cmd, "getenv")) {
        const char *v = getenv(a[0]);
        printf("ok getenv name=%s value=%s\n", a[0], v ? v : "(unset)");
    } else if (!strcmp(cmd, "waitfile")) {
        double t0 = now_ms();
        /* On the simulated clock, time moves without this thread while it polls (the test that
         * makes the file holds time itself when the start must be common). */
        if (p_clock_park) p_clock_park();
        while (access(a[0], F_OK) != 0) {
            if (now_ms() - t0 > WAIT_CAP_MS) {
                if (p_clock_unpark) p_clock_unpark();
                printf("err waitfile code=-1 timeout=1\n");
                return;
            }
            usleep(1000);
        }
        if (p_clock_unpark) p_clock_unpark();
        printf("ok waitfile ms=%.3f\n", now_ms() - t0);
    } else if (!strcmp(cmd, "touch")) {
        FILE *f = fopen(a[0], "a");
        if (!f) {
            printf("err touch code=-1\n");
            return;
        }
        fclose(f);
        printf("ok touch\n");
    } else if (!strcmp(cmd, "allocbench")) {
        NEED(cuMemAlloc);
        NEED(cuMemFree);
        unsigned long long n = num(a[0]), size = num(a[1]), failures = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (unsigned long long i = 0; i < n; i++) {
            CUdeviceptr d = 0;
            if (p_cuMemAlloc(&d, size) != 0 || p_cuMemFree(d) != 0) failures++;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (double)(n ? n : 1);
        printf("ok allocbench n=%llu failures=%llu ns=%.0f\n", n, failures, ns);
    } else if (!strcmp(cmd, "churn")) {
        NEED(cuMemAlloc);
        NEED(cuMemFree);
        unsigned long long size = num(a[0]), count = 0, failures = 0, rounds = 0;
        double t0 = now_ms();
        int timeout = 0;
        for (;; rounds++) {
            if (rounds % 16 == 0) {
                if (access(a[1], F_OK) == 0) break;
                if (now_ms() - t0 > WAIT_CAP_MS) {
                    timeout = 1;
                    break;
                }
            }
            CUdeviceptr d = 0;
            if (p_cuMemAlloc(&d, size) != 0) {
                failures++;
                continue;
            }
            if (p_cuMemFree(d) != 0) failures++;
            count++;
        }
        if (timeout) {
            printf("err churn code=-1 timeout=1 count=%llu failures=%llu\n", count, failures);
            return;
        }
        printf("ok churn count=%llu failures=%llu\n", count, failures);
    } else if (!strcmp(cmd, "allocwait")) {
        NEED(cuMemAlloc);
        unsigned long long every = num(a[1]), limit = num(a[2]), tries = 0;
        struct obj o = {K_ALLOC, 0, NULL, 0, num(a[0]), 0};
        double t0 = now_ms();
        CUresult r;
        for (;;) {
            r = p_cuMemAlloc(&o.ptr, o.size);
            tries++;
            if (r != 2 || now_ms() - t0 > (double)limit) break;
            usleep((useconds_t)(every * 1000));
        }
        unsigned long long at = now_ns();
        if (r != 0) {
            printf("err allocwait code=%d tries=%llu\n", r, tries);
            return;
        }
        int id = add_obj(o);
        printf("ok allocwait id=%d ptr=0x%llx tries=%llu at=%llu\n", id, o.ptr, tries, at);
    } else if (!strcmp(cmd, "storm")) {
        /* storm T NS SEED STOPFILE */
        NEED(cuMemAlloc);
        NEED(cuMemFree);
        NEED(cuCtxSetCurrent);
        NEED(cuLaunchKernel);
        int ok;
        ensure_function(cmd, &ok);
        if (!ok) return;
        unsigned long long t = num(a[0]), tot[4];
        pthread_t *th = calloc(t, sizeof *th);
        struct storm_arg *args = calloc(t, sizeof *args);
        for (unsigned long long i = 0; i < t; i++) {
            args[i].ns = num(a[1]);
            args[i].seed = num(a[2]) * 0x9E3779B97F4A7C15ULL + (i + 1) * 0xBF58476D1CE4E5B9ULL + (unsigned long long)getpid();
            args[i].stopfile = a[3];
            pthread_create(&th[i], NULL, storm_thread, &args[i]);
        }
        for (unsigned long long i = 0; i < t; i++) pthread_join(th[i], NULL);
        storm_totals(args, t, tot);
        free(th);
        free(args);
        printf("ok storm rounds=%llu allocs=%llu refusals=%llu failures=%llu\n", tot[0], tot[1], tot[2], tot[3]);
    } else if (!strcmp(cmd, "hammer")) {
        /* hammer T ROUNDS CHUNK CHURN NS */
        NEED(cuMemAlloc);
        NEED(cuMemFree);
        NEED(cuCtxSetCurrent);
        NEED(cuLaunchKernel);
        int ok;
        ensure_function(cmd, &ok);
        if (!ok) return;
        unsigned long long t = num(a[0]);
        struct hammer_shared sh = {.rounds = num(a[1]), .chunk = num(a[2]), .churn = num(a[3]), .ns = num(a[4])};
        if (!t || !sh.rounds || sh.chunk < 4096) {
            printf("err hammer code=-1 bad_arguments=1\n");
            return;
        }
        pthread_barrier_init(&sh.barrier, NULL, (unsigned)t);
        pthread_t *th = calloc(t, sizeof *th);
        struct hammer_arg *args = calloc(t, sizeof *args);
        for (unsigned long long i = 0; i < t; i++) {
            args[i].sh = &sh;
            args[i].seed = (i + 1) * 0x9E3779B97F4A7C15ULL;
            args[i].granted = calloc(sh.rounds, sizeof(unsigned long long));
            pthread_create(&th[i], NULL, hammer_thread, &args[i]);
        }
        unsigned long long refusals = 0, failures = 0, held = 0;
        for (unsigned long long i = 0; i < t; i++) {
            pthread_join(th[i], NULL);
            refusals += args[i].refusals;
            failures += args[i].failures;
            held += args[i].held;
        }
        printf("ok hammer threads=%llu refusals=%llu failures=%llu held=%llu granted=", t, refusals, failures, held);
        for (unsigned long long r = 0; r < sh.rounds; r++) {
            unsigned long long g = 0;
            for (unsigned long long i = 0; i < t; i++) g += args[i].granted[r];
            printf("%s%llu", r ? "," : "", g);
        }
        printf("\n");
        for (unsigned long long i = 0; i < t; i++) free(args[i].granted);
        free(th);
        free(args);
        pthread_barrier_destroy(&sh.barrier);
    } else if (!strcmp(cmd, "forkstorm")) {
        /* forkstorm T FORKS TIMEOUT_MS NS */
        NEED(cuMemAlloc);
        NEED(cuMemFree);
        NEED(cuCtxSetCurrent);
        NEED(cuLaunchKernel);
        NEED(cuCtxSynchronize);
        int ok;
        ensure_function(cmd, &ok);
        if (!ok) return;
        unsigned long long t = num(a[0]), forks = num(a[1]), timeout = num(a[2]), ns = num(a[3]), tot[4];
        volatile int stop = 0;
        pthread_t *th = calloc(t, sizeof *th);
        struct storm_arg *args = calloc(t, sizeof *args);
        for (unsigned long long i = 0; i < t; i++) {
            args[i].ns = ns;
            args[i].seed = (i + 1) * 0x9E3779B97F4A7C15ULL + (unsigned long long)getpid();
            args[i].stop = &stop;
            pthread_create(&th[i], NULL, storm_thread, &args[i]);
        }
        unsigned long long fine = 0, hung = 0, failed = 0, s = 0x5eed;
        double max_ms = 0;
        char codes[256] = "";
        usleep(2000); /* let the threads get going */
        for (unsigned long long f = 0; f < forks; f++) {
            usleep((useconds_t)(xorshift(&s) % 2000));
            fflush(stdout);
            double t0 = now_ms();
            pid_t child = fork();
            if (child < 0) {
                failed++;
                continue;
            }
            if (child == 0) forked_child(ns);
            int status = 0;
            pid_t got = 0;
            while ((got = waitpid(child, &status, WNOHANG)) == 0 && now_ms() - t0 < (double)timeout) usleep(500);
            double ms = now_ms() - t0;
            if (ms > max_ms) max_ms = ms;
            if (got == 0) {
                kill(child, SIGKILL);
                waitpid(child, &status, 0);
                hung++;
            } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
                fine++;
            } else {
                failed++;
                size_t n = strlen(codes);
                if (n < sizeof codes - 8)
                    snprintf(codes + n, sizeof codes - n, "%s%d", n ? "," : "", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
            }
        }
        stop = 1;
        for (unsigned long long i = 0; i < t; i++) pthread_join(th[i], NULL);
        storm_totals(args, t, tot);
        free(th);
        free(args);
        printf("ok forkstorm forks=%llu fine=%llu hung=%llu failed=%llu codes=%s max_ms=%.1f rounds=%llu failures=%llu\n", forks,
               fine, hung, failed, codes[0] ? codes : "-", max_ms, tot[0], tot[3]);
    } else if (!strcmp(cmd, "now")) {
        printf("ok now ns=%llu\n", clock_ns());
    } else if (!strcmp(cmd, "probe") || !strcmp(cmd, "mprobe") || !strcmp(cmd, "pprobe")) {
        NEED(cuLaunchKernel);
        NEED(cuCtxSynchronize);
        NEED(cuEventCreate);
        NEED(cuEventRecord);
        NEED(cuEventElapsedTime);
        NEED(cuEventDestroy);
        int ok;
        ensure_function(cmd, &ok);
        if (!ok) return;
        /* mprobe N K NS HOST_US GAP_US: each request is K kernels of NS, with HOST_US of host
         * work (a sleep) after each launch but the last: a host-bound request when HOST_US is
         * long beside NS. Printed as a probe line. */
        int multi = !strcmp(cmd, "mprobe"), periodic = !strcmp(cmd, "pprobe");
        unsigned long long n = num(a[0]), gap = num(a[multi ? 4 : 2]), sum = 0, seed = 0x9e3779b97f4a7c15ULL;
        unsigned long long kernels = multi ? num(a[1]) : 1, host_us = multi ? num(a[3]) : 0;
        if (n == 0 || kernels == 0) {
            printf("err probe code=-1 n=0\n");
            return;
        }
        CUevent before, after;
        CHECK(p_cuEventCreate(&before, 0));
        CHECK(p_cuEventCreate(&after, 0));
        unsigned long long *lat = calloc(n, sizeof *lat), *dev = calloc(n, sizeof *dev);
        unsigned long long dur = num(a[multi ? 2 : 1]), first = 0, last = 0;
        void *params[] = {&dur};
        for (unsigned long long i = 0; i < n; i++) {
            if (periodic) {
                unsigned long long now = clock_ns();
                if (!g_pprobe_next) g_pprobe_next = now;
                if (g_pprobe_next > now) clock_sleep_us((g_pprobe_next - now) / 1000);
                g_pprobe_next += gap * 1000ULL;
            } else if (i && gap) {
                seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
                clock_sleep_us(gap / 2 + (seed >> 33) % (gap + 1));
            }
            unsigned long long t0 = clock_ns();
            float ms = 0;
            CUresult r = p_cuEventRecord(before, 0);
            for (unsigned long long k = 0; r == 0 && k < kernels; k++) {
                if (k) clock_sleep_us(host_us);
                r = p_cuLaunchKernel(g_func, g_grid[0], g_grid[1], g_grid[2], 256, 1, 1, 0, 0, params, NULL);
            }
            if (r == 0) r = p_cuEventRecord(after, 0);
            if (r == 0) r = p_cuCtxSynchronize();
            unsigned long long t1 = clock_ns();
            if (r == 0) r = p_cuEventElapsedTime(&ms, before, after);
            if (r != 0) {
                printf("err probe code=%d at=%llu\n", r, i);
                free(lat);
                free(dev);
                return;
            }
            if (i == 0) first = t0;
            last = t1;
            lat[i] = t1 - t0;
            dev[i] = (unsigned long long)((double)ms * 1e6);
            sum += lat[i];
        }
        p_cuEventDestroy(before);
        p_cuEventDestroy(after);
        qsort(lat, n, sizeof *lat, cmp_ull);
        qsort(dev, n, sizeof *dev, cmp_ull);
        printf("ok probe n=%llu min_us=%llu p50_us=%llu p90_us=%llu p99_us=%llu max_us=%llu mean_us=%llu dev_p50_us=%llu "
               "dev_p99_us=%llu dev_max_us=%llu t0=%llu t1=%llu\n",
               n, lat[0] / 1000, pct(lat, n, 50) / 1000, pct(lat, n, 90) / 1000, pct(lat, n, 99) / 1000,
               lat[n - 1] / 1000, sum / n / 1000, pct(dev, n, 50) / 1000, pct(dev, n, 99) / 1000, dev[n - 1] / 1000,
               first, last);
        free(lat);
        free(dev);
    } else if (!strcmp(cmd, "flood")) {
        unsigned long long dur = num(a[0]);
        flood(cmd, &dur, NULL, 1, 0, num(a[1]), a[2]);
    } else if (!strcmp(cmd, "floodmix")) {
        enum { MAXMIX = 64 };
        unsigned long long durs[MAXMIX], pauses[MAXMIX];
        int n = 0;
        char list[512];
        if (snprintf(list, sizeof list, "%s", a[0]) >= (int)sizeof list) {
            printf("err floodmix code=-1 durations=too_long\n");
            return;
        }
        for (char *save = NULL, *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            char *plus = strchr(t, '+');
            pauses[n] = 0;
            if (plus) *plus = 0;
            if (n == MAXMIX || parse_size(t, &durs[n]) || (plus && parse_size(plus + 1, &pauses[n]))) {
                printf("err floodmix code=-1 durations=bad (at most %d numbers: '%s')\n", MAXMIX, t);
                return;
            }
            n++;
        }
        if (!n) {
            printf("err floodmix code=-1 durations=none\n");
            return;
        }
        flood(cmd, durs, pauses, n, num(a[1]), num(a[2]), a[3]);
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || validate(argc, argv)) {
        fprintf(stderr, "usage: %s CMD [ARGS] CMD ...  (see tests/README.md)\n", argv[0]);
        return 2;
    }
    resolve_driver();
    resolve_clock();
    clock_gettime(CLOCK_MONOTONIC, &g_mark);
    g_mark_ns = clock_ns();
    int i = 1;
    int in_child = 0;
    while (i < argc) {
        const struct cmdspec *c = find_cmd(argv[i]);
        if (!strcmp(c->name, "fork")) {
            /* The child runs the commands up to `endchild` and exits; the parent waits for it,
               then goes on after `endchild`. */
            fflush(stdout);
            pid_t child = fork();
            if (child < 0) {
                printf("err fork errno=%d\n", errno);
                return 1;
            }
            if (child == 0) {
                in_child = 1;
                printf("ok forked pid=%d\n", (int)getpid());
                i += 1;
                continue;
            }
            int j = i + 1;
            while (j < argc && strcmp(argv[j], "endchild")) j += 1 + (int)strlen(find_cmd(argv[j])->args);
            int status = 0;
            waitpid(child, &status, 0);
            printf("ok fork child=%d status=%d\n", (int)child, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
            i = j + 1;
            continue;
        }
        if (!strcmp(c->name, "exec")) {
            /* The rest of the command line is the new program's (argv[0] = its path). */
            fflush(stdout);
            execv(argv[i + 1], &argv[i + 1]);
            printf("err exec code=-1 errno=%d\n", errno);
            return 1;
        }
        if (!strcmp(c->name, "endchild")) {
            if (in_child) exit(0);
            i += 1;
            continue;
        }
        run(c->name, &argv[i + 1]);
        i += 1 + (int)strlen(c->args);
    }
    return 0;
}
