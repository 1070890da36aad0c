//! Every device allocation path, counted on success and uncounted on free.
//!
//! Each hook charges the budget of the device first (compare-and-swap, refused over the limit),
//! then calls the real driver, then records what it got; a failed driver call gives the charge
//! back. A free removes the record first and calls the driver second, so that an address the
//! driver hands out again in another thread can never be confused with the one being freed.

use crate::policy::budget::{self, Budget, Refusal, Scope};
use crate::state::alloc_table::{AllocTable, Entry};
use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::{hooks::context, sys::guard, sys::runtime};
use gpuslice_common::size::format_size;
use once_cell::sync::Lazy;
use std::ffi::c_uint;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, SeqCst},
};

/// Linear allocations (cuMemAlloc, pitch, managed, async, pools), by device pointer.
pub(crate) static POINTERS: Lazy<AllocTable> = Lazy::new(AllocTable::new);
/// Virtual memory management handles (cuMemCreate), by handle.
static HANDLES: Lazy<AllocTable> = Lazy::new(AllocTable::new);
/// CUDA arrays and mipmapped arrays, by handle.
pub(crate) static ARRAYS: Lazy<AllocTable> = Lazy::new(AllocTable::new);

/// Operations that change what the driver holds for this process, between their first step
/// and their last (low 32 bits), and how many have ended (high 32 bits). `context::true_up`
/// compares the driver's figure with the tables only across a stretch in which none was under
/// way: mid-operation the two legitimately differ (an allocation the driver has made and the
/// table not yet recorded, a free recorded and not yet made), and a measurement then would
/// move the overhead by those bytes, refusing below the limit or granting over it.
static OPERATIONS: AtomicU64 = AtomicU64::new(0);
const ONE_ENDED: u64 = (1 << 32) - 1;

/// One operation under way, for as long as it lives.
pub struct Operation(());

impl Operation {
    #[inline]
    pub fn begin() -> Operation {
        OPERATIONS.fetch_add(1, SeqCst);
        Operation(())
    }
}

impl Drop for Operation {
    #[inline]
    fn drop(&mut self) {
        OPERATIONS.fetch_add(ONE_ENDED, SeqCst);
    }
}

/// A mark of the operations so far: `Some` when none is under way. Equal marks taken before
/// and after a reading mean that nothing changed in between.
pub fn quiet_mark() -> Option<u64> {
    let v = OPERATIONS.load(SeqCst);
    (v & 0xffff_ffff == 0).then_some(v)
}

/// A mark of the operations so far when exactly `own` are under way (the caller's own): equal
/// marks before and after a reading mean no other operation was under way or happened meanwhile.
pub fn quiet_mark_but(own: u64) -> Option<u64> {
    let v = OPERATIONS.load(SeqCst);
    (v & 0xffff_ffff == own).then_some(v)
}

/// In a forked child: the parent's operations under way are not the child's.
pub fn forget_in_child() {
    OPERATIONS.store(0, SeqCst);
}

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: hold_for_fork, in_child: forget_in_child };

/// Every table's locks, for a fork (see `sys::atfork`).
pub fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    for table in [&*POINTERS, &*HANDLES, &*ARRAYS] {
        table.hold_for_fork(h);
    }
    crate::hooks::modules::hold_for_fork(h);
}

/// Records a VMM handle charged elsewhere (an import `sharing` charged), so that its
/// `cuMemRelease` gives the bytes back like any other handle's.
pub fn record_handle(handle: CUmemGenericAllocationHandle, device: CUdevice, bytes: u64) {
    HANDLES.insert(handle, Entry { device, bytes });
}

/// Bytes tracked on `device` across all allocation kinds (without modules and libraries).
pub fn allocated_bytes(device: i32) -> u64 {
    POINTERS.bytes_on(device) + HANDLES.bytes_on(device) + ARRAYS.bytes_on(device)
}

/// Bytes tracked on `device`: allocations, and modules and libraries loaded.
pub fn tracked_bytes(device: i32) -> u64 {
    allocated_bytes(device) + crate::hooks::modules::tracked_bytes(device)
}

/// Forgets every allocation on `device` (its primary context was reset, which frees them all).
pub fn forget_device(device: i32) -> u64 {
    POINTERS.drain_device(device) + HANDLES.drain_device(device) + ARRAYS.drain_device(device) + crate::hooks::modules::forget_device(device)
}

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

