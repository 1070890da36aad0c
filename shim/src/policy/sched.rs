//! Priority classes on a device: while a high-priority process has work queued or running,
//! lower-priority processes hold their launches back, and whenever a high-priority process
//! lives on the device they keep only a few launches in flight, so that a high-priority
//! request waits for about one neighbour kernel at most. When no high-priority process has
//! work, everyone runs at full speed: nothing is partitioned.
//!
//! The state lives in shared memory (`DeviceSched`: the ledger's device slot with a
//! controller, this user's board page without one):
//! - a high-priority process marks its slot busy before each launch, records an event after it,
//!   and a watcher thread of its own clears the mark (and wakes the waiters through a futex on
//!   `wake`) once every recorded event has completed;
//! - a lower-priority launcher sleeps on that futex while any high-priority process is busy,
//!   then waits (blocking-sync events: the thread sleeps in the driver) until fewer than
//!   `GPUSLICE_PRIORITY_QUEUE` of its own launches are still in flight, or, with a duration
//!   budget (`flight_cost`, `GPUSLICE_PRIORITY_BUDGET_US`), until the launch fits beside the
//!   estimated device time still in flight.
//! - under a budget, anticipation (`GPUSLICE_PRIORITY_ANTICIPATE`, on by default): a
//!   high-priority process whose requests keep time (`period`) publishes when the next is due,
//!   and a lower-priority launch whose work would still run then waits for that request
//!   instead, so the request finds the device idle rather than waiting for a kernel nothing can
//!   stop. Requests that do not keep time publish nothing, and nothing changes for them.
//!   With `GPUSLICE_PRIORITY_STRETCH=on` (experimental) the budget also grows to most of the
//!   time until that request while every live high-priority process publishes one, so a
//!   neighbour's queue covers its own host pauses between requests.
//!
//! `GPUSLICE_PRIORITY_GATE=spatial-off` (experimental, issue 19) lifts both for a lower-priority
//! process on a device where MPS's active-thread percentage carries its share (`mps::spatial`):
//! there the SMs it leaves free are what protects the high-priority work, and holding its
//! launches back idles its own pipeline. `GPUSLICE_PRIORITY_GATE=auto` lifts them there only
//! while every live high-priority process on the device says its requests are host-bound: each
//! high-priority process measures its own requests (`request_load`, from its slot's busy
//! periods) and publishes the verdict in `DeviceSched::host_bound`; the neighbour decides
//! launch by launch. Stop 22 on the H100: lifting the gate cost an eager (host-bound) probe
//! nothing and its neighbour regained ~35 points, but cost a graph (device-bound) probe ×2.4.
//!
//! Leases bound what a dead process can cause: a high-priority process's slot lapses 300 ms
//! after its watcher last renewed it, and no launch waits for a busy mark longer than
//! `MAX_HOLD_NS`.

use crate::policy::flight_cost::{self, Room};
use crate::policy::hold_summary;
use crate::policy::period::{Due, Period};
use crate::policy::request_load::{Requests, Verdict};
use crate::policy::switch_ahead::{self, Ending};
use crate::state::link::{self, MAX_ORDINALS};
use crate::sys::clock::{coarse_now_ns, now_ns};
use crate::sys::driver::call_real;
use crate::sys::events::{self, current_context, record, synchronize};
use crate::sys::ffi::*;
use crate::sys::locks;
use gpuslice_common::ledger::{DeviceSched, HighSlot, Priority};
use gpuslice_common::settings::PriorityGate;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Condvar, Mutex, MutexGuard};

/// How long a high-priority process's claim lasts without renewal.
const LEASE_NS: u64 = 300_000_000;
/// How often the watcher renews it.
const RENEW_NS: u64 = 50_000_000;
/// How often the watcher looks at outstanding events while high-priority work runs.
const POLL_NS: u64 = 20_000;
/// Longest a lower-priority launch waits for high-priority work before going anyway.
const MAX_HOLD_NS: u64 = 1_000_000_000;
/// Launches a lower-priority process keeps in flight while a high-priority one lives. One: the
/// GPU time-slices between processes' queues, so a second queued kernel of the neighbour can
/// run before the high-priority request even when the first has finished (measured on the
/// H200: queue 2 cost a 2 ms probe about three 200 µs neighbour kernels at p50).
const DEFAULT_QUEUE: usize = 1;
/// A lower-priority launcher polls its oldest launch this long before sleeping on it: with one
/// launch in flight, the gap between its kernels is the time to notice the end, and a sleeping
/// thread wakes tens of µs late (CUDA's own synchronisation spins by default too).
const SPIN_NS: u64 = 500_000;
/// On the simulated clock a launcher waiting for its oldest launch to near its end looks at it
/// this often (there it cannot poll: the clock stands still while anyone spins).
const SIMULATED_POLL_NS: u64 = 5_000;
/// How often a launch held for a high-priority request that is due looks whether it began.
const DUE_POLL_NS: u64 = 20_000;
/// After waiting this long on a busy mark, a launcher checks its holder is alive (no controller:
/// same user, same pid namespace).
const CHECK_HOLDER_NS: u64 = 10_000_000;

