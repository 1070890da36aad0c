//! The gate every driver call of the program passes, so that a suspension (issue 22, our own
//! path) can stop the process's calls and know that none is inside the driver.
//!
//! Each thread has a record in initial-exec TLS (`gpuslice_gate_thread`, defined below in
//! assembly so that the thunks of `hooks::gate` reach it with one `fs:` access): `depth`, how
//! many driver calls of the program this thread is inside (nested calls, e.g. through a driver
//! callback that calls the driver again, count on top and are let through). Entering, a thread
//! stores its depth (a plain store to its own line: no lock, no atomic read-modify-write),
//! then loads the process's gate word; leaving, it stores the depth back.
//!
//! The closer stores the gate word, then makes every running thread of the process pass a full
//! barrier with `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` (registered once per process),
//! then scans the registered records: a thread seen outside cannot enter any more without
//! seeing the closed gate (its depth store and gate load are ordered by that barrier, Dekker
//! style without a fence on the thread's side). Where `membarrier` is refused (an old kernel, a
//! seccomp profile) the closer falls back to SeqCst fences and a second scan 1 ms later: a
//! store still in another core's store buffer drains in far less than that on any x86 core,
//! so the fallback holds in practice but not by the architecture's letter (documented in
//! docs/NOTES.md, "The gate").
//!
//! A thread that finds the gate closed sets its depth back to 0 and waits on a futex on the
//! gate word until `open`. The thread that closed the gate is exempt: it passes its own gate
//! (the suspender must call the driver). A thread registers its record at its first driver
//! call (the record starts `UNREGISTERED`, which the fast path sends to the slow path) and a
//! thread-local destructor takes it out at thread exit (then `DEAD`: its later calls still wait
//! at a closed gate but are not counted — a hole of a few instructions at thread teardown).

use crate::sys::atfork::{Handlers, Holder};
use crate::sys::locks;
use std::sync::atomic::{compiler_fence, fence, AtomicU32, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::Mutex;
use std::time::Duration;

/// A thread's record has not been registered yet (its first call goes to the slow path).
pub const UNREGISTERED: u32 = 0x8000_0000;
/// A thread's record was taken out at thread exit; its calls are not counted any more.
pub const DEAD: u32 = 0x4000_0000;

/// The per-thread record, laid out as the assembly below defines it.
#[repr(C)]
pub struct ThreadRecord {
    /// Driver calls this thread is inside (plus `UNREGISTERED` or `DEAD`).
    pub depth: AtomicU32,
    _pad: u32,
}

// The record itself: 8 bytes of initial-exec TLS, initially UNREGISTERED. `.hidden` keeps it
// out of the exported symbols while other objects of the crate (the thunks) link to it.
core::arch::global_asm!(
    ".pushsection .tdata,\"awT\",@progbits",
    ".p2align 3",
    ".globl gpuslice_gate_thread",
    ".hidden gpuslice_gate_thread",
    ".type gpuslice_gate_thread,@object",
    ".size gpuslice_gate_thread,8",
    "gpuslice_gate_thread:",
    ".long 0x80000000",
    ".long 0",
    ".popsection",
);

/// The gate word: 0 open, 1 closed. Read by the thunks (`hooks::gate`) on every call.
pub static GATE: AtomicU32 = AtomicU32::new(0);

/// The closer's record address while the gate is closed (it is exempt), else 0.
static HOLDER: AtomicUsize = AtomicUsize::new(0);

/// Every live thread's record address (registered at its first driver call).
static RECORDS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// `membarrier`: 0 not tried yet, 1 registered, 2 unavailable (fences and a second scan).
static MEMBARRIER: AtomicU8 = AtomicU8::new(0);

/// Names handed out without a thunk, and `cuGetExportTable` calls: each a way around the gate.
static UNKNOWN_NAMES: AtomicUsize = AtomicUsize::new(0);
static EXPORT_TABLES: AtomicUsize = AtomicUsize::new(0);

/// The calling thread's record.
#[inline(always)]
pub fn record() -> &'static ThreadRecord {
    let address: usize;
    // SAFETY: reads the GOT entry holding the record's TLS offset and the thread pointer
    // (`fs:0` is the TCB's self pointer on x86-64 glibc); no stack, no other memory.
    unsafe {
        core::arch::asm!(
            "mov {a}, qword ptr [rip + gpuslice_gate_thread@GOTTPOFF]",
            "add {a}, qword ptr fs:[0]",
            a = out(reg) address,
            options(pure, readonly, nostack),
        );
    }
    // SAFETY: the thread's own record, alive as long as the thread (`'static` only in name:
    // it is never handed to another thread except through `RECORDS`, which drops it at exit).
    unsafe { &*(address as *const ThreadRecord) }
}

