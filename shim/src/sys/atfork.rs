//! The fork table: what each module that owns state across `fork()` does before it and in the
//! child, run in the one order that `hooks::fork` gives. Below every module, so that each can
//! declare its handlers (`pub const FORK: atfork::Handlers`) without naming the others.
//!
//! `fork()` while other threads are inside the shim: the child must neither find one of the
//! shim's locks held for ever (by a thread that did not follow it into the child) nor inherit a
//! table half-updated. The prepare handler runs every module's `prepare` in table order (an
//! order that agrees with every nesting of locks in the code), each handing its locks to the
//! `Holder`, so that at the fork no thread is inside a critical section. The parent's handler
//! lets them go. The child's first resets what each held lock guards (while it still holds
//! it), lets them go, then runs every module's `in_child` in table order (atomics only).
//!
//! Each lock is waited for at most `PATIENCE` (a thread may hold one across a driver call that
//! blocks, or the forking thread itself may, if the driver forks inside a call): a lock not had
//! by then is left alone, the fork goes ahead, and the parent says so once.
//!
//! `install` registers the handlers with `pthread_atfork` after the driver's own (at attach,
//! after `cuInit`), so the shim's prepare runs first and its child handler last, as POSIX
//! orders them. Until a table is registered the handlers do nothing.

use crate::sys::locks;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(1);

/// One module's part in a fork.
pub struct Handlers {
    /// Before the fork: hands the module's locks to the holder (`Holder::take`).
    pub prepare: fn(&mut Holder),
    /// In the child, after every held lock was reset and let go: forgets the parent's state
    /// that no lock guards. Atomics only (another thread of the parent may have held a lock).
    pub in_child: fn(),
}

/// For a module with no locks to hold.
pub fn nothing_to_hold(_: &mut Holder) {}

/// For a module whose locked state is all it has to forget.
pub fn nothing_to_forget() {}

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

/// The handlers, in the order they run (`hooks::fork::ORDER`).
static TABLE: OnceLock<&'static [Handlers]> = OnceLock::new();

thread_local! {
    /// Between prepare and parent/child: the forking thread's, in both processes.
    static HELD: RefCell<Option<Holder>> = const { RefCell::new(None) };
}

/// Locks that were not had within `PATIENCE` at the latest fork (reported by the parent).
static MISSED: AtomicUsize = AtomicUsize::new(0);

/// Sets the table (the first one given wins; there is one order per process).
pub fn register(order: &'static [Handlers]) {
    let _ = TABLE.set(order);
}

/// Installs the handlers with `pthread_atfork` (once per process line; a child inherits them).
pub fn install() {
    static ONCE: Once = Once::new();
    // SAFETY: registering plain extern "C" functions.
    ONCE.call_once(|| unsafe {
        libc::pthread_atfork(Some(prepare), Some(in_parent), Some(in_child));
    });
}

fn table() -> &'static [Handlers] {
    TABLE.get().copied().unwrap_or(&[])
}

extern "C" fn prepare() {
    // Nothing may unwind out of a fork handler; a failure here only means no locks are held.
    let _ = std::panic::catch_unwind(|| {
        let mut h = Holder { held: Vec::with_capacity(512), missed: 0 };
        for module in table() {
            (module.prepare)(&mut h);
        }
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
        // The guards were dropped above (released) with the holder. Held or not: atomics only
        // from here.
        for module in table() {
            (module.in_child)();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    static DATA: Mutex<u32> = Mutex::new(7);
    static FORGOT: AtomicBool = AtomicBool::new(false);

    fn hold(h: &mut Holder) {
        h.take(&DATA, |d| *d = 0);
    }

    fn forget() {
        // Runs after the held locks were let go.
        assert!(DATA.try_lock().is_ok(), "in_child runs after the locks are released");
        FORGOT.store(true, Relaxed);
    }

    static ORDER: [Handlers; 2] = [Handlers { prepare: hold, in_child: forget }, Handlers { prepare: nothing_to_hold, in_child: nothing_to_forget }];

    /// The handlers as `pthread_atfork` would call them, on this thread: prepare holds the
    /// registered locks, the parent lets them go untouched, the child resets then forgets.
    #[test]
    fn the_table_holds_each_lock_and_the_child_resets_then_forgets() {
        register(&ORDER);
        prepare();
        assert!(DATA.try_lock().is_err(), "prepare holds the module's lock");
        in_parent();
        assert_eq!(*DATA.lock().unwrap(), 7, "the parent keeps its data");
        prepare();
        in_child();
        assert_eq!(*DATA.lock().unwrap(), 0, "the child's reset ran on the held data");
        assert!(FORGOT.load(Relaxed), "the child's in_child ran");
    }
}
