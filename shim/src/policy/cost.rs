//! What a launch costs in device time: learned per kernel shape (function, grid, block, shared
//! memory) or per CUDA graph from events on the launching streams, and settled against the
//! measured truth.
//!
//! **Spans.** Every 16th launch of a shape (and every launch of a shape not measured yet) opens
//! a span: an event is recorded before it, and the span grows over the thread's following
//! launches of the same shape on the same stream, up to 8, as long as no other thread launches
//! on the device in between (then the span would time their kernels too), then closes with an
//! event after the last. The span's time divided by its launches is one sample. Measuring several back-to-back
//! kernels between two events matters for short kernels: an event between two kernels exposes
//! the second one's launch latency (about 1.5 µs on an H200, which made 20 µs kernels look 7%
//! longer when each sample was one kernel).
//!
//! **Busy and idle.** When the host model says the process still has work queued
//! (`Bucket::busy`), the opening event goes on the stream of the process's previous launch: it
//! completes when that launch ends, and the span's first kernel runs right after, whichever
//! stream either is on, so the span measures the process's occupancy of the device even when it
//! spreads work over many streams. On an idle device the opening goes on the span's own stream
//! and includes one launch latency; such a span counts as busy once it covers 4 launches. The
//! lower of the two kinds' estimates is charged (see `Estimate::charge_ns`).
//!
//! **Estimate and settlement.** A shape's estimate is the median of its last 8 samples of a
//! kind: robust to samples stretched by another process's time slice or by threads racing for
//! the opening event, and to samples shrunk by kernels that overlap (several streams,
//! programmatic dependent launch), where a floor would undercharge. When a sample arrives, its
//! launches are settled in the bucket from what they were charged to the new estimate: errors do
//! not accumulate. Launches of a shape not measured yet are charged `UNKNOWN_NS`, which errs
//! towards under-use until their sample arrives.

use crate::policy::throttle::Bucket;
use crate::sys::driver::driver;
use crate::sys::events::{self, current_context, record, synchronize};
use crate::sys::ffi::*;
use crate::sys::locks;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::Mutex;

