//! Every launch entry point: kernels (plain, `Ex`, cooperative, each with its `_ptsz` variant)
//! and CUDA graphs. Unmanaged (no share, no priority at stake), a launch costs a few loads on top
//! of the driver's own work. Throttled, it waits for its device's bucket, goes out, and is
//! charged its estimated device time (see `throttle` and `cost`); with a high-priority process
//! on the device, it follows `sched`'s rules first. A kernel of a sliced module (`slicer`) always
//! gets its slice parameter, and goes out in slices while a high-priority process lives beside
//! this lower-priority one (`launch_sliced`).

use crate::policy::slice_args::SliceArgs;
use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::{policy::board, policy::cost, policy::sched, policy::slice_cost, policy::slicer, policy::throttle, sys::clock, sys::guard, sys::locks};
use gpuslice_common::ledger::Priority;
use gpuslice_ptx::{plan_slices, Dim3, Slice};
use std::ffi::{c_uint, c_void};

/// The stream as the driver's other entry points understand it: stream 0 on a `_ptsz` entry
/// point is the per-thread default stream.
fn effective_stream(stream: CUstream, per_thread: bool) -> CUstream {
    if per_thread && stream.is_null() {
        STREAM_PER_THREAD as CUstream
    } else {
        stream
    }
}

/// True when work on `stream` is being captured into a graph rather than run; captured work is
/// charged when the graph is launched.
fn capturing(stream: CUstream) -> bool {
    let Some(is_capturing) = driver().and_then(|d| d.cuStreamIsCapturing) else { return false };
    let mut status: c_uint = 0;
    // SAFETY: out-pointer to a local. An error (an illegal query during global capture) is
    // treated as capturing: leave the launch alone.
    let code = unsafe { is_capturing(stream, &mut status) };
    code != CUDA_SUCCESS || status != 0
}

/// What a launch needs beyond the driver: `None` for nothing; `Some(priority)` when a share or
/// a priority is at stake, `priority` telling whether `sched`'s rules apply (asked once here).
#[inline(always)]
fn managed() -> Option<bool> {
    let priority = sched::engaged();
    (priority || throttle::active()).then_some(priority)
}

/// Runs `launch` under the priority rules (when `priority`) and the throttle of the current
/// device.
#[inline(never)]
fn launch_managed(priority: bool, stream: CUstream, per_thread: bool, key: u64, launch: impl FnOnce() -> CuResult) -> CuResult {
    let Some(device) = driver().and_then(|d| d.current_device()) else { return launch() };
    let stream = effective_stream(stream, per_thread);
    if capturing(stream) {
        return launch();
    }
    if priority {
        sched::launch(device, stream, key, || throttled(device, stream, key, launch))
    } else {
        throttled(device, stream, key, launch)
    }
}

/// Runs `launch` under the throttle of `device`, if it has one.
fn throttled(device: CUdevice, stream: CUstream, key: u64, launch: impl FnOnce() -> CuResult) -> CuResult {
    let Some(bucket) = throttle::bucket(device) else { return launch() };
    cost::harvest();
    let entered = bucket.wait_turn(|| {
        // A burst ends here: measure it, and hand the device over before sleeping. Without a
        // cap the wait is only for the queue ahead to shrink: the turn is kept.
        cost::close_span();
        if !bucket.uncapped() {
            end_burst(device, bucket);
        }
        cost::harvest();
    });
    let returner = || board::returner_waiting(device, throttle::RETURNER_FRESH_MS);
    if bucket.lends() && board::holding(device) && bucket.hand_over_now(board::others_waiting(device), returner) {
        // Issue 18: a lending process has run its slice, or was borrowing, and someone queues:
        // the turn goes on.
        tracing::debug!("hands the turn over after holding it {} us", bucket.held_ns() / 1000);
        cost::close_span();
        end_burst(device, bucket);
        cost::harvest();
    }
    if !board::holding(device) {
        // A new burst: take the turn (waiting, boundedly, for another process's burst).
        let taken = board::take(device, bucket.queued_until().max(clock::now_ns()), bucket.back_from_idle(entered));
        if taken.waited_ns > 5_000_000 {
            tracing::debug!("took the turn after waiting {} us ({} peers)", taken.waited_ns / 1000, taken.peers);
        }
        bucket.add_turn_waited(taken.waited_ns);
        if taken.neighbour {
            bucket.saw_neighbour(taken.peers);
        }
        bucket.turn_taken();
    }
    let plan = cost::plan(key);
    let me = throttle::thread_token();
    let mut last = locks::lock(bucket.last_launch());
    let sequence = last.sequence + 1;
    // This thread's previous launch, if it was also the device's previous one.
    let previous = (last.thread == me && last.sequence != 0).then_some(last.stream as CUstream);
    // A span grows over back-to-back launches only: one whose work has drained (the program
    // synchronised, or waited for a turn or a file) would measure the idle gap as device time.
    let continues = cost::continues_span(key, stream, sequence) && bucket.busy();
    if !continues {
        cost::close_span();
        // Behind queued work, open on the stream of this thread's previous launch if it was the
        // device's previous one (see `cost`); on an idle device, on this launch's own stream.
        // Behind another thread's work, no sample this time.
        let busy = bucket.busy();
        let opening = if busy { previous } else { Some(stream) };
        if let (true, Some(opening)) = (plan.sample, opening) {
            cost::open_span(opening, stream, busy, key, bucket, sequence);
        }
    }
    let code = launch();
    if code == CUDA_SUCCESS {
        *last = throttle::LastLaunch { thread: me, stream: stream as usize, sequence };
        drop(last);
        bucket.charge(plan.charge_ns);
        board::extend(device, bucket.queued_until());
        if !cost::extend_span(plan.charge_ns, sequence) && plan.charge_ns == cost::UNKNOWN_NS {
            cost::note_unsettled(key);
        }
    }
    code
}

