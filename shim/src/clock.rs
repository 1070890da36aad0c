//! The one clock the shim's scheduling reads and sleeps on: the throttle's buckets, the turns
//! between processes, the priority leases and the cost model all take their time from here, so
//! that a simulated clock for tests (issue 14 item 1, not built yet) has one place to plug in.
//! Today it is CLOCK_MONOTONIC (shared by all processes of a host, as the ledger's leases need).

use std::time::Duration;

/// CLOCK_MONOTONIC in nanoseconds (vDSO: no system call).
#[inline]
pub fn now_ns() -> u64 {
    gpuslice_common::ledger::monotonic_ns()
}

/// CLOCK_MONOTONIC_COARSE: a few ns to read, enough for leases of hundreds of ms.
#[inline]
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps the calling thread for `ns` of this clock's time.
#[inline]
pub fn sleep_ns(ns: u64) {
    std::thread::sleep(Duration::from_nanos(ns));
}
