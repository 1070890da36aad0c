// The module of tests/gpu/modules.sh: a 256 MiB __device__ array (the issue's uncounted memory),
// compiled to a cubin with `nvcc -cubin -arch=sm_90` and loaded with cuModuleLoadData.
__device__ char big[256u << 20];

extern "C" __global__ void touch(char value) {
    big[(blockIdx.x * blockDim.x + threadIdx.x) * 4096u] = value;
}
