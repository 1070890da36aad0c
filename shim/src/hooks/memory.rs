//! Every device allocation path, counted on success and uncounted on free: the exported hooks,
//! each charging through `charge` (the tables and the charge itself live there).
//!
//! Each hook charges the budget of the device first (compare-and-swap, refused over the limit),
//! then calls the real driver, then records what it got; a failed driver call gives the charge
//! back. A free removes the record first and calls the driver second, so that an address the
//! driver hands out again in another thread can never be confused with the one being freed.

use crate::hooks::charge::{charge_extra, charged_memory, current_device, released, Operation, ARRAYS, HANDLES, POINTERS};
use crate::policy::budget;
use crate::state::alloc_table::{AllocTable, Entry};
use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use crate::sys::guard;
use std::ffi::c_uint;

/// Charges `bytes` on `device`, runs `allocate`, and records the key it returns.
///
/// `allocate` returns the driver's code and the key of what it made (read only on success).
#[inline]
pub(crate) fn charged(table: &AllocTable, device: Option<CUdevice>, bytes: u64, what: &'static str, allocate: impl FnMut() -> (CuResult, u64)) -> CuResult {
    let code = charged_memory(table, device, bytes, what, allocate);
    if code == CUDA_SUCCESS {
        // Not VMM-backed by the shim: its suspend agent cannot move it (`suspend_path = "auto"`).
        crate::hooks::vmm::note_other_memory();
    }
    code
}

/// A linear allocation entry point: `(dptr, bytesize, rest...)`, recorded by the pointer it
/// returns. `what` names the API in the refusal log line.
macro_rules! linear_hook {
    ($name:ident, $what:literal $(, $arg:ident : $ty:ty)*) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(dptr: *mut CUdeviceptr, bytesize: usize $(, $arg: $ty)*) -> CuResult {
            guard::cuda(stringify!($name), || {
                guard::test_panic_point(stringify!($name));
                charged(&POINTERS, current_device(), bytesize as u64, $what, || {
                    let code = call_real!($name(dptr, bytesize $(, $arg)*));
                    // SAFETY: on CUDA_SUCCESS the driver has written the new device pointer through `dptr` (it refuses a null `dptr`), so it is readable.
                    (code, if code == CUDA_SUCCESS { unsafe { *dptr } } else { 0 })
                })
            })
        }
    };
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CuResult {
    guard::cuda("cuMemAlloc_v2", || {
        guard::test_panic_point("cuMemAlloc_v2");
        // A member of a group on the shim's suspend path: VMM-backed (issue 22), and its suspend
        // agent running from its first such allocation on.
        if let Some(code) = crate::hooks::vmm::alloc(dptr, bytesize as u64, "cuMemAlloc") {
            crate::hooks::suspend_agent::start();
            return code;
        }
        charged(&POINTERS, current_device(), bytesize as u64, "cuMemAlloc", || {
            let code = call_real!(cuMemAlloc_v2(dptr, bytesize));
            // SAFETY: on CUDA_SUCCESS the driver has written the new device pointer through `dptr` (it refuses a null `dptr`), so it is readable.
            (code, if code == CUDA_SUCCESS { unsafe { *dptr } } else { 0 })
        })
    })
}

