// sharebench: throughput-bound kernels that fill every SM, for measuring SM-time shares.
//
//   sharebench calibrate US [--reps R] [--n N]
//       Find `iters` such that one kernel takes about US microseconds: each measurement is a
//       back-to-back run of N kernels (default 200) timed with events, total/N; the median of
//       R runs (default 5) counts. Prints iters=, kernel_us= (the final measurement).
//   sharebench run --iters N --seconds S [--graph K] [--streams M] [--report-ms P]
//                  [--warmup-s W] [--go-file PATH] [--go-timeout-s T]
//       Launch kernels back to back, round robin over M streams (default 1), for S seconds of
//       wall time after a W-second warm-up (default 0.3; the queue is drained after it).
//       Synchronizes only at the end, except for a throttle that keeps at most ~64 kernels
//       queued per stream: an event is recorded on a stream after every 16 of its kernels and
//       the host waits for the one 4 back. With --graph K, K launches are captured once into a
//       CUDA graph (one graph exec per stream) and the graph is launched instead; each graph
//       launch counts K kernels. Prints kernels= (timed phase), seconds= (first timed launch
//       to the end of the final synchronize), rate= (kernels/s), kernel_us= (seconds*1e6 /
//       kernels). With --report-ms P, every P ms also a line `t=<s> kernels=<n> mono=<s>`:
//       kernels known COMPLETE (their event has been reached) at host time t (seconds since
//       the first timed launch; mono = CLOCK_MONOTONIC, comparable between processes), so a
//       share over any window can be computed from the differences.
//       --go-file: after the context exists print ready=1, then wait until PATH exists
//       before the warm-up (lets two processes start their timed phases together).
//   sharebench threads --iters N --seconds S --threads T [--go-file PATH]
//       T host threads, each on a stream of its own, launching back to back for S seconds
//       (after 0.3 s of warm-up); prints kernels=, seconds=, rate= and host_ns_per_launch=
//       (time inside the launch calls per launch, all threads) and cpu_ns_per_launch= (CPU
//       time of the launching threads in the timed phase per launch).
//
// The kernel: grid = SMs x (resident blocks per SM at 256 threads), i.e. one full wave; each
// thread runs `iters` iterations of 4 dependent FMA chains and the result is stored to global
// memory (thread 0 always, every other thread under a condition that is never true but that
// the compiler cannot decide), so nothing can be optimised away.
//
// Output: key=value lines. Exit status: 0 ok, 2 usage, 3 the first CUDA call failed,
// 4 a CUDA error later, 5 the go file never appeared.
#include <cuda_runtime.h>
#include <link.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "gpucommon.cuh"