/// Charged for a launch whose shape has no measurement yet.
pub const UNKNOWN_NS: u64 = 1_000_000;
const SAMPLE_EVERY: u64 = 16;
/// Most launches one span covers.
const SPAN_MAX: u32 = 8;
/// An idle span of at least this many launches has amortised its launch latency.
const SPAN_AMORTISED: u32 = 4;
/// Outstanding samples per context beyond which no new ones are taken.
const MAX_PENDING: usize = 256;
/// A span closed this long after the host model's end of its work (plus its own charge) is
/// dropped: it would measure a pause.
const LATE_CLOSE_NS: u64 = 1_000_000;
/// Samples an estimate is the median of.
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
        self.median()
    }

    fn median(&self) -> u64 {
        let mut sorted = self.samples;
        let live = &mut sorted[..self.filled];
        live.sort_unstable();
        match live.len() {
            0 => 0,
            n if n % 2 == 1 => live[n / 2],
            n => (live[n / 2 - 1] + live[n / 2]) / 2,
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Estimate {
    busy_ns: u64,
    idle_ns: u64,
    busy: Window,
    idle: Window,
    launches: u64,
    /// Launches charged `UNKNOWN_NS` outside any span, settled when the first sample arrives.
    unsettled: u64,
}

impl Estimate {
    /// The lower of the two kinds. A busy sample (behind this process's own queued work)
    /// measures occupancy and is normally the lower: an idle one also holds a launch latency.
    /// A busy estimate above the idle one was inflated by another process's work queued on the
    /// device ahead of the span; preferring it regardless was issue 14's starvation: a process
    /// charged 22× its kernels' time launched only on an idle device from then on, so it never
    /// took another busy sample to correct it.
    fn charge_ns(&self) -> u64 {
        match (self.busy_ns, self.idle_ns) {
            (0, 0) => UNKNOWN_NS,
            (busy, 0) => busy,
            (0, idle) => idle,
            (busy, idle) => busy.min(idle),
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

/// What to do for one launch: charge this much, and whether to start measuring it.
pub struct Plan {
    pub charge_ns: u64,
    pub sample: bool,
}

pub fn plan(key: u64) -> Plan {
    let mut guard = locks::lock(shard(key));
    let e = guard.get_or_insert_with(HashMap::new).entry(key).or_default();
    let unknown = e.busy_ns == 0 && e.idle_ns == 0;
    let sample = unknown || e.launches.is_multiple_of(SAMPLE_EVERY);
    e.launches += 1;
    Plan { charge_ns: e.charge_ns(), sample }
}

/// The samples still in flight in one context (their events come from `events::TIMINGS`).
#[derive(Default)]
struct ContextEvents {
    pending: VecDeque<Pending>,
}

/// A closed span whose events the device has yet to reach.
struct Pending {
    before: usize,
    after: usize,
    key: u64,
    launches: u32,
    charged_ns: u64,
    busy: bool,
    bucket: Bucket,
}

static CONTEXTS: Mutex<Option<HashMap<usize, ContextEvents>>> = Mutex::new(None);
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: hold_for_fork, in_child: forget_in_child };

/// The cost model's locks, for a fork (see `sys::atfork`): the child keeps what kernels cost, and
/// forgets its parent's spans in flight (of the parent's contexts; their idle events stay in
/// `events::TIMINGS`, under keys the child never uses).
pub fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    h.take(&CONTEXTS, |c| *c = None);
    for shard in &ESTIMATES {
        h.take(shard, crate::sys::atfork::keep);
    }
}

/// In a forked child: no span in flight, and the forking thread's open span (the only thread
/// there) was its parent's.
pub fn forget_in_child() {
    PENDING.store(0, Relaxed);
    let _ = OPEN.try_with(|open| open.borrow_mut().take());
}

/// A span being measured: opened, and growing with this thread's launches.
struct Span {
    ctx: usize,
    before: usize,
    after: usize,
    busy: bool,
    key: u64,
    stream: usize,
    launches: u32,
    charged_ns: u64,
    bucket: Bucket,
    /// The device-wide number of the span's latest launch.
    last_sequence: u64,
    /// When the host model expects the span's work done (`Bucket::queued_until` after its
    /// latest launch).
    model_end: u64,
}

thread_local! {
    static OPEN: RefCell<Option<Span>> = const { RefCell::new(None) };
}

fn give_back(ctx: usize, pair: [usize; 2]) {
    for event in pair {
        events::TIMINGS.give(ctx, event);
    }
}

/// True when a launch of `key` on `stream` by this thread, numbered `sequence` on its device,
/// continues its open span: same shape, same stream, and no other launch in between.
pub fn continues_span(key: u64, stream: CUstream, sequence: u64) -> bool {
    // try_with: a thread being torn down has no span (and must not panic).
    OPEN.try_with(|open| open.borrow().as_ref().is_some_and(|s| s.key == key && s.stream == stream as usize && s.last_sequence + 1 == sequence))
        .unwrap_or(false)
}

/// Opens a span before a launch: records its opening event on `opening` (this launch's stream,
/// or the previous launch's when the device is busy).
pub fn open_span(opening: CUstream, stream: CUstream, busy: bool, key: u64, bucket: Bucket, sequence: u64) {
    let Some(ctx) = current_context() else { return };
    let (before, after) = {
        let mut contexts = locks::lock(&CONTEXTS);
        let events = contexts.get_or_insert_with(HashMap::new).entry(ctx).or_default();
        if events.pending.len() >= MAX_PENDING {
            return;
        }
        let Some(before) = events::TIMINGS.take(ctx) else { return };
        let Some(after) = events::TIMINGS.take(ctx) else {
            events::TIMINGS.give(ctx, before);
            return;
        };
        (before, after)
    };
    if !record(before, opening) {
        give_back(ctx, [before, after]);
        return;
    }
    let span = Span {
        ctx,
        before,
        after,
        busy,
        key,
        stream: stream as usize,
        launches: 0,
        charged_ns: 0,
        bucket,
        last_sequence: sequence,
        model_end: bucket.queued_until(),
    };
    if OPEN.try_with(|open| *open.borrow_mut() = Some(span)).is_err() {
        give_back(ctx, [before, after]);
    }
}

/// Notes a launch of `key` charged `UNKNOWN_NS` that no span measures: it is settled when the
/// shape's first sample arrives.
pub fn note_unsettled(key: u64) {
    let mut guard = locks::lock(shard(key));
    guard.get_or_insert_with(HashMap::new).entry(key).or_default().unsettled += 1;
}

/// Counts a launch (numbered `sequence`) that went out inside this thread's open span; closes
/// the span when full. Returns whether there was a span to count it in.
pub fn extend_span(charged_ns: u64, sequence: u64) -> bool {
    let mut counted = false;
    let full = OPEN.try_with(|open| {
        let mut open = open.borrow_mut();
        let Some(span) = open.as_mut() else { return false };
        counted = true;
        span.launches += 1;
        span.charged_ns += charged_ns;
        span.last_sequence = sequence;
        span.model_end = span.bucket.queued_until();
        span.launches >= SPAN_MAX
    });
    if full == Ok(true) {
        close_span();
    }
    counted
}

/// Closes this thread's open span, if any: its closing event goes on its stream now, before
/// anything else is launched there.
pub fn close_span() {
    let Some(span) = OPEN.try_with(|open| open.borrow_mut().take()).ok().flatten() else { return };
    // Its closing event goes on the stream now: closed long after its work drained (the
    // program synchronised and paused, or the thread waited for a turn), the span would measure
    // the pause as device time. One such sample settled a 1.5 s pause as 2 × 748 ms kernels.
    let late = crate::sys::clock::now_ns() > span.model_end.saturating_add(span.charged_ns).saturating_add(LATE_CLOSE_NS);
    if span.launches == 0 || late || !record(span.after, span.stream as CUstream) {
        give_back(span.ctx, [span.before, span.after]);
        return;
    }
    let pending = Pending {
        before: span.before,
        after: span.after,
        key: span.key,
        launches: span.launches,
        charged_ns: span.charged_ns,
        busy: span.busy || span.launches >= SPAN_AMORTISED,
        bucket: span.bucket,
    };
    if let Some(events) = locks::lock(&CONTEXTS).as_mut().and_then(|m| m.get_mut(&span.ctx)) {
        events.pending.push_back(pending);
        PENDING.fetch_add(1, Relaxed);
    }
}

/// Waits until the work queued on `stream` so far is done (an event, not a context sync: that
/// would break another thread's stream capture).
pub fn wait_for(stream: CUstream) {
    let Some(ctx) = current_context() else { return };
    // A sleeper (`events::SLEEPER`): a throttled process must not spin through its bursts.
    let Some(event) = events::SLEEPERS.take(ctx) else { return };
    if record(event, stream) {
        synchronize(event);
    }
    events::SLEEPERS.give(ctx, event);
}

/// Folds completed spans into the estimates and settles their charges. Never blocks: if
/// another thread is harvesting, this one goes on.
pub fn harvest() {
    if PENDING.load(Relaxed) == 0 {
        return;
    }
    let Some(d) = driver() else { return };
    let (Some(query), Some(elapsed)) = (d.cuEventQuery, d.cuEventElapsedTime) else { return };
    let Some(mut contexts) = locks::try_lock(&CONTEXTS) else { return };
    let Some(map) = contexts.as_mut() else { return };
    for (&ctx, events) in map.iter_mut() {
        while let Some(p) = events.pending.front() {
            // SAFETY: our own events.
            let state = unsafe { query(p.after as *mut c_void) };
            if state == CUDA_ERROR_NOT_READY {
                break; // Later ones are behind it.
            }
            let p = events.pending.pop_front().expect("front exists");
            PENDING.fetch_sub(1, Relaxed);
            let mut ms: f32 = 0.0;
            // SAFETY: our own events, both complete.
            let ok = state == CUDA_SUCCESS && unsafe { elapsed(&mut ms, p.before as *mut c_void, p.after as *mut c_void) } == CUDA_SUCCESS;
            if ok {
                learn(&p, (f64::from(ms) * 1e6) as u64);
                give_back(ctx, [p.before, p.after]);
            }
            // A failed query means the context is gone: drop its events rather than reuse them.
        }
    }
}

fn learn(p: &Pending, measured_ns: u64) {
    let per_launch = (measured_ns / u64::from(p.launches.max(1))).max(1);
    let mut guard = locks::lock(shard(p.key));
    let e = guard.get_or_insert_with(HashMap::new).entry(p.key).or_default();
    let unsettled = std::mem::take(&mut e.unsettled);
    if p.busy {
        e.busy_ns = e.busy.push(per_launch);
    } else {
        e.idle_ns = e.idle.push(per_launch);
    }
    let estimate = e.charge_ns();
    drop(guard);
    tracing::trace!(key = p.key, busy = p.busy, launches = p.launches, per_launch, estimate, charged = p.charged_ns, "device-time sample");
    // Settle the span's launches at what launches of this shape are charged from now on.
    let truth = estimate.saturating_mul(u64::from(p.launches));
    p.bucket.settle(truth as i64 - p.charged_ns as i64);
    if unsettled != 0 {
        p.bucket.settle((estimate as i64 - UNKNOWN_NS as i64).saturating_mul(unsettled as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_the_window() {
        let mut w = Window::default();
        assert_eq!(w.push(200), 200);
        assert_eq!(w.push(600), 400);
        assert_eq!(w.push(200), 200);
        for _ in 0..8 {
            w.push(100);
        }
        assert_eq!(w.median(), 100, "old samples leave the window");
    }

    #[test]
    fn keys_tell_shapes_apart() {
        let f = 0x1000 as *mut c_void;
        assert_ne!(kernel_key(f, [1, 1, 1], [32, 1, 1], 0), kernel_key(f, [2, 1, 1], [32, 1, 1], 0));
        assert_ne!(kernel_key(f, [1, 1, 1], [32, 1, 1], 0), graph_key(f));
        assert_eq!(kernel_key(f, [4, 2, 1], [8, 8, 1], 128), kernel_key(f, [4, 2, 1], [8, 8, 1], 128));
    }
}
