//! The suspend agent (issue 22, step 3): one thread per member of a group on the shim's
//! suspend path. It acts on its own request word (`ProcessSlot::suspend_request`, written by
//! the controller for the members it addresses), sleeping on the group's word
//! (`MemberSettings::suspend`), which the controller changes and wakes after each request; it
//! answers in its own process slot (`suspend_ack` and the figures beside it), waking the
//! controller's wait on that word. A member the controller does not address (one that the
//! driver's checkpoint suspends, a newcomer) never moves: the two paths never stack.
//!
//! Suspend: close the gate (hooked calls wait), synchronise every context, copy every
//! VMM-backed range to pinned host memory and release its physical memory (`hooks::vmm`).
//! Resume: map new memory at the same addresses, copy back, open the gate. A resume that finds
//! no room undoes its attempt, keeps the gate closed and answers "failed, no room": the
//! controller asks again later. While the agent holds the process suspended, `suspend_held` is
//! 1, so that a controller can always find and resume it. The thread costs nothing while it
//! sleeps, and works whether or not the program makes CUDA calls.

use crate::hooks::vmm::{self, Moved};
use gpuslice_common::ledger::*;
use gpuslice_common::size::format_size;
use gpuslice_common::turns::{futex_wait, futex_wake};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static STARTED: AtomicBool = AtomicBool::new(false);
/// How long the gate may wait for calls in flight (the driver path's lock timeout too), unless
/// the controller asks for less (`gate_timeout`).
const GATE_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent looks at its word at least this often (a wake lost to a race costs this much).
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
    crate::hooks::vmm_ring::forget_in_child();
}

/// Test knob `GPUSLICE_TEST_SUSPEND_KEEP_BYTES=N`: the agent reports N as what its process
/// keeps on the device while suspended, whatever it keeps (a lie, as a tenant writing its slot
/// could tell anyway); CI uses it to make the controller disbelieve an agent and fall back.
fn keep_override() -> Option<u64> {
    static KEEP: OnceLock<Option<u64>> = OnceLock::new();
    *KEEP.get_or_init(|| {
        // Plain bytes first: `parse_size` refuses 0, the figure this knob is for.
        let bytes =
            std::env::var("GPUSLICE_TEST_SUSPEND_KEEP_BYTES").ok().and_then(|v| v.trim().parse().ok().or_else(|| gpuslice_common::size::parse_size(&v).ok()));
        if let Some(b) = bytes {
            tracing::warn!(
                "GPUSLICE_TEST_SUSPEND_KEEP_BYTES: the suspend agent reports keeping {} on the device, whatever it keeps (a test of the controller's check)",
                format_size(b)
            );
        }
        bytes
    })
}

/// How long this suspension's gate may wait for calls in flight: what the controller wrote
/// before its request (the suspension policy bounds it by the waiting request's time), at
/// most `GATE_TIMEOUT`; 0 (an older controller, or none written) is `GATE_TIMEOUT`.
fn gate_timeout(slot: &ProcessSlot) -> Duration {
    match slot.suspend_gate_ms.load(Relaxed) {
        0 => GATE_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)).min(GATE_TIMEOUT),
    }
}

/// Whether this process's memory is on the host now.
struct Agent {
    suspended: bool,
}

fn serve(ring: &'static MemberSettings, slot: &'static ProcessSlot) {
    let mut agent = Agent { suspended: false };
    let mut seen = 0;
    let mut staged = false;
    loop {
        if !staged {
            // The staging ring is pinned ahead, once the process has memory to move, so that
            // the first suspension does not pay for it (it would pin it itself otherwise).
            staged = vmm::prepare_ring();
        }
        // The ring first: the controller writes this member's request, then the ring, so a
        // request written after these loads changes the ring and the wait returns at once.
        let rung = ring.suspend.load(Acquire);
        let mine = slot.suspend_request.load(Acquire);
        if mine != seen {
            agent.handle(mine, slot);
            seen = mine;
            continue;
        }
        futex_wait(&ring.suspend, rung, u32::MAX, RECHECK_NS);
    }
}

/// The answer's words: the figures first, the acknowledgement last (the controller reads the
/// figures once it sees the acknowledgement).
struct Answer<'a> {
    slot: &'a ProcessSlot,
    generation: u32,
    started: Instant,
}

impl Answer<'_> {
    fn say(&self, state: u32, error: u32) {
        self.slot.suspend_error.store(error, Relaxed);
        self.slot.suspend_ack.store(suspend_ack(self.generation, state), Release);
        futex_wake(&self.slot.suspend_ack, u32::MAX);
    }

    /// A move done: its figures (`phase_us` for the phases this direction has), then `state`.
    fn moved(&self, state: u32, moved: &Moved, phase_us: &[u64; PHASES], keep: Option<u64>) {
        let s = self.slot;
        s.suspend_bytes.store(moved.bytes, Relaxed);
        s.suspend_ranges.store(moved.ranges, Relaxed);
        s.suspend_ms.store(self.started.elapsed().as_millis().min(u32::MAX as u128) as u32, Relaxed);
        for (word, &us) in s.suspend_phase_us.iter().zip(phase_us) {
            word.store(us.min(u32::MAX as u64) as u32, Relaxed);
        }
        if let Some(k) = keep {
            s.suspend_keep.store(k, Relaxed);
        }
        self.say(state, 0);
    }
}

