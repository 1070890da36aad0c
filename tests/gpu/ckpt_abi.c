/* Issue 22: the checkpoint API as this machine's cuda.h declares it, against what gpuslice's
 * controller (controller/src/checkpoint.rs) and the simulated driver (tests/simcuda/src/
 * checkpoint.rs) assume: the six prototypes, the four argument structs (64 bytes each, field
 * offsets) and the CUprocessState values. Compiled only (never linked or run against the
 * driver): cc -I/usr/local/cuda/include ckpt_abi.c -o ckpt_abi && ./ckpt_abi */
#include <cuda.h>
#include <stddef.h>
#include <stdio.h>

#define SAME_TYPE(f, t) _Static_assert(__builtin_types_compatible_p(__typeof__(&f), t), #f " has another signature")
SAME_TYPE(cuCheckpointProcessGetRestoreThreadId, CUresult (*)(int, int *));
SAME_TYPE(cuCheckpointProcessGetState, CUresult (*)(int, CUprocessState *));
SAME_TYPE(cuCheckpointProcessLock, CUresult (*)(int, CUcheckpointLockArgs *));
SAME_TYPE(cuCheckpointProcessCheckpoint, CUresult (*)(int, CUcheckpointCheckpointArgs *));
SAME_TYPE(cuCheckpointProcessRestore, CUresult (*)(int, CUcheckpointRestoreArgs *));
SAME_TYPE(cuCheckpointProcessUnlock, CUresult (*)(int, CUcheckpointUnlockArgs *));

int main(void) {
    int ok = 1;
#define EXPECT(what, got, want)                                                        \
    do {                                                                               \
        long g_ = (long)(got), w_ = (long)(want);                                      \
        printf("abi %s=%ld expected=%ld %s\n", what, g_, w_, g_ == w_ ? "ok" : "DIFFERENT"); \
        if (g_ != w_) ok = 0;                                                          \
    } while (0)
    EXPECT("sizeof_lock_args", sizeof(CUcheckpointLockArgs), 64);
    EXPECT("lock_timeoutMs_offset", offsetof(CUcheckpointLockArgs, timeoutMs), 0);
    EXPECT("lock_reserved1_offset", offsetof(CUcheckpointLockArgs, reserved1), 8);
    EXPECT("sizeof_checkpoint_args", sizeof(CUcheckpointCheckpointArgs), 64);
    EXPECT("sizeof_restore_args", sizeof(CUcheckpointRestoreArgs), 64);
    EXPECT("restore_gpuPairs_offset", offsetof(CUcheckpointRestoreArgs, gpuPairs), 0);
    EXPECT("restore_gpuPairsCount_offset", offsetof(CUcheckpointRestoreArgs, gpuPairsCount), 8);
    EXPECT("restore_reserved1_offset", offsetof(CUcheckpointRestoreArgs, reserved1), 56);
    EXPECT("sizeof_unlock_args", sizeof(CUcheckpointUnlockArgs), 64);
    EXPECT("state_running", CU_PROCESS_STATE_RUNNING, 0);
    EXPECT("state_locked", CU_PROCESS_STATE_LOCKED, 1);
    EXPECT("state_checkpointed", CU_PROCESS_STATE_CHECKPOINTED, 2);
    EXPECT("state_failed", CU_PROCESS_STATE_FAILED, 3);
    EXPECT("error_illegal_state", CUDA_ERROR_ILLEGAL_STATE, 401);
    EXPECT("error_timeout", CUDA_ERROR_TIMEOUT, 909);
    EXPECT("error_not_supported", CUDA_ERROR_NOT_SUPPORTED, 801);
    printf("abi_ok=%d\n", ok);
    return ok ? 0 : 1;
}
