//! The token that names each registered process in device state (the turn among throttled
//! processes), drawn by the controller, and the turns freed by it when the process goes.
//!
//! The process used to draw its own and write it into its slot, and the controller freed the
//! turn held under whatever that slot said: a member that wrote another process's token there
//! (every holder's token is in the device table, which every member maps) and exited made the
//! controller hand that process's turn over early. Now the controller picks the token, writes it
//! into the slot before the slot is handed out (the shim takes it from there: no protocol change,
//! nothing added to the launch path), and keeps its own copy (`Watched::token`, and the record in
//! the ledger file for a restart); the slot's word is never read back.

use super::{State, Watched};

impl State {
    /// A token for a new registration: random, never 0 (`Turn::holder`'s "nobody"), and no
    /// other watched process's, so that freeing one process's turn can free no other's.
    pub(super) fn new_token(&self) -> u64 {
        loop {
            let token = random_u64();
            if token != 0 && !self.watched.values().any(|w| w.token == token) {
                return token;
            }
        }
    }

    /// Frees every device turn held under `w`'s token (the process is gone): the others need
    /// not wait out its lease. A token of 0 (not known) frees nothing.
    pub(super) fn free_turns(&self, w: &Watched, why: &str) {
        for d in 0..gpuslice_common::ledger::MAX_DEVICES {
            if self.ledger.device(d).sched.turn.clear_holder(w.token) {
                tracing::debug!("pid {} {why}: its turn on device {d} is free", w.pid);
            }
        }
    }
}

/// 64 random bits: the kernel's, else (no getrandom: a kernel before 3.17, or a seccomp filter)
/// the clock's nanoseconds, stirred. The tokens need not be secret (every holder's is in the
/// device table); `new_token` keeps them apart.
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom into a local buffer of its length.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_NONBLOCK) };
    if got == bytes.len() as isize {
        return u64::from_ne_bytes(bytes);
    }
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static DRAWN: AtomicU64 = AtomicU64::new(0);
    // splitmix64 of the clock and a count, so that two draws in one nanosecond differ.
    let mut x = gpuslice_common::ledger::monotonic_ns() ^ DRAWN.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
