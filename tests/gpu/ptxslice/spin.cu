// The neighbour's kernel for tests/gpu/ptxslice_probe.sh (issue 19 part 2), compiled with
// `nvcc -ptx -arch=sm_90`: each block spins `cycles` SM clock cycles, then its first thread
// writes blockIdx.x + gridDim.x (so the kernel reads the grid: gpuslice slices it).
extern "C" __global__ void spin(unsigned long long cycles, unsigned int* out) {
  long long t0 = clock64();
  while ((unsigned long long)(clock64() - t0) < cycles) {
  }
  if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x + gridDim.x;
}
