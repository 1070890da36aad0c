//! The shim's own CUDA events, made and recorded in one place: a timing pair around a span of
//! launches (`cost`) and a sleeper that a thread waits on until a stream drains (`sched`,
//! `cost::wait_for`). The pools that keep them per context stay with their users, whose locks
//! nest differently (see `hooks::fork`).

use crate::sys::driver::driver;
use crate::sys::ffi::*;
use std::ffi::{c_uint, c_void};

/// `CU_EVENT_BLOCKING_SYNC`.
const BLOCKING_SYNC: c_uint = 0x1;
/// `CU_EVENT_DISABLE_TIMING`.
const DISABLE_TIMING: c_uint = 0x2;

/// An event whose waiters sleep (the driver's default wait spins: a throttled process waits
/// for each of its bursts to drain before it hands the turn over, and spinning through them cost
/// each process about its own device share in CPU time, issue 14, stop 11).
pub const SLEEPER: c_uint = BLOCKING_SYNC | DISABLE_TIMING;
/// An event that records when the device reached it (`cuEventElapsedTime`).
pub const TIMING: c_uint = 0;

/// The calling thread's current context, as a number (the pools' key).
pub fn current_context() -> Option<usize> {
    driver()?.current_context()
}

/// A new event of kind `flags` (`SLEEPER`, `TIMING`) in the current context.
pub fn create(flags: c_uint) -> Option<usize> {
    let create = driver()?.cuEventCreate?;
    let mut ev: *mut c_void = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the event is made in the current context.
    (unsafe { create(&mut ev, flags) } == CUDA_SUCCESS).then_some(ev as usize)
}

/// Records one of the shim's events on the program's stream.
pub fn record(event: usize, stream: CUstream) -> bool {
    driver().is_some_and(|d| d.record_event(event, stream))
}

/// Waits until the device reaches `event` (a sleeper sleeps).
pub fn synchronize(event: usize) {
    let Some(sync) = driver().and_then(|d| d.cuEventSynchronize) else { return };
    // SAFETY: one of the shim's own events.
    let _ = unsafe { sync(event as *mut c_void) };
}
