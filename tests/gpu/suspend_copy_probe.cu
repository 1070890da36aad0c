// Issue 22: what a suspend path of our own would cost, measured on the card with the driver API.
// The driver's checkpoint moved 1.8 GB/s out and 5.2 GB/s back on the H100 (link 55 GB/s); the
// custom-storage mode is not in driver 580. A shim-side path would copy every allocation to
// pinned host memory, unmap and release its physical memory (keeping the virtual range), and at
// resume create, map at the same address and copy back. This probe times each step:
//   link  pinned cuMemcpy of 1 GiB each way, best of 5 (the physical limit, as hostbw measures)
//   a     cuMemAlloc vs VMM (cuMemAddressReserve + cuMemCreate + cuMemMap + cuMemSetAccess): time
//         per allocation and per free at 2 MiB, 64 MiB, 1 GiB; a copy kernel's bandwidth through
//         cuMemAlloc memory, one VMM handle, and 2 MiB VMM pieces (is VMM backing free?)
//   b     copy-out / copy-in of N GiB held in many VMM allocations to pinned host memory, with
//         1, 2, 4 streams and chunks of 64 MiB, 256 MiB, whole allocations
//   c     suspend = copy-out + cuMemUnmap + cuMemRelease (ranges kept); resume = cuMemCreate +
//         cuMemMap at the same addresses + cuMemSetAccess + copy-in; every word verified
//   d     pinning: cuMemHostAlloc of the N GiB (1 GiB pieces), cuMemFreeHost; mmap +
//         cuMemHostRegister (untouched and touched pages); pageable copies for comparison
//   e     device memory in use (cuMemGetInfo) after the context, after the kernels' modules, with
//         the data, after its release with the ranges kept, at the end
//
//   suspend_copy_probe [GiB (default 24; fractions allowed)] [budget s (default 100)]
// key=value lines while it runs, the table last. Exit 0: data bit-identical and both goals
// (>= 20 GB/s each way) met; 1: a FAIL row; 4: a CUDA error (the table so far is printed).
// Built with `nvcc -O2 -arch=sm_90 ... -lcuda` (tests/gpu/suspend_copy_probe.sh); without nvcc,
// g++ builds it against tests/gpu/dryrun/cuda_host.h (the dry run: bookkeeping, not figures).
#ifdef __CUDACC__
#include <cuda.h>
#include <cuda_runtime.h>
#else
#include "dryrun/cuda_host.h"
#endif

#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static const size_t kMiB = 1ull << 20;
static const size_t kGiB = 1ull << 30;

// ---- results: a table printed last, also on a CUDA error ----
struct Row {
  std::string id, what, figure;
};
static std::vector<Row> g_rows;
static int g_fails = 0;

static std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

static void row(const char* id, const std::string& what, const std::string& figure) {
  g_rows.push_back(Row{id, what, figure});
  printf("row %s: %s: %s\n", id, what.c_str(), figure.c_str());
  fflush(stdout);
}

static void print_table() {
  printf("\n| id | what | figure |\n|---|---|---|\n");
  for (auto& r : g_rows) printf("| %s | %s | %s |\n", r.id.c_str(), r.what.c_str(), r.figure.c_str());
  fflush(stdout);
}

