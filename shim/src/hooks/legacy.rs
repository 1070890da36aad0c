//! The 32-bit-era entry points (before CUDA 3.2 added the `_v2` names): `cuMemAlloc`,
//! `cuMemAllocPitch`, `cuMemFree`, `cuMemGetInfo`, `cuDeviceTotalMem`, `cuArrayCreate`,
//! `cuArray3DCreate` (the context ones are in `context`). The driver still exports them; a
//! program that binds to them (an old binary, `dlsym("cuMemAlloc")`, `cuGetProcAddress` with a
//! cudaVersion below 3020) is counted exactly like one that calls the `_v2` ones.
//!
//! Their device pointers and sizes are `unsigned int` (`CUdeviceptr_v1`), as are the fields of
//! the `_v1` array descriptors. A legacy pointer is recorded zero-extended, so that a
//! `cuMemFree_v2` of it (or the reverse) finds the same record.

use crate::hooks::charge::{self, current_device, released, Operation, ARRAYS, POINTERS};
use crate::hooks::memory::{array_bytes, charged};
use crate::state::alloc_table::Entry;
use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use crate::{policy::budget, sys::guard, sys::runtime};
use std::ffi::c_uint;

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc(dptr: *mut c_uint, bytesize: c_uint) -> CuResult {
    guard::cuda("cuMemAlloc", || {
        charged(&POINTERS, current_device(), u64::from(bytesize), "cuMemAlloc", || {
            let code = call_real!(cuMemAlloc(dptr, bytesize));
            // SAFETY: on CUDA_SUCCESS the driver has written the new pointer through `dptr` (it refuses a null `dptr`), so it is readable.
            (code, if code == CUDA_SUCCESS { u64::from(unsafe { *dptr }) } else { 0 })
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch(dptr: *mut c_uint, pitch: *mut c_uint, width_bytes: c_uint, height: c_uint, element_size: c_uint) -> CuResult {
    guard::cuda("cuMemAllocPitch", || {
        let _op = Operation::begin();
        let requested = u64::from(width_bytes) * u64::from(height);
        let device = current_device();
        let code = charged(&POINTERS, device, requested, "cuMemAllocPitch", || {
            let code = call_real!(cuMemAllocPitch(dptr, pitch, width_bytes, height, element_size));
            // SAFETY: on CUDA_SUCCESS the driver has written the new pointer through `dptr` (it refuses a null `dptr`), so it is readable.
            (code, if code == CUDA_SUCCESS { u64::from(unsafe { *dptr }) } else { 0 })
        });
        if code != CUDA_SUCCESS || pitch.is_null() {
            return code;
        }
        // SAFETY: the allocation succeeded (checked above), so the driver wrote the new pointer through `dptr`, which is therefore readable.
        let (Some(device), key) = (device, u64::from(unsafe { *dptr })) else { return code };
        let Some(budget) = budget::of(device) else { return code };
        // SAFETY: `pitch` is non-null (checked above) and the successful call wrote the pitch through it.
        let actual = u64::from(unsafe { *pitch }) * u64::from(height);
        if actual <= requested {
            return code;
        }
        if charge::charge_extra(budget, device, "cuMemAllocPitch", requested, actual - requested, || {
            POINTERS.remove(key);
            call_real!(cuMemFree(key as c_uint));
        }) {
            POINTERS.insert(key, Entry { device, bytes: actual });
            CUDA_SUCCESS
        } else {
            CUDA_ERROR_OUT_OF_MEMORY
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree(dptr: c_uint) -> CuResult {
    guard::cuda("cuMemFree", || released(&POINTERS, u64::from(dptr), || call_real!(cuMemFree(dptr))))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CuResult {
    guard::cuda("cuMemGetInfo", || {
        if runtime::refused() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let code = call_real!(cuMemGetInfo(free, total));
        if code != CUDA_SUCCESS || free.is_null() || total.is_null() {
            return code;
        }
        let Some(b) = current_device().and_then(budget::of) else { return code };
        // SAFETY: the driver just wrote both. The quota's figures are at most the real ones,
        // so they fit where the driver's did.
        if let Some((t, f, _)) = b.quota_view(u64::from(unsafe { *total }), u64::from(unsafe { *free })) {
            // SAFETY: `total` and `free` are non-null (checked above) and the driver just wrote them, so both are writable.
            unsafe {
                *total = t as c_uint;
                *free = f as c_uint;
            }
        }
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem(bytes: *mut c_uint, device: CUdevice) -> CuResult {
    guard::cuda("cuDeviceTotalMem", || {
        if runtime::refused() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let code = call_real!(cuDeviceTotalMem(bytes, device));
        if code == CUDA_SUCCESS && !bytes.is_null() {
            // SAFETY: the driver just wrote it.
            let real = u64::from(unsafe { *bytes });
            if let Some((t, _, _)) = budget::of(device).and_then(|b| b.quota_view(real, real)) {
                // SAFETY: `bytes` is non-null (checked above) and the driver just wrote it, so it is writable.
                unsafe { *bytes = t as c_uint };
            }
        }
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate(array: *mut CUarray, desc: *const ArrayDescriptorV1) -> CuResult {
    guard::cuda("cuArrayCreate", || {
        let bytes = if desc.is_null() {
            0
        } else {
            // SAFETY: `desc` is non-null (this branch) and, by cuArrayCreate's contract, points at the caller's CUDA_ARRAY_DESCRIPTOR_v1 for the call.
            let d = unsafe { &*desc };
            array_bytes(d.width as usize, d.height as usize, 1, d.format, d.num_channels)
        };
        charged(&ARRAYS, current_device(), bytes, "cuArrayCreate", || {
            let code = call_real!(cuArrayCreate(array, desc));
            // SAFETY: on CUDA_SUCCESS the driver has written the new CUarray through `array` (it refuses a null `array`), so it is readable.
            (code, if code == CUDA_SUCCESS { unsafe { *array as u64 } } else { 0 })
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate(array: *mut CUarray, desc: *const Array3dDescriptorV1) -> CuResult {
    guard::cuda("cuArray3DCreate", || {
        let bytes = if desc.is_null() {
            0
        } else {
            // SAFETY: `desc` is non-null (this branch) and, by cuArray3DCreate's contract, points at the caller's CUDA_ARRAY3D_DESCRIPTOR_v1 for the call.
            let d = unsafe { &*desc };
            array_bytes(d.width as usize, d.height as usize, d.depth as usize, d.format, d.num_channels)
        };
        charged(&ARRAYS, current_device(), bytes, "cuArray3DCreate", || {
            let code = call_real!(cuArray3DCreate(array, desc));
            // SAFETY: on CUDA_SUCCESS the driver has written the new CUarray through `array` (it refuses a null `array`), so it is readable.
            (code, if code == CUDA_SUCCESS { unsafe { *array as u64 } } else { 0 })
        })
    })
}
