// latprobe: a periodic latency probe, for measuring what a neighbour costs a latency-bound
// process (priority classes, time-slicing, MPS).
//
//   latprobe calibrate --request-us US [--kernels K] [--reps R]
//       Find `iters` such that one request (K kernels back to back on one stream, then
//       cudaStreamSynchronize; default K = 10) takes about US microseconds of wall time alone:
//       each measurement is the median wall time of R requests (default 30) run back to back;
//       secant steps on iters to within 1%. Prints iters=, request_ms=, dev_ms= (the request's
//       device time from events), kernel_us= (dev_ms * 1000 / K).
//   latprobe run --iters N --seconds S [--kernels K] [--period-ms P] [--warmup-s W]
//                [--go-file PATH] [--go-timeout-s T] [--dump PATH] [--spin-ms X]
//       One request every P ms (default 10) for S seconds after a W-second warm-up of the same
//       pattern (default 0.5; not recorded). Request i is due at t0 + i*P: the host sleeps until
//       then (clock_nanosleep to X ms before, default 1, then spins), launches, synchronizes. Its
//       latency is measured from the time it was DUE to its completion, so a request that
//       waits behind a late predecessor, or behind a neighbour's work, shows the whole wait.
//       Prints requests=, p50_ms=, p90_ms=, p99_ms=, max_ms=, mean_ms=, min_ms= (nearest-rank
//       percentiles), busy_frac= (sum of the requests' device time from events / wall time of
//       the timed phase), busy_frac_wall= (sum of latencies / wall), dev_p50_ms=,
//       late_releases= (requests launched more than 0.1 ms after they were due: the previous
//       one was still running, or the host woke late), wake_late_max_ms= (host wake-up delay,
//       counting only requests whose predecessor had finished), worst= (the 5 slowest,
//       t_s:lat_ms), mono_start=/mono_end= (CLOCK_MONOTONIC of the timed phase, comparable
//       with sharebench's report lines). --dump writes one line per request:
//       `t_due_s lat_ms dev_ms release_late_ms`.
//       --go-file: after the context exists (and a few requests have loaded the module) print
//       ready=1, then wait until PATH exists before the warm-up.
//
// The kernel is sharebench's: grid = SMs x resident blocks per SM (256 threads), one full
// wave, `iters` iterations of 4 dependent FMA chains per thread, result stored.
//
// Output: key=value lines. Exit status: 0 ok, 2 usage, 3 the first CUDA call failed,
// 4 a CUDA error later, 5 the go file never appeared.
#include <cuda_runtime.h>
#include <link.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gpucommon.cuh"


// Sleep until CLOCK_MONOTONIC time t: clock_nanosleep to `spin` seconds before, then spin, so
// the wake-up is late by microseconds, not by the scheduler's slack (which reached 0.3 ms).
static double g_spin = 1e-3;
static void sleep_until(double t) {
  const double spin = g_spin;
  for (;;) {
    double left = t - mono_s();
    if (left <= 0) return;
    if (left <= spin) continue;
    double wake = t - spin;
    struct timespec ts;
    ts.tv_sec = (time_t)wake;
    long ns = (long)((wake - (double)ts.tv_sec) * 1e9);
    ts.tv_nsec = ns < 0 ? 0 : (ns > 999999999L ? 999999999L : ns);
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr);
  }
}

static void usage() {
  fprintf(stderr,
          "usage: latprobe calibrate --request-us US [--kernels K] [--reps R]\n"
          "       latprobe run --iters N --seconds S [--kernels K] [--period-ms P] [--warmup-s W]\n"
          "                    [--go-file PATH] [--go-timeout-s T] [--dump PATH] [--spin-ms X]\n");
  exit(2);
}

// ------------------------------------------------------------------ device setup

// The benchmark kernel's device, and the probe's stream and request events.
struct Dev : FmaDevice {
  cudaStream_t s = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
};
static Dev D;

static void setup_device() {
  static const char* const env[] = {"GPUSLICE_PRIORITY", "GPUSLICE_PRIORITY_QUEUE",
                                    "CUDA_MPS_PIPE_DIRECTORY",
                                    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", nullptr};
  fma_setup(D, env);
  CHECK(cudaStreamCreateWithFlags(&D.s, cudaStreamNonBlocking));
  CHECK(cudaEventCreate(&D.e0));
  CHECK(cudaEventCreate(&D.e1));
  CHECK(cudaDeviceSynchronize());
}

static inline cudaError_t launch(int iters) { return fma_launch(D, D.s, iters); }

// One request: an event, `kernels` kernels, an event, synchronize the stream. Returns the
// device time between the two events in ms.
static double request(int iters, int kernels) {
  CHECK(cudaEventRecord(D.e0, D.s));
  for (int k = 0; k < kernels; k++) CHECK(launch(iters));
  CHECK(cudaEventRecord(D.e1, D.s));
  CHECK(cudaStreamSynchronize(D.s));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, D.e0, D.e1));
  return (double)ms;
}

