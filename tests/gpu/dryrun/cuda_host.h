// The dry run of tests/gpu/suspend_copy_probe.cu on a machine without CUDA: the few driver-API
// types and calls the probe uses, emulated on host memory, and its kernels run on the CPU one
// (block, thread) at a time. Built by `SUSPEND_COPY_PROBE_DRY_RUN=1 bash
// tests/gpu/suspend_copy_probe.sh` with g++ -x c++. It proves the probe's bookkeeping (chunks,
// streams, host packing, unmap/re-map at the same address, the verification), never a figure.
//
// The emulation keeps the driver's rules that the probe could get wrong: a VMM mapping is
// inaccessible until cuMemSetAccess (PROT_NONE until then, so a missing call crashes), an
// unmapped range stays reserved (PROT_NONE), a re-created handle is new memory (a fresh memfd,
// zero-filled: data survives only through the host copy), sizes must be multiples of the
// granularity, and cuMemMap needs the range reserved and unmapped.
//
// With SUSPEND_COPY_PROBE_REAL_CUDA_H defined, only the CPU-kernel part is taken and the types and
// calls come from a real cuda.h (`g++ -fsyntax-only -I<CUDA>/include`): the probe's driver-API
// calls are then checked against NVIDIA's declarations without nvcc.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>

#ifdef SUSPEND_COPY_PROBE_REAL_CUDA_H
#include <cuda.h>
#else
typedef enum cudaError_enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_SUPPORTED = 801,
} CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct CUctx_st* CUcontext;
typedef struct CUstream_st* CUstream;

typedef enum { CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16 } CUdevice_attribute;
typedef enum { CU_MEM_ALLOCATION_TYPE_PINNED = 0x1 } CUmemAllocationType;
typedef enum { CU_MEM_HANDLE_TYPE_NONE = 0x0 } CUmemAllocationHandleType;
typedef enum { CU_MEM_LOCATION_TYPE_DEVICE = 0x1 } CUmemLocationType;
typedef enum { CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3 } CUmemAccess_flags;
typedef enum { CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 0x1 } CUmemAllocationGranularity_flags;
#define CU_STREAM_NON_BLOCKING 0x1

typedef struct {
  CUmemLocationType type;
  int id;
} CUmemLocation;
typedef struct {
  CUmemAllocationType type;
  CUmemAllocationHandleType requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
} CUmemAllocationProp;
typedef struct {
  CUmemLocation location;
  CUmemAccess_flags flags;
} CUmemAccessDesc;

#endif

// ---- kernels on the CPU ----
#define __global__
#define __device__
struct HostDim {
  unsigned x, y, z;
};
static HostDim blockIdx, threadIdx, blockDim, gridDim;
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long old = *p;
  *p += v;
  return old;
}
#define LAUNCH(kernel, blocks, threads, stream, ...)                        \
  do {                                                                      \
    (void)(stream);                                                         \
    gridDim = HostDim{(unsigned)(blocks), 1, 1};                            \
    blockDim = HostDim{(unsigned)(threads), 1, 1};                          \
    for (unsigned b_ = 0; b_ < gridDim.x; b_++)                             \
      for (unsigned t_ = 0; t_ < blockDim.x; t_++) {                        \
        blockIdx = HostDim{b_, 0, 0};                                       \
        threadIdx = HostDim{t_, 0, 0};                                      \
        kernel(__VA_ARGS__);                                                \
      }                                                                     \
  } while (0)

#ifndef SUSPEND_COPY_PROBE_REAL_CUDA_H
// ---- the emulated device ----
namespace hostcuda {
static const size_t kGranularity = 2ull << 20;
static const size_t kTotal = 80ull << 30;
static const size_t kContext = 512ull << 20;
struct Handle {
  int fd;
  size_t size;
};
static size_t used = 0;
static bool context_made = false;
static std::map<CUdeviceptr, size_t> linear;     // cuMemAlloc'd ranges
static std::map<CUdeviceptr, size_t> reserved;   // cuMemAddressReserve'd ranges
static std::map<CUdeviceptr, size_t> mapped;     // mapped ranges (start -> size)
static std::map<CUmemGenericAllocationHandle, Handle> handles;
static std::map<void*, size_t> host;             // cuMemHostAlloc'd
static CUmemGenericAllocationHandle next_handle = 1;

static bool inside_reservation(CUdeviceptr p, size_t size) {
  auto it = reserved.upper_bound(p);
  if (it == reserved.begin()) return false;
  --it;
  return p >= it->first && p + size <= it->first + it->second;
}
static bool overlaps_mapping(CUdeviceptr p, size_t size) {
  for (auto& m : mapped)
    if (p < m.first + m.second && m.first < p + size) return true;
  return false;
}
static void* reserve_none(size_t size) {
  void* p = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}
}  // namespace hostcuda

