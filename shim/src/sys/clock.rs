//! The one clock the shim's scheduling reads and sleeps on: the throttle's buckets, the turns
//! between processes, the priority leases and the cost model all take their time from here.
//! It is CLOCK_MONOTONIC (shared by all processes of a host, as the ledger's leases need),
//! unless the loaded driver itself provides a simulated clock (the test double's
//! `simcuda_clock_*`, looked up once in the driver's own handle when it is loaded, never from an
//! environment variable): then every read, sleep and futex wait of the shim's scheduling goes
//! through it, so that tests judge shares on virtual time (see tests/simcuda/src/clock.rs and
//! LD_PRELOAD.md for why this is no escape from a quota).

use crate::sys::dl::Library;
use std::sync::atomic::AtomicU32;
use std::sync::OnceLock;
use std::time::Duration;

/// The simulated driver's clock, as it exports it.
struct Simulated {
    now_ns: extern "C" fn() -> u64,
    sleep_until_ns: extern "C" fn(u64),
    futex_wait: unsafe extern "C" fn(*const AtomicU32, u32, u32, u64),
    futex_wake: unsafe extern "C" fn(*const AtomicU32, u32),
    join: extern "C" fn(),
}

/// Set once, when the driver is loaded and says its simulated clock is on.
static SIMULATED: OnceLock<Simulated> = OnceLock::new();

/// Looks for the driver's simulated clock in `driver` (the real libcuda's handle).
pub fn attach(driver: &Library) {
    let sym = |name: &std::ffi::CStr| driver.symbol(name);
    let (enabled, now, sleep, wait, wake, join) = (
        sym(c"simcuda_clock_enabled"),
        sym(c"simcuda_clock_now_ns"),
        sym(c"simcuda_clock_sleep_until_ns"),
        sym(c"simcuda_clock_futex_wait"),
        sym(c"simcuda_clock_futex_wake"),
        sym(c"simcuda_clock_join"),
    );
    if [enabled, now, sleep, wait, wake, join].iter().any(|p| p.is_null()) {
        return;
    }
    // SAFETY: the simulated driver exports these with exactly these signatures (tests/simcuda's
    // lib.rs); a library that is not it has none of them.
    unsafe {
        let enabled: extern "C" fn() -> libc::c_int = std::mem::transmute(enabled);
        if enabled() == 0 {
            return;
        }
        let _ = SIMULATED.set(Simulated {
            now_ns: std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> u64>(now),
            sleep_until_ns: std::mem::transmute::<*mut libc::c_void, extern "C" fn(u64)>(sleep),
            futex_wait: std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn(*const AtomicU32, u32, u32, u64)>(wait),
            futex_wake: std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn(*const AtomicU32, u32)>(wake),
            join: std::mem::transmute::<*mut libc::c_void, extern "C" fn()>(join),
        });
    }
}

/// True when the shim runs on the simulated driver's clock.
#[inline]
pub fn simulated() -> bool {
    SIMULATED.get().is_some()
}

/// The host's CLOCK_MONOTONIC in nanoseconds (vDSO: no system call), never the simulated one:
/// for what must not follow the driver's time (how often a refusal is logged, how often NVML is
/// asked again), where a test's virtual time would only change how much is logged or measured.
#[inline]
pub fn host_ns() -> u64 {
    gpuslice_common::ledger::monotonic_ns()
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO: no system call), or the simulated driver's time.
#[inline]
pub fn now_ns() -> u64 {
    #[cfg(test)]
    if let Some(t) = unit::now() {
        return t;
    }
    match SIMULATED.get() {
        None => gpuslice_common::ledger::monotonic_ns(),
        Some(s) => (s.now_ns)(),
    }
}

/// CLOCK_MONOTONIC_COARSE: a few ns to read, enough for leases of hundreds of ms.
#[inline]
pub fn coarse_now_ns() -> u64 {
    #[cfg(test)]
    if let Some(t) = unit::now() {
        return t;
    }
    if let Some(s) = SIMULATED.get() {
        return (s.now_ns)();
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps the calling thread for `ns` of this clock's time.
#[inline]
pub fn sleep_ns(ns: u64) {
    #[cfg(test)]
    if unit::sleep(ns) {
        return;
    }
    match SIMULATED.get() {
        None => std::thread::sleep(Duration::from_nanos(ns)),
        Some(s) => (s.sleep_until_ns)((s.now_ns)().saturating_add(ns)),
    }
}

/// Sleeps while `word` is `expected`, until `futex_wake` with a bit of `mask`, at most
/// `timeout_ns` of this clock's time (spurious returns happen: callers loop).
pub fn futex_wait(word: &AtomicU32, expected: u32, mask: u32, timeout_ns: u64) {
    match SIMULATED.get() {
        None => gpuslice_common::turns::futex_wait(word, expected, mask, timeout_ns),
        // SAFETY: a live word; the simulated clock only reads it.
        Some(s) => unsafe { (s.futex_wait)(word, expected, mask, timeout_ns) },
    }
}

/// Wakes the waiters on `word` whose mask shares a bit with `mask`.
pub fn futex_wake(word: &AtomicU32, mask: u32) {
    match SIMULATED.get() {
        None => gpuslice_common::turns::futex_wake(word, mask),
        // SAFETY: as `futex_wait`.
        Some(s) => unsafe { (s.futex_wake)(word, mask) },
    }
}

/// A thread the shim starts takes part in the simulated clock from here (no-op on real time):
/// called before its starter goes on, so that virtual time cannot run while it gets going.
pub fn join() {
    if let Some(s) = SIMULATED.get() {
        (s.join)();
    }
}

/// The turns' waits and wakes on this clock.
pub struct TurnClock {
    /// Whether other processes' pids may be checked (without a controller only).
    pub check_pids: bool,
}

impl gpuslice_common::turns::Waiter for TurnClock {
    fn now_ns(&self) -> u64 {
        now_ns()
    }
    fn alive(&self, pid: u32) -> bool {
        !self.check_pids || pid == 0 || crate::sys::pids::alive(pid)
    }
    fn wait(&self, word: &AtomicU32, expected: u32, mask: u32, timeout_ns: u64) {
        futex_wait(word, expected, mask, timeout_ns)
    }
    fn wake(&self, word: &AtomicU32, mask: u32) {
        futex_wake(word, mask)
    }
}

/// Unit tests' clock: virtual time of the calling thread alone, which a sleep moves at once (a
/// discrete-event clock with one participant), so that figures judged in unit tests do not
/// depend on the machine's load.
#[cfg(test)]
pub mod unit {
    use std::cell::Cell;

    thread_local! {
        static NOW: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// Puts the calling thread on its own virtual clock, starting at 1 s.
    pub fn simulate() {
        NOW.with(|n| n.set(Some(1_000_000_000)));
    }

    pub(super) fn now() -> Option<u64> {
        NOW.with(|n| n.get())
    }

    /// Moves the calling thread's virtual clock by `ns` if it has one.
    pub(super) fn sleep(ns: u64) -> bool {
        NOW.with(|n| n.get().map(|t| n.set(Some(t + ns)))).is_some()
    }

    /// Moves it by `ns` of host work (nothing else moves it).
    pub fn advance(ns: u64) {
        sleep(ns);
    }
}
