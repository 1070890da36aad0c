// Issue 22: the host link's bandwidth, the physical limit for moving a suspended tenant's
// memory: cudaMemcpy between pinned host memory and the device, each way.
// hostbw [GiB per copy (default 4)] [repetitions (default 5)] -> h2d_gbs= d2h_gbs= (best of the
// repetitions, GB = 1e9 bytes)
#include "gpucommon.cuh"
#include <cstdio>
#include <cstdlib>

int main(int argc, char **argv) {
    size_t gib = argc > 1 ? strtoull(argv[1], nullptr, 0) : 4;
    int reps = argc > 2 ? atoi(argv[2]) : 5;
    size_t bytes = gib << 30;
    void *host = nullptr, *dev = nullptr;
    CHECK(cudaMallocHost(&host, bytes));
    CHECK(cudaMalloc(&dev, bytes));
    CHECK(cudaMemset(dev, 1, bytes));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    double best[2] = {0, 0};
    for (int r = 0; r < reps; r++) {
        for (int way = 0; way < 2; way++) {
            CHECK(cudaEventRecord(a));
            if (way == 0) CHECK(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice));
            else CHECK(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
            CHECK(cudaEventRecord(b));
            CHECK(cudaEventSynchronize(b));
            float ms = 0;
            CHECK(cudaEventElapsedTime(&ms, a, b));
            double gbs = bytes / (ms * 1e-3) / 1e9;
            if (gbs > best[way]) best[way] = gbs;
        }
    }
    printf("bytes=%zu\nh2d_gbs=%.2f\nd2h_gbs=%.2f\n", bytes, best[0], best[1]);
    return 0;
}
