// Kernels the slicer must leave as they are, or slice with a note (issue 19). tests/gpu/ptxslice.sh
// compiles this with `nvcc -ptx -arch=sm_90` and checks ptx-slice's verdict on each; the unit tests'
// fixture ptx/tests/fixtures/refuse.ptx is the hand-written form of the same kernels.
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

// Grid synchronization: only a cooperative launch of the whole grid can pass the barrier.
extern "C" __global__ void grid_sync(unsigned *data) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  data[i] += 1u;
  cg::this_grid().sync();
  data[i] += data[(i + blockDim.x) % (gridDim.x * blockDim.x)];
}

// Thread-block clusters: the cluster shape ties blocks together.
extern "C" __global__ void __cluster_dims__(2, 1, 1) cluster_rank(unsigned *out) {
  out[blockIdx.x] = cg::this_cluster().block_rank();
}

// %gridid names the launch: a sliced grid has several.
extern "C" __global__ void reads_gridid(unsigned long long *out) {
  unsigned long long g;
  asm volatile("mov.u64 %0, %%gridid;" : "=l"(g));
  out[blockIdx.x] = g;
}

// %smid: sliced, with a note (a slice runs on whichever SMs are free, as the original could).
extern "C" __global__ void reads_smid(unsigned *out) {
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  out[blockIdx.x] = sm < 1024u ? blockIdx.x : 0u;
}
