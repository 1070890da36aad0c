/* Issue 22 (d): does this machine's driver export the checkpoint API's custom-storage mode
 * (cuCheckpointOperationComplete, documented with CUcheckpointCustomStorageInfo in the CUDA
 * driver API pages; see docs/NOTES.md, branch i13c)? Looks the symbol up in libcuda.so.1 at
 * run time, without calling anything: prints `custom_storage_exported=0|1`.
 * cc ckpt_custom_probe.c -ldl -o ckpt_custom_probe && ./ckpt_custom_probe */
#include <dlfcn.h>
#include <stdio.h>

int main(void) {
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!cuda) {
        printf("custom_storage_exported=0 (libcuda.so.1: %s)\n", dlerror());
        return 0;
    }
    int complete = dlsym(cuda, "cuCheckpointOperationComplete") != NULL;
    int checkpoint = dlsym(cuda, "cuCheckpointProcessCheckpoint") != NULL;
    printf("custom_storage_exported=%d checkpoint_exported=%d\n", complete, checkpoint);
    return 0;
}