/// `charged` for memory of any kind; `hooks::vmm` calls it directly for its own ranges.
#[inline]
pub(crate) fn charged_memory(
    table: &AllocTable,
    device: Option<CUdevice>,
    bytes: u64,
    what: &'static str,
    mut allocate: impl FnMut() -> (CuResult, u64),
) -> CuResult {
    if runtime::refused() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Some((device, budget)) = device.and_then(|d| Some((d, budget::of(d)?))) else {
        return allocate().0;
    };
    if budget.near_limit(bytes) {
        context::true_up(device);
    }
    let _op = Operation::begin();
    if let Err(refusal) = budget.try_charge(bytes) {
        report_refusal(what, device, bytes, refusal);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    // A panic from here to the driver's answer must not keep the reservation: nothing would
    // ever free it, and the quota would shrink for good (for the whole group, in the ledger).
    let reservation = Reservation { budget, bytes };
    guard::test_panic_stage(what, "reserved");
    let (mut code, mut key) = allocate();
    // The device is full, not the quota: the controller may suspend others to make room.
    if code == CUDA_ERROR_OUT_OF_MEMORY && crate::policy::make_room::ask(device, bytes, what) {
        (code, key) = allocate();
    }
    std::mem::forget(reservation);
    if code == CUDA_SUCCESS {
        table.insert(key, Entry { device, bytes });
        hide_from_report(budget, bytes);
    } else {
        budget.uncharge(bytes);
    }
    code
}

/// Test knob `GPUSLICE_TEST_UNDERREPORT_BYTES=N`: the first N bytes this process allocates are
/// left out of its own report (its ledger slot), as a tenant that writes its slot could do
/// anyway. It gives the process nothing it could not take by itself; CI and the GPU acceptance
/// use it to check that the controller's cross-check catches a process that under-reports.
static UNDERREPORT_LEFT: Lazy<AtomicU64> = Lazy::new(|| {
    let bytes = std::env::var("GPUSLICE_TEST_UNDERREPORT_BYTES").ok().and_then(|v| gpuslice_common::size::parse_size(&v).ok()).unwrap_or(0);
    if bytes > 0 {
        tracing::warn!(
            "GPUSLICE_TEST_UNDERREPORT_BYTES: this process leaves {} of its allocations out of its report (a test of the controller's cross-check)",
            format_size(bytes)
        );
    }
    AtomicU64::new(bytes)
});

#[inline]
fn hide_from_report(budget: Budget, bytes: u64) {
    if UNDERREPORT_LEFT.load(Relaxed) == 0 {
        return;
    }
    let mut hidden = 0;
    let _ = UNDERREPORT_LEFT.fetch_update(SeqCst, Relaxed, |left| {
        hidden = left.min(bytes);
        Some(left - hidden)
    });
    budget.uncharge(hidden);
}

/// Bytes reserved for an allocation the driver has not answered yet; given back if the hook
/// unwinds before it does (the panic came from our code before the call, so nothing was made).
struct Reservation {
    budget: Budget,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.uncharge(self.bytes);
    }
}

/// Removes the record of `key`, runs `free`, and gives the bytes back if the driver freed it.
#[inline]
pub(crate) fn released(table: &AllocTable, key: u64, free: impl FnOnce() -> CuResult) -> CuResult {
    let _op = Operation::begin();
    let entry = table.remove(key);
    let code = free();
    if let Some(entry) = entry {
        if code == CUDA_SUCCESS {
            if let Some(budget) = budget::of(entry.device) {
                budget.uncharge(entry.bytes);
            }
        } else {
            // Still allocated as far as the driver is concerned.
            table.insert(key, entry);
        }
    }
    code
}

#[cold]
pub(crate) fn report_refusal(what: &str, device: CUdevice, bytes: u64, refusal: Refusal) {
    let pid = std::process::id();
    let whose = match (refusal.scope, crate::state::link::get()) {
        (Scope::Process, _) => format!(
            "this process's own cap: it holds {} ({} B) of {} ({} B)",
            format_size(refusal.used),
            refusal.used,
            format_size(refusal.limit),
            refusal.limit
        ),
        (Scope::Group, Some(l)) if l.controlled && !gpuslice_common::settings::is_solo_group(&l.group_name) => format!(
            "group {:?} holds {} ({} B) of its limit {} ({} B)",
            l.group_name,
            format_size(refusal.used),
            refusal.used,
            format_size(refusal.limit),
            refusal.limit
        ),
        (Scope::Group, _) => format!("used {} ({} B), limit {} ({} B)", format_size(refusal.used), refusal.used, format_size(refusal.limit), refusal.limit),
    };
    // The controller's cross-check may have charged the group the driver's figure.
    let penalty = crate::state::link::get().and_then(|l| Some(l.penalty(l.index(device)?))).unwrap_or(0);
    let charged = if penalty > 0 && refusal.scope == Scope::Group {
        format!(" (of which {} the controller charged because the driver shows the group's processes holding more than they report)", format_size(penalty))
    } else {
        String::new()
    };
    let line = format!("pid {pid}: {what} refused on device {device}: request {} ({bytes} B), {whose}{charged}: CUDA_ERROR_OUT_OF_MEMORY", format_size(bytes));
    match REFUSAL_LOG.admit(crate::sys::clock::host_ns()) {
        crate::policy::refusal_log::Verdict::Log { unlogged: 0, .. } => tracing::warn!("{line}"),
        crate::policy::refusal_log::Verdict::Log { unlogged, since_ns } => {
            tracing::warn!("{line} ({unlogged} more refusals in the last {:.1} s were not logged)", since_ns as f64 / 1e9)
        }
        crate::policy::refusal_log::Verdict::Quiet => tracing::debug!("{line}"),
    }
}

/// Refusals of a program that retries are logged once, then once per interval with a count.
static REFUSAL_LOG: Lazy<crate::policy::refusal_log::RateLimit> = Lazy::new(crate::policy::refusal_log::RateLimit::from_env);

pub(crate) fn current_device() -> Option<CUdevice> {
    driver()?.current_device()
}

/// Charges a correction after the driver reported the real size (pitch, arrays); on refusal the
/// allocation is undone by `undo` and the whole request refused.
pub(crate) fn charge_extra(budget: Budget, device: CUdevice, what: &'static str, requested: u64, extra: u64, undo: impl FnOnce()) -> bool {
    match budget.try_charge(extra) {
        Ok(()) => true,
        Err(refusal) => {
            undo();
            budget.uncharge(requested);
            report_refusal(what, device, requested + extra, refusal);
            false
        }
    }
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
        // A member of a group on the shim's suspend path: VMM-backed (issue 22).
        if let Some(code) = crate::hooks::vmm::alloc(dptr, bytesize as u64, "cuMemAlloc") {
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
