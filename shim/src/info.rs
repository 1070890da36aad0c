//! Memory queries that report the quota: `cuMemGetInfo_v2` and `cuDeviceTotalMem_v2` say the
//! limit is the total and `min(limit - used, real free)` is free, so that frameworks that size
//! themselves (PyTorch's OOM messages, vLLM's gpu_memory_utilization) size to the quota.

use crate::budget;
use crate::driver::{call_real, driver};
use crate::ffi::*;
use crate::{guard, runtime};

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CuResult {
    guard::cuda("cuMemGetInfo_v2", || {
        if runtime::refused() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let code = call_real!(cuMemGetInfo_v2(free, total));
        if code != CUDA_SUCCESS || free.is_null() || total.is_null() {
            return code;
        }
        let Some(b) = driver().and_then(|d| d.current_device()).and_then(budget::of) else { return code };
        if let Some(limit) = b.limit() {
            // SAFETY: the driver just wrote both.
            unsafe {
                let real_total = *total as u64;
                let real_free = *free as u64;
                let quota_total = limit.min(real_total);
                *total = quota_total as usize;
                *free = quota_total.saturating_sub(b.used()).min(real_free) as usize;
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
            if let Some(limit) = budget::of(device).and_then(|b| b.limit()) {
                // SAFETY: the driver just wrote it.
                unsafe { *bytes = (*bytes as u64).min(limit) as usize };
            }
        }
        code
    })
}