/// `CU_STREAM_CAPTURE_MODE_RELAXED`: this thread's event queries do not break another
/// thread's stream capture (a thread's default, GLOBAL, makes them invalidate it: PyTorch's
/// CUDA-graph capture failed that way on the H200).
const CAPTURE_MODE_RELAXED: i32 = 2;

/// The priority this process launches with now (a controller may change it at any time).
#[inline]
pub fn priority() -> Priority {
    link::get().map_or(Priority::Normal, |l| l.priority())
}

/// True when a launch needs this module: this process is high-priority, or some high-priority
/// process lives on one of its devices.
#[inline]
pub fn engaged() -> bool {
    let Some(l) = link::get() else { return false };
    if l.priority() == Priority::High {
        return true;
    }
    let scheds = l.scheds();
    if scheds.is_empty() {
        return false;
    }
    let now = coarse_now_ns();
    scheds.iter().any(|s| s.high_alive(now))
}

/// True when a lower-priority launch on `device` skips the gate: MPS carries this process's
/// share there, and `GPUSLICE_PRIORITY_GATE` is `spatial-off`, or `auto` and every live
/// high-priority process on the device says its requests are host-bound. Two loads (the
/// device's MPS mode, then the settings read at the first CUDA call), and for `auto` the
/// device's host-bound word (and, when some bit is set, its slots' owners and leases): no
/// syscall, no lock. Asked at every launch, so a neighbour goes back under the gate at its next
/// launch once a high-priority process says device-bound.
#[inline]
pub fn gate_off(device: CUdevice) -> bool {
    gate_off_on(device, || state(device))
}

#[inline]
fn gate_off_on<'a>(device: CUdevice, sched: impl FnOnce() -> Option<&'a DeviceSched>) -> bool {
    if !crate::policy::mps::spatial(device) {
        return false;
    }
    match crate::sys::runtime::runtime().settings.as_ref().map(|s| s.priority_gate) {
        Ok(PriorityGate::SpatialOff) => true,
        Ok(PriorityGate::Auto) => sched().is_some_and(|s| s.highs_host_bound(coarse_now_ns())),
        _ => false,
    }
}

fn state(device: CUdevice) -> Option<&'static DeviceSched> {
    link::get()?.sched(device)
}

/// A context was made on `device`: a high-priority process claims its place there now, so
/// that lower-priority neighbours bound their queues before its first request arrives.
pub fn context_created(device: CUdevice) {
    if priority() == Priority::High {
        if let Some(s) = state(device) {
            let _ = high_slot(device, s);
        }
    }
}

/// Runs `launch` (of shape `key`, see `cost::kernel_key`) under the priority rules of the
/// current device.
pub fn launch(device: CUdevice, stream: CUstream, key: u64, launch: impl FnOnce() -> CuResult) -> CuResult {
    let Some(s) = state(device) else { return launch() };
    match priority() {
        Priority::High => high_launch(device, s, stream, launch),
        _ => {
            if gate_off_on(device, || Some(s)) {
                return launch();
            }
            let now = now_ns();
            if !s.high_alive(now) {
                return launch();
            }
            // With a budget: this launch's estimate (`None`: not measured yet) and the budget.
            let budgeted = flight_cost::budget_ns().map(|budget| (flight_cost::estimate(key), budget));
            let estimate = budgeted.map(|(known, budget)| (known.unwrap_or(budget), budget));
            let measure = hold_summary::enabled();
            let waits = yield_to_high(device, s, now, estimate, measure);
            if measure {
                hold_summary::note(now_ns(), waits);
            }
            // A launch going out alone is timed from an event just before it.
            let marked = estimate.is_some() && in_flight(device).mark_start(stream);
            let code = launch();
            if code == CUDA_SUCCESS {
                let timed = budgeted.map(|(known, budget)| (known.unwrap_or(budget), known.is_none()));
                in_flight(device).push(stream, key, timed, marked);
            }
            code
        }
    }
}

// ------------------------------------------------------------------- lower-priority side

/// Waits while a high-priority process has work on the device, then until this process has
/// fewer than its allowance of launches in flight (with a budget: until a launch estimated at
/// `estimate.0` fits the budget `estimate.1` beside those in flight). With `measure`, returns
/// how long each reason held it (`hold_summary`; nothing is timed otherwise).
fn yield_to_high(device: CUdevice, s: &DeviceSched, start: u64, estimate: Option<(u64, u64)>, measure: bool) -> hold_summary::Waits {
    let mut waits = hold_summary::Waits::default();
    let stamp = || if measure { now_ns() } else { 0 };
    loop {
        let t0 = stamp();
        wait_while_busy(s, start);
        let t1 = stamp();
        in_flight(device).wait_for_room(queue_allowance(), estimate, s);
        let t2 = stamp();
        if let Some((next, _)) = estimate.filter(|_| flight_cost::anticipates()) {
            hold_before_request(device, s, start, next);
        }
        let t3 = stamp();
        // Saturating: a debug figure must never wrap or panic, whatever a clock reading does.
        waits.busy += t1.saturating_sub(t0);
        waits.room += t2.saturating_sub(t1);
        waits.due += t3.saturating_sub(t2);
        // The waits may have let a high-priority request begin: look again, or this launch
        // would go in ahead of it.
        if s.busy_high(now_ns()).is_none() || now_ns() - start >= MAX_HOLD_NS {
            break;
        }
    }
    let waited = now_ns() - start;
    if waited > 1_000 {
        if let Some(l) = link::get() {
            if let Some(i) = l.index(device) {
                l.group.devices[i].throttled_ns.fetch_add(waited, Relaxed);
                l.process.devices[i].throttled_ns.fetch_add(waited, Relaxed);
            }
        }
    }
    waits
}