static inline CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
static inline CUresult cuDriverGetVersion(int* v) { *v = 13000; return CUDA_SUCCESS; }
static inline CUresult cuDeviceGet(CUdevice* d, int ordinal) { *d = ordinal; return ordinal == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }
static inline CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  snprintf(name, (size_t)len, "host emulation (dry run)");
  return CUDA_SUCCESS;
}
static inline CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
  *v = a == CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT ? 4 : 0;
  return CUDA_SUCCESS;
}
static inline CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
  static int ctx;
  *c = reinterpret_cast<CUcontext>(&ctx);
  hostcuda::context_made = true;
  return CUDA_SUCCESS;
}
static inline CUresult cuDevicePrimaryCtxRelease(CUdevice) { return CUDA_SUCCESS; }
static inline CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
static inline CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
static inline CUresult cuGetErrorName(CUresult r, const char** s) {
  *s = r == CUDA_SUCCESS ? "CUDA_SUCCESS" : r == CUDA_ERROR_OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_INVALID_VALUE";
  return CUDA_SUCCESS;
}
static inline CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
  if (!hostcuda::context_made) return CUDA_ERROR_INVALID_VALUE;
  *total = hostcuda::kTotal;
  *free_bytes = hostcuda::kTotal - hostcuda::kContext - hostcuda::used;
  return CUDA_SUCCESS;
}

static inline CUresult cuMemAlloc(CUdeviceptr* p, size_t size) {
  if (size == 0) return CUDA_ERROR_INVALID_VALUE;
  void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  *p = reinterpret_cast<CUdeviceptr>(m);
  hostcuda::linear[*p] = size;
  hostcuda::used += size;
  return CUDA_SUCCESS;
}
static inline CUresult cuMemFree(CUdeviceptr p) {
  auto it = hostcuda::linear.find(p);
  if (it == hostcuda::linear.end()) return CUDA_ERROR_INVALID_VALUE;
  munmap(reinterpret_cast<void*>(p), it->second);
  hostcuda::used -= it->second;
  hostcuda::linear.erase(it);
  return CUDA_SUCCESS;
}

