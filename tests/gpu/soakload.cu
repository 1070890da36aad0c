// soakload: random device-memory churn and kernel launches for the soak (tests/gpu/soak.py,
// `make gpu-soak`). Knows at every moment exactly how many bytes it holds.
//
//   soakload --seed S [--min-mib 1] [--max-mib 512] [--hold-mib 4096] [--burst-min 1]
//            [--burst-max 4] [--iters-min 600] [--iters-max 1500] [--sleep-max-us 5000]
//            [--streams 1] [--pause-file PATH] [--hb-ms 500] [--max-s 900]
//
// Each step, chosen at random (seeded): allocate (size log-uniform between --min-mib and
// --max-mib, a multiple of 64 KiB, memset on the device), free a random allocation, or neither;
// then a burst of --burst-min..--burst-max kernels (an FMA kernel of --iters-min..--iters-max
// iterations filling every SM, and a store kernel over up to 16 MiB of a live allocation),
// round robin over --streams non-blocking streams, synchronized; then a sleep of up to
// --sleep-max-us. Allocations that would take the total over --hold-mib are not tried (a free
// happens instead), so set it above the quota to run into the quota now and then: a refused
// cudaMalloc (cudaErrorMemoryAllocation) is counted (ooms=) and answered by freeing one
// allocation; one allocation in a hundred steps frees everything.
//
// Lines on stdout, each a kind and key=value fields:
//   ready pid= preloaded_gpuslice= total_mib= free_mib= sms= grid=   after the context exists
//   hb t= held= n= allocs= frees= ooms= kernels= steps= paused=     every --hb-ms (main loop)
//   quiet seq= held= n= t=     when --pause-file appeared (its content: a number, seq): the
//                              step in progress is finished, the device synchronized, and
//                              nothing is allocated, freed or launched until the file is gone
//                              (heartbeats go on, paused=1); a new number means a new quiet line
//   bye held= allocs= frees= ooms= kernels=     after SIGTERM/SIGINT: everything freed, exit 0
//   error where= code= name=    a CUDA error other than a refused allocation: exit 4
// held = sum of the sizes of the live allocations, in bytes (what the program asked for).
// t = CLOCK_MONOTONIC seconds (comparable with time.monotonic() of the harness).
// Exit status: 0 after SIGTERM/SIGINT, 2 usage, 3 the first CUDA call failed or --max-s
// passed (watchdog: the harness died), 4 a CUDA error.
#include <cuda_runtime.h>
#include <link.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpucommon.cuh"

#ifdef __CUDACC__
__global__ void store_kernel(unsigned* p, size_t words, unsigned value) {
  size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride)
    p[i] = value ^ (unsigned)i;
}
#else
// Host-only syntax check (g++ -x c++): a stand-in with the same signature.
static void store_kernel(unsigned*, size_t, unsigned) {}
#endif

static volatile sig_atomic_t g_stop = 0;
static void on_signal(int) { g_stop = 1; }

static void usage() {
  fprintf(stderr,
          "usage: soakload --seed S [--min-mib 1] [--max-mib 512] [--hold-mib 4096]\n"
          "                [--burst-min 1] [--burst-max 4] [--iters-min 600] [--iters-max 1500]\n"
          "                [--sleep-max-us 5000] [--streams 1] [--pause-file PATH] [--hb-ms 500]\n"
          "                [--max-s 900]\n");
  exit(2);
}

struct Opts {
  unsigned long long seed = 1;
  double min_mib = 1, max_mib = 512, hold_mib = 4096;
  int burst_min = 1, burst_max = 4, iters_min = 600, iters_max = 1500;
  long sleep_max_us = 5000;
  int streams = 1;
  std::string pause_file;
  double hb_ms = 500, max_s = 900;
};

struct Block {
  void* p;
  size_t bytes;
};

struct State {
  std::vector<Block> live;
  unsigned long long held = 0, allocs = 0, frees = 0, ooms = 0, kernels = 0, steps = 0;
  std::vector<cudaStream_t> streams;
  float* out = nullptr;
  int grid = 0, block = 256;
  double t_hb = 0;
};
static State S;