/// Sleeps while a live high-priority process has work on the device.
fn wait_while_busy(s: &DeviceSched, start: u64) {
    let mut now = now_ns();
    while let Some(holder) = s.busy_high(now) {
        if now - start >= MAX_HOLD_NS {
            break;
        }
        if now - start >= CHECK_HOLDER_NS && holder_is_gone(holder) {
            s.release_high_at(holder, holder.owner.load(Acquire), now);
            continue;
        }
        let seen = s.wake.load(SeqCst);
        if s.busy_high(now).is_none() {
            break;
        }
        futex_wait(&s.wake, seen, 2_000_000);
        now = now_ns();
    }
}

/// Waits while this launch (estimated at `next`, behind what this process has in flight) would
/// still run when a high-priority process's next request is due, until that request begins
/// (the caller then waits for it to end), its window passes (mispredicted: go on), or the
/// launch has waited `MAX_HOLD_NS` in all.
fn hold_before_request(device: CUdevice, s: &DeviceSched, start: u64, next: u64) {
    loop {
        let now = now_ns();
        let Some((from, until)) = s.next_request(now) else { return };
        if s.busy_high(now).is_some() || now - start >= MAX_HOLD_NS {
            return;
        }
        if in_flight(device).ends_at(now, next) <= from {
            return;
        }
        // Until the window opens nothing can begin; then look every so often.
        let poll = if crate::sys::clock::simulated() { SIMULATED_POLL_NS } else { DUE_POLL_NS };
        let wait = if now < from { from - now } else { poll.min(until - now) };
        crate::sys::clock::sleep_ns(wait.min(MAX_HOLD_NS - (now - start)));
    }
}

/// Whether budgets stretch towards the next request: `GPUSLICE_PRIORITY_STRETCH` on, and
/// anticipation, which ends the queue before the window (two cached loads).
fn stretching() -> bool {
    flight_cost::stretches() && flight_cost::anticipates()
}

/// The stretched budget at `now`: most of the time until the next request when every live
/// high-priority process on the device says when that is (`flight_cost::stretched`), else
/// `budget`. Read again at each look: the nearer the window, the less fits.
fn stretched_budget(s: &DeviceSched, budget: u64, now: u64) -> u64 {
    s.next_request_of_every(now).map_or(budget, |(from, _)| flight_cost::stretched(budget, now, from))
}

/// Where a launch stands at `now` under a stretched budget, given where it would stand at any
/// time (`room_at`). The budget (`stretched_budget`) shrinks as the window nears, so the time at
/// which room comes under the budget of `now` is looked at again under that time's own budget,
/// until they agree: a few steps of arithmetic instead of waking up at each (the gap closes by
/// an eighth each step, and the waiter would otherwise wake ~13 times for 3 ms). Under a budget
/// that does not move, the first answer stands (callers with a fixed one ask once).
fn room_in_time(now: u64, room_at: impl Fn(u64) -> Room) -> Room {
    let mut at = now;
    for _ in 0..ROOM_STEPS {
        match room_at(at) {
            Room::At(when) if when > at => at = when,
            Room::Now if at > now => return Room::At(at),
            room => return room,
        }
    }
    Room::At(at)
}

/// Steps `room_in_time` takes at most: past them it answers the time reached, and the waiter
/// looks again then. 32 steps of 7/8 leave 1.4 % of the first gap.
const ROOM_STEPS: usize = 32;

/// True when the holder of a busy mark is known dead. Only asked without a controller, where
/// the page is this user's and its processes share a pid namespace; with one, the lease decides.
fn holder_is_gone(holder: &HighSlot) -> bool {
    if link::get().is_none_or(|l| l.controlled) {
        return false;
    }
    let pid = holder.pid.load(Relaxed);
    pid != 0 && !crate::sys::pids::alive(pid)
}

fn queue_allowance() -> usize {
    crate::sys::runtime::runtime().settings.as_ref().ok().and_then(|s| s.priority_queue).map_or(DEFAULT_QUEUE, |n| n as usize)
}

/// One launch in flight: its event (recorded after it) in context `ctx`, its shape and
/// estimate (`guessed`: the whole budget, its shape not measured yet), whether it was queued
/// behind the previous one (then the time between their events is its own), and when its
/// launch call returned.
struct Flight {
    ctx: usize,
    event: usize,
    key: u64,
    estimate_ns: u64,
    guessed: bool,
    queued: bool,
    launched_ns: u64,
}

/// This process's launches on one device that may still be running, the fork generation they
/// belong to, and the event of the last one seen finished (the start of the next one's
/// measurement, with a budget) and when it was seen finished.
struct Queue {
    generation: u64,
    flights: VecDeque<Flight>,
    last_done: Option<(usize, usize)>,
    last_done_seen_ns: u64,
}

struct InFlight {
    events: Mutex<Queue>,
}