/// Hands the turn on `device` over at the end of a burst. While another process shares the
/// device, first waits for this burst to finish, so that the next process's burst starts on an
/// idle device instead of time-slicing with this one.
fn end_burst(device: i32, bucket: throttle::Bucket) {
    if !board::holding(device) {
        return;
    }
    // Waiting matters as soon as anyone queues, not only once this process knows the device is
    // shared: a next burst started behind this one's queued work has its first kernels' device
    // time measured from before this burst ended, and an estimate inflated that way throttled
    // processes far below their share (issue 14's starvation, with the old turn race).
    if bucket.shared(clock::now_ns()) || board::others_waiting(device) {
        let last = *locks::lock(bucket.last_launch());
        if last.thread == throttle::thread_token() && last.sequence != 0 {
            cost::wait_for(last.stream as CUstream);
        }
    }
    board::release(device);
    bucket.turn_released();
}

/// The arguments of a launch of a sliced kernel that the slicing changes.
struct Shape {
    f: *mut c_void,
    grid: [u32; 3],
    block: [u32; 3],
    shared_mem: u32,
    stream: CUstream,
    per_thread: bool,
    /// False for launches that must stay whole: cooperative ones, `Ex` with attributes.
    sliceable: bool,
}

/// A launch of a kernel of a sliced module. It always carries the slice parameter (the kernel
/// reads it); it goes out whole unless a high-priority process lives beside this lower-priority
/// one, and then in slices of about `slice_cost::TARGET_NS` of measured device time, each slice
/// a launch of its own under the priority rules (so a high-priority request waits for at most
/// the one slice in flight). `real` launches a grid with the given `kernelParams` and `extra`.
#[inline(never)]
fn launch_sliced(
    k: &slicer::Kernel,
    shape: Shape,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    real: impl Fn([u32; 3], *mut *mut c_void, *mut *mut c_void) -> CuResult,
) -> CuResult {
    let original = Dim3::new(shape.grid[0], shape.grid[1], shape.grid[2]);
    let d = driver();
    let stream = effective_stream(shape.stream, shape.per_thread);
    // Asked of the driver only when it matters: to split, or to measure (a capture would take
    // the events in as graph nodes).
    let candidate = shape.sliceable && original.volume() > 0 && sched::priority() != Priority::High && sched::engaged();
    let captured = candidate && capturing(stream);
    let split = candidate && !captured;
    let device = if split { d.and_then(|d| d.current_device()) } else { None };
    let mut cost = locks::lock(&k.cost);
    // First: a measurement finished since the last launch sizes this one's slices.
    let mut lent = if captured { None } else { cost.begin(|| d?.current_context(), || !capturing(stream)) };
    let (slices, wave) = match device {
        // Under `GPUSLICE_PRIORITY_GATE=spatial-off` on a spatial MPS device the gate lets the
        // launch go as if no high-priority process lived: slices would buy nothing there.
        Some(device) if split && !sched::gate_off(device) => {
            let (max_blocks, wave) = cost.max_blocks(device, shape.f, shape.block, shape.shared_mem);
            tracing::trace!(
                "a launch of {} blocks in slices of at most {max_blocks} ({:?} ps per block measured, wave {wave})",
                original.volume(),
                cost.block_ps()
            );
            (plan_slices(original, max_blocks), wave)
        }
        _ => {
            tracing::trace!("a launch of {} blocks goes whole (candidate {candidate}, captured {captured}, device {device:?})", original.volume());
            (vec![Slice { offset: Dim3::new(0, 0, 0), grid: original }], 0)
        }
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        if let Some(line) = cost.summary(clock::coarse_now_ns(), slices.len(), original.volume(), wave != 0, wave) {
            tracing::debug!("kernel {}: {line}", k.name);
        }
    }
    drop(cost);
    for s in &slices {
        // SAFETY: the program's own launch arguments, valid for this call.
        let Some(mut args) = (unsafe { SliceArgs::new(params, extra, k.params, &k.slot, s.param_bytes(original)) }) else {
            tracing::warn!("a launch of a sliced kernel passes arguments gpuslice cannot extend; refused");
            return_events(k, &mut lent);
            return CUDA_ERROR_INVALID_VALUE;
        };
        let grid = [s.grid.x, s.grid.y, s.grid.z];
        let mut go = || {
            let events = lent.take();
            let (code, measured) = slice_cost::measured(events, stream, || real(grid, args.params(), args.extra()));
            if let Some(e) = events {
                locks::lock(&k.cost).end(e, s.grid.volume(), measured);
            }
            code
        };
        let code = match managed() {
            None => go(),
            Some(priority) => launch_managed(priority, shape.stream, shape.per_thread, cost::kernel_key(shape.f, grid, shape.block, shape.shared_mem), go),
        };
        if code != CUDA_SUCCESS {
            return_events(k, &mut lent);
            return code;
        }
    }
    return_events(k, &mut lent);
    CUDA_SUCCESS
}

