//! The shim's own CUDA events, made and recorded in one place: a timing pair around a span of
//! launches (`cost`) and a sleeper that a thread waits on until a stream drains (`sched`,
//! `cost::wait_for`). The events not in use wait in one pool per kind and context
//! (`SLEEPERS`, `TIMINGS`).

use crate::sys::atfork::{self, Handlers, Holder};
use crate::sys::driver::driver;
use crate::sys::ffi::*;
use crate::sys::locks;
use std::collections::HashMap;
use std::ffi::{c_uint, c_void};
use std::sync::Mutex;

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

/// Events of one kind not in use, per context (an event belongs to the context it was made in).
pub struct Pool {
    flags: c_uint,
    free: Mutex<Option<HashMap<usize, Vec<usize>>>>,
}

/// The sleepers of every context: `sched`'s launch order and `cost::wait_for` take from it.
pub static SLEEPERS: Pool = Pool { flags: SLEEPER, free: Mutex::new(None) };
/// The timing events of every context, for `cost`'s spans.
pub static TIMINGS: Pool = Pool { flags: TIMING, free: Mutex::new(None) };
/// Events that sleep when waited on and also time (the duration budget, `policy::flight_cost`).
pub static TIMED_SLEEPERS: Pool = Pool { flags: BLOCKING_SYNC, free: Mutex::new(None) };

impl Pool {
    /// An event of context `ctx` (the current one): one given back earlier, or a new one.
    pub fn take(&self, ctx: usize) -> Option<usize> {
        let reused = locks::lock(&self.free).as_mut().and_then(|p| p.get_mut(&ctx)).and_then(|v| v.pop());
        reused.or_else(|| create(self.flags))
    }

    /// Gives `event` of context `ctx` back for reuse.
    pub fn give(&self, ctx: usize, event: usize) {
        locks::lock(&self.free).get_or_insert_with(HashMap::new).entry(ctx).or_default().push(event);
    }
}

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules): a pool's
/// lock is a leaf (nothing is taken while it is held), so it may be taken after every other.
/// The child keeps the pools: they are per context, a forked child's contexts are new, and its
/// parent's events are never reused.
pub const FORK: Handlers = Handlers { prepare: hold_for_fork, in_child: atfork::nothing_to_forget };

fn hold_for_fork(h: &mut Holder) {
    h.take(&SLEEPERS.free, atfork::keep);
    h.take(&TIMINGS.free, atfork::keep);
    h.take(&TIMED_SLEEPERS.free, atfork::keep);
}
