//! Contexts and the memory the driver holds for them: measured when a context is created,
//! charged to the device's budget as overhead, and given back when it is destroyed.
//!
//! The measure is NVML's per-process figure before and after creation (exact, when NVML lists
//! this pid), else NVML's device-wide used delta (close, unless another process allocates at the
//! same instant). Near the limit, `true_up` re-reads the per-process figure so that memory the
//! driver takes outside any allocation call (modules loaded lazily, pool blocks kept after a
//! free) still counts against the quota.

use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use crate::sys::real_nvml::nvml;
use crate::{hooks::charge, sys::guard, sys::locks, sys::runtime};
use crate::{policy::budget, policy::switch_ahead::Ending, state::link};
use gpuslice_common::size::format_size;
use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::*};
use std::sync::Mutex;

/// Per device: has the primary context's reserve been charged? 0 no, 1 being measured, 2 yes.
static PRIMARY: [AtomicU8; link::MAX_ORDINALS] = [const { AtomicU8::new(0) }; link::MAX_ORDINALS];
/// Reserve charged for the primary context of each device.
static PRIMARY_RESERVE: [AtomicU64; link::MAX_ORDINALS] = [const { AtomicU64::new(0) }; link::MAX_ORDINALS];
/// Non-primary contexts: context → (device, reserve charged).
static CREATED: Mutex<Option<HashMap<usize, (CUdevice, u64)>>> = Mutex::new(None);
/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: hold_for_fork, in_child: forget_in_child };

/// The created contexts' lock, for a fork: a child's contexts are its own (see `sys::atfork`).
pub fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    h.take(&CREATED, |m| *m = None);
}

/// In a forked child: no primary context's reserve is charged to it yet (the parent's was
/// charged to the parent's slot); its own is measured when it makes one.
pub fn forget_in_child() {
    for (state, reserve) in PRIMARY.iter().zip(&PRIMARY_RESERVE) {
        state.store(0, Release);
        reserve.store(0, Release);
    }
}

/// A reading taken before a context is created.
struct Before {
    process: Option<u64>,
    device: Option<u64>,
}

/// Measured when a limit applies or a controller watches (a limit may be set later, and `ls`
/// shows the reserve); a process alone without a limit skips the NVML calls.
fn wants_measure(device: CUdevice) -> bool {
    budget::of(device).is_some_and(|b| b.limit().is_some()) || link::get().is_some_and(|l| l.controlled)
}

fn measure_before(device: CUdevice) -> Option<Before> {
    let nv = nvml()?;
    Some(Before { process: nv.process_used(device).map(|p| p.unwrap_or(0)), device: nv.device_used(device) })
}

/// Bytes the new context took, from the readings before and now.
fn measure_after(device: CUdevice, before: &Before) -> Option<u64> {
    let nv = nvml()?;
    if let (Some(b), Some(Some(a))) = (before.process, nv.process_used(device)) {
        return Some(a.saturating_sub(b));
    }
    let (Some(b), Some(a)) = (before.device, nv.device_used(device)) else { return None };
    Some(a.saturating_sub(b))
}