static void die(const char* where, cudaError_t e) {
  printf("error where=%s code=%d name=%s\n", where, (int)e, cudaGetErrorName(e));
  fflush(stdout);
  exit(4);
}
#define MUST(call)                     \
  do {                                 \
    cudaError_t e_ = (call);           \
    if (e_ != cudaSuccess) die(#call, e_); \
  } while (0)

static void heartbeat(bool paused) {
  double t = mono_s();
  S.t_hb = t;
  printf("hb t=%.6f held=%llu n=%zu allocs=%llu frees=%llu ooms=%llu kernels=%llu steps=%llu paused=%d\n",
         t, S.held, S.live.size(), S.allocs, S.frees, S.ooms, S.kernels, S.steps, paused ? 1 : 0);
  fflush(stdout);
}

static void free_at(size_t i) {
  Block b = S.live[i];
  S.live[i] = S.live.back();
  S.live.pop_back();
  MUST(cudaFree(b.p));
  S.held -= b.bytes;
  S.frees++;
}

// The pause file's number, or -1 when there is none.
static long pause_seq(const Opts& o) {
  if (o.pause_file.empty()) return -1;
  FILE* f = fopen(o.pause_file.c_str(), "r");
  if (!f) return -1;
  long seq = 0;
  if (fscanf(f, "%ld", &seq) != 1) seq = 0;
  fclose(f);
  return seq;
}

// Called between steps: while the pause file exists, stay quiet (nothing allocated, freed or
// launched) and say so once per number written into it.
static void maybe_pause(const Opts& o, double hb_s) {
  long seq = pause_seq(o);
  if (seq < 0) return;
  long said = -1;
  while (seq >= 0 && !g_stop) {
    if (seq != said) {
      MUST(cudaDeviceSynchronize());
      printf("quiet seq=%ld held=%llu n=%zu t=%.6f\n", seq, S.held, S.live.size(), mono_s());
      fflush(stdout);
      said = seq;
    }
    if (mono_s() - S.t_hb >= hb_s) heartbeat(true);
    usleep(10000);
    seq = pause_seq(o);
  }
}

int main(int argc, char** argv) {
  Opts o;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (i + 1 >= argc) usage();
    const char* v = argv[++i];
    if (a == "--seed") o.seed = strtoull(v, nullptr, 10);
    else if (a == "--min-mib") o.min_mib = atof(v);
    else if (a == "--max-mib") o.max_mib = atof(v);
    else if (a == "--hold-mib") o.hold_mib = atof(v);
    else if (a == "--burst-min") o.burst_min = atoi(v);
    else if (a == "--burst-max") o.burst_max = atoi(v);
    else if (a == "--iters-min") o.iters_min = atoi(v);
    else if (a == "--iters-max") o.iters_max = atoi(v);
    else if (a == "--sleep-max-us") o.sleep_max_us = atol(v);
    else if (a == "--streams") o.streams = atoi(v);
    else if (a == "--pause-file") o.pause_file = v;
    else if (a == "--hb-ms") o.hb_ms = atof(v);
    else if (a == "--max-s") o.max_s = atof(v);
    else usage();
  }
  if (!(o.min_mib > 0) || o.max_mib < o.min_mib || o.burst_min < 0 || o.burst_max < o.burst_min ||
      o.iters_min < 1 || o.iters_max < o.iters_min || o.streams < 1 || o.streams > 16 ||
      o.sleep_max_us < 0 || !(o.hb_ms > 0) || !(o.max_s > 0))
    usage();

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  int shim = gpuslice_preloaded();
  cudaError_t e = cudaFree(0);
  if (e != cudaSuccess) {
    printf("error where=init code=%d name=%s\n", (int)e, cudaGetErrorName(e));
    fflush(stdout);
    return 3;
  }
  int dev = 0, sms = 0;
  MUST(cudaGetDevice(&dev));
  MUST(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  S.grid = sms * 4;
  for (int i = 0; i < o.streams; i++) {
    cudaStream_t s;
    MUST(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    S.streams.push_back(s);
  }
  // The kernel's output: a small allocation of its own, counted like every other.
  MUST(cudaMalloc(&S.out, 257 * sizeof(float)));
  S.live.push_back({S.out, 257 * sizeof(float)});
  S.held += 257 * sizeof(float);
  S.allocs++;
  size_t free_b = 0, total_b = 0;
  MUST(cudaMemGetInfo(&free_b, &total_b));
  printf("ready pid=%d preloaded_gpuslice=%d total_mib=%.0f free_mib=%.0f sms=%d grid=%d\n",
         (int)getpid(), shim, total_b / 1048576.0, free_b / 1048576.0, sms, S.grid);
  fflush(stdout);

  std::mt19937_64 rng(o.seed);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  const double t_start = mono_s(), hb_s = o.hb_ms / 1000.0;
  const size_t unit = 64 << 10;
  heartbeat(false);

  while (!g_stop) {
    if (mono_s() - t_start > o.max_s) {
      printf("watchdog t=%.6f\n", mono_s());
      fflush(stdout);
      return 3;
    }
    maybe_pause(o, hb_s);
    if (g_stop) break;
    S.steps++;

    // Memory: allocate, free, or neither. The kernels' own output block (index 0 at first) may
    // be freed too: `out` is re-pointed at another live block or allocated again below.
    double r = u01(rng);
    if (r < 0.01 && S.live.size() > 1) {
      while (!S.live.empty()) free_at(S.live.size() - 1);
      S.out = nullptr;
    } else if (r < 0.50) {
      double mib = std::exp(std::log(o.min_mib) + u01(rng) * (std::log(o.max_mib) - std::log(o.min_mib)));
      size_t bytes = ((size_t)(mib * 1048576.0) + unit - 1) / unit * unit;
      if ((double)(S.held + bytes) > o.hold_mib * 1048576.0 && !S.live.empty()) {
        free_at((size_t)(u01(rng) * S.live.size()) % S.live.size());
      } else {
        void* p = nullptr;
        cudaError_t a = cudaMalloc(&p, bytes);
        if (a == cudaSuccess) {
          S.live.push_back({p, bytes});
          S.held += bytes;
          S.allocs++;
          MUST(cudaMemsetAsync(p, (int)(S.steps & 0xff), bytes, S.streams[0]));
        } else if (a == cudaErrorMemoryAllocation) {
          (void)cudaGetLastError();  // not sticky; clear it for the next call's sake
          S.ooms++;
          if (!S.live.empty()) free_at((size_t)(u01(rng) * S.live.size()) % S.live.size());
        } else {
          die("cudaMalloc", a);
        }
      }
    } else if (r < 0.85 && !S.live.empty()) {
      free_at((size_t)(u01(rng) * S.live.size()) % S.live.size());
    }
    // `out` must point into a live block of at least 257 floats.
    bool out_live = false;
    for (const Block& b : S.live)
      if (b.p == (void*)S.out && b.bytes >= 257 * sizeof(float)) out_live = true;
    if (!out_live) {
      S.out = nullptr;
      for (const Block& b : S.live)
        if (b.bytes >= 257 * sizeof(float)) { S.out = (float*)b.p; break; }
      if (!S.out) {
        void* p = nullptr;
        cudaError_t a = cudaMalloc(&p, 257 * sizeof(float));
        if (a == cudaErrorMemoryAllocation) {  // at the quota with nothing to free: skip kernels
          (void)cudaGetLastError();
          S.ooms++;
        } else if (a != cudaSuccess) {
          die("cudaMalloc(out)", a);
        } else {
          S.live.push_back({p, 257 * sizeof(float)});
          S.held += 257 * sizeof(float);
          S.allocs++;
          S.out = (float*)p;
        }
      }
    }

    // A burst of kernels, round robin over the streams, then synchronized.
    if (S.out) {
      int k = o.burst_min + (int)(u01(rng) * (o.burst_max - o.burst_min + 1));
      if (k > o.burst_max) k = o.burst_max;
      for (int i = 0; i < k; i++) {
        cudaStream_t s = S.streams[i % S.streams.size()];
        if (i == 0 && S.live.size() > 1) {  // touch a random live block (up to 16 MiB of it)
          const Block& b = S.live[(size_t)(u01(rng) * S.live.size()) % S.live.size()];
          size_t words = std::min(b.bytes, (size_t)16 << 20) / sizeof(unsigned);
          unsigned val = (unsigned)S.steps;
          void* pb = b.p;
          void* args[] = {(void*)&pb, (void*)&words, (void*)&val};
          MUST(cudaLaunchKernel((const void*)store_kernel, dim3(S.grid), dim3(S.block), args, 0, s));
        } else {
          int iters = o.iters_min + (int)(u01(rng) * (o.iters_max - o.iters_min + 1));
          if (iters > o.iters_max) iters = o.iters_max;
          float b = 0.9999f, c = 1e-4f;
          void* args[] = {(void*)&S.out, (void*)&iters, (void*)&b, (void*)&c};
          MUST(cudaLaunchKernel((const void*)fma_kernel, dim3(S.grid), dim3(S.block), args, 0, s));
        }
        S.kernels++;
      }
    }
    for (cudaStream_t s : S.streams) MUST(cudaStreamSynchronize(s));  // kernels and memsets
    if (o.sleep_max_us > 0) usleep((useconds_t)(u01(rng) * (double)o.sleep_max_us));
    if (mono_s() - S.t_hb >= hb_s) heartbeat(false);
  }

  MUST(cudaDeviceSynchronize());
  while (!S.live.empty()) free_at(S.live.size() - 1);
  printf("bye held=%llu allocs=%llu frees=%llu ooms=%llu kernels=%llu\n", S.held, S.allocs,
         S.frees, S.ooms, S.kernels);
  fflush(stdout);
  return 0;
}
