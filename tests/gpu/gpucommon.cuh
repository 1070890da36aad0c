// What the CUDA programs of tests/gpu share (bench.cu, sharebench.cu, memfill.cu): whether the
// shim is loaded, a median, and the CUDA error check. Included by path from the same folder.
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