static IN_FLIGHT: [InFlight; MAX_ORDINALS] =
    [const { InFlight { events: Mutex::new(Queue { generation: 0, flights: VecDeque::new(), last_done: None, last_done_seen_ns: 0 }) } }; MAX_ORDINALS];

fn in_flight(device: CUdevice) -> &'static InFlight {
    &IN_FLIGHT[(device.max(0) as usize).min(MAX_ORDINALS - 1)]
}

impl InFlight {
    /// The queue; a forked child's inherited events, which belong to its parent's contexts,
    /// are dropped.
    fn queue(&self) -> MutexGuard<'_, Queue> {
        let mut guard = locks::lock(&self.events);
        let generation = link::fork_generation();
        if guard.generation != generation {
            std::mem::forget(std::mem::take(&mut guard.flights));
            guard.last_done = None;
            guard.generation = generation;
        }
        guard
    }

    /// `marked`: `mark_start` recorded an event just before this launch.
    /// `timed`: with a budget, the launch's estimate and whether it is a guess (the shape not
    /// measured yet); the clock is read only then.
    fn push(&self, stream: CUstream, key: u64, timed: Option<(u64, bool)>, marked: bool) {
        let Some((ctx, event)) = recorded_event(stream) else { return };
        let mut queue = self.queue();
        let queued = marked || !queue.flights.is_empty();
        queue.flights.push_back(Flight {
            ctx,
            event,
            key,
            estimate_ns: timed.map_or(0, |t| t.0),
            guessed: timed.is_some_and(|t| t.1),
            queued,
            launched_ns: if timed.is_some() { now_ns() } else { 0 },
        });
    }

    /// With nothing in flight, records an event on `stream` to time the next launch from (the
    /// launch after it is then measured as if queued behind it); false when something is in
    /// flight (that launch's event does it) or no event could be recorded.
    fn mark_start(&self, stream: CUstream) -> bool {
        let mut queue = self.queue();
        if !queue.flights.is_empty() {
            return false;
        }
        let Some(start) = recorded_event(stream) else { return false };
        if let Some((ctx, event)) = queue.last_done.replace(start) {
            give_event(ctx, event);
        }
        true
    }

    /// When a launch estimated at `next` would end if it went out at `now` (`flight_cost::ends_at`),
    /// finished launches dropped first.
    fn ends_at(&self, now: u64, next: u64) -> u64 {
        relaxed(|| {
            let mut queue = self.queue();
            while queue.flights.front().is_some_and(|f| done(f.event)) {
                queue.drop_oldest(true);
            }
            flight_cost::ends_at(queue.flights.iter().map(|f| f.estimate_ns), queue.oldest_began(), now, next)
        })
    }

    /// Drops finished launches; waits for the oldest while `limit` or more are in flight, or
    /// with a budget (`estimate`: the next launch's and the budget, stretched towards the next
    /// request on `s` when `stretching`) until the next one fits beside what is left of them
    /// (`flight_cost::room`).
    fn wait_for_room(&self, limit: usize, estimate: Option<(u64, u64)>, s: &DeviceSched) {
        relaxed(|| self.wait_for_room_now(limit, estimate, s))
    }

    fn wait_for_room_now(&self, limit: usize, estimate: Option<(u64, u64)>, s: &DeviceSched) {
        let mut queue = self.queue();
        while let Some(oldest) = queue.flights.front() {
            if done(oldest.event) {
                queue.drop_oldest(estimate.is_some());
                continue;
            }
            let room = match estimate {
                None if queue.flights.len() >= limit => Room::AfterOldest,
                None => Room::Now,
                Some((next, budget)) => {
                    let began = queue.oldest_began();
                    let room_at = |at: u64, budget: u64| flight_cost::room(queue.flights.iter().map(|f| f.estimate_ns), began, at, next, budget);
                    if stretching() {
                        room_in_time(now_ns(), |at| room_at(at, stretched_budget(s, budget, at)))
                    } else {
                        room_at(now_ns(), budget)
                    }
                }
            };
            match room {
                Room::Now => break,
                Room::At(when) => wait_until(oldest.event, when),
                Room::AfterOldest => {
                    // Dropped even if the wait failed: never a second wait on a broken event.
                    wait_for(oldest.event);
                    queue.drop_oldest(estimate.is_some());
                }
            }
        }
    }
}

impl Queue {
    /// When the oldest launch began on the device: about when its launch returned or when the
    /// one before it was seen finished, whichever is later (both at or after the device's own
    /// times: what is left of it is not understated). `None` with a guessed estimate (it counts
    /// whole, `flight_cost::room`) or nothing in flight.
    fn oldest_began(&self) -> Option<u64> {
        let oldest = self.flights.front()?;
        (!oldest.guessed).then(|| oldest.launched_ns.max(self.last_done_seen_ns))
    }

    /// Drops the oldest launch, finished; with a budget (`timed`) the events time the
    /// launches: one queued behind the previous ran from that one's end to its own.
    fn drop_oldest(&mut self, timed: bool) {
        let Some(Flight { ctx, event, key, queued, .. }) = self.flights.pop_front() else { return };
        if timed {
            self.last_done_seen_ns = now_ns();
        }
        if let Some((previous_ctx, previous_event)) = self.last_done.replace((ctx, event)) {
            if timed && queued && previous_ctx == ctx {
                if let Some(ns) = elapsed_ns(previous_event, event) {
                    flight_cost::learn(key, ns);
                }
            }
            give_event(previous_ctx, previous_event);
        }
    }
}

