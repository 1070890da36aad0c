// memfill: fill device memory with 256 MiB cudaMalloc chunks until the allocation fails.
//
//   memfill [sleep_ms [max_chunks [hold_ms]]]
//
// sleep_ms   pause after each successful allocation (lets an NVML poller see the growth); default 0
// max_chunks stop after this many chunks (0 = until failure); default 0
// hold_ms    pause at the peak, before freeing; default max(200, 4 * sleep_ms) when sleep_ms > 0, else 0
//
// Output: key=value lines on stdout. Exit status: 0 when the run completed (whatever the
// quota did), 3 when the first CUDA call (cudaFree(0)) or cudaMemGetInfo failed, 4 on an
// unexpected error later on.
#include <cuda_runtime.h>
#include <link.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "gpucommon.cuh"

static const size_t kMiB = 1024ull * 1024ull;
static const size_t kChunk = 256ull * kMiB;

static void sleep_ms(long ms) {
  if (ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

static unsigned long long mib_floor(size_t b) { return (unsigned long long)(b / kMiB); }
static unsigned long long mib_ceil(size_t b) { return (unsigned long long)((b + kMiB - 1) / kMiB); }

int main(int argc, char** argv) {
  long pause = argc > 1 ? atol(argv[1]) : 0;
  long max_chunks = argc > 2 ? atol(argv[2]) : 0;
  long hold = argc > 3 ? atol(argv[3]) : (pause > 0 ? (4 * pause > 200 ? 4 * pause : 200) : 0);

  int shim = 0;
  dl_iterate_phdr(find_gpuslice, &shim);
  printf("preloaded_gpuslice=%d\n", shim);
  printf("chunk_mib=256\nsleep_ms=%ld\nmax_chunks=%ld\n", pause, max_chunks);
  fflush(stdout);

  // First CUDA call: creates the primary context.
  cudaError_t err = cudaFree(0);
  if (err != cudaSuccess) {
    printf("init_error=%s\ninit_error_string=%s\n", cudaGetErrorName(err), cudaGetErrorString(err));
    fflush(stdout);
    return 3;
  }
  size_t free_b = 0, total_b = 0;
  err = cudaMemGetInfo(&free_b, &total_b);
  if (err != cudaSuccess) {
    printf("meminfo_error=%s\n", cudaGetErrorName(err));
    fflush(stdout);
    return 3;
  }
  printf("total_bytes=%zu\nfree_bytes=%zu\n", total_b, free_b);
  printf("total_mib=%llu\nfree_mib=%llu\n", mib_floor(total_b), mib_floor(free_b));
  printf("used_before_mib=%llu\n", mib_ceil(total_b >= free_b ? total_b - free_b : 0));
  fflush(stdout);

  std::vector<void*> chunks;
  const char* alloc_error = "none";
  const char* stop_reason = "error";
  for (;;) {
    if (max_chunks > 0 && (long)chunks.size() >= max_chunks) {
      stop_reason = "cap";
      break;
    }
    void* p = nullptr;
    err = cudaMalloc(&p, kChunk);
    if (err != cudaSuccess) {
      alloc_error = cudaGetErrorName(err);
      printf("alloc_error_string=%s\n", cudaGetErrorString(err));
      cudaGetLastError();  // clear it so that later calls report their own status
      break;
    }
    chunks.push_back(p);
    sleep_ms(pause);
  }
  printf("chunks=%zu\nallocated_mib=%llu\nalloc_error=%s\nstop_reason=%s\n", chunks.size(),
         (unsigned long long)chunks.size() * 256ull, alloc_error, stop_reason);
  fflush(stdout);

  size_t f2 = 0, t2 = 0;
  err = cudaMemGetInfo(&f2, &t2);
  if (err == cudaSuccess)
    printf("peak_total_mib=%llu\npeak_free_mib=%llu\n", mib_floor(t2), mib_floor(f2));
  else
    printf("peak_meminfo_error=%s\n", cudaGetErrorName(err));
  fflush(stdout);
  sleep_ms(hold);

  int free_errors = 0;
  for (void* p : chunks)
    if (cudaFree(p) != cudaSuccess) free_errors++;
  size_t n = chunks.size();
  chunks.clear();
  printf("free_errors=%d\n", free_errors);
  err = cudaMemGetInfo(&f2, &t2);
  if (err == cudaSuccess)
    printf("after_free_total_mib=%llu\nafter_free_free_mib=%llu\n", mib_floor(t2), mib_floor(f2));
  else
    printf("after_free_meminfo_error=%s\n", cudaGetErrorName(err));

  // One chunk again.
  void* p = nullptr;
  err = cudaMalloc(&p, kChunk);
  printf("realloc_ok=%d\nrealloc_error=%s\n", err == cudaSuccess ? 1 : 0,
         err == cudaSuccess ? "none" : cudaGetErrorName(err));
  if (err == cudaSuccess) cudaFree(p);
  else cudaGetLastError();

  // Refill to the same count: shows that the frees were credited back.
  size_t refill = 0;
  for (size_t i = 0; i < n; i++) {
    void* q = nullptr;
    if (cudaMalloc(&q, kChunk) != cudaSuccess) {
      cudaGetLastError();
      break;
    }
    chunks.push_back(q);
    refill++;
  }
  for (void* q : chunks) cudaFree(q);
  chunks.clear();
  printf("refill_chunks=%zu\n", refill);

  err = cudaDeviceSynchronize();
  printf("final_sync=%s\ndone=1\n", cudaGetErrorName(err));
  fflush(stdout);
  return err == cudaSuccess ? 0 : 4;
}
