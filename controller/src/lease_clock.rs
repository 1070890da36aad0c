//! The clock the shims write their leases in, for judging them: CLOCK_MONOTONIC, or in the
//! integration tests the simulated clock page that `SIMCUDA_CLOCK` names.
//!
//! Under the simulated clock (tests/simcuda/src/clock.rs) the shims' `now` is virtual time,
//! which runs far ahead of the controller's wall clock while the test waits in real time (a
//! neighbour flooding 1 ms kernels moves it tens of seconds a real second). Judged against
//! CLOCK_MONOTONIC, a high-priority process's honest 300 ms lease then looked "further ahead
//! than any process takes" and was lapsed as a forgery every tick, and its neighbours stopped
//! yielding: `priority.rs::priority_set_live_through_the_controller` failed under load. Only
//! the test harness sets `SIMCUDA_CLOCK`; without it this is CLOCK_MONOTONIC.
//!
//! The suspension policy's refusals are timed on it too (`refusal::now_ns`): how long a group
//! is passed over is then judged on the virtual time its members' simulated kernels run on.

use gpuslice_common::ledger;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::OnceLock;

/// The page's first word ("SIMCLOCK" little endian) and where its virtual time lies: the
/// layout of `Page` in tests/simcuda/src/clock.rs.
const SIM_MAGIC: u64 = 0x4b43_4f4c_434d_4953;
const SIM_NOW_OFFSET: usize = 8;
const SIM_MAPPED: usize = 16;

/// Virtual time's word in the simulated clock page, mapped read-only; `None` without one.
fn simulated_now() -> Option<&'static AtomicU64> {
    static NOW: OnceLock<Option<usize>> = OnceLock::new();
    let at = *NOW.get_or_init(|| {
        let path = std::env::var_os("SIMCUDA_CLOCK").filter(|p| !p.is_empty())?;
        let file = std::fs::File::open(&path).ok()?;
        if file.metadata().ok()?.len() < SIM_MAPPED as u64 {
            return None;
        }
        // SAFETY: a read-only shared mapping of the file's first bytes (the page stays mapped
        // for the controller's life; the descriptor may close).
        let base = unsafe { libc::mmap(std::ptr::null_mut(), SIM_MAPPED, libc::PROT_READ, libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&file), 0) };
        if base == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: the mapping holds SIM_MAPPED bytes, page aligned; the words are atomics there.
        let magic = unsafe { &*(base as *const AtomicU64) }.load(SeqCst);
        (magic == SIM_MAGIC).then(|| base as usize + SIM_NOW_OFFSET)
    });
    // SAFETY: an aligned word inside the mapping made above, never unmapped.
    at.map(|a| unsafe { &*(a as *const AtomicU64) })
}

/// Now, in the clock of the shims' leases.
pub fn now_ns() -> u64 {
    simulated_now().map_or_else(ledger::monotonic_ns, |w| w.load(SeqCst))
}