// CPU time of the calling thread, seconds.
static double thread_cpu_s() {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage() {
  fprintf(stderr,
          "usage: sharebench calibrate US [--reps R] [--n N]\n"
          "       sharebench run --iters N --seconds S [--graph K] [--streams M] [--report-ms P]\n"
          "                      [--warmup-s W] [--go-file PATH] [--go-timeout-s T]\n");
  exit(2);
}

// ------------------------------------------------------------------ device setup

static FmaDevice D;

static void setup_device() {
  // SHAREBENCH_BLOCKING_SYNC=1: the program's own waits sleep instead of spinning (issue 14:
  // separates the program's spinning from the shim's in the CPU seconds per process). Set
  // before fma_setup makes the context.
  const char* blocking = getenv("SHAREBENCH_BLOCKING_SYNC");
  if (blocking && strcmp(blocking, "1") == 0) CHECK(cudaSetDeviceFlags(cudaDeviceScheduleBlockingSync));
  printf("blocking_sync=%d\n", blocking && strcmp(blocking, "1") == 0);
  static const char* const env[] = {"GPUSLICE_SM_SHARE", "CUDA_DEVICE_SM_LIMIT", nullptr};
  fma_setup(D, env);
}

static inline cudaError_t launch(cudaStream_t s, int iters) { return fma_launch(D, s, iters); }

// ------------------------------------------------------------------ calibrate

// Median over `reps` of (event time of `n` back-to-back kernels) / n, in microseconds.
static double measure_us(cudaStream_t s, int iters, int n, int reps, cudaEvent_t e0,
                         cudaEvent_t e1) {
  std::vector<double> v;
  for (int r = 0; r < reps; r++) {
    CHECK(cudaEventRecord(e0, s));
    for (int i = 0; i < n; i++) CHECK(launch(s, iters));
    CHECK(cudaEventRecord(e1, s));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    v.push_back(1000.0 * ms / n);
  }
  return median(v);
}

static int cmd_calibrate(int argc, char** argv) {
  if (argc < 3) usage();
  double target = atof(argv[2]);
  int reps = 5, n = 200;
  for (int i = 3; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--reps" && i + 1 < argc) reps = atoi(argv[++i]);
    else if (a == "--n" && i + 1 < argc) n = atoi(argv[++i]);
    else usage();
  }
  if (!(target > 0) || reps < 1 || n < 200) {
    fprintf(stderr, "calibrate: US > 0, reps >= 1, n >= 200\n");
    return 2;
  }
  setup_device();
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  // Warm-up: module load, clocks up.
  double t_warm = mono_s() + 0.3;
  while (mono_s() < t_warm) {
    for (int i = 0; i < 50; i++) CHECK(launch(s, 2000));
    CHECK(cudaStreamSynchronize(s));
  }
  // Two points for a line t = a + b*iters, then secant steps on the newest two points.
  long i1 = 512, i2 = 4096;
  double t1 = measure_us(s, (int)i1, n, reps, e0, e1);
  double t2 = measure_us(s, (int)i2, n, reps, e0, e1);
  printf("calib_point iters=%ld kernel_us=%.3f\ncalib_point iters=%ld kernel_us=%.3f\n", i1, t1,
         i2, t2);
  long best = i2;
  double best_t = t2;
  for (int step = 0; step < 6; step++) {
    long next = secant_next_iters(i1, t1, i2, t2, target);
    if (next == i2) break;
    double tn = measure_us(s, (int)next, n, reps, e0, e1);
    printf("calib_point iters=%ld kernel_us=%.3f\n", next, tn);
    i1 = i2;
    t1 = t2;
    i2 = next;
    t2 = tn;
    if (std::fabs(tn - target) < std::fabs(best_t - target)) {
      best = next;
      best_t = tn;
    }
    if (std::fabs(tn - target) <= 0.005 * target) break;
  }
  // The figure printed is a fresh measurement of the chosen iters.
  best_t = measure_us(s, (int)best, n, reps, e0, e1);
  printf("target_us=%.3f\niters=%ld kernel_us=%.3f\n", target, best, best_t);
  printf("done=1\n");
  fflush(stdout);
  return 0;
}

// ------------------------------------------------------------------ run

struct StreamState {
  cudaStream_t s = nullptr;
  cudaGraphExec_t exec = nullptr;
  static const int kRing = 8;
  cudaEvent_t ring[kRing];
  long long mark_at[kRing];  // this stream's kernel count when the mark was recorded
  long long nmarks = 0;      // marks recorded so far
  long long confirmed = -1;  // newest mark known to be complete
  long long launched = 0;    // kernels launched on this stream
  long long since_mark = 0;  // kernels since the last mark
  long long done = 0;        // kernels known complete
};

static const long long kMarkEvery = 16;
static const int kWaitBack = 4;

static void confirm(StreamState& st, long long seq) {
  if (seq > st.confirmed) {
    st.confirmed = seq;
    st.done = st.mark_at[seq % StreamState::kRing];
  }
}

// Marks older than kWaitBack have been waited for; query the newer ones in order.
static void poll_done(StreamState& st) {
  long long from = std::max(st.confirmed + 1, st.nmarks - kWaitBack);
  for (long long q = from; q < st.nmarks; q++) {
    cudaError_t e = cudaEventQuery(st.ring[q % StreamState::kRing]);
    if (e == cudaErrorNotReady) {
      (void)cudaGetLastError();  // cudaEventQuery leaves no sticky error, but be sure
      break;
    }
    CHECK(e);
    confirm(st, q);
  }
}

// One launch unit (a kernel, or a graph of k kernels) on stream st, then the throttle.
static void launch_unit(StreamState& st, int iters, int k) {
  if (st.exec)
    CHECK(cudaGraphLaunch(st.exec, st.s));
  else
    CHECK(launch(st.s, iters));
  st.launched += k;
  st.since_mark += k;
  if (st.since_mark >= kMarkEvery) {
    st.since_mark = 0;
    long long seq = st.nmarks++;
    int slot = (int)(seq % StreamState::kRing);
    st.mark_at[slot] = st.launched;
    CHECK(cudaEventRecord(st.ring[slot], st.s));
    long long back = seq - kWaitBack;
    if (back >= 0 && back > st.confirmed) {
      CHECK(cudaEventSynchronize(st.ring[back % StreamState::kRing]));
      confirm(st, back);
    }
  }
}

// CPU seconds (user + system) of the whole process so far: tenants.py splits the figure it
// judges into the start (driver and context, waiting for the go file), the warm-up and the
// timed phase (issue 14: which of them grows with the processes sharing the device).
static double process_cpu_s() {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static int cmd_run(int argc, char** argv) {
  long iters = -1;
  double seconds = -1, warmup = 0.3, go_timeout = 60;
  int graph = 0, nstreams = 1, report_ms = 0;
  const char* go_file = nullptr;
  for (int i = 2; i < argc; i++) {
    std::string a = argv[i];
    bool more = i + 1 < argc;
    if (a == "--iters" && more) iters = atol(argv[++i]);
    else if (a == "--seconds" && more) seconds = atof(argv[++i]);
    else if (a == "--graph" && more) graph = atoi(argv[++i]);
    else if (a == "--streams" && more) nstreams = atoi(argv[++i]);
    else if (a == "--report-ms" && more) report_ms = atoi(argv[++i]);
    else if (a == "--warmup-s" && more) warmup = atof(argv[++i]);
    else if (a == "--go-file" && more) go_file = argv[++i];
    else if (a == "--go-timeout-s" && more) go_timeout = atof(argv[++i]);
    else usage();
  }
  if (iters < 1 || iters > 2000000000L || !(seconds > 0) || graph < 0 || nstreams < 1 ||
      nstreams > 64 || report_ms < 0 || warmup < 0) {
    fprintf(stderr, "run: need --iters >= 1 and --seconds > 0; --streams 1..64\n");
    return 2;
  }
  setup_device();
  const int k = graph > 0 ? graph : 1;
  std::vector<StreamState> st(nstreams);
  for (auto& x : st) {
    CHECK(cudaStreamCreateWithFlags(&x.s, cudaStreamNonBlocking));
    for (int r = 0; r < StreamState::kRing; r++)
      CHECK(cudaEventCreateWithFlags(&x.ring[r], cudaEventDisableTiming));
  }
  cudaGraph_t g = nullptr;
  if (graph > 0) {
    CHECK(cudaStreamBeginCapture(st[0].s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < graph; i++) CHECK(launch(st[0].s, (int)iters));
    CHECK(cudaStreamEndCapture(st[0].s, &g));
    size_t nodes = 0;
    CHECK(cudaGraphGetNodes(g, nullptr, &nodes));
    for (auto& x : st) CHECK(cudaGraphInstantiate(&x.exec, g, 0));
    printf("graph_nodes=%zu\n", nodes);
  }
  printf("iters=%ld\nstreams=%d\ngraph=%d\nseconds_target=%.3f\nwarmup_s=%.3f\nreport_ms=%d\n",
         iters, nstreams, graph, seconds, warmup, report_ms);
  fflush(stdout);

  if (go_file && !wait_go_file(go_file, go_timeout)) return 5;
  const double cpu_go = process_cpu_s();

  // Warm-up (also fills a token bucket's history under the shim), then drain the queue.
  long long unit = 0;
  double w0 = mono_s();
  double w_end = w0 + warmup;
  while (mono_s() < w_end) {
    launch_unit(st[unit % nstreams], (int)iters, k);
    unit++;
  }
  CHECK(cudaDeviceSynchronize());
  long long warm_kernels = 0;
  for (auto& x : st) {
    warm_kernels += x.launched;
    x.launched = x.since_mark = x.done = 0;
    x.nmarks = 0;
    x.confirmed = -1;
  }
  printf("warmup_kernels=%lld\nwarmup_seconds=%.4f\n", warm_kernels, mono_s() - w0);
  fflush(stdout);

  // Timed phase.
  const double cpu_t0 = process_cpu_s();
  unit = 0;
  const double t0 = mono_s();
  const double t_end = t0 + seconds;
  double next_report = report_ms > 0 ? t0 + report_ms * 1e-3 : 1e300;
  double now = t0, t_last_launch = t0;
  while (now < t_end) {
    launch_unit(st[unit % nstreams], (int)iters, k);
    unit++;
    now = mono_s();
    t_last_launch = now;
    if (now >= next_report) {
      long long done = 0;
      for (auto& x : st) {
        poll_done(x);
        done += x.done;
      }
      double t = mono_s();
      printf("t=%.4f kernels=%lld mono=%.6f\n", t - t0, done, t);
      next_report += report_ms * 1e-3;
      if (next_report < t) next_report = t + report_ms * 1e-3;
    }
  }
  CHECK(cudaDeviceSynchronize());
  const double t1 = mono_s();
  const double cpu_t1 = process_cpu_s();
  printf("cpu_s_before_go=%.4f\ncpu_s_warmup=%.4f\ncpu_s_timed=%.4f\n", cpu_go, cpu_t0 - cpu_go,
         cpu_t1 - cpu_t0);
  long long kernels = 0;
  for (auto& x : st) kernels += x.launched;
  const double secs = t1 - t0;
  if (report_ms > 0) printf("t=%.4f kernels=%lld mono=%.6f\n", secs, kernels, t1);
  printf("launch_units=%lld\ndrain_s=%.4f\nmono_start=%.6f\nmono_end=%.6f\n", unit,
         t1 - t_last_launch, t0, t1);
  printf("kernels=%lld\nseconds=%.6f\nrate=%.3f\nkernel_us=%.4f\n", kernels, secs,
         kernels / secs, kernels > 0 ? secs * 1e6 / (double)kernels : 0.0);
  float sink = 0.f;
  CHECK(cudaMemcpy(&sink, D.out, sizeof(float), cudaMemcpyDeviceToHost));
  printf("result=%.6f\ndone=1\n", sink);
  fflush(stdout);
  for (auto& x : st)
    if (x.exec) cudaGraphExecDestroy(x.exec);
  if (g) cudaGraphDestroy(g);
  return 0;
}

// ------------------------------------------------------------------ threads

// `threads`: T host threads, each launching back to back on a stream of its own (with the same
// queue throttle as `run`) for S seconds after a 0.3 s warm-up; all start together. Prints
// kernels=, seconds=, rate= (as `run`) and host_ns_per_launch= (wall time spent inside the
// launch calls, over all threads, per launch: what the throttle costs the launching threads).
static int cmd_threads(int argc, char** argv) {
  long iters = -1;
  double seconds = -1;
  int nthreads = 1;
  const char* go_file = nullptr;
  for (int i = 2; i < argc; i++) {
    std::string a = argv[i];
    bool more = i + 1 < argc;
    if (a == "--iters" && more) iters = atol(argv[++i]);
    else if (a == "--seconds" && more) seconds = atof(argv[++i]);
    else if (a == "--threads" && more) nthreads = atoi(argv[++i]);
    else if (a == "--go-file" && more) go_file = argv[++i];
    else usage();
  }
  if (iters < 1 || !(seconds > 0) || nthreads < 1 || nthreads > 64) {
    fprintf(stderr, "threads: need --iters >= 1, --seconds > 0, --threads 1..64\n");
    return 2;
  }
  setup_device();
  std::vector<StreamState> st(nthreads);
  for (auto& x : st) {
    CHECK(cudaStreamCreateWithFlags(&x.s, cudaStreamNonBlocking));
    for (int r = 0; r < StreamState::kRing; r++)
      CHECK(cudaEventCreateWithFlags(&x.ring[r], cudaEventDisableTiming));
  }
  if (go_file) {
    printf("ready=1\n");
    fflush(stdout);
    // 1 ms between looks: the start skew stays ~1 ms, and 32 processes waiting seconds for the
    // slowest context (6.3 s before T32 on the H100) do not spend CPU on 5000 wake-ups a second.
    while (access(go_file, F_OK) != 0) usleep(1000);
  }
  std::atomic<int> phase{0};  // 0 warm-up, 1 timed, 2 stop
  std::vector<double> in_launch(nthreads, 0.0);
  std::vector<long long> timed(nthreads, 0);
  std::vector<double> cpu(nthreads, 0.0);
  std::vector<std::thread> th;
  for (int t = 0; t < nthreads; t++) {
    th.emplace_back([&, t] {
      StreamState& x = st[t];
      while (phase.load() == 0) launch_unit(x, (int)iters, 1);
      long long before = x.launched;
      double spent = 0.0, cpu0 = thread_cpu_s();
      while (phase.load() == 1) {
        double a = mono_s();
        launch_unit(x, (int)iters, 1);
        spent += mono_s() - a;
      }
      timed[t] = x.launched - before;
      in_launch[t] = spent;
      cpu[t] = thread_cpu_s() - cpu0;
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double t0 = mono_s();
  phase.store(1);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  phase.store(2);
  const double t_stop = mono_s();
  for (auto& x : th) x.join();
  CHECK(cudaDeviceSynchronize());
  const double t1 = mono_s();
  long long kernels = 0;
  double spent = 0.0, cpu_s = 0.0;
  for (int t = 0; t < nthreads; t++) {
    kernels += timed[t];
    spent += in_launch[t];
    cpu_s += cpu[t];
  }
  // The kernels launched before the stop ran by t1; the share counts the time they took.
  const double secs = t1 - t0;
  printf("threads=%d\nkernels=%lld\nseconds=%.6f\nrate=%.3f\nlaunch_seconds=%.6f\n", nthreads,
         kernels, secs, kernels / secs, t_stop - t0);
  printf("host_ns_per_launch=%.1f\ncpu_ns_per_launch=%.1f\ndone=1\n",
         kernels > 0 ? spent * 1e9 / (double)kernels : 0.0,
         kernels > 0 ? cpu_s * 1e9 / (double)kernels : 0.0);
  fflush(stdout);
  return 0;
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 2) usage();
  std::string cmd = argv[1];
  if (cmd == "calibrate") return cmd_calibrate(argc, argv);
  if (cmd == "run") return cmd_run(argc, argv);
  if (cmd == "threads") return cmd_threads(argc, argv);
  usage();
  return 2;
}
