//! Memory queries that report the quota: `cuMemGetInfo_v2` and `cuDeviceTotalMem_v2` say the
//! limit is the total and `min(limit - used, real free)` is free, so that frameworks that size
//! themselves (PyTorch's OOM messages, vLLM's gpu_memory_utilization) size to the quota.

use crate::policy::budget;
use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::{sys::guard, sys::runtime};

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CuResult {
    guard::cuda("cuMemGetInfo_v2", || {
        if runtime::refused() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        guard::test_panic_point("cuMemGetInfo_v2");
        let code = call_real!(cuMemGetInfo_v2(free, total));
        if code != CUDA_SUCCESS || free.is_null() || total.is_null() {
            return code;
        }
        let Some(b) = driver().and_then(|d| d.current_device()).and_then(budget::of) else { return code };
        // SAFETY: the driver just wrote both.
        if let Some((t, f, _)) = b.quota_view(unsafe { *total } as u64, unsafe { *free } as u64) {
            // SAFETY: `total` and `free` are non-null (checked above) and the driver just wrote them, so both are writable.
            unsafe {
                *total = t as usize;
                *free = f as usize;
            }
        }
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: CUdevice) -> CuResult {
    guard::cuda("cuDeviceTotalMem_v2", || {
        if runtime::refused() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let code = call_real!(cuDeviceTotalMem_v2(bytes, device));
        if code == CUDA_SUCCESS && !bytes.is_null() {
            // SAFETY: the driver just wrote it.
            let real = unsafe { *bytes } as u64;
            if let Some((t, _, _)) = budget::of(device).and_then(|b| b.quota_view(real, real)) {
                // SAFETY: `bytes` is non-null (checked above) and the driver just wrote it, so it is writable.
                unsafe { *bytes = t as usize };
            }
        }
        code
    })
}
