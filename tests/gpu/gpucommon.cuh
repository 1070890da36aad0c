// What the CUDA programs of tests/gpu share (bench.cu, sharebench.cu, latprobe.cu, memfill.cu,
// soakload.cu): whether the shim is loaded, the clock, a median, the CUDA error check, the
// benchmark kernel with its device set-up and launch, the calibration's secant step and the
// --go-file start line. Included by path from the same folder.
#pragma once

#include <cuda_runtime.h>
#include <link.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// dl_iterate_phdr callback: sets *(int*)data to 1 when a loaded object's name has "gpuslice".
static inline int find_gpuslice(struct dl_phdr_info* info, size_t, void* data) {
  if (info->dlpi_name && strstr(info->dlpi_name, "gpuslice")) *static_cast<int*>(data) = 1;
  return 0;
}

// 1 when libgpuslice is among the loaded objects (preloaded), else 0.
static inline int gpuslice_preloaded() {
  int shim = 0;
  dl_iterate_phdr(find_gpuslice, &shim);
  return shim;
}

// CLOCK_MONOTONIC in seconds: comparable between processes and with Python's time.monotonic().
static inline double mono_s() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline const char* env_or_dash(const char* name) {
  const char* v = getenv(name);
  return v ? v : "-";
}

static inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  if (n == 0) return 0.0;
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// A CUDA runtime call that must succeed: otherwise cuda_error= and cuda_error_at= lines on
// stdout and exit status 4.
#define CHECK(call)                                                                   \
  do {                                                                                \
    cudaError_t e_ = (call);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      printf("cuda_error=%s\ncuda_error_at=%s:%d\n", cudaGetErrorName(e_), __FILE__, \
             __LINE__);                                                               \
      fflush(stdout);                                                                 \
      exit(4);                                                                        \
    }                                                                                 \
  } while (0)

// The benchmark kernel of sharebench, latprobe and soakload: each thread runs `iters`
// iterations of 4 dependent FMA chains and stores the result (thread 0 always, the others under
// a condition that is never true but that the compiler cannot decide), so nothing is optimised
// away; launched as one full wave (SMs x resident blocks), it is throughput-bound on every SM.
#ifdef __CUDACC__
__global__ void fma_kernel(float* out, int iters, float b, float c) {
  unsigned tid = blockIdx.x * blockDim.x + threadIdx.x;
  float a0 = 1.0f + (float)(tid & 1023) * 1e-6f;
  float a1 = a0 + 0.25f, a2 = a0 + 0.5f, a3 = a0 + 0.75f;
#pragma unroll 4
  for (int i = 0; i < iters; i++) {
    a0 = fmaf(a0, b, c);
    a1 = fmaf(a1, b, c);
    a2 = fmaf(a2, b, c);
    a3 = fmaf(a3, b, c);
  }
  float s = (a0 + a1) + (a2 + a3);
  if (tid == 0)
    out[0] = s;
  else if (s == -1.0f)  // never: the chains converge to c / (1 - b) = 1
    out[1 + (tid & 255)] = s;
}
#else
// Host-only syntax check (g++ -x c++): a stand-in with the same signature.
static void fma_kernel(float*, int, float, float) {}
#endif

// ------------------------------------------------------------------ the benchmark kernel's device

// One full wave of fma_kernel on the current device, and its output buffer.
struct FmaDevice {
  int sms = 0;
  int blocks_per_sm = 0;
  int block = 256;
  int grid = 0;
  float* out = nullptr;
  float b = 0.9999f;
  float c = 1e-4f;
};

// Prints preloaded_gpuslice= and env_<NAME>= for each name of the nullptr-terminated `env_names`
// ("-" when unset), makes the context (on failure: init_error= and exit status 3), sizes one
// full wave (SMs x resident blocks of 256 threads), allocates and clears the kernel's output,
// and prints device=, sms=, blocks_per_sm=, block=, grid=.
static inline void fma_setup(FmaDevice& d, const char* const* env_names) {
  printf("preloaded_gpuslice=%d\n", gpuslice_preloaded());
  for (const char* const* name = env_names; *name; name++)
    printf("env_%s=%s\n", *name, env_or_dash(*name));
  fflush(stdout);
  cudaError_t e = cudaFree(0);
  if (e != cudaSuccess) {
    printf("init_error=%s\n", cudaGetErrorName(e));
    fflush(stdout);
    exit(3);
  }
  int dev = 0;
  CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&d.blocks_per_sm,
                                                      (const void*)fma_kernel, d.block, 0));
  if (d.blocks_per_sm < 1) d.blocks_per_sm = 1;
  d.grid = d.sms * d.blocks_per_sm;
  CHECK(cudaMalloc(&d.out, 257 * sizeof(float)));
  CHECK(cudaMemset(d.out, 0, 257 * sizeof(float)));
  printf("device=%s\nsms=%d\nblocks_per_sm=%d\nblock=%d\ngrid=%d\n", prop.name, d.sms,
         d.blocks_per_sm, d.block, d.grid);
  fflush(stdout);
}

static inline cudaError_t fma_launch(FmaDevice& d, cudaStream_t s, int iters) {
  void* args[] = {(void*)&d.out, (void*)&iters, (void*)&d.b, (void*)&d.c};
  return cudaLaunchKernel((const void*)fma_kernel, dim3(d.grid), dim3(d.block), args, 0, s);
}

// ------------------------------------------------------------------ calibration, start line

// The calibrations' secant step: the iters at which the line through (i1, t1) and (i2, t2)
// reaches `target` (proportional scaling from i2 when the slope is not positive), within
// 1..2e9.
static inline long secant_next_iters(long i1, double t1, long i2, double t2, double target) {
  double slope = (t2 - t1) / (double)(i2 - i1);
  long next;
  if (slope <= 0 || !std::isfinite(slope))
    next = (long)std::llround((double)i2 * target / t2);
  else
    next = (long)std::llround((double)i2 + (target - t2) / slope);
  if (next < 1) next = 1;
  if (next > 2000000000L) next = 2000000000L;
  return next;
}

// --go-file: prints ready=1, then waits until `path` exists and prints go_mono=; false (after
// printing go_timeout=1) when it has not appeared within `timeout_s` seconds.
static inline bool wait_go_file(const char* path, double timeout_s) {
  printf("ready=1\n");
  fflush(stdout);
  double give_up = mono_s() + timeout_s;
  while (access(path, F_OK) != 0) {
    if (mono_s() > give_up) {
      printf("go_timeout=1\n");
      fflush(stdout);
      return false;
    }
    // 2 ms, not less: at 32 tenants the first one waits here seconds for the slowest to make
    // its context, and a 200 us poll cost it ~0.5 s of CPU (issue 14's CPU figures); the
    // warm-up after the go file absorbs a start up to 2 ms late.
    usleep(2000);
  }
  printf("go_mono=%.6f\n", mono_s());
  return true;
}
