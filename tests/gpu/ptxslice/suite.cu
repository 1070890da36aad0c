// The slicing correctness suite (issue 19): kernels whose outputs must be bit-identical whether a
// grid runs in one launch or in slices (tests/gpu/ptxslice.sh compiles this to PTX, slices it with
// ptx-slice, and run.cu compares). The PTX fixtures of the unit tests (ptx/tests/fixtures/suite.ptx)
// are written in the form `nvcc -ptx -arch=sm_90` gives for this file. Integer arithmetic only, so
// that atomics give one answer in any order.
#include <cooperative_groups.h>

// 1-D grid, blockIdx.x.
extern "C" __global__ void fill_1d(unsigned *out, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = (i * 2654435761u) ^ blockIdx.x;
}

// 2-D grid, blockIdx.{x,y} and gridDim.{x,y}.
extern "C" __global__ void fill_2d(unsigned *out) {
  unsigned x = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned y = blockIdx.y * blockDim.y + threadIdx.y;
  unsigned width = gridDim.x * blockDim.x;
  out[y * width + x] = ((blockIdx.y << 16) | blockIdx.x) ^ (gridDim.y << 8);
}

// 3-D grid: the linear block index from every blockIdx and gridDim component.
extern "C" __global__ void fill_3d(unsigned *out) {
  unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  out[block * blockDim.x + threadIdx.x] = block * 7u + gridDim.z * 1000u + threadIdx.x;
}

// A grid-stride loop: gridDim.x decides which elements a thread visits.
extern "C" __global__ void grid_stride(const unsigned *in, unsigned *out, unsigned n) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) out[i] = in[i] * 3u + 1u;
}

// Static shared memory, __syncthreads, a reduction loop and an atomic (block size 256).
extern "C" __global__ void block_sum_static(const unsigned *in, unsigned *block_sums, unsigned *total) {
  __shared__ unsigned tile[256];
  unsigned t = threadIdx.x;
  tile[t] = in[blockIdx.x * 256 + t];
  __syncthreads();
  for (unsigned s = 128; s > 0; s >>= 1) {
    if (t < s) tile[t] += tile[t + s];
    __syncthreads();
  }
  if (t == 0) {
    block_sums[blockIdx.x] = tile[0];
    atomicAdd(total, tile[0]);
  }
}

// Dynamic shared memory (extern __shared__): each block reverses its chunk.
extern "C" __global__ void reverse_dynamic(const unsigned *in, unsigned *out) {
  extern __shared__ unsigned buf[];
  unsigned base = blockIdx.x * blockDim.x;
  buf[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x] + blockIdx.x;
}

// Atomics on a histogram that depends on the block.
extern "C" __global__ void histogram(const unsigned *in, unsigned *bins, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(&bins[(in[i] ^ blockIdx.x) & 63u], 1u);
}

// A device function that does not read blockIdx: the kernel passes it the value; sliced.
__device__ __noinline__ unsigned mix(unsigned a) { return (a ^ (a >> 7)) * 0x9E3779B9u; }
extern "C" __global__ void uses_helper(unsigned *out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = mix(blockIdx.x) + threadIdx.x;
}

// A device function that reads blockIdx and gridDim itself: called as a clone that takes the slice
// parameter.
__device__ __noinline__ unsigned block_key() { return blockIdx.x * 31u + gridDim.x; }
extern "C" __global__ void helper_reads_ctaid(unsigned *out) { out[blockIdx.x * blockDim.x + threadIdx.x] = block_key(); }

// The same one call further down: both device functions are cloned.
__device__ __noinline__ unsigned outer_key(unsigned t) { return block_key() ^ t; }
extern "C" __global__ void helper_chain(unsigned *out) { out[blockIdx.x * blockDim.x + threadIdx.x] = outer_key(threadIdx.x); }