/// "gate 3 ms, sync 1 ms, ..." for the phases of one direction.
fn describe(phase_us: &[u64; PHASES], phases: &[usize]) -> String {
    phases.iter().map(|&p| format!("{} {:.1} ms", PHASE_NAMES[p], phase_us[p] as f64 / 1e3)).collect::<Vec<_>>().join(", ")
}

/// "path: staging ring 8 × 64.0 MiB, 8 workers" for a log line.
fn path(moved: &Moved) -> String {
    match moved.ring {
        Some(r) => format!("path: {} {} × {}, {} workers", moved.path, r.slots, format_size(r.slot), r.workers),
        None => format!("path: {}", moved.path),
    }
}

fn gbps(bytes: u64, started: Instant) -> f64 {
    bytes as f64 / started.elapsed().as_secs_f64().max(1e-9) / 1e9
}

impl Agent {
    fn handle(&mut self, word: u32, slot: &ProcessSlot) {
        let (generation, wanted) = ((word >> 1) & 0x0fff_ffff, word & 1 == 1);
        let answer = Answer { slot, generation, started: Instant::now() };
        match (wanted, self.suspended) {
            (true, false) => self.suspend(&answer),
            (false, true) => self.resume(&answer),
            // Already as asked (a repeated request): say so under the new generation.
            (true, true) => answer.say(SUSPEND_SUSPENDED, 0),
            (false, false) => {
                if generation != 0 {
                    answer.say(SUSPEND_RUNNING, 0);
                }
            }
        }
    }

    fn suspend(&mut self, answer: &Answer<'_>) {
        let pid = std::process::id();
        answer.say(SUSPEND_SUSPENDING, 0);
        vmm::announce_caps();
        if !crate::sys::gate::fast_suspendable() {
            // A function handed out bare could reach released memory: a clean refusal, never a fault.
            tracing::warn!("pid {pid}: not suspended by its agent: a driver function it was given bypasses the suspend gate");
            return answer.say(SUSPEND_FAILED, SUSPEND_ERR_HOLE);
        }
        let t = Instant::now();
        let timeout = gate_timeout(answer.slot);
        if crate::sys::gate::close(timeout).is_err() {
            tracing::warn!("pid {pid}: not suspended: CUDA calls in flight did not finish within {timeout:?}");
            return answer.say(SUSPEND_FAILED, SUSPEND_ERR_BUSY);
        }
        let gate_us = t.elapsed().as_micros() as u64;
        match vmm::move_out() {
            Ok(moved) => {
                self.suspended = true;
                answer.slot.suspend_held.store(1, Release);
                let mut phase_us = moved.phase_us;
                phase_us[PHASE_GATE] = gate_us;
                // What it charged and did not move stays: contexts, modules, other memory.
                let charged: u64 = answer.slot.devices.iter().map(|d| d.used.load(Relaxed)).sum();
                let keep = keep_override().unwrap_or(charged.saturating_sub(moved.requested));
                tracing::info!(
                    "pid {pid}: suspended by its agent: {} B in {} allocations to host memory in {:.0} ms ({:.2} GB/s; {}; {}); keeps {} on the device; {} driver functions outside the table pass the gate through spare thunks",
                    moved.bytes,
                    moved.ranges,
                    answer.started.elapsed().as_secs_f64() * 1e3,
                    gbps(moved.bytes, answer.started),
                    describe(&phase_us, &PHASES_OUT),
                    path(&moved),
                    format_size(keep),
                    crate::sys::gate::spares_used()
                );
                answer.moved(SUSPEND_SUSPENDED, &moved, &phase_us, Some(keep));
            }
            Err(code) => {
                crate::sys::gate::open();
                tracing::warn!("pid {pid}: suspension failed (driver code {code}); it runs on");
                answer.say(SUSPEND_FAILED, SUSPEND_ERR_DRIVER | code << 16);
            }
        }
    }

    fn resume(&mut self, answer: &Answer<'_>) {
        let pid = std::process::id();
        answer.say(SUSPEND_RESUMING, 0);
        match vmm::move_in() {
            Ok(moved) => {
                self.suspended = false;
                crate::sys::gate::open();
                answer.slot.suspend_held.store(0, Release);
                // The suspension's split stays readable beside the resume's.
                let mut phase_us: [u64; PHASES] = std::array::from_fn(|i| u64::from(answer.slot.suspend_phase_us[i].load(Relaxed)));
                for p in PHASES_IN {
                    phase_us[p] = moved.phase_us[p];
                }
                tracing::info!(
                    "pid {pid}: resumed by its agent: {} B in {} allocations back on the device in {:.0} ms ({:.2} GB/s; {}; {})",
                    moved.bytes,
                    moved.ranges,
                    answer.started.elapsed().as_secs_f64() * 1e3,
                    gbps(moved.bytes, answer.started),
                    describe(&phase_us, &PHASES_IN),
                    path(&moved)
                );
                answer.moved(SUSPEND_RUNNING, &moved, &phase_us, None);
            }
            Err(code) => {
                // Still suspended, the gate closed, the host copies kept: asked again later.
                let reason = if code == crate::sys::ffi::CUDA_ERROR_OUT_OF_MEMORY { SUSPEND_ERR_NO_ROOM } else { SUSPEND_ERR_DRIVER };
                tracing::warn!("pid {pid}: resume failed (driver code {code}); it stays suspended");
                answer.say(SUSPEND_FAILED, reason | code << 16);
            }
        }
    }
}