/// Gives back measurement events that no launch used.
fn return_events(k: &slicer::Kernel, lent: &mut Option<slice_cost::Events>) {
    if let Some(e) = lent.take() {
        locks::lock(&k.cost).end(e, 0, false);
    }
}

/// A kernel launch entry point with the classic argument list; `cuLaunchKernel` takes an
/// `extra` array after the parameters, `cuLaunchCooperativeKernel` does not.
macro_rules! kernel_hook {
    ($name:ident, per_thread = $pt:expr, sliceable = $sliceable:expr $(, $extra:ident)?) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            f: *mut c_void,
            gx: c_uint,
            gy: c_uint,
            gz: c_uint,
            bx: c_uint,
            by: c_uint,
            bz: c_uint,
            shared_mem: c_uint,
            stream: CUstream,
            params: *mut *mut c_void,
            $($extra: *mut *mut c_void,)?
        ) -> CuResult {
            guard::cuda(stringify!($name), || {
                if let Some(k) = slicer::kernel(f) {
                    let extra_in: *mut *mut c_void = { let _none: *mut *mut c_void = std::ptr::null_mut(); $( let _none = $extra; )? _none };
                    let shape = Shape { f, grid: [gx, gy, gz], block: [bx, by, bz], shared_mem, stream, per_thread: $pt, sliceable: $sliceable };
                    return launch_sliced(&k, shape, params, extra_in, |g, p, _e| {
                        call_real!($name(f, g[0], g[1], g[2], bx, by, bz, shared_mem, stream, p $(, { let $extra = _e; $extra })?))
                    });
                }
                let launch = || call_real!($name(f, gx, gy, gz, bx, by, bz, shared_mem, stream, params $(, $extra)?));
                let Some(priority) = managed() else { return launch() };
                launch_managed(priority, stream, $pt, cost::kernel_key(f, [gx, gy, gz], [bx, by, bz], shared_mem), launch)
            })
        }
    };
}

kernel_hook!(cuLaunchKernel, per_thread = false, sliceable = true, extra);
kernel_hook!(cuLaunchKernel_ptsz, per_thread = true, sliceable = true, extra);
kernel_hook!(cuLaunchCooperativeKernel, per_thread = false, sliceable = false);
kernel_hook!(cuLaunchCooperativeKernel_ptsz, per_thread = true, sliceable = false);

macro_rules! ex_hook {
    ($name:ident, per_thread = $pt:expr) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(config: *const LaunchConfig, f: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void) -> CuResult {
            guard::cuda(stringify!($name), || {
                if let (Some(k), false) = (slicer::kernel(f), config.is_null()) {
                    // SAFETY: the program's launch configuration, valid for this call.
                    let c = unsafe { &*config };
                    let shape = Shape {
                        f,
                        grid: c.grid,
                        block: c.block,
                        shared_mem: c.shared_mem_bytes,
                        stream: c.stream,
                        per_thread: $pt,
                        sliceable: c.num_attrs == 0,
                    };
                    return launch_sliced(&k, shape, params, extra, |g, p, e| {
                        let sliced = LaunchConfig {
                            grid: g,
                            block: c.block,
                            shared_mem_bytes: c.shared_mem_bytes,
                            stream: c.stream,
                            attrs: c.attrs,
                            num_attrs: c.num_attrs,
                        };
                        call_real!($name(&sliced, f, p, e))
                    });
                }
                let launch = || call_real!($name(config, f, params, extra));
                let Some(priority) = managed().filter(|_| !config.is_null()) else { return launch() };
                // SAFETY: the program's launch configuration, valid for this call.
                let c = unsafe { &*config };
                launch_managed(priority, c.stream, $pt, cost::kernel_key(f, c.grid, c.block, c.shared_mem_bytes), launch)
            })
        }
    };
}

ex_hook!(cuLaunchKernelEx, per_thread = false);
ex_hook!(cuLaunchKernelEx_ptsz, per_thread = true);

macro_rules! graph_hook {
    ($name:ident, per_thread = $pt:expr) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(exec: *mut c_void, stream: CUstream) -> CuResult {
            guard::cuda(stringify!($name), || {
                let launch = || call_real!($name(exec, stream));
                let Some(priority) = managed() else { return launch() };
                launch_managed(priority, stream, $pt, cost::graph_key(exec), launch)
            })
        }
    };
}

graph_hook!(cuGraphLaunch, per_thread = false);
graph_hook!(cuGraphLaunch_ptsz, per_thread = true);