static void fail_cu(const char* call, CUresult r, int line) {
  const char* name = nullptr;
  cuGetErrorName(r, &name);
  printf("cuda_error=%s\ncuda_error_at=%s (line %d)\n", name ? name : "?", call, line);
  row("error", fmt("%s (line %d)", call, line), name ? name : "?");
  print_table();
  exit(4);
}
#define CU(call)                                          \
  do {                                                    \
    CUresult r_ = (call);                                 \
    if (r_ != CUDA_SUCCESS) fail_cu(#call, r_, __LINE__); \
  } while (0)

#ifdef __CUDACC__
// Kernels go through the runtime on the driver's primary context (made current first, so the
// runtime uses it); a bad launch is reported by the runtime only.
#define LAUNCH(kernel, blocks, threads, stream, ...)                                              \
  do {                                                                                            \
    kernel<<<(blocks), (threads), 0, (cudaStream_t)(stream)>>>(__VA_ARGS__);                      \
    cudaError_t e_ = cudaGetLastError();                                                          \
    if (e_ != cudaSuccess) {                                                                      \
      printf("cuda_error=%s\ncuda_error_at=launch of %s\n", cudaGetErrorName(e_), #kernel);       \
      row("error", "launch of " #kernel, cudaGetErrorName(e_));                                   \
      print_table();                                                                              \
      exit(4);                                                                                    \
    }                                                                                             \
  } while (0)
#endif

static double now_s() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double gbs(size_t bytes, double s) { return s > 0 ? (double)bytes / s / 1e9 : 0.0; }
static double gib(size_t bytes) { return (double)bytes / (double)kGiB; }

// ---- kernels ----
struct alignas(16) Pair {
  unsigned long long a, b;
};

// splitmix64's finaliser: the expected word at every position, from the allocation's seed.
__device__ inline unsigned long long mix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__global__ void fill_kernel(unsigned long long* p, size_t words, unsigned long long seed) {
  size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) p[i] = mix64(seed + i);
}

// Counts the words that differ from fill_kernel's pattern: 0 means bit-identical.
__global__ void verify_kernel(const unsigned long long* p, size_t words, unsigned long long seed, unsigned long long* bad) {
  size_t stride = (size_t)gridDim.x * blockDim.x;
  unsigned long long n = 0;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) n += p[i] != mix64(seed + i);
  if (n) atomicAdd(bad, n);
}

__global__ void copy_kernel(const Pair* src, Pair* dst, size_t n) {
  size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[i];
}

// ---- the device and VMM helpers ----
static CUdevice g_dev;
static int g_blocks = 0;
static const int kThreads = 256;
static size_t g_gran = 2 * kMiB;
static CUmemAllocationProp g_prop;
static CUmemAccessDesc g_access;

static size_t device_used() {
  size_t free_b = 0, total = 0;
  CU(cuMemGetInfo(&free_b, &total));
  return total - free_b;
}

static size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

struct Vmm {
  CUdeviceptr va = 0;
  size_t size = 0;
  CUmemGenericAllocationHandle handle = 0;
};

struct VmmSteps {
  double reserve = 0, create = 0, map = 0, access = 0, unmap = 0, release = 0, addr_free = 0;
};

static void vmm_alloc(Vmm& v, size_t size, VmmSteps* t) {
  v.size = size;
  double t0 = now_s();
  CU(cuMemAddressReserve(&v.va, size, g_gran, 0, 0));
  double t1 = now_s();
  CU(cuMemCreate(&v.handle, size, &g_prop, 0));
  double t2 = now_s();
  CU(cuMemMap(v.va, size, 0, v.handle, 0));
  double t3 = now_s();
  CU(cuMemSetAccess(v.va, size, &g_access, 1));
  double t4 = now_s();
  if (t) {
    t->reserve += t1 - t0;
    t->create += t2 - t1;
    t->map += t3 - t2;
    t->access += t4 - t3;
  }
}

static void vmm_free(Vmm& v, VmmSteps* t) {
  double t0 = now_s();
  CU(cuMemUnmap(v.va, v.size));
  double t1 = now_s();
  CU(cuMemRelease(v.handle));
  double t2 = now_s();
  CU(cuMemAddressFree(v.va, v.size));
  double t3 = now_s();
  if (t) {
    t->unmap += t1 - t0;
    t->release += t2 - t1;
    t->addr_free += t3 - t2;
  }
  v = Vmm();
}

// ---- (a) allocation cost and kernel bandwidth ----
static void part_a(size_t bw_bytes) {
  const size_t sizes[3] = {2 * kMiB, 64 * kMiB, kGiB};
  const int counts[3] = {256, 64, 8};
  const char* ids[3] = {"a1", "a2", "a3"};
  for (int s = 0; s < 3; s++) {
    size_t size = sizes[s];
    int n = counts[s];
    std::vector<CUdeviceptr> ptrs(n);
    std::vector<Vmm> vmms(n);
    double alloc = 0, free_ = 0;
    VmmSteps steps;
    // Two rounds; the second is kept (the first pays the driver's warm-up).
    for (int round = 0; round < 2; round++) {
      steps = VmmSteps();
      double t0 = now_s();
      for (int i = 0; i < n; i++) CU(cuMemAlloc(&ptrs[i], size));
      double t1 = now_s();
      for (int i = 0; i < n; i++) CU(cuMemFree(ptrs[i]));
      double t2 = now_s();
      alloc = (t1 - t0) / n;
      free_ = (t2 - t1) / n;
      for (int i = 0; i < n; i++) vmm_alloc(vmms[i], size, &steps);
      for (int i = 0; i < n; i++) vmm_free(vmms[i], &steps);
    }
    double us = 1e6 / n;
    double vmm_alloc_us = (steps.reserve + steps.create + steps.map + steps.access) * us;
    double vmm_free_us = (steps.unmap + steps.release + steps.addr_free) * us;
    printf("a_size=%zu a_n=%d cumemalloc_us=%.1f cumemfree_us=%.1f vmm_reserve_us=%.1f vmm_create_us=%.1f vmm_map_us=%.1f "
           "vmm_access_us=%.1f vmm_unmap_us=%.1f vmm_release_us=%.1f vmm_addrfree_us=%.1f\n",
           size, n, alloc * 1e6, free_ * 1e6, steps.reserve * us, steps.create * us, steps.map * us, steps.access * us,
           steps.unmap * us, steps.release * us, steps.addr_free * us);
    row(ids[s], fmt("%s x %d: µs per allocation / per free", size >= kGiB ? "1 GiB" : size >= 64 * kMiB ? "64 MiB" : "2 MiB", n),
        fmt("cuMemAlloc %.1f / cuMemFree %.1f; VMM %.1f (reserve %.1f + create %.1f + map %.1f + access %.1f) / %.1f (unmap %.1f + "
            "release %.1f + address free %.1f)",
            alloc * 1e6, free_ * 1e6, vmm_alloc_us, steps.reserve * us, steps.create * us, steps.map * us, steps.access * us,
            vmm_free_us, steps.unmap * us, steps.release * us, steps.addr_free * us));
  }

  // The copy kernel through three kinds of memory of bw_bytes each (source and destination).
  CUdeviceptr legacy[2];
  Vmm single[2];
  Vmm pieces_va[2];  // one reservation each, mapped from 2 MiB handles
  std::vector<CUmemGenericAllocationHandle> pieces[2];
  for (int k = 0; k < 2; k++) {
    CU(cuMemAlloc(&legacy[k], bw_bytes));
    vmm_alloc(single[k], bw_bytes, nullptr);
    pieces_va[k].size = bw_bytes;
    CU(cuMemAddressReserve(&pieces_va[k].va, bw_bytes, g_gran, 0, 0));
    for (size_t off = 0; off < bw_bytes; off += g_gran) {
      CUmemGenericAllocationHandle h;
      CU(cuMemCreate(&h, g_gran, &g_prop, 0));
      CU(cuMemMap(pieces_va[k].va + off, g_gran, 0, h, 0));
      CU(cuMemSetAccess(pieces_va[k].va + off, g_gran, &g_access, 1));
      pieces[k].push_back(h);
    }
  }
  CUdeviceptr src[3] = {legacy[0], single[0].va, pieces_va[0].va};
  CUdeviceptr dst[3] = {legacy[1], single[1].va, pieces_va[1].va};
  const char* kind[3] = {"cuMemAlloc", "VMM one handle", "VMM 2 MiB pieces"};
  size_t n = bw_bytes / sizeof(Pair);
  for (int k = 0; k < 3; k++) LAUNCH(fill_kernel, g_blocks, kThreads, 0, (unsigned long long*)src[k], bw_bytes / 8, 1ull);
  CU(cuCtxSynchronize());
  double best[3] = {0, 0, 0};
  const int reps = 10;
  for (int round = 0; round < 3; round++) {
    for (int k = 0; k < 3; k++) {
      LAUNCH(copy_kernel, g_blocks, kThreads, 0, (const Pair*)src[k], (Pair*)dst[k], n);  // warm-up
      CU(cuCtxSynchronize());
      double t0 = now_s();
      for (int r = 0; r < reps; r++) LAUNCH(copy_kernel, g_blocks, kThreads, 0, (const Pair*)src[k], (Pair*)dst[k], n);
      CU(cuCtxSynchronize());
      best[k] = std::max(best[k], gbs(2 * bw_bytes * reps, now_s() - t0));
    }
  }
  printf("kernel_gbs_cumemalloc=%.1f kernel_gbs_vmm=%.1f kernel_gbs_vmm_pieces=%.1f kernel_bytes=%zu\n", best[0], best[1], best[2], bw_bytes);
  row("a4", fmt("copy kernel, %.2f GiB read + written, best of 3 x %d launches: GB/s", gib(bw_bytes), reps),
      fmt("%s %.0f; %s %.0f (%+.1f %%); %s %.0f (%+.1f %%)", kind[0], best[0], kind[1], best[1], 100.0 * (best[1] / best[0] - 1), kind[2],
          best[2], 100.0 * (best[2] / best[0] - 1)));
  for (int k = 0; k < 2; k++) {
    CU(cuMemFree(legacy[k]));
    vmm_free(single[k], nullptr);
    // cuMemUnmap takes a whole mapping, never a span of several: one call per piece.
    for (size_t i = 0; i < pieces[k].size(); i++) {
      CU(cuMemUnmap(pieces_va[k].va + i * g_gran, g_gran));
      CU(cuMemRelease(pieces[k][i]));
    }
    CU(cuMemAddressFree(pieces_va[k].va, bw_bytes));
  }
}

// ---- the data: N GiB in many VMM allocations, each with its place in pinned host memory ----
struct Alloc {
  Vmm v;
  unsigned long long seed = 0;
  char* host = nullptr;
};
static std::vector<Alloc> g_data;
static std::vector<void*> g_pieces;  // pinned host memory, g_piece_size each
static size_t g_piece_size = 0;
static CUstream g_streams[4];
static CUdeviceptr g_bad = 0;  // the verification's mismatch counter

// Allocations of 2, 32, 96, 256, 512, 1024 MiB in turn until `total` is reached (the last one
// cut to fit): a mix like a framework's segments, dozens of them for 24 GiB.
static void make_data(size_t total) {
  const size_t mix_mib[6] = {2, 32, 96, 256, 512, 1024};
  size_t left = total;
  for (int i = 0; left >= g_gran; i++) {
    size_t size = std::min(round_up(mix_mib[i % 6] * kMiB, g_gran), left);
    Alloc a;
    vmm_alloc(a.v, size, nullptr);
    a.seed = (unsigned long long)(g_data.size() + 1) << 40;
    g_data.push_back(a);
    left -= size;
  }
}

// Pinned host memory for every allocation, in pieces of g_piece_size (an allocation never spans
// two pieces); returns the seconds cuMemHostAlloc took in all.
static double pin_host(size_t total) {
  g_piece_size = std::min(kGiB, total);
  size_t used_in_piece = g_piece_size;  // no piece yet
  double took = 0;
  for (auto& a : g_data) {
    if (g_piece_size - used_in_piece < a.v.size) {
      void* p = nullptr;
      double t0 = now_s();
      CU(cuMemHostAlloc(&p, g_piece_size, 0));
      took += now_s() - t0;
      g_pieces.push_back(p);
      used_in_piece = 0;
    }
    a.host = static_cast<char*>(g_pieces.back()) + used_in_piece;
    used_in_piece += a.v.size;
  }
  return took;
}

// Copies every allocation out (device to host) or in, in chunks of `chunk` bytes (0: whole
// allocations) spread round-robin over `streams` streams; returns the seconds until all are done.
static double copy_all(bool out, int streams, size_t chunk, size_t* copies) {
  size_t k = 0;
  double t0 = now_s();
  for (auto& a : g_data) {
    size_t step = chunk ? chunk : a.v.size;
    for (size_t off = 0; off < a.v.size; off += step, k++) {
      size_t n = std::min(step, a.v.size - off);
      CUstream s = g_streams[k % (size_t)streams];
      if (out) CU(cuMemcpyDtoHAsync(a.host + off, a.v.va + off, n, s));
      else CU(cuMemcpyHtoDAsync(a.v.va + off, a.host + off, n, s));
    }
  }
  for (int i = 0; i < streams; i++) CU(cuStreamSynchronize(g_streams[i]));
  if (copies) *copies = k;
  return now_s() - t0;
}

static void fill_all(unsigned long long salt) {
  for (auto& a : g_data) LAUNCH(fill_kernel, g_blocks, kThreads, 0, (unsigned long long*)a.v.va, a.v.size / 8, a.seed ^ salt);
  CU(cuCtxSynchronize());
}

// Words of all allocations that differ from their pattern.
static unsigned long long verify_all() {
  unsigned long long zero = 0, bad = 0;
  CU(cuMemcpyHtoD(g_bad, &zero, sizeof zero));
  for (auto& a : g_data)
    LAUNCH(verify_kernel, g_blocks, kThreads, 0, (const unsigned long long*)a.v.va, a.v.size / 8, a.seed, (unsigned long long*)g_bad);
  CU(cuCtxSynchronize());
  CU(cuMemcpyDtoH(&bad, g_bad, sizeof bad));
  return bad;
}

static std::string chunk_name(size_t chunk) { return chunk == 0 ? std::string("whole allocations") : fmt("%zu MiB chunks", chunk / kMiB); }

#ifdef __CUDACC__
static const bool kDryRun = false;
#else
static const bool kDryRun = true;  // the host emulation: its speeds mean nothing
#endif

static const char* verdict(bool ok) {
  if (!ok) g_fails++;
  return ok ? "PASS" : "FAIL";
}

// A speed goal: judged on the card only.
static const char* speed_verdict(bool ok) { return kDryRun ? "INFO (dry run)" : verdict(ok); }

static double g_start = 0, g_budget = 100;
static bool over_budget(const char* part) {
  if (now_s() - g_start <= g_budget) return false;
  row(part, "skipped", fmt("the probe's budget of %.0f s was spent", g_budget));
  return true;
}

int main(int argc, char** argv) {
  double want_gib = argc > 1 ? atof(argv[1]) : 24.0;
  g_budget = argc > 2 ? atof(argv[2]) : 100.0;
  g_start = now_s();
  setvbuf(stdout, nullptr, _IOLBF, 0);

  CU(cuInit(0));
  CU(cuDeviceGet(&g_dev, 0));
  char name[128] = {0};
  int driver = 0, sms = 0;
  CU(cuDeviceGetName(name, sizeof name, g_dev));
  CU(cuDriverGetVersion(&driver));
  CU(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, g_dev));
  g_blocks = sms * 4;
  CUcontext ctx;
  CU(cuDevicePrimaryCtxRetain(&ctx, g_dev));
  CU(cuCtxSetCurrent(ctx));
  size_t used_ctx = device_used();

  memset(&g_prop, 0, sizeof g_prop);
  g_prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  g_prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  g_prop.location.id = g_dev;
  memset(&g_access, 0, sizeof g_access);
  g_access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  g_access.location.id = g_dev;
  g_access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  size_t gran_min = 0, gran_rec = 0;
  CU(cuMemGetAllocationGranularity(&gran_min, &g_prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
  CU(cuMemGetAllocationGranularity(&gran_rec, &g_prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
  g_gran = std::max(gran_min, (size_t)2 * kMiB);

  size_t total = (size_t)(want_gib * (double)kGiB) / g_gran * g_gran;
  if (total < g_gran) total = g_gran;
  size_t bw_bytes = std::max(g_gran, std::min(kGiB, total / 4 / g_gran * g_gran));
  printf("device=%s driver=%d sms=%d granularity_min=%zu granularity_recommended=%zu data_bytes=%zu budget_s=%.0f used_ctx=%zu\n", name, driver,
         sms, gran_min, gran_rec, total, g_budget, used_ctx);
  for (int i = 0; i < 4; i++) CU(cuStreamCreate(&g_streams[i], CU_STREAM_NON_BLOCKING));
  CU(cuMemAlloc(&g_bad, sizeof(unsigned long long)));

  // (a)
  part_a(bw_bytes);
  size_t used_kernels = device_used();

  // The data, and (d) the pinning of its host copy.
  make_data(total);
  size_t n_alloc = g_data.size();
  fill_all(0);
  size_t used_data = device_used();
  double pin_s = pin_host(total);
  size_t pinned = g_pieces.size() * g_piece_size;
  row("d1",
      fmt("cuMemHostAlloc of %.2f GiB in %zu pieces of %zu MiB (a suspension's host buffers)", gib(pinned), g_pieces.size(),
          g_piece_size / kMiB),
      fmt("%.2f s = %.1f GB/s pinned", pin_s, gbs(pinned, pin_s)));
  unsigned long long bad_before = verify_all();

  // The link, as hostbw measures it: pinned, synchronous, best of 5.
  size_t link_bytes = g_piece_size;
  CUdeviceptr link_dev;
  CU(cuMemAlloc(&link_dev, link_bytes));
  double link_h2d = 0, link_d2h = 0;
  for (int r = 0; r < 5; r++) {
    double t0 = now_s();
    CU(cuMemcpyHtoD(link_dev, g_pieces[0], link_bytes));
    double t1 = now_s();
    CU(cuMemcpyDtoH(g_pieces[0], link_dev, link_bytes));
    double t2 = now_s();
    link_h2d = std::max(link_h2d, gbs(link_bytes, t1 - t0));
    link_d2h = std::max(link_d2h, gbs(link_bytes, t2 - t1));
  }
  // g_pieces[0] holds the first allocations' host places: nothing there matters yet (every
  // copy-in below follows a copy-out). The buffer goes, so that (e) counts the data only.
  CU(cuMemFree(link_dev));
  printf("link_h2d_gbs=%.2f link_d2h_gbs=%.2f link_bytes=%zu\n", link_h2d, link_d2h, link_bytes);
  row("link", fmt("pinned cuMemcpy of %.2f GiB each way, best of 5", gib(link_bytes)), fmt("H2D %.1f GB/s, D2H %.1f GB/s", link_h2d, link_d2h));

  // (b) copy-out and copy-in of all the data, by streams and chunk size.
  const int stream_counts[3] = {1, 2, 4};
  const size_t chunks[3] = {64 * kMiB, 256 * kMiB, 0};
  int best_out_s = 1, best_in_s = 1;
  size_t best_out_c = 0, best_in_c = 0;
  double best_out = 0, best_in = 0;
  int b = 0;
  for (int si = 0; si < 3 && !over_budget("b"); si++) {
    for (int ci = 0; ci < 3; ci++) {
      size_t copies = 0;
      double out_s = copy_all(true, stream_counts[si], chunks[ci], &copies);
      double in_s = copy_all(false, stream_counts[si], chunks[ci], nullptr);
      double out_gbs = gbs(total, out_s), in_gbs = gbs(total, in_s);
      printf("copy streams=%d chunk=%zu copies=%zu d2h_gbs=%.2f h2d_gbs=%.2f\n", stream_counts[si], chunks[ci], copies, out_gbs, in_gbs);
      char id[16];
      snprintf(id, sizeof id, "b%d", ++b);
      row(id,
          fmt("%.2f GiB in %zu allocations, %d stream%s, %s (%zu copies)", gib(total), n_alloc, stream_counts[si], stream_counts[si] > 1 ? "s" : "",
              chunk_name(chunks[ci]).c_str(), copies),
          fmt("out %.1f GB/s (%.0f %% of the link), in %.1f GB/s (%.0f %%)", out_gbs, 100 * out_gbs / link_d2h, in_gbs, 100 * in_gbs / link_h2d));
      if (out_gbs > best_out) best_out = out_gbs, best_out_s = stream_counts[si], best_out_c = chunks[ci];
      if (in_gbs > best_in) best_in = in_gbs, best_in_s = stream_counts[si], best_in_c = chunks[ci];
    }
  }
  unsigned long long bad_copies = verify_all();

  // (c) the round trip with release, each way with (b)'s best configuration.
  size_t used_released = 0, used_resumed = 0;
  unsigned long long bad_round = ~0ull;
  if (!over_budget("c")) {
    VmmSteps st;
    double t0 = now_s();
    copy_all(true, best_out_s, best_out_c, nullptr);
    double t1 = now_s();
    for (auto& a : g_data) {
      double u0 = now_s();
      CU(cuMemUnmap(a.v.va, a.v.size));
      double u1 = now_s();
      CU(cuMemRelease(a.v.handle));
      st.unmap += u1 - u0;
      st.release += now_s() - u1;
      a.v.handle = 0;
    }
    double t2 = now_s();
    used_released = device_used();
    double t3 = now_s();
    for (auto& a : g_data) {
      double m0 = now_s();
      CU(cuMemCreate(&a.v.handle, a.v.size, &g_prop, 0));
      double m1 = now_s();
      CU(cuMemMap(a.v.va, a.v.size, 0, a.v.handle, 0));
      double m2 = now_s();
      CU(cuMemSetAccess(a.v.va, a.v.size, &g_access, 1));
      st.create += m1 - m0;
      st.map += m2 - m1;
      st.access += now_s() - m2;
    }
    double t4 = now_s();
    used_resumed = device_used();
    // New physical memory may still hold the old bytes: overwrite it (untimed), so that only
    // the copy-in can make the verification pass.
    fill_all(0x5555555555555555ull);
    double t5 = now_s();
    copy_all(false, best_in_s, best_in_c, nullptr);
    double t6 = now_s();
    bad_round = verify_all();
    double suspend_s = t2 - t0, resume_s = (t4 - t3) + (t6 - t5);
    double suspend_gbs = gbs(total, suspend_s), resume_gbs = gbs(total, resume_s);
    printf("suspend_s=%.3f suspend_gbs=%.2f copy_out_s=%.3f unmap_s=%.3f release_s=%.3f resume_s=%.3f resume_gbs=%.2f create_s=%.3f "
           "map_s=%.3f access_s=%.3f copy_in_s=%.3f mismatches=%llu\n",
           suspend_s, suspend_gbs, t1 - t0, st.unmap, st.release, resume_s, resume_gbs, st.create, st.map, st.access, t6 - t5, bad_round);
    row("c1",
        fmt("suspend: copy-out (%d stream%s, %s) + cuMemUnmap + cuMemRelease of %zu allocations, ranges kept", best_out_s,
            best_out_s > 1 ? "s" : "", chunk_name(best_out_c).c_str(), n_alloc),
        fmt("%.2f s = **%.1f GB/s** (%.0f %% of the link's D2H): copy %.3f s, unmap %.1f ms, release %.1f ms", suspend_s, suspend_gbs,
            100 * suspend_gbs / link_d2h, t1 - t0, st.unmap * 1e3, st.release * 1e3));
    row("c2",
        fmt("resume: cuMemCreate + cuMemMap at the same addresses + cuMemSetAccess + copy-in (%d stream%s, %s)", best_in_s,
            best_in_s > 1 ? "s" : "", chunk_name(best_in_c).c_str()),
        fmt("%.2f s = **%.1f GB/s** (%.0f %% of the link's H2D): create %.1f ms, map %.1f ms, access %.1f ms, copy %.3f s", resume_s, resume_gbs,
            100 * resume_gbs / link_h2d, st.create * 1e3, st.map * 1e3, st.access * 1e3, t6 - t5));
    row("c3", "suspend >= 20 GB/s (issue 22's goal; the driver's checkpoint: 1.8 GB/s on the H100)",
        fmt("%s (%.1f GB/s)", speed_verdict(suspend_gbs >= 20), suspend_gbs));
    row("c4", "resume >= 20 GB/s (the driver's restore: 5.2 GB/s on the H100)", fmt("%s (%.1f GB/s)", speed_verdict(resume_gbs >= 20), resume_gbs));
  }
  row("c5", "every word bit-identical: after the fill / after (b)'s copies / after (c)'s release and re-map",
      fmt("%s (mismatched words %llu / %llu / %s)", verdict(bad_before == 0 && bad_copies == 0 && bad_round == 0), bad_before, bad_copies,
          bad_round == ~0ull ? "not run" : std::to_string(bad_round).c_str()));

  // (d) pinning after the fact, and pageable copies.
  if (!over_budget("d")) {
    size_t reg = std::min(total, 8 * kGiB);
    double took[2] = {0, 0}, unreg[2] = {0, 0}, touch = 0;
    bool mapped = true;
    for (int touched = 0; touched < 2 && mapped; touched++) {
      void* p = mmap(nullptr, reg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) {
        mapped = false;
        break;
      }
      if (touched) {
        double t0 = now_s();
        memset(p, 1, reg);
        touch = now_s() - t0;
      }
      double t0 = now_s();
      CU(cuMemHostRegister(p, reg, 0));
      double t1 = now_s();
      CU(cuMemHostUnregister(p));
      took[touched] = t1 - t0;
      unreg[touched] = now_s() - t1;
      munmap(p, reg);
    }
    row("d2", fmt("mmap + cuMemHostRegister of %.2f GiB: untouched pages / touched (memset first) / unregister", gib(reg)),
        mapped ? fmt("%.2f s (%.1f GB/s) / %.2f s (%.1f GB/s; the memset %.2f s) / %.2f s", took[0], gbs(reg, took[0]), took[1], gbs(reg, took[1]),
                     touch, unreg[1])
               : std::string("mmap failed (no host memory)"));
    std::vector<char> pageable(link_bytes, 1);
    CU(cuMemAlloc(&link_dev, link_bytes));
    double d2h = 0, h2d = 0;
    for (int r = 0; r < 3; r++) {
      double t0 = now_s();
      CU(cuMemcpyDtoH(pageable.data(), link_dev, link_bytes));
      double t1 = now_s();
      CU(cuMemcpyHtoD(link_dev, pageable.data(), link_bytes));
      d2h = std::max(d2h, gbs(link_bytes, t1 - t0));
      h2d = std::max(h2d, gbs(link_bytes, now_s() - t1));
    }
    row("d3", fmt("pageable (malloc'd, touched) cuMemcpy of %.2f GiB, best of 3", gib(link_bytes)), fmt("D2H %.1f GB/s, H2D %.1f GB/s", d2h, h2d));
    CU(cuMemFree(link_dev));
  }

  // The end: free everything, timing the host side.
  for (auto& a : g_data) vmm_free(a.v, nullptr);
  double t0 = now_s();
  for (void* p : g_pieces) CU(cuMemFreeHost(p));
  double free_host_s = now_s() - t0;
  row("d4", fmt("cuMemFreeHost of the %.2f GiB", gib(pinned)), fmt("%.2f s", free_host_s));
  size_t used_end = device_used();
  printf("used_ctx=%zu used_kernels=%zu used_data=%zu used_released=%zu used_resumed=%zu used_end=%zu\n", used_ctx, used_kernels, used_data,
         used_released, used_resumed, used_end);
  row("e1",
      "device memory in use (total - free, MiB; other processes' included): after the context / after the kernels ran / with the data / "
      "after its release, ranges kept / after re-map / at the end",
      fmt("%zu / %zu / %zu / %zu / %zu / %zu", used_ctx / kMiB, used_kernels / kMiB, used_data / kMiB, used_released / kMiB, used_resumed / kMiB,
          used_end / kMiB));
  row("e2", "what a suspended process keeps on the device: after release minus after the context (modules, reserved ranges, pools, ...)",
      used_released ? fmt("%.0f MiB", ((double)used_released - (double)used_ctx) / (double)kMiB) : std::string("not run"));
  for (int i = 0; i < 4; i++) CU(cuStreamDestroy(g_streams[i]));
  CU(cuMemFree(g_bad));
  CU(cuDevicePrimaryCtxRelease(g_dev));
  printf("wall_s=%.1f\n", now_s() - g_start);
  printf("\n=== suspend_copy_probe: %s, driver %d; %.2f GiB in %zu VMM allocations; %.0f s\n", name, driver, gib(total), n_alloc, now_s() - g_start);
  print_table();
  return g_fails ? 1 : 0;
}