static inline CUresult cuMemGetAllocationGranularity(size_t* g, const CUmemAllocationProp* prop, CUmemAllocationGranularity_flags) {
  if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
  *g = hostcuda::kGranularity;
  return CUDA_SUCCESS;
}
static inline CUresult cuMemAddressReserve(CUdeviceptr* p, size_t size, size_t alignment, CUdeviceptr addr, unsigned long long flags) {
  using namespace hostcuda;
  if (size == 0 || size % kGranularity || addr != 0 || flags != 0) return CUDA_ERROR_INVALID_VALUE;
  size_t align = alignment ? alignment : kGranularity;
  char* raw = static_cast<char*>(reserve_none(size + align));
  if (!raw) return CUDA_ERROR_OUT_OF_MEMORY;
  uintptr_t start = (reinterpret_cast<uintptr_t>(raw) + align - 1) / align * align;
  size_t head = start - reinterpret_cast<uintptr_t>(raw), tail = align - head;
  if (head) munmap(raw, head);
  if (tail) munmap(reinterpret_cast<char*>(start) + size, tail);
  *p = start;
  reserved[*p] = size;
  return CUDA_SUCCESS;
}
static inline CUresult cuMemAddressFree(CUdeviceptr p, size_t size) {
  using namespace hostcuda;
  auto it = reserved.find(p);
  if (it == reserved.end() || it->second != size || overlaps_mapping(p, size)) return CUDA_ERROR_INVALID_VALUE;
  munmap(reinterpret_cast<void*>(p), size);
  reserved.erase(it);
  return CUDA_SUCCESS;
}
static inline CUresult cuMemCreate(CUmemGenericAllocationHandle* h, size_t size, const CUmemAllocationProp* prop, unsigned long long flags) {
  using namespace hostcuda;
  if (size == 0 || size % kGranularity || flags != 0 || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
      prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
    return CUDA_ERROR_INVALID_VALUE;
  int fd = memfd_create("cuMemCreate", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, (off_t)size) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
  *h = next_handle++;
  handles[*h] = Handle{fd, size};
  used += size;
  return CUDA_SUCCESS;
}
static inline CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
  using namespace hostcuda;
  auto it = handles.find(h);
  if (it == handles.end()) return CUDA_ERROR_INVALID_VALUE;
  close(it->second.fd);  // the pages go once the last mapping goes too
  used -= it->second.size;
  handles.erase(it);
  return CUDA_SUCCESS;
}
static inline CUresult cuMemMap(CUdeviceptr p, size_t size, size_t offset, CUmemGenericAllocationHandle h, unsigned long long flags) {
  using namespace hostcuda;
  auto it = handles.find(h);
  if (it == handles.end() || flags != 0 || offset + size > it->second.size || size % kGranularity || !inside_reservation(p, size) ||
      overlaps_mapping(p, size))
    return CUDA_ERROR_INVALID_VALUE;
  void* m = mmap(reinterpret_cast<void*>(p), size, PROT_NONE, MAP_SHARED | MAP_FIXED, it->second.fd, (off_t)offset);
  if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  mapped[p] = size;
  return CUDA_SUCCESS;
}
static inline CUresult cuMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc* desc, size_t count) {
  using namespace hostcuda;
  if (count != 1 || desc->flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE || desc->location.type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
  // The whole range must be mapped (one mapping or contiguous ones).
  for (CUdeviceptr at = p; at < p + size;) {
    auto it = mapped.upper_bound(at);
    if (it == mapped.begin()) return CUDA_ERROR_INVALID_VALUE;
    --it;
    if (at >= it->first + it->second) return CUDA_ERROR_INVALID_VALUE;
    at = it->first + it->second;
  }
  return mprotect(reinterpret_cast<void*>(p), size, PROT_READ | PROT_WRITE) == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
static inline CUresult cuMemUnmap(CUdeviceptr p, size_t size) {
  using namespace hostcuda;
  auto it = mapped.find(p);
  if (it == mapped.end() || it->second != size) return CUDA_ERROR_INVALID_VALUE;
  // Back to reserved-only: inaccessible, the pages of the handle no longer reachable from here.
  void* m = mmap(reinterpret_cast<void*>(p), size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (m == MAP_FAILED) return CUDA_ERROR_INVALID_VALUE;
  mapped.erase(it);
  return CUDA_SUCCESS;
}

static inline CUresult cuMemHostAlloc(void** p, size_t size, unsigned) {
  // Pinned memory is resident and zeroed: populate it, as the driver's pinning costs.
  void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  hostcuda::host[m] = size;
  *p = m;
  return CUDA_SUCCESS;
}
static inline CUresult cuMemFreeHost(void* p) {
  auto it = hostcuda::host.find(p);
  if (it == hostcuda::host.end()) return CUDA_ERROR_INVALID_VALUE;
  munmap(p, it->second);
  hostcuda::host.erase(it);
  return CUDA_SUCCESS;
}
static inline CUresult cuMemHostRegister(void* p, size_t size, unsigned) {
  // Pinning faults every page in; write one byte of each page that is still zero-filled.
  volatile char* c = static_cast<volatile char*>(p);
  for (size_t off = 0; off < size; off += 4096) c[off] = c[off];
  return CUDA_SUCCESS;
}
static inline CUresult cuMemHostUnregister(void*) { return CUDA_SUCCESS; }

static inline CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
  memcpy(dst, reinterpret_cast<const void*>(src), n);
  return CUDA_SUCCESS;
}
static inline CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
  memcpy(reinterpret_cast<void*>(dst), src, n);
  return CUDA_SUCCESS;
}
static inline CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream) { return cuMemcpyDtoH(dst, src, n); }
static inline CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream) { return cuMemcpyHtoD(dst, src, n); }
static inline CUresult cuStreamCreate(CUstream* s, unsigned) {
  static int streams[64];
  static int next = 0;
  *s = reinterpret_cast<CUstream>(&streams[next++ % 64]);
  return CUDA_SUCCESS;
}
static inline CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
static inline CUresult cuStreamDestroy(CUstream) { return CUDA_SUCCESS; }
#endif  // SUSPEND_COPY_PROBE_REAL_CUDA_H
