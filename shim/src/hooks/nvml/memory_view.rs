//! NVML's memory queries inside a slice: total = the limit that applies (the environment's, or
//! the group's from the controller, edits included, read live from the ledger), used = what the
//! group holds on the device (contexts' reserves included), free = the rest, capped by what
//! the card really has free. The same figures `cuMemGetInfo_v2` and `cuDeviceTotalMem_v2`
//! report (`Budget::quota_view`). BAR1 is left alone; without a memory limit NVML's own answer
//! stands.

use super::{real_or_return, tenant};
use crate::sys::ffi::*;
use crate::sys::guard;

type MemoryFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> NvmlReturn;
type MemoryV2Fn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemoryV2) -> NvmlReturn;

/// (total, free, used) of the slice `device` shows, given the card's real total and free.
fn slice_view(device: NvmlDevice, real_total: u64, real_free: u64) -> Option<(u64, u64, u64)> {
    tenant::of(device)?.budget.quota_view(real_total, real_free)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: NvmlDevice, memory: *mut NvmlMemory) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetMemoryInfo", NVML_ERROR_UNKNOWN, || {
        guard::test_panic_point("nvmlDeviceGetMemoryInfo");
        let real = real_or_return!(c"nvmlDeviceGetMemoryInfo", MemoryFn);
        // SAFETY: `real` is libnvidia-ml's own nvmlDeviceGetMemoryInfo, given the caller's arguments unchanged.
        let code = unsafe { real(device, memory) };
        if code == NVML_SUCCESS && !memory.is_null() {
            // SAFETY: `memory` is non-null (checked above) and NVML just filled it; the caller's struct is not otherwise referenced during the call.
            let m = unsafe { &mut *memory };
            if let Some((total, free, used)) = slice_view(device, m.total, m.free) {
                (m.total, m.free, m.used) = (total, free, used);
            }
        }
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: NvmlDevice, memory: *mut NvmlMemoryV2) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetMemoryInfo_v2", NVML_ERROR_UNKNOWN, || {
        let real = real_or_return!(c"nvmlDeviceGetMemoryInfo_v2", MemoryV2Fn);
        // SAFETY: `real` is libnvidia-ml's own nvmlDeviceGetMemoryInfo_v2, given the caller's arguments unchanged.
        let code = unsafe { real(device, memory) };
        if code == NVML_SUCCESS && !memory.is_null() {
            // SAFETY: `memory` is non-null (checked above) and NVML just filled it; the caller's struct is not otherwise referenced during the call.
            let m = unsafe { &mut *memory };
            if let Some((total, free, used)) = slice_view(device, m.total, m.free) {
                // Inside a slice the driver's reserve is part of what the group holds.
                (m.total, m.reserved, m.free, m.used) = (total, 0, free, used);
            }
        }
        code
    })
}