// ------------------------------------------------------------------ calibrate

// Median wall ms (and median device ms) of `reps` requests back to back.
static double measure_ms(int iters, int kernels, int reps, double* dev_ms) {
  std::vector<double> wall, dev;
  for (int r = 0; r < reps; r++) {
    double t = mono_s();
    double d = request(iters, kernels);
    wall.push_back(1000.0 * (mono_s() - t));
    dev.push_back(d);
  }
  if (dev_ms) *dev_ms = median(dev);
  return median(wall);
}

static int cmd_calibrate(int argc, char** argv) {
  double target_us = -1;
  int kernels = 10, reps = 30;
  for (int i = 2; i < argc; i++) {
    std::string a = argv[i];
    bool more = i + 1 < argc;
    if (a == "--request-us" && more) target_us = atof(argv[++i]);
    else if (a == "--kernels" && more) kernels = atoi(argv[++i]);
    else if (a == "--reps" && more) reps = atoi(argv[++i]);
    else usage();
  }
  if (!(target_us > 0) || kernels < 1 || kernels > 10000 || reps < 3) {
    fprintf(stderr, "calibrate: --request-us > 0, --kernels 1..10000, --reps >= 3\n");
    return 2;
  }
  setup_device();
  const double target = target_us / 1000.0;  // ms
  // Warm-up: module load, clocks up.
  double t_warm = mono_s() + 0.3;
  while (mono_s() < t_warm) request(2000, kernels);
  long i1 = 512, i2 = 4096;
  double d1 = 0, d2 = 0;
  double t1 = measure_ms((int)i1, kernels, reps, &d1);
  double t2 = measure_ms((int)i2, kernels, reps, &d2);
  printf("calib_point iters=%ld request_ms=%.4f dev_ms=%.4f\n", i1, t1, d1);
  printf("calib_point iters=%ld request_ms=%.4f dev_ms=%.4f\n", i2, t2, d2);
  long best = i2;
  double best_t = t2;
  for (int step = 0; step < 8; step++) {
    long next = secant_next_iters(i1, t1, i2, t2, target);
    if (next == i2) break;
    double dn = 0;
    double tn = measure_ms((int)next, kernels, reps, &dn);
    printf("calib_point iters=%ld request_ms=%.4f dev_ms=%.4f\n", next, tn, dn);
    i1 = i2;
    t1 = t2;
    i2 = next;
    t2 = tn;
    if (std::fabs(tn - target) < std::fabs(best_t - target)) {
      best = next;
      best_t = tn;
    }
    if (std::fabs(tn - target) <= 0.01 * target) break;
  }
  // The figures printed are a fresh measurement of the chosen iters.
  double dev = 0;
  best_t = measure_ms((int)best, kernels, reps, &dev);
  printf("target_ms=%.4f\nkernels=%d\niters=%ld\nrequest_ms=%.4f\ndev_ms=%.4f\nkernel_us=%.2f\n",
         target, kernels, best, best_t, dev, 1000.0 * dev / kernels);
  printf("done=1\n");
  fflush(stdout);
  return 0;
}

// ------------------------------------------------------------------ run

struct Req {
  double due;       // CLOCK_MONOTONIC when it was due
  double lat_ms;    // due -> completion
  double dev_ms;    // events around its kernels
  double late_ms;   // launched this long after it was due
};

// Requests due every `period` s from `t0` while due < t_stop; appended to `out` when given.
// Returns the completion time of the last request.
static double periodic(int iters, int kernels, double t0, double period, double t_stop,
                       std::vector<Req>* out, double* wake_late_max) {
  double last_done = t0;
  for (long i = 0;; i++) {
    double due = t0 + (double)i * period;
    if (due >= t_stop) break;
    bool prev_late = last_done > due;  // the previous request ran past this one's due time
    sleep_until(due);
    double rel = mono_s();
    double dev = request(iters, kernels);
    double done = mono_s();
    last_done = done;
    if (out) {
      Req r;
      r.due = due;
      r.lat_ms = 1000.0 * (done - due);
      r.dev_ms = dev;
      r.late_ms = 1000.0 * (rel - due);
      out->push_back(r);
      if (!prev_late && wake_late_max && r.late_ms > *wake_late_max) *wake_late_max = r.late_ms;
    }
  }
  return last_done;
}

// Nearest-rank percentile of sorted values.
static double pctl(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0.0;
  long n = (long)sorted.size();
  long k = (long)std::ceil(q * (double)n) - 1;
  if (k < 0) k = 0;
  if (k >= n) k = n - 1;
  return sorted[(size_t)k];
}

