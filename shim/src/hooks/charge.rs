//! What this process holds on each device through the shim, and how a request for more is
//! charged: the tables of allocations, VMM handles, arrays, modules and libraries (what each
//! holds, by key); the operations under way (so that a measurement is taken only while none
//! is half done); the charge itself (`charged_memory`: budget first, driver second, record
//! third, refused over the limit with a line that names the process, the request and the
//! limit); the release; and `true_up`, which re-measures near the limit what the driver holds
//! outside the tables.
//!
//! The hooks above (`memory`, `legacy`, `vmm`, `modules`, `context`, `sharing`) call into it;
//! it calls none of them.

use crate::policy::budget::{self, Budget, Refusal, Scope};
use crate::state::alloc_table::{AllocTable, Entry};
use crate::state::link;
use crate::sys::driver::driver;
use crate::sys::ffi::*;
use crate::sys::real_nvml::nvml;
use crate::sys::{guard, runtime};
use gpuslice_common::size::format_size;
use once_cell::sync::Lazy;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{AcqRel, Relaxed, SeqCst},
};

/// Linear allocations (cuMemAlloc, pitch, managed, async, pools), by device pointer.
pub(crate) static POINTERS: Lazy<AllocTable> = Lazy::new(AllocTable::new);
/// Virtual memory management handles (cuMemCreate), by handle.
pub(crate) static HANDLES: Lazy<AllocTable> = Lazy::new(AllocTable::new);
/// CUDA arrays and mipmapped arrays, by handle.
pub(crate) static ARRAYS: Lazy<AllocTable> = Lazy::new(AllocTable::new);
/// Loaded modules, by `CUmodule`.
pub(crate) static MODULES: Lazy<AllocTable> = Lazy::new(AllocTable::new);
/// Loaded libraries, by `CUlibrary`.
pub(crate) static LIBRARIES: Lazy<AllocTable> = Lazy::new(AllocTable::new);
/// Per device: when the overhead was last re-measured (`clock::host_ns`), to bound NVML calls.
static LAST_TRUE_UP: [AtomicU64; link::MAX_ORDINALS] = [const { AtomicU64::new(0) }; link::MAX_ORDINALS];

/// Operations that change what the driver holds for this process, between their first step
/// and their last (low 32 bits), and how many have ended (high 32 bits). `true_up`
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
    for table in [&*POINTERS, &*HANDLES, &*ARRAYS, &*MODULES, &*LIBRARIES] {
        table.hold_for_fork(h);
    }
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
    allocated_bytes(device) + MODULES.bytes_on(device) + LIBRARIES.bytes_on(device)
}

/// Forgets every allocation on `device` (its primary context was reset, which frees them all).
pub fn forget_device(device: i32) -> u64 {
    POINTERS.drain_device(device) + HANDLES.drain_device(device) + ARRAYS.drain_device(device) + MODULES.drain_device(device) + LIBRARIES.drain_device(device)
}

/// Re-measures the memory the driver holds for this process outside tracked allocations, at
/// most once a millisecond per device, when no other operation overlaps the measurement. Only
/// called near the limit.
pub fn true_up(device: CUdevice) {
    let Some(slot) = usize::try_from(device).ok().and_then(|d| LAST_TRUE_UP.get(d)) else { return };
    let now = crate::sys::clock::host_ns();
    let last = slot.load(Relaxed);
    if last != 0 && now.saturating_sub(last) < 1_000_000 {
        return;
    }
    if slot.compare_exchange(last, now, AcqRel, Relaxed).is_err() {
        return; // Another thread is measuring.
    }
    let Some(nv) = nvml() else { return };
    let Some(b) = budget::of(device) else { return };
    // Only across a stretch with no allocation, free or context change under way (see
    // `Operation`); otherwise the figure stays as it was until a later call.
    let Some(mark) = quiet_mark() else { return };
    let Some(Some(process)) = nv.process_used(device) else { return };
    let tracked = tracked_bytes(device);
    if quiet_mark() != Some(mark) {
        return;
    }
    let overhead = process.saturating_sub(tracked);
    if overhead != b.overhead() {
        tracing::debug!(
            "device {device}: driver-held memory re-measured: {} (was {}), tracked {}",
            format_size(overhead),
            format_size(b.overhead()),
            format_size(tracked)
        );
        b.set_overhead(overhead);
    }
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
        true_up(device);
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