/// A hooked wrapper's pass through the gate: `enter` at the top, the guard's drop leaves.
pub struct Inside(&'static ThreadRecord);

/// Enters the gate from Rust (the hooked wrappers, through `guard::cuda`): the same protocol
/// as the thunks' assembly.
#[inline(always)]
pub fn enter() -> Inside {
    let r = record();
    if r.depth.load(Relaxed) == 0 {
        r.depth.store(1, Relaxed);
        // The store and the load below stay in this order for the compiler; the CPU's order is
        // the closer's `membarrier`.
        compiler_fence(SeqCst);
        if GATE.load(Relaxed) == 0 {
            return Inside(r);
        }
        on_closed(r);
    } else {
        on_busy_record(r);
    }
    Inside(r)
}

impl Drop for Inside {
    #[inline(always)]
    fn drop(&mut self) {
        compiler_fence(SeqCst);
        let d = self.0.depth.load(Relaxed);
        self.0.depth.store(d.wrapping_sub(1), Relaxed);
    }
}

/// The thunks' slow path when the depth was not 0: a first call (register), a nested call
/// (passes: this thread is counted already, and the closer waits for it to leave), or a call
/// at thread teardown.
#[cold]
pub fn on_busy_record(r: &'static ThreadRecord) {
    let d = r.depth.load(Relaxed);
    if d & UNREGISTERED != 0 {
        r.depth.store(0, Relaxed);
        if !register(r) {
            r.depth.store(DEAD, Relaxed);
            return on_busy_record(r);
        }
        r.depth.store(1, Relaxed);
        fence(SeqCst);
        if GATE.load(Relaxed) != 0 {
            on_closed(r);
        }
    } else if d == DEAD {
        // Not counted: wait while closed, then pass.
        wait_open(r);
        r.depth.store(DEAD + 1, Relaxed);
    } else {
        r.depth.store(d + 1, Relaxed);
    }
}

/// The slow path when the gate was seen closed just after the depth went 0 → 1: the closer
/// passes, everyone else steps out (depth 0), waits for `open` and steps in again.
#[cold]
pub fn on_closed(r: &'static ThreadRecord) {
    loop {
        if HOLDER.load(SeqCst) == r as *const _ as usize {
            return;
        }
        r.depth.store(0, SeqCst);
        wait_open(r);
        r.depth.store(1, Relaxed);
        fence(SeqCst);
        if GATE.load(SeqCst) == 0 {
            return;
        }
    }
}

/// Waits on the gate word until it opens (the closer itself never waits).
fn wait_open(r: &'static ThreadRecord) {
    while GATE.load(SeqCst) != 0 && HOLDER.load(SeqCst) != r as *const _ as usize {
        crate::sys::clock::futex_wait(&GATE, 1, u32::MAX, 100_000_000);
    }
}

thread_local! {
    /// Takes the thread's record out of `RECORDS` when the thread exits.
    static REGISTERED: Registration = const { Registration(std::cell::Cell::new(0)) };
}

struct Registration(std::cell::Cell<usize>);

impl Drop for Registration {
    fn drop(&mut self) {
        let address = self.0.get();
        if address != 0 {
            locks::lock(&RECORDS).retain(|&a| a != address);
            // SAFETY: this thread's own record, still alive during its TLS destructors.
            unsafe { &*(address as *const ThreadRecord) }.depth.store(DEAD, SeqCst);
        }
    }
}

/// Puts the record in `RECORDS`; false when the thread is past its TLS destructors.
fn register(r: &'static ThreadRecord) -> bool {
    let address = r as *const _ as usize;
    let ok = REGISTERED.try_with(|reg| reg.0.set(address)).is_ok();
    if ok {
        locks::lock(&RECORDS).push(address);
    }
    ok
}

/// Why `close` gave up: threads stayed inside driver calls past the timeout (a
/// `cuStreamSynchronize` behind a long kernel, a launch waiting for its turn). The gate is open
/// again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateBusy {
    /// Threads still inside a driver call at the timeout (0: another thread holds the gate).
    pub threads_inside: usize,
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Registers the process for `membarrier(PRIVATE_EXPEDITED)` (once; at `cuInit`, and again in a
/// fork child at its first `close`). Slow (the kernel may wait for an RCU grace period).
pub fn init() {
    if MEMBARRIER.load(Relaxed) != 0 {
        return;
    }
    // SAFETY: the membarrier syscall with a command and no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) };
    MEMBARRIER.store(if rc == 0 { 1 } else { 2 }, Relaxed);
    if rc != 0 {
        tracing::info!(
            "membarrier(REGISTER_PRIVATE_EXPEDITED) refused ({}); the suspend gate falls back to fences and a second scan",
            std::io::Error::last_os_error()
        );
    }
}

/// Makes every running thread of the process pass a full barrier; false when only the fences
/// of the fallback could be had.
fn barrier_all_threads() -> bool {
    init();
    fence(SeqCst);
    if MEMBARRIER.load(Relaxed) == 1 {
        // SAFETY: as in `init`.
        let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
        if rc == 0 {
            return true;
        }
    }
    fence(SeqCst);
    false
}

/// Threads other than `me` inside a driver call now.
fn threads_inside(me: usize) -> usize {
    let records = locks::lock(&RECORDS);
    records
        .iter()
        .filter(|&&a| a != me)
        // SAFETY: a registered record is alive until its thread's destructor removes it,
        // which needs this lock.
        .filter(|&&a| unsafe { &*(a as *const ThreadRecord) }.depth.load(SeqCst) & !(UNREGISTERED | DEAD) != 0)
        .count()
}

/// Closes the gate and waits until no other thread is inside a driver call. The caller stays
/// exempt (it may call the driver, through the thunks or the hooks) until `open`. On timeout
/// the gate opens again and the threads still inside are counted. A second closer (another
/// thread while the gate is held) gets `GateBusy { threads_inside: 0 }`; the holder closing
/// again gets `Ok`. Times are on `sys::clock` (the simulated clock under the tests).
pub fn close(timeout: Duration) -> Result<(), GateBusy> {
    let me = record() as *const _ as usize;
    match HOLDER.compare_exchange(0, me, SeqCst, SeqCst) {
        Ok(_) => {}
        Err(holder) if holder == me => return Ok(()),
        Err(_) => return Err(GateBusy { threads_inside: 0 }),
    }
    GATE.store(1, SeqCst);
    let exact = barrier_all_threads();
    let deadline = crate::sys::clock::now_ns().saturating_add(timeout.as_nanos().min(u64::MAX as u128) as u64);
    let mut pause_ns = 20_000u64;
    let mut rescanned = exact;
    loop {
        let inside = threads_inside(me);
        if inside == 0 {
            if rescanned {
                return Ok(());
            }
            // The fallback: give stores still in flight on other cores time to land.
            crate::sys::clock::sleep_ns(1_000_000);
            fence(SeqCst);
            rescanned = true;
            continue;
        }
        if crate::sys::clock::now_ns() >= deadline {
            open();
            return Err(GateBusy { threads_inside: inside });
        }
        crate::sys::clock::sleep_ns(pause_ns);
        pause_ns = (pause_ns * 2).min(1_000_000);
    }
}

/// Opens the gate and wakes every thread waiting at it.
pub fn open() {
    GATE.store(0, SeqCst);
    HOLDER.store(0, SeqCst);
    crate::sys::clock::futex_wake(&GATE, u32::MAX);
}

/// Whether the gate is closed now.
pub fn is_closed() -> bool {
    GATE.load(SeqCst) != 0
}

/// Whether every way into the driver this process was given passes the gate: false once a
/// driver function the thunk table lacks was handed out (`note_unknown_name`). The driver's
/// private export tables (`note_export_table`) are counted but do not count against it: the
/// CUDA runtime asks for them in every program (its own bookkeeping: context-local storage,
/// module registration), so counting them would make the fast path apply to no real tenant;
/// its copies and launches go through public entry points, which are thunked. This is the
/// documented hole (LD_PRELOAD.md, docs/NOTES.md "the suspend gate"); `holes()` reports it.
pub fn fast_suspendable() -> bool {
    UNKNOWN_NAMES.load(Relaxed) == 0
}

/// (unknown names handed out, export tables asked for) so far.
pub fn holes() -> (usize, usize) {
    (UNKNOWN_NAMES.load(Relaxed), EXPORT_TABLES.load(Relaxed))
}

/// A driver function without a thunk was handed to the program (logged once per process):
/// the table lacks it and every spare thunk is taken, so its calls bypass the gate.
pub fn note_unknown_name(name: &str) {
    if UNKNOWN_NAMES.fetch_add(1, Relaxed) == 0 {
        tracing::warn!(
            "driver function {name} is outside CUDA 13.0's table and every spare suspend-gate thunk is taken: its calls bypass the gate, so this process is not fast-suspendable (its suspend agent refuses; `suspend_path = \"auto\"` or `\"driver\"` suspends it by the driver's checkpoint)"
        );
    }
}

/// Spare thunks handed out so far (`hooks::gate::spare_for`): names outside the table that
/// pass the gate all the same.
static SPARES_USED: AtomicUsize = AtomicUsize::new(0);

/// A spare thunk was handed out; `used` is how many are taken now.
pub fn note_spare(used: usize) {
    SPARES_USED.fetch_max(used, Relaxed);
}

/// Spare thunks taken so far.
pub fn spares_used() -> usize {
    SPARES_USED.load(Relaxed)
}

/// The program asked for a private export table (`cuGetExportTable`).
pub fn note_export_table() {
    EXPORT_TABLES.fetch_add(1, Relaxed);
}

fn keep_own_record(records: &mut Vec<usize>) {
    let me = record() as *const _ as usize;
    records.retain(|&a| a == me);
}

fn hold(h: &mut Holder) {
    h.take(&RECORDS, keep_own_record);
}

fn forget() {
    // The child has only the forking thread, no suspender: the gate starts open, and
    // membarrier's registration (per address space) is made again at the first close.
    GATE.store(0, SeqCst);
    HOLDER.store(0, SeqCst);
    MEMBARRIER.store(0, Relaxed);
}

pub const FORK: Handlers = Handlers { prepare: hold, in_child: forget };

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    // One test: the gate is process-wide state.
    #[test]
    fn close_waits_for_threads_inside_blocks_newcomers_and_exempts_the_closer() {
        // A thread inside a call keeps close() waiting, and close() times out with GateBusy.
        let release = Arc::new(AtomicBool::new(false));
        let entered = Arc::new(AtomicBool::new(false));
        let inside = {
            let (release, entered) = (release.clone(), entered.clone());
            std::thread::spawn(move || {
                let _in = enter();
                entered.store(true, SeqCst);
                while !release.load(SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        while !entered.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(close(Duration::from_millis(30)), Err(GateBusy { threads_inside: 1 }));
        assert!(!is_closed(), "a timed-out close reopens");
        release.store(true, SeqCst);
        inside.join().unwrap();

        // Closed: the closer passes (nested too), a newcomer waits until open.
        assert_eq!(close(Duration::from_secs(5)), Ok(()));
        assert!(is_closed());
        {
            let _a = enter();
            let _b = enter();
        }
        assert_eq!(record().depth.load(SeqCst), 0, "the closer's own calls leave no depth behind");
        let passed = Arc::new(AtomicBool::new(false));
        let waiter = {
            let passed = passed.clone();
            std::thread::spawn(move || {
                let _in = enter();
                passed.store(true, SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!passed.load(SeqCst), "a call at the closed gate waits");
        assert_eq!(threads_inside(record() as *const _ as usize), 0, "a waiter does not count as inside");
        open();
        waiter.join().unwrap();
        assert!(passed.load(SeqCst), "open lets it through");
    }
}
