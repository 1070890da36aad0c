//! The suspend agent (issue 22, step 3): one thread per member of a group on the shim's
//! suspend path. It sleeps on the group's request word (`MemberSettings::suspend`, written by
//! the controller) and answers in its own process slot (`ProcessSlot::suspend_ack` and the
//! figures beside it), waking the controller's wait on that word.
//!
//! Suspend: close the gate (hooked calls wait), synchronise every context, copy every
//! VMM-backed range to pinned host memory and release its physical memory (`hooks::vmm`).
//! Resume: map new memory at the same addresses, copy back, open the gate. A resume that finds
//! no room undoes its attempt, keeps the gate closed and answers "failed, no room": the
//! controller asks again later. The thread costs nothing while it sleeps, and works whether or
//! not the program makes CUDA calls.

use crate::hooks::vmm;
use gpuslice_common::ledger::*;
use gpuslice_common::turns::{futex_wait, futex_wake};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::{Duration, Instant};

static STARTED: AtomicBool = AtomicBool::new(false);
/// How long the gate may wait for calls in flight (the driver path's lock timeout too).
const GATE_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent looks at the word at least this often (a wake lost to a race costs this much).
const RECHECK_NS: u64 = 1_000_000_000;

/// Starts the agent once (the first allocation of a member on the shim path, or its `cuInit`).
#[inline]
pub fn start() {
    if STARTED.load(Relaxed) || STARTED.swap(true, AcqRel) {
        return;
    }
    let Some(link) = crate::state::link::get() else { return };
    vmm::announce_caps();
    let spawned = std::thread::Builder::new().name("gpuslice-suspend".into()).spawn(move || {
        // No panic may leave the thread silently: a failed agent only means the driver's path.
        let _ = std::panic::catch_unwind(|| serve(link.members, link.process));
    });
    if let Err(e) = spawned {
        tracing::warn!("the suspend agent could not start ({e}): this process will be suspended by the driver's checkpoint");
    }
}

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules): the agent
/// thread is the parent's, so a child that uses CUDA starts its own.
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: crate::sys::atfork::nothing_to_hold, in_child: forget_in_child };

fn forget_in_child() {
    STARTED.store(false, Relaxed);
}

/// Whether this process's memory is on the host now.
struct Agent {
    suspended: bool,
}

fn serve(request: &'static MemberSettings, slot: &'static ProcessSlot) {
    let mut agent = Agent { suspended: false };
    let mut seen = 0;
    loop {
        let word = request.suspend.load(Acquire);
        if word != seen {
            agent.handle(word, slot);
            seen = word;
        }
        futex_wait(&request.suspend, word, u32::MAX, RECHECK_NS);
    }
}

fn answer(slot: &ProcessSlot, generation: u32, state: u32, error: u32, bytes: Option<u64>, started: Instant) {
    slot.suspend_error.store(error, Relaxed);
    if let Some(b) = bytes {
        slot.suspend_bytes.store(b, Relaxed);
        slot.suspend_ms.store(started.elapsed().as_millis().min(u32::MAX as u128) as u32, Relaxed);
    }
    slot.suspend_ack.store(suspend_ack(generation, state), Release);
    futex_wake(&slot.suspend_ack, u32::MAX);
}

impl Agent {
    fn handle(&mut self, word: u32, slot: &ProcessSlot) {
        let (generation, wanted) = ((word >> 1) & 0x0fff_ffff, word & 1 == 1);
        let started = Instant::now();
        let pid = std::process::id();
        match (wanted, self.suspended) {
            (true, false) => {
                answer(slot, generation, SUSPEND_SUSPENDING, 0, None, started);
                if crate::sys::gate::close(GATE_TIMEOUT).is_err() {
                    tracing::warn!("pid {pid}: not suspended: CUDA calls in flight did not finish within {GATE_TIMEOUT:?}");
                    return answer(slot, generation, SUSPEND_FAILED, SUSPEND_ERR_BUSY, None, started);
                }
                match vmm::move_out() {
                    Ok(bytes) => {
                        self.suspended = true;
                        let ms = started.elapsed().as_secs_f64() * 1e3;
                        tracing::info!("pid {pid}: suspended by its agent: {bytes} B to host memory in {ms:.0} ms");
                        answer(slot, generation, SUSPEND_SUSPENDED, 0, Some(bytes), started);
                    }
                    Err(code) => {
                        crate::sys::gate::open();
                        tracing::warn!("pid {pid}: suspension failed (driver code {code}); it runs on");
                        answer(slot, generation, SUSPEND_FAILED, SUSPEND_ERR_DRIVER | code << 16, None, started);
                    }
                }
            }
            (false, true) => {
                answer(slot, generation, SUSPEND_RESUMING, 0, None, started);
                match vmm::move_in() {
                    Ok(bytes) => {
                        self.suspended = false;
                        crate::sys::gate::open();
                        let ms = started.elapsed().as_secs_f64() * 1e3;
                        tracing::info!("pid {pid}: resumed by its agent: {bytes} B back on the device in {ms:.0} ms");
                        answer(slot, generation, SUSPEND_RUNNING, 0, Some(bytes), started);
                    }
                    Err(code) => {
                        // Still suspended, the gate closed, the host copies kept: asked again later.
                        let reason = if code == crate::sys::ffi::CUDA_ERROR_OUT_OF_MEMORY { SUSPEND_ERR_NO_ROOM } else { SUSPEND_ERR_DRIVER };
                        tracing::warn!("pid {pid}: resume failed (driver code {code}); it stays suspended");
                        answer(slot, generation, SUSPEND_FAILED, reason | code << 16, None, started);
                    }
                }
            }
            // Already as asked (a newcomer, a repeated request): say so under the new generation.
            (true, true) => answer(slot, generation, SUSPEND_SUSPENDED, 0, None, started),
            (false, false) => {
                if generation != 0 {
                    answer(slot, generation, SUSPEND_RUNNING, 0, None, started);
                }
            }
        }
    }
}
