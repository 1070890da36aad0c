//! What a launch costs in device time: learned per kernel shape (function, grid, block, shared
//! memory) or per CUDA graph from events on the launching stream, and settled against the
//! measured truth.
//!
//! A sampled launch is bracketed by two events from a per-context pool. When the host model says
//! earlier work was still queued (`Bucket::busy`), the first event goes on the stream of the
//! process's previous launch and completes exactly when that launch ends; this kernel runs right
//! after it, so the pair measures the kernel's effective back-to-back time even when the process
//! spreads its work over many streams ("busy" sample). On an idle device the pair also includes the launch latency
//! ("idle" sample); it is used only until a busy sample exists. Every 8th launch of a shape is
//! sampled, and every launch of a shape not yet measured; such launches are charged
//! `UNKNOWN_NS` until their sample arrives, which errs towards under-use, never over-use.
//!
//! A shape's estimate is the floor of its last 8 samples of a kind (a sample can only be
//! stretched, by another process's time slice or by a race between threads for the opening
//! event, never shortened). When a sample arrives, the launch it measured is settled in the
//! bucket from what it was charged to the estimate its measurement produced: errors do not
//! accumulate.

use crate::driver::driver;
use crate::ffi::*;
use crate::throttle::Bucket;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering::*};

/// Charged for a launch whose shape has no measurement yet.
pub const UNKNOWN_NS: u64 = 1_000_000;
const SAMPLE_EVERY: u64 = 8;
/// Outstanding samples per context beyond which no new ones are taken.
const MAX_PENDING: usize = 256;

/// Samples an estimate is the floor of: a kernel of one shape cannot run faster than it does,
/// but a sample can be stretched (another process's time slice, a race between threads on the
/// opening event), so the floor of the last few is the robust figure.
const WINDOW: usize = 8;

#[derive(Default, Clone, Copy)]
struct Window {
    samples: [u64; WINDOW],
    next: usize,
    filled: usize,
}

impl Window {
    fn push(&mut self, v: u64) -> u64 {
        self.samples[self.next] = v;
        self.next = (self.next + 1) % WINDOW;
        self.filled = (self.filled + 1).min(WINDOW);
        self.floor()
    }

    fn floor(&self) -> u64 {
        self.samples[..self.filled].iter().copied().min().unwrap_or(0)
    }
}

#[derive(Default, Clone, Copy)]
struct Estimate {
    busy_ns: u64,
    idle_ns: u64,
    busy: Window,
    idle: Window,
    launches: u64,
}

impl Estimate {
    fn charge_ns(&self) -> u64 {
        if self.busy_ns != 0 {
            self.busy_ns
        } else if self.idle_ns != 0 {
            self.idle_ns
        } else {
            UNKNOWN_NS
        }
    }
}

const SHARDS: usize = 16;
static ESTIMATES: [Mutex<Option<HashMap<u64, Estimate>>>; SHARDS] = [const { Mutex::new(None) }; SHARDS];

fn shard(key: u64) -> &'static Mutex<Option<HashMap<u64, Estimate>>> {
    &ESTIMATES[(key >> 60) as usize % SHARDS]
}