/// Waits until `event` has completed: polls it for `SPIN_NS`, then sleeps on it.
fn wait_for(event: usize) {
    // No spinning on the simulated clock: it stands still while anyone spins.
    let spin_until = if crate::sys::clock::simulated() { 0 } else { now_ns() + SPIN_NS };
    while !done(event) {
        if now_ns() >= spin_until {
            synchronize(event);
            return;
        }
        std::hint::spin_loop();
    }
}

/// Waits until time `when` or until `event` has completed, whichever comes first: polls the
/// event for the last `SPIN_NS` before `when` and sleeps before that (on the simulated clock,
/// which stands still while anyone spins, sleeps in steps of `SIMULATED_POLL_NS`; the caller
/// looks at the event again after each).
fn wait_until(event: usize, when: u64) {
    let now = now_ns();
    if crate::sys::clock::simulated() {
        crate::sys::clock::sleep_ns(when.saturating_sub(now).min(SIMULATED_POLL_NS));
        return;
    }
    if when > now + SPIN_NS {
        crate::sys::clock::sleep_ns(when - now - SPIN_NS);
    }
    while !done(event) && now_ns() < when {
        std::hint::spin_loop();
    }
}

/// Device time between two completed timing events.
fn elapsed_ns(start: usize, end: usize) -> Option<u64> {
    let mut ms = 0f32;
    let ok = call_real!(cuEventElapsedTime(&mut ms, start as *mut c_void, end as *mut c_void)) == CUDA_SUCCESS;
    (ok && ms >= 0.0).then(|| (f64::from(ms) * 1e6) as u64)
}

// ------------------------------------------------------------------- high-priority side

/// What the watcher looks after: per device, the events of launches not yet known finished.
struct Watched {
    devices: HashMap<CUdevice, Outstanding>,
    started: bool,
    /// `link::fork_generation()` when this was set up: a forked child finds another and starts
    /// over (the slots and the watcher thread are its parent's).
    generation: u64,
}

struct Outstanding {
    sched: &'static DeviceSched,
    slot: &'static HighSlot,
    events: Vec<(usize, usize)>,
    /// This process's requests on the device, measured from the slot's busy periods.
    requests: Requests,
    /// Their starts, and when the next is due (as of the last start).
    period: Period,
    due: Option<Due>,
    /// Whether the watcher last logged them keeping time (`publish`).
    keeping_time: bool,
    /// The context of the latest request's launches (where the empty kernel goes), until the
    /// program ends it.
    ctx: Option<usize>,
    /// The window (its `from`) the empty kernel last went ahead of: once per request.
    switched_for: u64,
    /// When the watcher last found work outstanding: a busy period ended between then and the
    /// look that found it done.
    seen_busy: u64,
    /// The measurement has been logged once (after `FIRST_REPORT` requests, or at a change).
    reported: bool,
}

/// Requests after which the verdict is logged even when it has not changed (the start,
/// device-bound, is an assumption until then).
const FIRST_REPORT: u64 = 16;

static WATCHED: Mutex<Option<Watched>> = Mutex::new(None);
static WORK: Condvar = Condvar::new();
/// On the simulated clock the watcher waits for work on this word through the clock instead
/// of `WORK` (a condition variable would hold virtual time while it waits).
static WORK_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// High-priority launches between marking busy and handing their event to the watcher.
static LAUNCHING: AtomicU64 = AtomicU64::new(0);

fn high_launch(device: CUdevice, s: &'static DeviceSched, stream: CUstream, launch: impl FnOnce() -> CuResult) -> CuResult {
    let Some(slot) = high_slot(device, s) else { return launch() };
    LAUNCHING.fetch_add(1, SeqCst);
    // A swap, not a store: the launch that turns the slot busy times the start of a busy
    // period for `request_load` (one clock read per period, through the vDSO).
    let began = slot.busy.swap(1, SeqCst) == 0;
    let began_at = if began { now_ns() } else { 0 };
    let code = launch();
    let event = if code == CUDA_SUCCESS { recorded_event(stream) } else { None };
    {
        let mut watched = locks::lock(&WATCHED);
        if let Some(o) = watched.as_mut().and_then(|w| w.devices.get_mut(&device)) {
            if began && o.requests.busy(began_at) {
                o.period.began(began_at);
                o.due = o.period.due();
                let lead = switch_lead(device);
                o.sched.set_next_request(o.slot, o.due.map(|d| (d.from.saturating_sub(lead), d.until)));
            }
            if let Some(event) = event {
                o.ctx = Some(event.0);
                o.events.push(event);
            }
        }
        LAUNCHING.fetch_sub(1, SeqCst);
    }
    if crate::sys::clock::simulated() {
        WORK_SEQ.fetch_add(1, SeqCst);
        futex_wake_all(&WORK_SEQ);
    }
    WORK.notify_one();
    code
}

