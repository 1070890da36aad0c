// The slicing proof on the GPU (issue 19): loads the original and the sliced PTX of suite.cu with
// cuModuleLoadData, runs each kernel once over its whole grid and again as the planner's slices
// (`ptx-slice plan`: one block per slice, 7 blocks, a row, a plane, everything), through
// kernelParams, through a packed `extra` buffer (CU_LAUNCH_PARAM_BUFFER_POINTER, offsets from
// ptx-slice's report) and through a captured CUDA graph, and compares every buffer bit for bit.
// Then times slicing's launch overhead. Prints `CHECK id PASS|FAIL detail` lines for ptxslice.sh.
//
//   run ORIGINAL.ptx SLICED.ptx REPORT.txt PTX_SLICE_BIN
//   run --jit FILE.ptx...     (only loads each module: the sliced forms of the other PTX files)
//
// Built by tests/gpu/ptxslice.sh: nvcc -O2 -arch=sm_90 run.cu -lcuda (driver API only).
#include <cuda.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#define CK(x)                                                                                \
  do {                                                                                       \
    CUresult r_ = (x);                                                                       \
    if (r_ != CUDA_SUCCESS) {                                                                \
      const char *s_ = nullptr;                                                              \
      cuGetErrorString(r_, &s_);                                                             \
      std::printf("CHECK setup FAIL %s = %d (%s) at line %d\n", #x, (int)r_, s_ ? s_ : "?", __LINE__); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

struct Dim { unsigned x, y, z; unsigned long long volume() const { return 1ull * x * y * z; } };
struct SliceParam { unsigned offset[3]; unsigned grid[3]; };
struct Slice { Dim offset, grid; };

// One kernel argument: a device buffer of `words` u32 (filled from `seed`, or zero), or a u32.
struct Arg { bool buffer; size_t words; unsigned seed; unsigned value; };
struct Case { const char *kernel; Dim grid, block; unsigned dynamic_shared; std::vector<Arg> args; };

static Arg buf(size_t words, unsigned seed = 0) { return Arg{true, words, seed, 0}; }
static Arg u32(unsigned v) { return Arg{false, 0, 0, v}; }

static std::vector<Case> cases() {
  return {
      {"fill_1d", {1000, 1, 1}, {128, 1, 1}, 0, {buf(128000), u32(127777)}},
      {"fill_2d", {37, 19, 1}, {8, 8, 1}, 0, {buf(37 * 19 * 64)}},
      {"fill_3d", {7, 5, 3}, {64, 1, 1}, 0, {buf(7 * 5 * 3 * 64)}},
      {"grid_stride", {50, 1, 1}, {128, 1, 1}, 0, {buf(1000000, 1), buf(1000000), u32(1000000)}},
      {"block_sum_static", {400, 1, 1}, {256, 1, 1}, 0, {buf(400 * 256, 2), buf(400), buf(1)}},
      {"reverse_dynamic", {300, 1, 1}, {128, 1, 1}, 512, {buf(300 * 128, 3), buf(300 * 128)}},
      {"histogram", {300, 1, 1}, {128, 1, 1}, 0, {buf(300 * 128, 4), buf(64), u32(300 * 128 - 5)}},
      {"uses_helper", {200, 1, 1}, {64, 1, 1}, 0, {buf(200 * 64)}},
      {"helper_reads_ctaid", {300, 1, 1}, {64, 1, 1}, 0, {buf(300 * 64)}},
      {"helper_chain", {40, 6, 1}, {32, 1, 1}, 0, {buf(40 * 6 * 32)}},
  };
}

static std::string read_file(const char *path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// "kernel NAME: sliced; params [...]; slice param at offset N (...)" -> NAME -> N
static std::map<std::string, unsigned> slice_offsets(const char *report) {
  std::map<std::string, unsigned> out;
  std::ifstream f(report);
  std::string line;
  while (std::getline(f, line)) {
    size_t colon = line.find(": sliced;"), at = line.find("slice param at offset ");
    if (line.rfind("kernel ", 0) == 0 && colon != std::string::npos && at != std::string::npos)
      out[line.substr(7, colon - 7)] = (unsigned)std::strtoul(line.c_str() + at + 22, nullptr, 10);
  }
  return out;
}

static std::vector<Slice> plan(const char *bin, Dim g, unsigned long long max_blocks) {
  char cmd[1024];
  std::snprintf(cmd, sizeof cmd, "'%s' plan %u %u %u %llu", bin, g.x, g.y, g.z, max_blocks);
  std::vector<Slice> out;
  FILE *p = popen(cmd, "r");
  if (!p) return out;
  Slice s;
  while (std::fscanf(p, "%u %u %u %u %u %u", &s.offset.x, &s.offset.y, &s.offset.z, &s.grid.x, &s.grid.y, &s.grid.z) == 6) out.push_back(s);
  pclose(p);
  return out;
}

struct Buffers {
  std::vector<CUdeviceptr> dev;
  std::vector<std::vector<unsigned>> init;
  explicit Buffers(const Case &c) {
    for (const Arg &a : c.args) {
      if (!a.buffer) continue;
      std::vector<unsigned> h(a.words);
      unsigned x = a.seed;
      for (auto &w : h) w = a.seed ? (x = x * 1664525u + 1013904223u) >> 8 : 0u;
      CUdeviceptr d;
      CK(cuMemAlloc(&d, a.words * 4));
      dev.push_back(d);
      init.push_back(h);
    }
    reset();
  }
  void reset() {
    for (size_t i = 0; i < dev.size(); i++) CK(cuMemcpyHtoD(dev[i], init[i].data(), init[i].size() * 4));
    CK(cuCtxSynchronize());  // a pageable copy may still be in flight when it returns, and the kernels run on a non-blocking stream
  }
  std::vector<std::vector<unsigned>> read() const {
    std::vector<std::vector<unsigned>> out;
    for (size_t i = 0; i < dev.size(); i++) {
      std::vector<unsigned> h(init[i].size());
      CK(cuMemcpyDtoH(h.data(), dev[i], h.size() * 4));
      out.push_back(h);
    }
    return out;
  }
  ~Buffers() {
    for (CUdeviceptr d : dev) cuMemFree(d);
  }
};

// kernelParams for the case's arguments, plus the slice parameter when `slice` is set.
struct Params {
  std::vector<CUdeviceptr> ptrs;
  std::vector<unsigned> values;
  std::vector<void *> list;
  SliceParam sp;
  Params(const Case &c, const Buffers &b, const Slice *slice) {
    ptrs.reserve(c.args.size());
    values.reserve(c.args.size());
    size_t bi = 0;
    for (const Arg &a : c.args) {
      if (a.buffer) { ptrs.push_back(b.dev[bi++]); list.push_back(&ptrs.back()); }
      else { values.push_back(a.value); list.push_back(&values.back()); }
    }
    if (slice) {
      sp = SliceParam{{slice->offset.x, slice->offset.y, slice->offset.z}, {c.grid.x, c.grid.y, c.grid.z}};
      list.push_back(&sp);
    }
  }
};

// The same arguments packed as the driver lays them out (each at its own alignment), with the
// slice parameter at the offset ptx-slice reported.
static std::vector<unsigned char> packed(const Case &c, const Buffers &b, const Slice &s, unsigned slice_offset) {
  std::vector<unsigned char> out(slice_offset + sizeof(SliceParam), 0);
  size_t at = 0, bi = 0;
  for (const Arg &a : c.args) {
    size_t size = a.buffer ? 8 : 4;
    at = (at + size - 1) / size * size;
    if (a.buffer) std::memcpy(&out[at], &b.dev[bi++], 8);
    else std::memcpy(&out[at], &a.value, 4);
    at += size;
  }
  SliceParam sp{{s.offset.x, s.offset.y, s.offset.z}, {c.grid.x, c.grid.y, c.grid.z}};
  std::memcpy(&out[slice_offset], &sp, sizeof sp);
  return out;
}

enum Route { KERNEL_PARAMS, EXTRA, GRAPH };

static void launch_slices(CUfunction f, const Case &c, const Buffers &b, const std::vector<Slice> &slices, Route route, unsigned slice_offset, CUstream stream) {
  CUgraph graph = nullptr;
  if (route == GRAPH) CK(cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_RELAXED));
  for (const Slice &s : slices) {
    if (route == EXTRA) {
      std::vector<unsigned char> bytes = packed(c, b, s, slice_offset);
      size_t size = bytes.size();
      void *extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, bytes.data(), CU_LAUNCH_PARAM_BUFFER_SIZE, &size, CU_LAUNCH_PARAM_END};
      CK(cuLaunchKernel(f, s.grid.x, s.grid.y, s.grid.z, c.block.x, c.block.y, c.block.z, c.dynamic_shared, stream, nullptr, extra));
    } else {
      Params p(c, b, &s);
      CK(cuLaunchKernel(f, s.grid.x, s.grid.y, s.grid.z, c.block.x, c.block.y, c.block.z, c.dynamic_shared, stream, p.list.data(), nullptr));
    }
  }
  if (route == GRAPH) {
    CUgraphExec exec;
    CK(cuStreamEndCapture(stream, &graph));
    CK(cuGraphInstantiateWithFlags(&exec, graph, 0));
    CK(cuGraphLaunch(exec, stream));
    CK(cuStreamSynchronize(stream));
    cuGraphExecDestroy(exec);
    cuGraphDestroy(graph);
  }
  CK(cuStreamSynchronize(stream));
}

// `run --jit FILE...`: each PTX file loads (the driver JIT-compiles it for this GPU).
static int jit_only(int argc, char **argv) {
  int failures = 0;
  for (int i = 2; i < argc; i++) {
    std::string text = read_file(argv[i]);
    CUmodule m;
    auto t0 = std::chrono::steady_clock::now();
    CUresult r = cuModuleLoadData(&m, text.c_str());
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const char *base = std::strrchr(argv[i], '/') ? std::strrchr(argv[i], '/') + 1 : argv[i];
    std::printf("CHECK jit:%s %s cuModuleLoadData = %d in %.1f ms (%zu bytes)\n", base, r == CUDA_SUCCESS ? "PASS" : "FAIL", (int)r, ms, text.size());
    if (r == CUDA_SUCCESS) cuModuleUnload(m);
    failures += r != CUDA_SUCCESS;
  }
  return failures ? 1 : 0;
}

int main(int argc, char **argv) {
  bool jit = argc >= 2 && std::strcmp(argv[1], "--jit") == 0;
  if (argc != 5 && !jit) {
    std::fprintf(stderr, "usage: %s ORIGINAL.ptx SLICED.ptx REPORT.txt PTX_SLICE_BIN\n       %s --jit FILE.ptx...\n", argv[0], argv[0]);
    return 2;
  }
  CK(cuInit(0));
  CUdevice dev;
  CUcontext ctx;
  CK(cuDeviceGet(&dev, 0));
  CK(cuDevicePrimaryCtxRetain(&ctx, dev));
  CK(cuCtxSetCurrent(ctx));
  if (jit) return jit_only(argc, argv);
  CUstream stream;
  CK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
  std::string orig_text = read_file(argv[1]), sliced_text = read_file(argv[2]);
  CUmodule orig, sliced;
  auto t0 = std::chrono::steady_clock::now();
  CK(cuModuleLoadData(&orig, orig_text.c_str()));
  auto t1 = std::chrono::steady_clock::now();
  CK(cuModuleLoadData(&sliced, sliced_text.c_str()));
  auto t2 = std::chrono::steady_clock::now();
  std::printf("CHECK jit PASS original %.1f ms, sliced %.1f ms (cuModuleLoadData of %zu and %zu bytes)\n",
              std::chrono::duration<double, std::milli>(t1 - t0).count(), std::chrono::duration<double, std::milli>(t2 - t1).count(), orig_text.size(),
              sliced_text.size());
  std::map<std::string, unsigned> offsets = slice_offsets(argv[3]);
  int failures = 0;

  for (const Case &c : cases()) {
    CUfunction fo, fs;
    CK(cuModuleGetFunction(&fo, orig, c.kernel));
    CK(cuModuleGetFunction(&fs, sliced, c.kernel));
    if (!offsets.count(c.kernel)) {
      std::printf("CHECK %s FAIL ptx-slice did not slice it (report has no offset)\n", c.kernel);
      failures++;
      continue;
    }
    Buffers b(c);
    Params whole(c, b, nullptr);
    CK(cuLaunchKernel(fo, c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z, c.dynamic_shared, stream, whole.list.data(), nullptr));
    CK(cuStreamSynchronize(stream));
    std::vector<std::vector<unsigned>> expected = b.read();
    bool wrote = expected != b.init;
    std::string detail;
    bool ok = wrote;
    const unsigned long long sizes[] = {1, 7, c.grid.x, 1ull * c.grid.x * c.grid.y, c.grid.volume()};
    for (unsigned long long n : sizes) {
      std::vector<Slice> slices = plan(argv[4], c.grid, n);
      for (Route route : {KERNEL_PARAMS, EXTRA, GRAPH}) {
        if (route == GRAPH && n != 7) continue;  // one graph per kernel: capture is slow with thousands of nodes
        b.reset();
        launch_slices(fs, c, b, slices, route, offsets[c.kernel], stream);
        bool same = b.read() == expected && !slices.empty();
        ok = ok && same;
        char part[96];
        std::snprintf(part, sizeof part, "%s%llu/%s:%zu%s", detail.empty() ? "" : " ", n, route == KERNEL_PARAMS ? "params" : route == EXTRA ? "extra" : "graph", slices.size(),
                      same ? "" : "!");
        detail += part;
      }
    }
    std::printf("CHECK %s %s %s%s\n", c.kernel, ok ? "PASS" : "FAIL", wrote ? "" : "(the kernel wrote nothing) ", detail.c_str());
    failures += !ok;
  }

  // Launch overhead of slicing: fill_1d's 1000 blocks whole, in 10 slices, in 1000 (host time to
  // launch and finish, median of 21 runs).
  const Case c = cases()[0];
  CUfunction fo, fs;
  CK(cuModuleGetFunction(&fo, orig, c.kernel));
  CK(cuModuleGetFunction(&fs, sliced, c.kernel));
  Buffers b(c);
  double med[3];
  const unsigned long long per[3] = {0, 100, 1};
  for (int k = 0; k < 3; k++) {
    std::vector<Slice> slices = per[k] ? plan(argv[4], c.grid, per[k]) : std::vector<Slice>{};
    std::vector<double> t;
    for (int r = 0; r < 21; r++) {
      auto s0 = std::chrono::steady_clock::now();
      if (per[k] == 0) {
        Params p(c, b, nullptr);
        CK(cuLaunchKernel(fo, c.grid.x, 1, 1, c.block.x, 1, 1, 0, stream, p.list.data(), nullptr));
        CK(cuStreamSynchronize(stream));
      } else {
        launch_slices(fs, c, b, slices, KERNEL_PARAMS, 0, stream);
      }
      t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s0).count());
    }
    std::sort(t.begin(), t.end());
    med[k] = t[t.size() / 2];
  }
  std::printf("CHECK overhead PASS whole %.1f us; 10 slices %.1f us; 1000 slices %.1f us (%.2f us per extra launch)\n", med[0], med[1], med[2], (med[2] - med[0]) / 999.0);
  cuModuleUnload(orig);
  cuModuleUnload(sliced);
  cuStreamDestroy(stream);
  cuDevicePrimaryCtxRelease(dev);
  return failures ? 1 : 0;
}
