// What the CUDA programs of tests/gpu share (bench.cu, sharebench.cu, latprobe.cu, memfill.cu,
// soakload.cu): whether the shim is loaded, a median, the CUDA error check, and the benchmark
// kernel. Included by path from the same folder.
#pragma once

#include <cuda_runtime.h>
#include <link.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// dl_iterate_phdr callback: sets *(int*)data to 1 when a loaded object's name has "gpuslice".
static inline int find_gpuslice(struct dl_phdr_info* info, size_t, void* data) {
  if (info->dlpi_name && strstr(info->dlpi_name, "gpuslice")) *static_cast<int*>(data) = 1;
  return 0;
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