linear_hook!(cuMemAllocManaged, "cuMemAllocManaged", flags: c_uint);
linear_hook!(cuMemAllocAsync, "cuMemAllocAsync", stream: CUstream);
linear_hook!(cuMemAllocAsync_ptsz, "cuMemAllocAsync", stream: CUstream);
linear_hook!(cuMemAllocFromPoolAsync, "cuMemAllocFromPoolAsync", pool: CUmemoryPool, stream: CUstream);
linear_hook!(cuMemAllocFromPoolAsync_ptsz, "cuMemAllocFromPoolAsync", pool: CUmemoryPool, stream: CUstream);

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch_v2(dptr: *mut CUdeviceptr, pitch: *mut usize, width_bytes: usize, height: usize, element_size: c_uint) -> CuResult {
    guard::cuda("cuMemAllocPitch_v2", || {
        if let Some(code) = crate::hooks::vmm::alloc_pitch(dptr, pitch, width_bytes, height, element_size) {
            crate::hooks::suspend_agent::start();
            return code;
        }
        // One operation from the first charge to the padding's (nested ones only count).
        let _op = Operation::begin();
        // Charge the unpadded size first; the padding is known only once the driver answers.
        let requested = (width_bytes as u64).saturating_mul(height as u64);
        let device = current_device();
        let code = charged(&POINTERS, device, requested, "cuMemAllocPitch", || {
            let code = call_real!(cuMemAllocPitch_v2(dptr, pitch, width_bytes, height, element_size));
            // SAFETY: on CUDA_SUCCESS the driver has written the new device pointer through `dptr` (it refuses a null `dptr`), so it is readable.
            (code, if code == CUDA_SUCCESS { unsafe { *dptr } } else { 0 })
        });
        if code != CUDA_SUCCESS || pitch.is_null() {
            return code;
        }
        // SAFETY: the allocation succeeded (checked above), so the driver wrote the new pointer through `dptr`, which is therefore readable.
        let (Some(device), key) = (device, unsafe { *dptr }) else { return code };
        let Some(budget) = budget::of(device) else { return code };
        // SAFETY: `pitch` is non-null (checked above) and the successful call wrote the pitch through it.
        let actual = (unsafe { *pitch } as u64).saturating_mul(height as u64);
        if actual <= requested {
            return code;
        }
        let extra = actual - requested;
        if charge_extra(budget, device, "cuMemAllocPitch", requested, extra, || {
            POINTERS.remove(key);
            call_real!(cuMemFree_v2(key));
        }) {
            POINTERS.insert(key, Entry { device, bytes: actual });
            CUDA_SUCCESS
        } else {
            CUDA_ERROR_OUT_OF_MEMORY
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CuResult {
    guard::cuda("cuMemFree_v2", || {
        guard::test_panic_point("cuMemFree_v2");
        if let Some(code) = crate::hooks::vmm::free(dptr) {
            return code;
        }
        released(&POINTERS, dptr, || call_real!(cuMemFree_v2(dptr)))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, stream: CUstream) -> CuResult {
    guard::cuda("cuMemFreeAsync", || released(&POINTERS, dptr, || call_real!(cuMemFreeAsync(dptr, stream))))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: CUstream) -> CuResult {
    guard::cuda("cuMemFreeAsync_ptsz", || released(&POINTERS, dptr, || call_real!(cuMemFreeAsync_ptsz(dptr, stream))))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(handle: *mut CUmemGenericAllocationHandle, size: usize, prop: *const MemAllocationPropHead, flags: u64) -> CuResult {
    guard::cuda("cuMemCreate", || {
        // Only memory placed on a device counts; host-located VMM memory is not device memory.
        let device = if prop.is_null() {
            None
        } else {
            // SAFETY: `prop` is non-null (this branch) and, by cuMemCreate's contract, points at the caller's CUmemAllocationProp, whose first fields are this head.
            let head = unsafe { &*prop };
            (head.location_type == MEM_LOCATION_TYPE_DEVICE).then_some(head.location_id)
        };
        charged(&HANDLES, device, size as u64, "cuMemCreate", || {
            let code = call_real!(cuMemCreate(handle, size, prop, flags));
            // SAFETY: on CUDA_SUCCESS the driver has written the new handle through `handle` (it refuses a null `handle`), so it is readable.
            (code, if code == CUDA_SUCCESS { unsafe { *handle } } else { 0 })
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CuResult {
    guard::cuda("cuMemRelease", || released(&HANDLES, handle, || call_real!(cuMemRelease(handle))))
}

pub(crate) fn array_bytes(width: usize, height: usize, depth: usize, format: u32, channels: u32) -> u64 {
    let element = fmt_bytes(format) * u64::from(channels.max(1));
    (width.max(1) as u64).saturating_mul(height.max(1) as u64).saturating_mul(depth.max(1) as u64).saturating_mul(element)
}

fn fmt_bytes(format: u32) -> u64 {
    array_format_bytes(format).unwrap_or(4)
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate_v2(array: *mut CUarray, desc: *const ArrayDescriptor) -> CuResult {
    guard::cuda("cuArrayCreate_v2", || {
        let bytes = if desc.is_null() {
            0
        } else {
            // SAFETY: `desc` is non-null (this branch) and, by cuArrayCreate_v2's contract, points at the caller's CUDA_ARRAY_DESCRIPTOR for the call.
            let d = unsafe { &*desc };
            array_bytes(d.width, d.height, 1, d.format, d.num_channels)
        };
        charged(&ARRAYS, current_device(), bytes, "cuArrayCreate", || {
            let code = call_real!(cuArrayCreate_v2(array, desc));
            // SAFETY: on CUDA_SUCCESS the driver has written the new CUarray through `array` (it refuses a null `array`), so it is readable.
            (code, if code == CUDA_SUCCESS { unsafe { *array as u64 } } else { 0 })
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate_v2(array: *mut CUarray, desc: *const Array3dDescriptor) -> CuResult {
    guard::cuda("cuArray3DCreate_v2", || {
        let bytes = if desc.is_null() {
            0
        } else {
            // SAFETY: `desc` is non-null (this branch) and, by cuArray3DCreate_v2's contract, points at the caller's CUDA_ARRAY3D_DESCRIPTOR for the call.
            let d = unsafe { &*desc };
            array_bytes(d.width, d.height, d.depth, d.format, d.num_channels)
        };
        charged(&ARRAYS, current_device(), bytes, "cuArray3DCreate", || {
            let code = call_real!(cuArray3DCreate_v2(array, desc));
            // SAFETY: on CUDA_SUCCESS the driver has written the new CUarray through `array` (it refuses a null `array`), so it is readable.
            (code, if code == CUDA_SUCCESS { unsafe { *array as u64 } } else { 0 })
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayCreate(array: *mut CUmipmappedArray, desc: *const Array3dDescriptor, levels: c_uint) -> CuResult {
    guard::cuda("cuMipmappedArrayCreate", || {
        let bytes = if desc.is_null() {
            0
        } else {
            // SAFETY: `desc` is non-null (this branch) and, by cuMipmappedArrayCreate's contract, points at the caller's CUDA_ARRAY3D_DESCRIPTOR for the call.
            let d = unsafe { &*desc };
            (0..levels.clamp(1, 64))
                .map(|l| {
                    let shrink = |extent: usize| if extent == 0 { 0 } else { (extent >> l).max(1) };
                    array_bytes(shrink(d.width), shrink(d.height), shrink(d.depth), d.format, d.num_channels)
                })
                .fold(0u64, u64::saturating_add)
        };
        charged(&ARRAYS, current_device(), bytes, "cuMipmappedArrayCreate", || {
            let code = call_real!(cuMipmappedArrayCreate(array, desc, levels));
            // SAFETY: on CUDA_SUCCESS the driver has written the new mipmapped array through `array` (it refuses a null `array`), so it is readable.
            (code, if code == CUDA_SUCCESS { unsafe { *array as u64 } } else { 0 })
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayDestroy(array: CUarray) -> CuResult {
    guard::cuda("cuArrayDestroy", || released(&ARRAYS, array as u64, || call_real!(cuArrayDestroy(array))))
}

#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(array: CUmipmappedArray) -> CuResult {
    guard::cuda("cuMipmappedArrayDestroy", || released(&ARRAYS, array as u64, || call_real!(cuMipmappedArrayDestroy(array))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_sizes() {
        assert_eq!(array_bytes(1024, 768, 0, 0x20, 4), 1024 * 768 * 16);
        assert_eq!(array_bytes(100, 0, 0, 0x01, 1), 100);
        assert_eq!(array_bytes(8, 8, 8, 0x10, 2), 8 * 8 * 8 * 4);
    }
}