#[inline]
fn mix(mut h: u64, v: u64) -> u64 {
    h ^= v.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
    h.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// The key of a kernel launch shape.
pub fn kernel_key(function: *mut c_void, grid: [u32; 3], block: [u32; 3], shared_mem: u32) -> u64 {
    let mut h = mix(0x4B45_524E, function as u64);
    for v in grid.into_iter().chain(block).chain([shared_mem]) {
        h = mix(h, u64::from(v));
    }
    h
}

/// The key of an instantiated CUDA graph.
pub fn graph_key(exec: *mut c_void) -> u64 {
    mix(0x4752_4150, exec as u64)
}

/// What to do for one launch: charge this much, and whether to measure it.
pub struct Plan {
    pub key: u64,
    pub charge_ns: u64,
    pub sample: bool,
}

pub fn plan(key: u64) -> Plan {
    let mut guard = shard(key).lock();
    let e = guard.get_or_insert_with(HashMap::new).entry(key).or_default();
    let unknown = e.busy_ns == 0 && e.idle_ns == 0;
    let sample = unknown || e.launches % SAMPLE_EVERY == 0;
    e.launches += 1;
    Plan { key, charge_ns: e.charge_ns(), sample }
}

/// Events of one context, and the samples still in flight there.
#[derive(Default)]
struct ContextEvents {
    pool: Vec<usize>,
    pending: VecDeque<Pending>,
}

struct Pending {
    before: usize,
    after: usize,
    key: u64,
    charged_ns: u64,
    busy: bool,
    bucket: &'static Bucket,
}

static CONTEXTS: Mutex<Option<HashMap<usize, ContextEvents>>> = Mutex::new(None);
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// A sample begun: the first event is recorded on the stream.
pub struct Started {
    ctx: usize,
    before: usize,
    after: usize,
    busy: bool,
}

fn current_context() -> Option<usize> {
    let get = driver()?.cuCtxGetCurrent?;
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: out-pointer to a local.
    (unsafe { get(&mut ctx) } == CUDA_SUCCESS && !ctx.is_null()).then_some(ctx as usize)
}

fn take_event(events: &mut ContextEvents) -> Option<usize> {
    if let Some(e) = events.pool.pop() {
        return Some(e);
    }
    let create = driver()?.cuEventCreate?;
    let mut ev: *mut c_void = std::ptr::null_mut();
    // SAFETY: out-pointer; flags 0 = timing enabled, in the current context.
    (unsafe { create(&mut ev, 0) } == CUDA_SUCCESS).then_some(ev as usize)
}

/// Records the opening event of a sample on `stream` (the launch's own, or the previous
/// launch's), before the launch.
pub fn begin(stream: CUstream, busy: bool) -> Option<Started> {
    let d = driver()?;
    let record = d.cuEventRecord?;
    let ctx = current_context()?;
    let (before, after) = {
        let mut contexts = CONTEXTS.lock();
        let events = contexts.get_or_insert_with(HashMap::new).entry(ctx).or_default();
        if events.pending.len() >= MAX_PENDING {
            return None;
        }
        let before = take_event(events)?;
        let Some(after) = take_event(events) else {
            events.pool.push(before);
            return None;
        };
        (before, after)
    };
    // SAFETY: our own event, the program's stream.
    if unsafe { record(before as *mut c_void, stream) } != CUDA_SUCCESS {
        give_back(ctx, &[before, after]);
        return None;
    }
    Some(Started { ctx, before, after, busy })
}

fn give_back(ctx: usize, events: &[usize]) {
    if let Some(e) = CONTEXTS.lock().as_mut().and_then(|m| m.get_mut(&ctx)) {
        e.pool.extend_from_slice(events);
    }
}

/// Records the closing event after the launch went out and queues the sample.
pub fn finish(started: Started, stream: CUstream, plan: &Plan, bucket: &'static Bucket, launched: bool) {
    let record = driver().and_then(|d| d.cuEventRecord);
    // SAFETY: our own event, the program's stream.
    let ok = launched && record.is_some_and(|r| unsafe { r(started.after as *mut c_void, stream) } == CUDA_SUCCESS);
    if !ok {
        give_back(started.ctx, &[started.before, started.after]);
        return;
    }
    let pending = Pending {
        before: started.before,
        after: started.after,
        key: plan.key,
        charged_ns: plan.charge_ns,
        busy: started.busy,
        bucket,
    };
    if let Some(events) = CONTEXTS.lock().as_mut().and_then(|m| m.get_mut(&started.ctx)) {
        events.pending.push_back(pending);
        PENDING.fetch_add(1, Relaxed);
    }
}

/// Folds completed samples into the estimates and settles their charges. Never blocks: if
/// another thread is harvesting, this one goes on.
pub fn harvest() {
    if PENDING.load(Relaxed) == 0 {
        return;
    }
    let Some(d) = driver() else { return };
    let (Some(query), Some(elapsed)) = (d.cuEventQuery, d.cuEventElapsedTime) else { return };
    let Some(mut contexts) = CONTEXTS.try_lock() else { return };
    let Some(map) = contexts.as_mut() else { return };
    for events in map.values_mut() {
        while let Some(p) = events.pending.front() {
            // SAFETY: our own events.
            let state = unsafe { query(p.after as *mut c_void) };
            if state == 600 {
                break; // CUDA_ERROR_NOT_READY: later ones are behind it.
            }
            let p = events.pending.pop_front().expect("front exists");
            PENDING.fetch_sub(1, Relaxed);
            let mut ms: f32 = 0.0;
            // SAFETY: our own events, both complete.
            let ok = state == CUDA_SUCCESS && unsafe { elapsed(&mut ms, p.before as *mut c_void, p.after as *mut c_void) } == CUDA_SUCCESS;
            if ok {
                learn(&p, (f64::from(ms) * 1e6) as u64);
                events.pool.extend_from_slice(&[p.before, p.after]);
            }
            // A failed query means the context is gone: drop its events rather than reuse them.
        }
    }
}

fn learn(p: &Pending, measured_ns: u64) {
    let measured_ns = measured_ns.max(1);
    let mut guard = shard(p.key).lock();
    let e = guard.get_or_insert_with(HashMap::new).entry(p.key).or_default();
    let had_busy = e.busy_ns != 0;
    let estimate = if p.busy {
        e.busy_ns = e.busy.push(measured_ns);
        e.busy_ns
    } else {
        e.idle_ns = e.idle.push(measured_ns);
        e.idle_ns
    };
    drop(guard);
    tracing::trace!(key = p.key, busy = p.busy, measured_ns, estimate, charged = p.charged_ns, "device-time sample");
    // Settle the sampled launch at the estimate its measurement produced, from the kind of
    // sample the launch was charged from: busy samples always, idle ones while no busy exists.
    if p.busy || !had_busy {
        p.bucket.settle(estimate as i64 - p.charged_ns as i64);
    }
}
