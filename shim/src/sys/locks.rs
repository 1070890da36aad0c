//! The shim's locks: std mutexes, taken with poisoning ignored (hooks catch panics, see
//! `guard`, and the data stays usable).
//!
//! Why std and not parking_lot: on Linux a std mutex is one futex word inside the mutex and
//! nothing else, so a forked child can release one it inherited (see `sys::atfork`). parking_lot keeps
//! a process-wide table of parked threads; a child inherits it half-updated, and its priority
//! watcher crashed in there in the fork test.

use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

#[inline]
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `m` if it is free now.
#[inline]
pub fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// `m` if it comes free within `patience` (polled: std has no timed lock). Only `atfork`'s
/// prepare handler uses it, where waiting for ever could hang the program.
pub fn lock_within<T>(m: &Mutex<T>, patience: Duration) -> Option<MutexGuard<'_, T>> {
    if let Some(g) = try_lock(m) {
        return Some(g);
    }
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if let Some(g) = try_lock(m) {
            return Some(g);
        }
        if start.elapsed() >= patience {
            return None;
        }
        spins += 1;
        if spins < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}
