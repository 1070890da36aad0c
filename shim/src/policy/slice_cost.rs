//! How many blocks a slice of a sliced kernel gets: from the measured device time of its blocks
//! (two timing events around one launch of it: the first few launches, then every 16th), so that
//! a slice lasts about `TARGET_NS` and a high-priority request waits for at most one slice.

use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::sys::median::Median;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// How long a slice should last: what a high-priority request may wait for.
pub const TARGET_NS: u64 = 100_000;
const SAMPLE_EVERY: u64 = 16;
const FIRST_SAMPLES: usize = 4;
/// A measured launch shorter than this says little of its blocks (launch latency, event
/// resolution) and is dropped: such a kernel needs no slicing anyway.
const MIN_SAMPLE_NS: f64 = 10_000.0;
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const ATTR_SMS: i32 = 16;

/// Two timing events of one context.
#[derive(Clone, Copy)]
pub struct Events {
    ctx: usize,
    start: usize,
    end: usize,
}

/// A sliced kernel's recent measurements: device time per block.
#[derive(Default)]
pub struct Sampler {
    samples: Median,
    launches: u64,
    /// The events (created at the first measurement).
    events: Option<Events>,
    /// Blocks of the measured launch whose end event has not been read yet.
    pending: Option<u64>,
    /// The events are lent to a launch of another thread.
    lent: bool,
}

impl Sampler {
    /// Device time of one block: the upper median of the recent samples (`median`). Not the
    /// least: one launch with a smaller problem (a warm-up, a short batch) would make every
    /// slice after it too long, and a slice too long is what a high-priority request waits for.
    pub fn block_ns(&self) -> Option<u64> {
        self.samples.get()
    }

    /// Reads a finished measurement, and lends the events out when this launch is to be measured
    /// (in the current context, `ctx()`) and `may` says it can be (its stream is not capturing).
    /// Asks nothing of the driver when there is nothing to read or measure.
    pub fn begin(&mut self, ctx: impl FnOnce() -> Option<usize>, may: impl FnOnce() -> bool) -> Option<Events> {
        self.launches += 1;
        let due = self.samples.len() < FIRST_SAMPLES || self.launches.is_multiple_of(SAMPLE_EVERY);
        if self.lent || (!due && self.pending.is_none()) {
            return None;
        }
        let ctx = ctx()?;
        let events = match self.events {
            Some(e) if e.ctx != ctx => return None,
            Some(e) => e,
            None => {
                let e = Events { ctx, start: create()?, end: create()? };
                self.events = Some(e);
                e
            }
        };
        if let Some(blocks) = self.pending {
            if call_real!(cuEventQuery(events.end as *mut c_void)) == CUDA_ERROR_NOT_READY {
                return None;
            }
            self.pending = None;
            let mut ms = 0f32;
            let ok = call_real!(cuEventElapsedTime(&mut ms, events.start as *mut c_void, events.end as *mut c_void)) == CUDA_SUCCESS;
            let ns = f64::from(ms) * 1e6;
            if ok && ns >= MIN_SAMPLE_NS {
                self.samples.push((ns / blocks.max(1) as f64).max(1.0) as u64);
            }
        }
        let due = due && may();
        self.lent = due;
        due.then_some(events)
    }

    /// Takes the events back after a launch of `blocks` blocks between them (`measured`: both
    /// events and the launch went in).
    pub fn end(&mut self, events: Events, blocks: u64, measured: bool) {
        self.events = Some(events);
        self.lent = false;
        self.pending = measured.then_some(blocks);
    }
}

/// Runs `launch` of `blocks` blocks on `stream` between `events` (when lent); true when all three
/// went in, so that the sample is good.
pub fn measured(events: Option<Events>, stream: CUstream, launch: impl FnOnce() -> CuResult) -> (CuResult, bool) {
    let Some(e) = events else { return (launch(), false) };
    let record = |ev: usize| driver().is_some_and(|d| d.record_event(ev, stream));
    let started = record(e.start);
    let code = launch();
    let ended = code == CUDA_SUCCESS && record(e.end);
    (code, started && ended)
}

fn create() -> Option<usize> {
    let mut ev: *mut c_void = std::ptr::null_mut();
    (call_real!(cuEventCreate(&mut ev, 0)) == CUDA_SUCCESS && !ev.is_null()).then_some(ev as usize)
}

/// SMs per device, read once.
static SMS: [AtomicU32; 64] = [const { AtomicU32::new(0) }; 64];

fn sms(device: CUdevice) -> u64 {
    let Some(cell) = usize::try_from(device).ok().and_then(|d| SMS.get(d)) else { return 1 };
    let known = cell.load(Relaxed);
    if known != 0 {
        return u64::from(known);
    }
    let mut v = 0;
    let n = if call_real!(cuDeviceGetAttribute(&mut v, ATTR_SMS, device)) == CUDA_SUCCESS && v > 0 { v as u32 } else { 1 };
    cell.store(n, Relaxed);
    u64::from(n)
}

/// Blocks per slice on `device`: `TARGET_NS` of measured block time, at least one block per SM
/// (fewer does not make a slice shorter); one block per SM until a measurement exists.
pub fn blocks_per_slice(device: CUdevice, block_ns: Option<u64>) -> u64 {
    let wave = sms(device);
    match block_ns {
        Some(ns) => gpuslice_ptx::plan::blocks_per_slice(TARGET_NS, ns, wave),
        None => wave,
    }
}
