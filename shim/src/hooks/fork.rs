//! `fork()` while other threads are inside the shim: the child must neither find one of the
//! shim's locks held for ever (by a thread that did not follow it into the child) nor inherit a
//! table half-updated.
//!
//! A `pthread_atfork` prepare handler takes every lock of the shim, in one fixed order that
//! agrees with every nesting in the code (sched → throttle → cost → context → allocation tables
//! → NVML), so that at the fork no thread is inside a critical section. The parent's handler
//! lets them go. The child's forgets what was its parent's (its allocations, contexts, events,
//! launch order, its slot in the ledger: the child registers afresh at its next CUDA call)
//! while it still holds them, then lets them go.
//!
//! Each lock is waited for at most `PATIENCE` (a thread may hold one across a driver call that
//! blocks, or the forking thread itself may, if the driver forks inside a call): a lock not had
//! by then is left alone, the fork goes ahead, and the parent says so once.
//!
//! Registered after the driver's own handlers (at attach, after `cuInit`), so the shim's
//! prepare runs first and its child handler last, as POSIX orders them.

use crate::sys::locks;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(1);

/// A lock held across the fork, and what the child does with its data before letting it go.
trait Held {
    fn in_child(&mut self);
}

struct One<T: 'static> {
    guard: MutexGuard<'static, T>,
    reset: fn(&mut T),
}

impl<T> Held for One<T> {
    fn in_child(&mut self) {
        (self.reset)(&mut self.guard)
    }
}

/// The locks taken by the prepare handler.
pub struct Holder {
    held: Vec<Box<dyn Held>>,
    missed: usize,
}

impl Holder {
    /// Takes `lock` (within `PATIENCE`); in the child, `reset` runs on its data before release.
    pub fn take<T>(&mut self, lock: &'static Mutex<T>, reset: fn(&mut T)) {
        match locks::lock_within(lock, PATIENCE) {
            Some(guard) => self.held.push(Box::new(One { guard, reset })),
            None => self.missed += 1,
        }
    }
}

/// Leaves the data as it is: the child keeps it (learned costs) or sorts it out itself (`sched`
/// compares fork generations).
pub fn keep<T>(_: &mut T) {}

thread_local! {
    /// Between prepare and parent/child: the forking thread's, in both processes.
    static HELD: RefCell<Option<Holder>> = const { RefCell::new(None) };
}

/// Locks that were not had within `PATIENCE` at the latest fork (reported by the parent).
static MISSED: AtomicUsize = AtomicUsize::new(0);

/// Installs the handlers (once per process line; a child inherits them).
pub fn install() {
    static ONCE: Once = Once::new();
    // SAFETY: registering plain extern "C" functions.
    ONCE.call_once(|| unsafe {
        libc::pthread_atfork(Some(prepare), Some(in_parent), Some(in_child));
    });
}

extern "C" fn prepare() {
    // Nothing may unwind out of a fork handler; a failure here only means no locks are held.
    let _ = std::panic::catch_unwind(|| {
        let mut h = Holder { held: Vec::with_capacity(512), missed: 0 };
        crate::policy::sched::hold_for_fork(&mut h);
        crate::policy::throttle::hold_for_fork(&mut h);
        crate::policy::cost::hold_for_fork(&mut h);
        crate::hooks::context::hold_for_fork(&mut h);
        crate::hooks::memory::hold_for_fork(&mut h);
        crate::hooks::sharing::hold_for_fork(&mut h);
        crate::hooks::nvml::hold_for_fork(&mut h);
        MISSED.store(h.missed, Relaxed);
        HELD.with(|slot| *slot.borrow_mut() = Some(h));
    });
}

extern "C" fn in_parent() {
    let _ = std::panic::catch_unwind(|| {
        HELD.with(|slot| drop(slot.borrow_mut().take()));
        let missed = MISSED.swap(0, Relaxed);
        if missed != 0 {
            tracing::warn!(
                "pid {}: fork() while {missed} of gpuslice's locks stayed busy for {PATIENCE:?}; the child may block if it calls CUDA",
                std::process::id()
            );
        }
    });
}

extern "C" fn in_child() {
    let _ = std::panic::catch_unwind(|| {
        let held = HELD.with(|slot| slot.borrow_mut().take());
        if let Some(mut h) = held {
            for lock in &mut h.held {
                lock.in_child();
            }
        }
        // Held or not: atomics only from here.
        crate::hooks::context::forget_in_child();
        crate::hooks::memory::forget_in_child();
        crate::policy::cost::forget_in_child();
        crate::policy::throttle::forget_in_child();
        crate::policy::board::forget_in_child();
        crate::state::link::forget_in_child();
    });
    // The guards were dropped above (released) with the holder.
}