static int cmd_run(int argc, char** argv) {
  long iters = -1;
  double seconds = -1, period_ms = 10, warmup = 0.5, go_timeout = 60;
  int kernels = 10;
  const char* go_file = nullptr;
  const char* dump = nullptr;
  for (int i = 2; i < argc; i++) {
    std::string a = argv[i];
    bool more = i + 1 < argc;
    if (a == "--iters" && more) iters = atol(argv[++i]);
    else if (a == "--seconds" && more) seconds = atof(argv[++i]);
    else if (a == "--kernels" && more) kernels = atoi(argv[++i]);
    else if (a == "--period-ms" && more) period_ms = atof(argv[++i]);
    else if (a == "--warmup-s" && more) warmup = atof(argv[++i]);
    else if (a == "--go-file" && more) go_file = argv[++i];
    else if (a == "--go-timeout-s" && more) go_timeout = atof(argv[++i]);
    else if (a == "--dump" && more) dump = argv[++i];
    else if (a == "--spin-ms" && more) g_spin = atof(argv[++i]) * 1e-3;
    else usage();
  }
  if (iters < 1 || iters > 2000000000L || !(seconds > 0) || kernels < 1 || kernels > 10000 ||
      !(period_ms > 0) || warmup < 0 || g_spin < 0) {
    fprintf(stderr, "run: need --iters >= 1, --seconds > 0, --period-ms > 0, --kernels 1..10000\n");
    return 2;
  }
  setup_device();
  // Module load and first-launch costs, before anyone waits on us.
  for (int i = 0; i < 5; i++) request((int)iters, kernels);
  printf("iters=%ld\nkernels=%d\nperiod_ms=%.3f\nseconds_target=%.3f\nwarmup_s=%.3f\n"
         "spin_ms=%.3f\n", iters, kernels, period_ms, seconds, warmup, g_spin * 1e3);
  fflush(stdout);

  if (go_file && !wait_go_file(go_file, go_timeout)) return 5;

  const double period = period_ms * 1e-3;
  if (warmup > 0) {
    double w0 = mono_s();
    periodic((int)iters, kernels, w0, period, w0 + warmup, nullptr, nullptr);
  }

  std::vector<Req> reqs;
  reqs.reserve((size_t)(seconds / period) + 16);
  double wake_late_max = 0;
  // The first request is due half a period after the warm-up's last one finished.
  const double t0 = mono_s() + 0.5 * period;
  const double t_end = periodic((int)iters, kernels, t0, period, t0 + seconds, &reqs,
                                &wake_late_max);
  const double wall = t_end - t0;

  std::vector<double> lat, dev;
  double lat_sum = 0, dev_sum = 0;
  long late = 0;
  for (const Req& r : reqs) {
    lat.push_back(r.lat_ms);
    dev.push_back(r.dev_ms);
    lat_sum += r.lat_ms;
    dev_sum += r.dev_ms;
    if (r.late_ms > 0.1) late++;
  }
  std::vector<double> sorted = lat;
  std::sort(sorted.begin(), sorted.end());
  const size_t n = reqs.size();
  printf("mono_start=%.6f\nmono_end=%.6f\nseconds=%.6f\nrequests=%zu\n", t0, t_end, wall, n);
  printf("p50_ms=%.4f\np90_ms=%.4f\np99_ms=%.4f\nmax_ms=%.4f\nmin_ms=%.4f\nmean_ms=%.4f\n",
         pctl(sorted, 0.50), pctl(sorted, 0.90), pctl(sorted, 0.99),
         n ? sorted.back() : 0.0, n ? sorted.front() : 0.0, n ? lat_sum / (double)n : 0.0);
  printf("busy_frac=%.4f\nbusy_frac_wall=%.4f\ndev_p50_ms=%.4f\n",
         wall > 0 ? dev_sum / 1000.0 / wall : 0.0, wall > 0 ? lat_sum / 1000.0 / wall : 0.0,
         median(dev));
  printf("late_releases=%ld\nwake_late_max_ms=%.4f\n", late, wake_late_max);
  // The five slowest requests, with when they were due (seconds into the timed phase).
  std::vector<size_t> idx(n);
  for (size_t i = 0; i < n; i++) idx[i] = i;
  std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return lat[a] > lat[b]; });
  printf("worst=");
  for (size_t i = 0; i < n && i < 5; i++)
    printf("%s%.3f:%.3f", i ? "," : "", reqs[idx[i]].due - t0, lat[idx[i]]);
  printf("\n");
  if (dump) {
    FILE* f = fopen(dump, "w");
    if (f) {
      for (const Req& r : reqs)
        fprintf(f, "%.6f %.4f %.4f %.4f\n", r.due - t0, r.lat_ms, r.dev_ms, r.late_ms);
      fclose(f);
    } else {
      printf("dump_error=%s\n", strerror(errno));
    }
  }
  float sink = 0.f;
  CHECK(cudaMemcpy(&sink, D.out, sizeof(float), cudaMemcpyDeviceToHost));
  printf("result=%.6f\ndone=1\n", sink);
  fflush(stdout);
  return 0;
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 2) usage();
  std::string cmd = argv[1];
  if (cmd == "calibrate") return cmd_calibrate(argc, argv);
  if (cmd == "run") return cmd_run(argc, argv);
  usage();
  return 2;
}
