//! Every launch entry point: kernels (plain, `Ex`, cooperative, each with its `_ptsz` variant)
//! and CUDA graphs. Unmanaged (no share, no priority at stake), a launch costs a few loads on top
//! of the driver's own work. Throttled, it waits for its device's bucket, goes out, and is
//! charged its estimated device time (see `throttle` and `cost`); with a high-priority process
//! on the device, it follows `sched`'s rules first.

use crate::driver::{call_real, driver};
use crate::ffi::*;
use crate::{board, cost, guard, locks, sched, throttle};
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
        sched::launch(device, stream, || throttled(device, stream, key, launch))
    } else {
        throttled(device, stream, key, launch)
    }
}

/// Runs `launch` under the throttle of `device`, if it has one.
fn throttled(device: CUdevice, stream: CUstream, key: u64, launch: impl FnOnce() -> CuResult) -> CuResult {
    let Some(bucket) = throttle::bucket(device) else { return launch() };
    cost::harvest();
    bucket.wait_turn(|| {
        // A burst ends here: measure it, and hand the device over before sleeping. Without a
        // cap the wait is only for the queue ahead to shrink: the turn is kept.
        cost::close_span();
        if !bucket.uncapped() {
            end_burst(device, bucket);
        }
        cost::harvest();
    });
    if bucket.slice_done() && board::holding(device) && board::others_waiting(device) {
        // Issue 18: a lending process has run its slice and someone queues: the turn goes on.
        cost::close_span();
        end_burst(device, bucket);
        cost::harvest();
    }
    if !board::holding(device) {
        // A new burst: take the turn (waiting, boundedly, for another process's burst).
        let taken = board::take(device, bucket.queued_until().max(throttle::now_ns()));
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
    if bucket.shared(throttle::now_ns()) || board::others_waiting(device) {
        let last = *locks::lock(bucket.last_launch());
        if last.thread == throttle::thread_token() && last.sequence != 0 {
            cost::wait_for(last.stream as CUstream);
        }
    }
    board::release(device);
    bucket.turn_released();
}

/// A kernel launch entry point with the classic argument list; `cuLaunchKernel` takes an
/// `extra` array after the parameters, `cuLaunchCooperativeKernel` does not.
macro_rules! kernel_hook {
    ($name:ident, per_thread = $pt:expr $(, $extra:ident)?) => {
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
                let launch = || call_real!($name(f, gx, gy, gz, bx, by, bz, shared_mem, stream, params $(, $extra)?));
                let Some(priority) = managed() else { return launch() };
                launch_managed(priority, stream, $pt, cost::kernel_key(f, [gx, gy, gz], [bx, by, bz], shared_mem), launch)
            })
        }
    };
}

kernel_hook!(cuLaunchKernel, per_thread = false, extra);
kernel_hook!(cuLaunchKernel_ptsz, per_thread = true, extra);
kernel_hook!(cuLaunchCooperativeKernel, per_thread = false);
kernel_hook!(cuLaunchCooperativeKernel_ptsz, per_thread = true);

macro_rules! ex_hook {
    ($name:ident, per_thread = $pt:expr) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(config: *const LaunchConfig, f: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void) -> CuResult {
            guard::cuda(stringify!($name), || {
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