fn charge_reserve(device: CUdevice, reserve: u64, what: &str) {
    if let Some(b) = budget::of(device) {
        b.add_overhead(reserve);
        tracing::info!("{what} on device {device} holds {} of device memory; counted against the quota", format_size(reserve));
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, device: CUdevice) -> CuResult {
    guard::cuda("cuDevicePrimaryCtxRetain", || {
        if runtime::refused() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let slot = usize::try_from(device).ok().and_then(|d| PRIMARY.get(d));
        crate::policy::sched::context_created(device);
        crate::policy::mps::context_created(device);
        let _op = charge::Operation::begin();
        let measuring = wants_measure(device) && slot.is_some_and(|s| s.compare_exchange(0, 1, AcqRel, Relaxed).is_ok());
        if !measuring {
            return call_real!(cuDevicePrimaryCtxRetain(pctx, device));
        }
        let before = measure_before(device);
        let code = call_real!(cuDevicePrimaryCtxRetain(pctx, device));
        let slot = slot.expect("measuring implies a slot");
        if code != CUDA_SUCCESS {
            slot.store(0, Release);
            return code;
        }
        let reserve = before.and_then(|b| measure_after(device, &b)).unwrap_or(0);
        PRIMARY_RESERVE[device as usize].store(reserve, Release);
        charge_reserve(device, reserve, "the primary context");
        slot.store(2, Release);
        code
    })
}

/// Gives the primary context's reserve back once the driver says it is gone.
fn primary_gone(device: CUdevice) {
    let Some(slot) = usize::try_from(device).ok().and_then(|d| PRIMARY.get(d)) else { return };
    let mut flags: c_uint = 0;
    let mut active: c_int = 1;
    if call_real!(cuDevicePrimaryCtxGetState(device, &mut flags, &mut active)) != CUDA_SUCCESS || active != 0 {
        return;
    }
    if slot.compare_exchange(2, 0, AcqRel, Relaxed).is_ok() {
        let reserve = PRIMARY_RESERVE[device as usize].swap(0, AcqRel);
        if let Some(b) = budget::of(device) {
            b.remove_overhead(reserve);
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(device: CUdevice) -> CuResult {
    guard::cuda("cuDevicePrimaryCtxRelease_v2", || ending(Ending::Device(device), || call_real!(cuDevicePrimaryCtxRelease_v2(device)), || primary_gone(device)))
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(device: CUdevice) -> CuResult {
    guard::cuda("cuDevicePrimaryCtxReset_v2", || ending(Ending::Device(device), || call_real!(cuDevicePrimaryCtxReset_v2(device)), || primary_reset(device)))
}

/// `ended`, for a call that may end a context: what the shim made in it goes first, while the
/// context lives (`sched::context_ending`).
fn ending(what: Ending, call: impl FnOnce() -> CuResult, then: impl FnOnce()) -> CuResult {
    crate::policy::sched::context_ending(what);
    ended(call, then)
}

/// Runs a call that ends something the driver held (a context, or a reference to the primary
/// one) inside an operation window, and `then` when the driver says it succeeded.
fn ended(call: impl FnOnce() -> CuResult, then: impl FnOnce()) -> CuResult {
    let _op = charge::Operation::begin();
    let code = call();
    if code == CUDA_SUCCESS {
        then();
    }
    code
}

/// Gives back the reserve a created context was charged.
fn context_destroyed(ctx: CUcontext) {
    let entry = locks::lock(&CREATED).as_mut().and_then(|m| m.remove(&(ctx as usize)));
    if let Some((device, reserve)) = entry {
        if let Some(b) = budget::of(device) {
            b.remove_overhead(reserve);
        }
    }
}

/// A reset frees every allocation of the primary context. Programs that mix primary and created
/// contexts on one device lose the created ones' records too; see LD_PRELOAD.md, "What it
/// cannot catch".
fn primary_reset(device: CUdevice) {
    let freed = charge::forget_device(device);
    if let Some(b) = budget::of(device) {
        b.uncharge(freed);
    }
    primary_gone(device);
}

/// Runs a context-creating call, measuring what the new context holds when a limit applies.
fn created(pctx: *mut CUcontext, device: CUdevice, create: impl FnOnce() -> CuResult) -> CuResult {
    if runtime::refused() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    crate::policy::sched::context_created(device);
    crate::policy::mps::context_created(device);
    let _op = charge::Operation::begin();
    if !wants_measure(device) {
        return create();
    }
    let before = measure_before(device);
    let code = create();
    if code == CUDA_SUCCESS && !pctx.is_null() {
        let reserve = before.and_then(|b| measure_after(device, &b)).unwrap_or(0);
        charge_reserve(device, reserve, "a new context");
        // SAFETY: the driver wrote the new context.
        let ctx = unsafe { *pctx } as usize;
        locks::lock(&CREATED).get_or_insert_with(HashMap::new).insert(ctx, (device, reserve));
    }
    code
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(pctx: *mut CUcontext, flags: c_uint, device: CUdevice) -> CuResult {
    guard::cuda("cuCtxCreate_v2", || created(pctx, device, || call_real!(cuCtxCreate_v2(pctx, flags, device))))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v3(pctx: *mut CUcontext, params: *mut c_void, num_params: c_int, flags: c_uint, device: CUdevice) -> CuResult {
    guard::cuda("cuCtxCreate_v3", || created(pctx, device, || call_real!(cuCtxCreate_v3(pctx, params, num_params, flags, device))))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(pctx: *mut CUcontext, params: *mut c_void, flags: c_uint, device: CUdevice) -> CuResult {
    guard::cuda("cuCtxCreate_v4", || created(pctx, device, || call_real!(cuCtxCreate_v4(pctx, params, flags, device))))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CuResult {
    guard::cuda("cuCtxDestroy_v2", || ending(Ending::Context(ctx as usize), || call_real!(cuCtxDestroy_v2(ctx)), || context_destroyed(ctx)))
}

// The pre-`_v2` context entry points (same ABI; see `legacy`): counted like the `_v2` ones.

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate(pctx: *mut CUcontext, flags: c_uint, device: CUdevice) -> CuResult {
    guard::cuda("cuCtxCreate", || created(pctx, device, || call_real!(cuCtxCreate(pctx, flags, device))))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy(ctx: CUcontext) -> CuResult {
    guard::cuda("cuCtxDestroy", || ending(Ending::Context(ctx as usize), || call_real!(cuCtxDestroy(ctx)), || context_destroyed(ctx)))
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease(device: CUdevice) -> CuResult {
    guard::cuda("cuDevicePrimaryCtxRelease", || ending(Ending::Device(device), || call_real!(cuDevicePrimaryCtxRelease(device)), || primary_gone(device)))
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset(device: CUdevice) -> CuResult {
    guard::cuda("cuDevicePrimaryCtxReset", || ending(Ending::Device(device), || call_real!(cuDevicePrimaryCtxReset(device)), || primary_reset(device)))
}