/// A fresh event of the current context recorded on `stream`, as (context, event).
fn recorded_event(stream: CUstream) -> Option<(usize, usize)> {
    let ctx = current_context()?;
    let event = take_event(ctx)?;
    if relaxed(|| record(event, stream)) {
        Some((ctx, event))
    } else {
        give_event(ctx, event);
        None
    }
}

/// This process's high-priority slot on `device`, claimed at its first launch there (and the
/// watcher started at the first of all).
fn high_slot(device: CUdevice, s: &'static DeviceSched) -> Option<&'static HighSlot> {
    let mut watched = locks::lock(&WATCHED);
    let generation = link::fork_generation();
    let w = watched.get_or_insert_with(|| Watched { devices: HashMap::new(), started: false, generation });
    if w.generation != generation {
        // Forked: forget the parent's slots (still its own) and its watcher thread.
        std::mem::forget(std::mem::take(&mut w.devices));
        *w = Watched { devices: HashMap::new(), started: false, generation };
    }
    if let Some(o) = w.devices.get(&device) {
        return Some(o.slot);
    }
    let now = now_ns();
    let Some(slot) = s.claim_high(owner(), std::process::id(), now, LEASE_NS) else {
        tracing::warn!("device {device}: {} high-priority processes already; this one runs as normal", gpuslice_common::ledger::MAX_HIGH);
        return None;
    };
    s.renew(slot, now, LEASE_NS);
    w.devices.insert(
        device,
        Outstanding {
            sched: s,
            slot,
            events: Vec::new(),
            requests: Requests::new(),
            period: Period::new(),
            due: None,
            keeping_time: false,
            ctx: None,
            switched_for: 0,
            seen_busy: 0,
            reported: false,
        },
    );
    if !w.started {
        w.started = true;
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(release_at_exit) };
        // On the simulated clock the watcher joins it before this thread goes on (it would
        // otherwise miss the virtual time that passes while it starts: leases lapse).
        let (joined, joined_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new().name("gpuslice-prio".into()).spawn(move || {
            crate::sys::clock::join();
            let _ = joined.send(());
            if std::panic::catch_unwind(watch).is_err() {
                // The slots lapse with their leases (300 ms); the program goes on.
                tracing::error!("gpuslice's priority watcher stopped on an internal error; high priority lapses");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the priority watcher ({e}); high priority is not enforced");
            return None;
        }
        if crate::sys::clock::simulated() {
            let _ = joined_rx.recv_timeout(std::time::Duration::from_secs(5));
        }
        tracing::info!("pid {}: high priority on device {device}: lower-priority processes yield to this one", std::process::id());
    }
    Some(slot)
}

/// The token naming this process's high-priority slots (a forked child draws its own).
fn owner() -> u64 {
    link::token()
}

/// Gives up every high-priority slot of this process (left high priority, or exiting).
fn release_all(w: &mut Watched) {
    for (_, o) in w.devices.drain() {
        o.sched.release_high_at(o.slot, owner(), now_ns());
        futex_wake_all(&o.sched.wake);
        for (ctx, e) in o.events {
            give_event(ctx, e);
        }
    }
}

extern "C" fn release_at_exit() {
    // Never block an exiting process: skip if the watcher holds the lock. A forked child's
    // inherited slots are its parent's: not to be released here. Nothing may unwind out of an
    // exit handler.
    let _ = std::panic::catch_unwind(|| {
        if let Some(mut watched) = locks::try_lock(&WATCHED) {
            if let Some(w) = watched.as_mut().filter(|w| w.generation == link::fork_generation()) {
                release_all(w);
            }
        }
    });
}

/// The watcher: renews the leases, and marks a device idle once its events have completed.
fn watch() {
    // SAFETY: prctl on this thread only: wake-ups within a few µs of the requested time.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    // For good: this thread's queries must never break the program's graph captures.
    let mut mode = CAPTURE_MODE_RELAXED;
    let _ = call_real!(cuThreadExchangeStreamCaptureMode(&mut mode));
    let mut renewed = 0u64;
    loop {
        let now = now_ns();
        let mut watched = locks::lock(&WATCHED);
        let Some(w) = watched.as_mut() else { return };
        if priority() != Priority::High && !w.devices.is_empty() {
            // Set back to normal or low (by the controller): the neighbours go free at once.
            release_all(w);
        }
        if now - renewed >= RENEW_NS {
            renewed = now;
            for o in w.devices.values() {
                o.sched.renew(o.slot, now, LEASE_NS);
                // Again with each renewal: a word cleared by someone else is set right.
                if o.slot.owner.load(Acquire) == owner() {
                    o.sched.set_host_bound(o.slot, o.requests.verdict() == Verdict::HostBound);
                }
            }
        }
        let mut outstanding = false;
        // The earliest empty kernel still to launch ahead of a request, and those due now.
        let mut switch_at = u64::MAX;
        let mut ahead = Vec::new();
        for (&device, o) in w.devices.iter_mut() {
            o.events.retain(|&(ctx, e)| {
                if done_in(ctx, e) {
                    give_event(ctx, e);
                    false
                } else {
                    true
                }
            });
            if o.events.is_empty() {
                if o.slot.busy.load(SeqCst) != 0 && LAUNCHING.load(SeqCst) == 0 {
                    o.slot.busy.store(0, SeqCst);
                    // A launch that began in between marks it again.
                    if LAUNCHING.load(SeqCst) != 0 {
                        o.slot.busy.store(1, SeqCst);
                    } else {
                        o.sched.wake.fetch_add(1, SeqCst);
                        futex_wake_all(&o.sched.wake);
                        o.requests.idle_seen(o.seen_busy, now);
                    }
                }
            } else {
                outstanding = true;
                o.seen_busy = now;
            }
            o.requests.tick(now);
            publish(device, o);
            match switch_ahead_of(device, o, now) {
                Some(Ahead::Later(at)) => switch_at = switch_at.min(at),
                Some(Ahead::Now(ctx)) => ahead.push((ctx, device)),
                None => {}
            }
        }
        if !ahead.is_empty() {
            // Outside this lock: the program's launches take it, and the first empty kernel in
            // a context is compiled. Read here, `endings` tells a context ended since.
            let endings = switch_ahead::endings();
            drop(watched);
            for (ctx, device) in ahead {
                switch_ahead::launch(ctx, device, endings);
            }
            continue;
        }
        let idle_ns = switch_at.saturating_sub(now_ns()).clamp(1_000, RENEW_NS);
        if outstanding {
            drop(watched);
            crate::sys::clock::sleep_ns(POLL_NS);
        } else if crate::sys::clock::simulated() {
            let seen = WORK_SEQ.load(SeqCst);
            drop(watched);
            futex_wait(&WORK_SEQ, seen, idle_ns);
        } else {
            drop(WORK.wait_timeout(watched, std::time::Duration::from_nanos(idle_ns)));
        }
    }
}

/// How much earlier than its window's own start a request that keeps time on `device` is
/// published as due: the switch-ahead lead where this process switches ahead (time-sliced
/// devices), else nothing.
fn switch_lead(device: CUdevice) -> u64 {
    if switch_ahead::enabled() && !crate::policy::mps::served_by_mps(device) {
        switch_ahead::LEAD_NS
    } else {
        0
    }
}

/// When the empty kernel goes ahead of the next request on a device.
enum Ahead {
    /// Its published window opens then.
    Later(u64),
    /// Now, into this context.
    Now(usize),
}

/// Whether the empty kernel goes ahead of the next request on `device` (`switch_ahead`): once
/// its published window opens, unless that request already began or its window has passed;
/// once per window (marked here as taken).
fn switch_ahead_of(device: CUdevice, o: &mut Outstanding, now: u64) -> Option<Ahead> {
    let lead = switch_lead(device);
    let (due, ctx) = (o.due?, o.ctx?);
    if lead == 0 || o.switched_for == due.from {
        return None;
    }
    let at = due.from.saturating_sub(lead);
    if now < at {
        return Some(Ahead::Later(at));
    }
    o.switched_for = due.from;
    (now < due.until && o.slot.busy.load(SeqCst) == 0).then_some(Ahead::Now(ctx))
}

/// The program is about to end a context (`cuCtxDestroy`), or the primary context of a device
/// (its release or reset): requests there no longer name it, then the empty kernel made there
/// is given back while the context lives. In that order: the watcher reads a request's context
/// and `switch_ahead::endings` together, so it either no longer sees the context or sees that
/// one ended before it launches (`switch_ahead`'s notes).
pub fn context_ending(ending: Ending) {
    {
        let mut watched = locks::lock(&WATCHED);
        if let Some(w) = watched.as_mut().filter(|w| w.generation == link::fork_generation()) {
            for (&device, o) in w.devices.iter_mut() {
                let gone = match ending {
                    Ending::Context(c) => o.ctx == Some(c),
                    Ending::Device(d) => d == device,
                };
                if gone {
                    o.ctx = None;
                }
            }
        }
    }
    switch_ahead::forget(ending);
}

/// Publishes a changed verdict of this process's requests on `device` for its neighbours, and
/// logs it (and, once, the first measurement that confirms the start).
fn publish(device: CUdevice, o: &mut Outstanding) {
    let pid = std::process::id();
    if o.due.is_some() != o.keeping_time {
        o.keeping_time = o.due.is_some();
        match o.due {
            Some(d) => {
                let lead = switch_lead(device);
                let ahead =
                    if lead > 0 { format!("; an empty kernel takes the GPU's switch to this context {} µs before each", lead / 1000) } else { String::new() };
                tracing::info!(
                    "pid {pid}: device {device}: requests keep time (every {:.2} ms, due within {} µs): neighbours under a duration budget keep their work clear of the next{ahead}",
                    d.period as f64 / 1e6,
                    (d.until - d.from) / 1000
                )
            }
            None => tracing::info!("pid {pid}: device {device}: requests no longer keep time: neighbours are not held before them"),
        }
    }
    let Some(change) = o.requests.take_change() else {
        if !o.reported && o.requests.requests() >= FIRST_REPORT {
            o.reported = true;
            let what = if o.requests.verdict() == Verdict::HostBound { "host-bound" } else { "device-bound" };
            tracing::info!(
                "pid {pid}: device {device}: requests {what} (device busy {:.0}% of each request, smoothed over the first {FIRST_REPORT}; {:.0}% of the last)",
                100.0 * o.requests.fraction(),
                100.0 * o.requests.last()
            );
        }
        return;
    };
    o.reported = true;
    let host_bound = change.verdict == Verdict::HostBound;
    o.sched.set_host_bound(o.slot, host_bound);
    let (busy, last) = (100.0 * change.fraction, 100.0 * change.last);
    let n = change.requests;
    if host_bound {
        tracing::info!(
            "pid {pid}: device {device}: requests host-bound (device busy {busy:.0}% of each request, smoothed; {last:.0}% of the last; after request {n}): spatial neighbours under GPUSLICE_PRIORITY_GATE=auto need not hold back"
        );
    } else {
        tracing::info!(
            "pid {pid}: device {device}: requests device-bound (device busy {busy:.0}% of each request, smoothed; {last:.0}% of the last; after request {n}): spatial neighbours under GPUSLICE_PRIORITY_GATE=auto hold back again"
        );
    }
}

// ------------------------------------------------------------------- events and futexes

/// Runs `f` with the calling thread in relaxed capture mode (see `CAPTURE_MODE_RELAXED`),
/// restoring the program's mode after.
fn relaxed<T>(f: impl FnOnce() -> T) -> T {
    let mut mode = CAPTURE_MODE_RELAXED;
    let swapped = call_real!(cuThreadExchangeStreamCaptureMode(&mut mode)) == CUDA_SUCCESS;
    let out = f();
    if swapped {
        let _ = call_real!(cuThreadExchangeStreamCaptureMode(&mut mode));
    }
    out
}

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: hold_for_fork, in_child: crate::sys::atfork::nothing_to_forget };

/// The priority machinery's locks, for a fork (see `sys::atfork`), in the order the code nests them:
/// the watcher's state before a device's launches in flight (the event pool, `events::SLEEPERS`,
/// comes after both). The child sorts its inherited state out itself (fork generations).
pub fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    h.take(&WATCHED, crate::sys::atfork::keep);
    for device in &IN_FLIGHT {
        h.take(&device.events, crate::sys::atfork::keep);
    }
    switch_ahead::hold_for_fork(h);
}

/// An event of context `ctx` (the current one) that sleeps when waited on.
fn take_event(ctx: usize) -> Option<usize> {
    // With a duration budget the events also time the launches (`flight_cost`).
    if flight_cost::budget_ns().is_some() {
        events::TIMED_SLEEPERS.take(ctx)
    } else {
        events::SLEEPERS.take(ctx)
    }
}

fn give_event(ctx: usize, event: usize) {
    if flight_cost::budget_ns().is_some() {
        events::TIMED_SLEEPERS.give(ctx, event)
    } else {
        events::SLEEPERS.give(ctx, event)
    }
}

/// True when the event has completed (or cannot be asked: never wait on a broken event).
fn done(event: usize) -> bool {
    call_real!(cuEventQuery(event as *mut c_void)) != CUDA_ERROR_NOT_READY
}

/// The same from the watcher thread, which has no context of its own.
fn done_in(ctx: usize, event: usize) -> bool {
    let _ = call_real!(cuCtxSetCurrent(ctx as CUcontext));
    done(event)
}

/// All bits: these futexes have one kind of waiter each.
const ALL: u32 = u32::MAX;

pub(crate) fn futex_wait(word: &std::sync::atomic::AtomicU32, expected: u32, timeout_ns: u64) {
    crate::sys::clock::futex_wait(word, expected, ALL, timeout_ns)
}

pub(crate) fn futex_wake_all(word: &std::sync::atomic::AtomicU32) {
    crate::sys::clock::futex_wake(word, ALL)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3 ms kernel began at 0, and a 600 µs one waits to join it; the next request is due at
    /// 4 ms. Stretched, the budget at `t` is 7/8 of the time left to 4 ms.
    fn stretched_room(at: u64) -> Room {
        let budget = flight_cost::stretched(400_000, at, 4_000_000);
        flight_cost::room([3_000_000].into_iter(), Some(0), at, 600_000, budget)
    }

    #[test]
    fn room_under_a_shrinking_budget_comes_when_both_agree() {
        // Under the budget of time 0 (3.5 ms) it would fit at 0.1 ms; by then the budget is
        // 3.41 ms. Where they agree: 3 ms − t + 600 µs ≤ 7/8 (4 ms − t), t ≥ 0.8 ms; 32 steps
        // come within 1.4 % of the way there (the waiter looks again then).
        let room = room_in_time(0, stretched_room);
        let Room::At(when) = room else { panic!("{room:?}") };
        assert!((780_000..=800_000).contains(&when), "{when}");
        assert!(matches!(stretched_room(when - 1), Room::At(_)), "never early");
        assert_eq!(stretched_room(800_000), Room::Now);
        assert_eq!(room_in_time(850_000, stretched_room), Room::Now);
    }

    #[test]
    fn room_under_a_fixed_budget_is_the_first_answer() {
        let fixed = |at: u64| flight_cost::room([500_000].into_iter(), Some(1_000_000), at, 20_000, 100_000);
        assert_eq!(room_in_time(1_000_000, fixed), Room::At(1_420_000));
        assert_eq!(room_in_time(1_420_000, fixed), Room::Now);
        let never = |_| Room::AfterOldest;
        assert_eq!(room_in_time(0, never), Room::AfterOldest);
    }
}
