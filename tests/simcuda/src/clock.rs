//! The simulated clock: one virtual time for every process of a test, so that shares and
//! latencies judged on it do not depend on how loaded the machine is.
//!
//! A page mapped `MAP_SHARED` by every participant (the file named by `SIMCUDA_CLOCK`; without
//! it the simulated driver runs on CLOCK_MONOTONIC as before). Virtual time moves only when no
//! participant is running: each thread that blocked once through the clock (a driver wait, a
//! sleep, a futex wait of the shim) is a participant, running until it blocks again. The last
//! one to block moves time to the earliest deadline among the blocked and marks those whose
//! deadline came as running (a conservative discrete-event scheme). Host work between calls
//! costs no virtual time. A wake-up by another participant (a futex wake through the clock)
//! marks the woken one running before the waker can block, so time never runs ahead of it.
//!
//! `active` counts running participants; whoever brings it to zero takes it back to one while
//! it moves time (so that nobody else moves it meanwhile) and lets go afterwards. A participant
//! that died (a killed process, a thread gone without its destructor) is found by a blocked
//! waiter that has waited `REAL_CHECK_NS` of real time (`tgkill(pid, tid, 0)`) and removed.
//!
//! Used by tests/simcuda (as `mod clock`) and by the integration tests' harness (through
//! `#[path]`), which takes part itself to hold time still while it starts processes.

#![allow(dead_code)]

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::SeqCst};

const MAGIC: u64 = 0x4b43_4f4c_434d_4953; // "SIMCLOCK" little endian
pub const MAX_PARTICIPANTS: usize = 4096;
const FREE: u32 = 0;
const RUNNING: u32 = 1;
const BLOCKED: u32 = 2;
/// `owner` of a slot being freed.
const LEAVING: u64 = u64::MAX;
pub const NO_DEADLINE: u64 = u64::MAX;
/// Real time a blocked participant waits before it looks for dead participants.
const REAL_CHECK_NS: u64 = 100_000_000;
/// Real-time checks in a row with neither time nor the running count moving before the count
/// is checked against the slots (a live thread is never that long between the two on any load
/// a test survives; a thread that died mid-step is).
const RECOUNT_AFTER_CHECKS: u32 = 5;
/// Real time without any move of the clock after which a waiter says who holds it still.
const STALL_WARN_NS: u64 = 10_000_000_000;
/// Real time a participant coming back waits for a step of `advance` to end before it gives up
/// (a thread killed mid-step never ends its step; a live one takes microseconds).
const STEP_WAIT_NS: u64 = 1_000_000_000;

#[repr(C)]
struct Slot {
    /// pid << 32 | tid of the thread, 0 when free, `LEAVING` while being freed.
    owner: AtomicU64,
    state: AtomicU32,
    /// Futex word the thread sleeps on; bumped by whoever marks it running.
    wake: AtomicU32,
    /// Virtual time at which a blocked thread runs again (`NO_DEADLINE`: only when woken).
    deadline: AtomicU64,
    /// Futex bits the thread waits for (0: it only sleeps).
    mask: AtomicU32,
    _pad: u32,
    /// The futex word it waits on, as `futex_key` names it (0: it only sleeps).
    word: AtomicU64,
}

#[repr(C)]
pub struct Page {
    magic: AtomicU64,
    /// Virtual time, ns (starts at CLOCK_MONOTONIC when the page is made).
    now: AtomicU64,
    /// Running participants (+1 while one moves time).
    active: AtomicI64,
    /// Slots ever used: scans stop here.
    high: AtomicU32,
    /// Threads inside a step of `advance` now: one that began before a parked participant
    /// came back moves time all the same, so coming back waits for it (`wait_for_steps`).
    advancing: AtomicU32,
    /// How many times time moved (for the tests' own figures).
    pub advances: AtomicU64,
    slots: [Slot; MAX_PARTICIPANTS],
}

pub const PAGE_SIZE: usize = std::mem::size_of::<Page>();

pub fn real_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn my_key() -> u64 {
    // SAFETY: getpid and gettid have no preconditions.
    let (pid, tid) = unsafe { (libc::getpid() as u64, libc::syscall(libc::SYS_gettid) as u64) };
    pid << 32 | (tid & 0xffff_ffff)
}

/// Sleeps while `word` is `expected`, at most `timeout_ns` of real time; true when it timed out.
fn futex_wait_real(word: &AtomicU32, expected: u32, timeout_ns: u64) -> bool {
    let ts = libc::timespec { tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t, tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long };
    // SAFETY: a shared futex wait on an aligned u32 of a live mapping (other processes map it).
    let r = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec, 0usize, 0u32) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT)
}

fn futex_wake_real(word: &AtomicU32) {
    // SAFETY: waking has no memory effects.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32) };
}

impl Page {
    /// Maps the clock page at `path`, making it if needed.
    pub fn open(path: &str) -> Result<&'static Page, String> {
        let c = std::ffi::CString::new(path).map_err(|_| format!("simclock: bad path {path:?}"))?;
        // SAFETY: plain open/fstat/ftruncate/mmap of a file; the mapping lives for the process.
        unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC, 0o600);
            if fd < 0 {
                return Err(format!("simclock: open {path}: {}", std::io::Error::last_os_error()));
            }
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || ((st.st_size as usize) < PAGE_SIZE && libc::ftruncate(fd, PAGE_SIZE as libc::off_t) != 0) {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(format!("simclock: size {path}: {e}"));
            }
            let p = libc::mmap(std::ptr::null_mut(), PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
            libc::close(fd);
            if p == libc::MAP_FAILED {
                return Err(format!("simclock: mmap {path}: {}", std::io::Error::last_os_error()));
            }
            let page = &*(p as *const Page);
            let _ = page.now.compare_exchange(0, real_now_ns(), SeqCst, SeqCst);
            let _ = page.magic.compare_exchange(0, MAGIC, SeqCst, SeqCst);
            if page.magic.load(SeqCst) != MAGIC {
                return Err(format!("simclock: {path} is not a clock page"));
            }
            Ok(page)
        }
    }

    /// Virtual time now.
    #[inline]
    pub fn now(&self) -> u64 {
        self.now.load(SeqCst)
    }

    fn used(&self) -> &[Slot] {
        &self.slots[..(self.high.load(SeqCst) as usize).min(MAX_PARTICIPANTS)]
    }

    /// Makes the calling thread a running participant; its slot index.
    pub fn join(&self) -> Option<usize> {
        let key = my_key();
        let i = self.slots.iter().position(|s| s.owner.compare_exchange(0, key, SeqCst, SeqCst).is_ok())?;
        let s = &self.slots[i];
        s.deadline.store(NO_DEADLINE, SeqCst);
        s.mask.store(0, SeqCst);
        self.active.fetch_add(1, SeqCst);
        s.state.store(RUNNING, SeqCst);
        self.high.fetch_max(i as u32 + 1, SeqCst);
        self.wait_for_steps();
        Some(i)
    }

    /// True when slot `i` is still the calling thread's.
    pub fn owns(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(|s| s.owner.load(SeqCst) == my_key())
    }

    /// The thread of slot `i` leaves (exits): time no longer waits for it.
    pub fn leave(&self, i: usize) {
        let s = &self.slots[i];
        let key = s.owner.load(SeqCst);
        if key == 0 || key == LEAVING || s.owner.compare_exchange(key, LEAVING, SeqCst, SeqCst).is_err() {
            return;
        }
        self.free(s);
    }

    fn free(&self, s: &Slot) {
        let was = s.state.swap(FREE, SeqCst);
        s.owner.store(0, SeqCst);
        if was == RUNNING && self.active.fetch_sub(1, SeqCst) == 1 {
            self.advance();
        }
    }

    /// Every slot of process `pid` leaves (at its exit).
    pub fn leave_process(&self, pid: u32) {
        for (i, s) in self.used().iter().enumerate() {
            if s.owner.load(SeqCst) >> 32 == u64::from(pid) {
                self.leave(i);
            }
        }
    }

    /// Blocks the participant of slot `i` until virtual time `deadline`, or (with `cond`, a
    /// futex word and the value it had) until a `wake` with a bit of `mask` once the word
    /// changed. Returns at once if the word already changed or the deadline is past.
    pub fn block(&self, i: usize, deadline: u64, mask: u32, cond: Option<(&AtomicU32, u32)>) {
        if self.block_inner(i, deadline, mask, cond) {
            BLOCKED_CALLS.fetch_add(1, SeqCst);
        }
    }

    /// `block`; true when the thread did block.
    fn block_inner(&self, i: usize, deadline: u64, mask: u32, cond: Option<(&AtomicU32, u32)>) -> bool {
        let s = &self.slots[i];
        s.deadline.store(deadline, SeqCst);
        s.mask.store(mask, SeqCst);
        s.word.store(cond.map_or(0, |(word, _)| futex_key(word)), SeqCst);
        s.state.store(BLOCKED, SeqCst);
        let changed = cond.is_some_and(|(word, expected)| word.load(SeqCst) != expected);
        if changed || deadline <= self.now() {
            // Still counted as running: undo, unless a waker already counted us again.
            if s.state.compare_exchange(BLOCKED, RUNNING, SeqCst, SeqCst).is_err() {
                self.active.fetch_sub(1, SeqCst);
            }
            return false;
        }
        if self.active.fetch_sub(1, SeqCst) == 1 {
            self.advance();
        }
        self.wait_running(s);
        true
    }

    /// Slot `i` blocks with no deadline and returns at once: time moves without it (its thread
    /// waits for something outside the clock) until `unpark`.
    pub fn park(&self, i: usize) {
        let s = &self.slots[i];
        s.deadline.store(NO_DEADLINE, SeqCst);
        s.mask.store(0, SeqCst);
        // Parking a parked slot changes nothing (it is counted once).
        if s.state.compare_exchange(RUNNING, BLOCKED, SeqCst, SeqCst).is_ok() && self.active.fetch_sub(1, SeqCst) == 1 {
            self.advance();
        }
    }

    /// Slot `i` runs again: from its return until the slot blocks or parks, time stands still.
    pub fn unpark(&self, i: usize) {
        let s = &self.slots[i];
        if s.state.compare_exchange(BLOCKED, RUNNING, SeqCst, SeqCst).is_ok() {
            self.active.fetch_add(1, SeqCst);
            self.wait_for_steps();
        }
    }

    /// Waits until no step of `advance` is under way. A participant that counts itself running
    /// again (`unpark`, `join`) stops every later step, but not one that took the count before
    /// it: that one still moves time once. Without this wait, a test that unparked and then
    /// touched its go-file could see one process start at the old time and the next one at the
    /// new (1.3 ms apart, once in ~570 runs: an advancing thread descheduled mid-step on a loaded
    /// machine). Steps are a few hundred instructions, so the wait is short; a thread killed
    /// mid-step would hold it for good, so it gives up after `STEP_WAIT_NS`.
    fn wait_for_steps(&self) {
        let start = real_now_ns();
        while self.advancing.load(SeqCst) != 0 {
            if real_now_ns() - start > STEP_WAIT_NS {
                eprintln!("simclock: a step of time did not end in 1 s (its thread died mid-step?): going on");
                return;
            }
            std::thread::yield_now();
        }
    }

    fn wait_running(&self, s: &Slot) {
        let start = real_now_ns();
        let mut last_seen = (self.now(), start);
        let mut last_counted = self.active.load(SeqCst);
        let mut still = 0u32;
        let mut warned = false;
        loop {
            let seen = s.wake.load(SeqCst);
            if s.state.load(SeqCst) != BLOCKED {
                return;
            }
            if futex_wait_real(&s.wake, seen, REAL_CHECK_NS) {
                self.reap_dead();
                let (now, real) = (self.now(), real_now_ns());
                let counted = self.active.load(SeqCst);
                if now != last_seen.0 || counted != last_counted {
                    last_seen = (now, real);
                    last_counted = counted;
                    still = 0;
                } else {
                    still += 1;
                    if still >= RECOUNT_AFTER_CHECKS {
                        self.recount(counted);
                    }
                }
                if now == last_seen.0 && !warned && real - last_seen.1 > STALL_WARN_NS {
                    warned = true;
                    let running: Vec<String> = self
                        .used()
                        .iter()
                        .filter(|s| s.state.load(SeqCst) == RUNNING)
                        .map(|s| {
                            let k = s.owner.load(SeqCst);
                            format!("{}/{}", k >> 32, k & 0xffff_ffff)
                        })
                        .collect();
                    eprintln!("simclock: virtual time has not moved for 10 s of real time; running (pid/tid): {running:?}");
                }
            }
        }
    }

    /// Marks slot `s` running if it is blocked (counting it), and wakes its thread.
    fn rouse(&self, s: &Slot) {
        if s.state.compare_exchange(BLOCKED, RUNNING, SeqCst, SeqCst).is_ok() {
            self.active.fetch_add(1, SeqCst);
            s.wake.fetch_add(1, SeqCst);
            futex_wake_real(&s.wake);
        }
    }

    /// Wakes every participant waiting on the futex word named `key` (`futex_key`) with a bit
    /// of `mask` (the caller changed the word): they re-check their word, and block again if
    /// it is not theirs.
    pub fn wake(&self, key: u64, mask: u32) {
        for s in self.used() {
            if s.state.load(SeqCst) == BLOCKED && s.mask.load(SeqCst) & mask != 0 && s.word.load(SeqCst) == key {
                self.rouse(s);
            }
        }
    }

    /// Moves time to the earliest deadline if nobody runs, and wakes whoever's deadline came.
    fn advance(&self) {
        loop {
            // Announced before the count is taken, so that whoever counts itself running after
            // the count was taken sees this step and waits for its end.
            self.advancing.fetch_add(1, SeqCst);
            if self.active.compare_exchange(0, 1, SeqCst, SeqCst).is_err() {
                self.advancing.fetch_sub(1, SeqCst);
                return;
            }
            let now = self.now();
            let next = self.used().iter().filter(|s| s.state.load(SeqCst) == BLOCKED).map(|s| s.deadline.load(SeqCst)).min().unwrap_or(NO_DEADLINE);
            if next != NO_DEADLINE {
                let t = next.max(now);
                self.now.store(t, SeqCst);
                self.advances.fetch_add(1, SeqCst);
                for s in self.used() {
                    if s.state.load(SeqCst) == BLOCKED && s.deadline.load(SeqCst) <= t {
                        self.rouse(s);
                    }
                }
            }
            self.advancing.fetch_sub(1, SeqCst);
            if self.active.fetch_sub(1, SeqCst) != 1 || next == NO_DEADLINE {
                return;
            }
        }
    }

    /// Sets `active` to the running slots when it has said `counted` for `RECOUNT_AFTER_CHECKS`
    /// real-time checks without time moving: a process killed between a count and its state (or
    /// while it moved time, holding the count at one) leaves it wrong, and time would stand still
    /// for good. Every step of a live thread between the two is a few instructions, so a count
    /// that stayed wrong that long is a dead thread's.
    fn recount(&self, counted: i64) {
        let running = self.used().iter().filter(|s| s.state.load(SeqCst) == RUNNING).count() as i64;
        if running != counted && self.active.compare_exchange(counted, running, SeqCst, SeqCst).is_ok() {
            eprintln!("simclock: {counted} running by count but {running} by state (a participant died mid-step): recounted");
            if running == 0 {
                self.advance();
            }
        }
    }

    /// Frees the slots of threads that are gone, and moves time if they were all it waited for.
    pub fn reap_dead(&self) {
        for s in self.used() {
            let key = s.owner.load(SeqCst);
            if key == 0 || key == LEAVING {
                continue;
            }
            let (pid, tid) = ((key >> 32) as libc::pid_t, (key & 0xffff_ffff) as libc::pid_t);
            // SAFETY: signal 0 only checks that the thread exists.
            let gone = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if gone && s.owner.compare_exchange(key, LEAVING, SeqCst, SeqCst).is_ok() {
                self.free(s);
            }
        }
        if self.active.load(SeqCst) == 0 {
            self.advance();
        }
    }
}

// ------------------------------------------------------------------ the calling thread's side

/// This process's clock page, from `SIMCUDA_CLOCK` (read once); `None`: real time.
pub fn page() -> Option<&'static Page> {
    static PAGE: std::sync::OnceLock<Option<&'static Page>> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        let path = std::env::var("SIMCUDA_CLOCK").ok().filter(|p| !p.is_empty())?;
        match Page::open(&path) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{e}; running on real time");
                None
            }
        }
    })
}

/// (device, inode, offset in the file) of a page of a shared file mapping.
type FileKey = (u64, u64, u64);

/// A futex word's name, the same in every process for a word of a shared file mapping (as the
/// kernel keys shared futexes: the file and the offset in it), else the process and the address.
/// A wake rouses only the waiters of its own word: the shim's process-local words (the turn's
/// one-queuer word, its launch bookkeeping) share bits with the turn's tickets, and waking every
/// process's turn waiters at each of them made the counts of wake-ups grow with the processes
/// for a reason no real machine has.
fn futex_key(word: &AtomicU32) -> u64 {
    use std::collections::HashMap;
    use std::sync::Mutex;
    /// Page address → (mapping's file key, or 0 for private memory), per process. A shared
    /// mapping of the tests' processes (the ledger, the turn page, this clock) lives as long as
    /// they do.
    static PAGES: Mutex<Option<HashMap<usize, Option<FileKey>>>> = Mutex::new(None);
    let addr = word.as_ptr() as usize;
    let page = addr & !4095;
    let mix = |a: u64, b: u64| (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(29).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut pages = PAGES.lock().unwrap_or_else(|e| e.into_inner());
    let file = *pages.get_or_insert_with(HashMap::new).entry(page).or_insert_with(|| shared_file_of(page));
    match file {
        // (device, inode, offset of the page in the file).
        Some((dev, ino, off)) => mix(mix(dev, ino), off + (addr - page) as u64) | 1,
        // SAFETY: getpid has no preconditions.
        None => mix(u64::from(unsafe { libc::getpid() } as u32), addr as u64) | 1,
    }
}

/// (device, inode, offset of `page` in the file) when `page` lies in a shared file mapping.
fn shared_file_of(page: usize) -> Option<FileKey> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut f = line.split_whitespace();
        let (range, perms, offset, dev, inode) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let (start, end) = range.split_once('-')?;
        let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
        if !(start..end).contains(&page) {
            continue;
        }
        let inode: u64 = inode.parse().ok()?;
        if !perms.contains('s') || inode == 0 {
            return None;
        }
        let dev = dev.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
        return Some((dev, inode, u64::from_str_radix(offset, 16).ok()? + (page - start) as u64));
    }
    None
}

/// What this process asked of the clock (for the tests' counts of wake-ups: each sleep or futex
/// wait that blocks is one sleep and one wake-up of a thread on a real machine): sleeps, futex
/// waits, futex wakes, and of the sleeps and waits those that blocked (the rest returned at
/// once: deadline past, word already changed).
pub static SLEEPS: AtomicU64 = AtomicU64::new(0);
pub static FUTEX_WAITS: AtomicU64 = AtomicU64::new(0);
pub static FUTEX_WAKES: AtomicU64 = AtomicU64::new(0);
pub static BLOCKED_CALLS: AtomicU64 = AtomicU64::new(0);

/// Bumped in a forked child: slots registered before the fork are the parent's.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(1);

struct Registration {
    slot: std::cell::Cell<usize>,
    generation: std::cell::Cell<u64>,
    /// The slot's owner key as this thread wrote it (pid and tid: no system call to check).
    key: std::cell::Cell<u64>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.generation.get() == FORK_GENERATION.load(SeqCst) {
            if let Some(p) = page() {
                p.leave(self.slot.get());
            }
        }
    }
}

thread_local! {
    static ME: Registration = const { Registration { slot: std::cell::Cell::new(0), generation: std::cell::Cell::new(0), key: std::cell::Cell::new(0) } };
}

/// The calling thread's slot (joining on first use).
fn me(p: &Page) -> Option<usize> {
    ME.try_with(|r| {
        let generation = FORK_GENERATION.load(SeqCst);
        let still_mine = r.generation.get() == generation && p.slots.get(r.slot.get()).is_some_and(|s| s.owner.load(SeqCst) == r.key.get());
        if !still_mine {
            let i = p.join()?;
            r.slot.set(i);
            r.generation.set(generation);
            r.key.set(p.slots[i].owner.load(SeqCst));
        }
        Some(r.slot.get())
    })
    .ok()
    .flatten()
}

extern "C" fn forked_child() {
    FORK_GENERATION.fetch_add(1, SeqCst);
}

extern "C" fn at_exit() {
    if let Some(p) = page() {
        // SAFETY: getpid has no preconditions.
        p.leave_process(unsafe { libc::getpid() } as u32);
    }
}

/// At library load: fork and exit handlers.
pub fn on_load() {
    // SAFETY: registering plain extern "C" functions.
    unsafe {
        libc::pthread_atfork(None, None, Some(forked_child));
        libc::atexit(at_exit);
    }
}

pub fn enabled() -> bool {
    page().is_some()
}

/// Virtual time if the clock is on, else CLOCK_MONOTONIC.
#[inline]
pub fn now_ns() -> u64 {
    match page() {
        Some(p) => p.now(),
        None => real_now_ns(),
    }
}

/// Sleeps until `t` on the clock.
pub fn sleep_until_ns(t: u64) {
    SLEEPS.fetch_add(1, SeqCst);
    match page().and_then(|p| Some((p, me(p)?))) {
        Some((p, i)) => p.block(i, t, 0, None),
        None => loop {
            let now = real_now_ns();
            if now >= t {
                return;
            }
            std::thread::sleep(std::time::Duration::from_nanos(t - now));
        },
    }
}

/// Sleeps while `word` is `expected`, until a `futex_wake` with a bit of `mask`, at most
/// `timeout_ns` of the clock's time.
pub fn futex_wait(word: &AtomicU32, expected: u32, mask: u32, timeout_ns: u64) {
    FUTEX_WAITS.fetch_add(1, SeqCst);
    match page().and_then(|p| Some((p, me(p)?))) {
        Some((p, i)) => p.block(i, p.now().saturating_add(timeout_ns), mask.max(1), Some((word, expected))),
        None => {
            futex_wait_real(word, expected, timeout_ns);
        }
    }
}

/// Wakes the waiters on `word` with a bit of `mask` (the caller changed it).
pub fn futex_wake(word: &AtomicU32, mask: u32) {
    FUTEX_WAKES.fetch_add(1, SeqCst);
    if let Some(p) = page() {
        p.wake(futex_key(word), mask);
    }
    // SAFETY: waking has no memory effects.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE_BITSET, i32::MAX, 0usize, 0usize, mask.max(1)) };
}

/// The calling thread takes part from now on (running: time waits for it).
pub fn join() {
    if let Some(p) = page() {
        let _ = me(p);
    }
}

/// The calling thread waits for something outside the clock (a thread join): time moves
/// without it until `unpark`.
pub fn park() {
    if let Some((p, i)) = page().and_then(|p| Some((p, me(p)?))) {
        p.park(i);
    }
}

pub fn unpark() {
    if let Some((p, i)) = page().and_then(|p| Some((p, me(p)?))) {
        p.unpark(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn page() -> &'static Page {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = format!("{}/simclock-test-{}-{}", std::env::temp_dir().display(), std::process::id(), N.fetch_add(1, SeqCst));
        let _ = std::fs::remove_file(&path);
        let p = Page::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        p
    }

    #[test]
    fn time_jumps_to_each_deadline_and_stands_still_while_anyone_runs() {
        let p = page();
        let start = p.now();
        let holder = p.join().unwrap();
        // Joined here, so that each runs (holds time) from now on, before its thread starts.
        let sleepers: Vec<_> = [30_000_000u64, 10_000_000, 20_000_000]
            .into_iter()
            .map(|d| {
                let i = p.join().unwrap();
                std::thread::spawn(move || {
                    p.block(i, start + d, 0, None);
                    let woke = p.now();
                    p.leave(i);
                    (d, woke)
                })
            })
            .collect();
        // Nobody moves time while the holder runs, however long that is in real time.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(p.now(), start);
        p.park(holder);
        for s in sleepers {
            let (d, woke) = s.join().unwrap();
            assert_eq!(woke, start + d, "each sleeper woke at its own deadline");
        }
        assert_eq!(p.now(), start + 30_000_000);
        p.leave(holder);
    }

    #[test]
    fn a_woken_waiter_runs_before_time_moves_on() {
        let p = page();
        let word = Arc::new(AtomicU32::new(0));
        let start = p.now();
        let (w2, w3) = (word.clone(), word.clone());
        // A waiter on the word with a far timeout, and a waker that sleeps 5 ms and then changes
        // the word: the waiter must see 5 ms, not its timeout.
        let (i, j) = (p.join().unwrap(), p.join().unwrap());
        let waiter = std::thread::spawn(move || {
            while w2.load(SeqCst) == 0 {
                p.block(i, p.now() + 1_000_000_000, 1, Some((&w2, 0)));
            }
            let seen = p.now();
            // And a sleeper behind it cannot pass it: it sleeps 1 ms from here.
            p.block(i, seen + 1_000_000, 0, None);
            p.leave(i);
            seen
        });
        let waker = std::thread::spawn(move || {
            p.block(j, start + 5_000_000, 0, None);
            w3.store(1, SeqCst);
            p.wake(futex_key(&w3), 1);
            p.leave(j);
        });
        waker.join().unwrap();
        assert_eq!(waiter.join().unwrap(), start + 5_000_000);
        assert_eq!(p.now(), start + 6_000_000);
    }

    #[test]
    fn parking_twice_counts_once() {
        let p = page();
        let (holder, sleeper) = (p.join().unwrap(), p.join().unwrap());
        p.park(holder);
        p.park(holder);
        let start = p.now();
        let t = std::thread::spawn(move || {
            p.block(sleeper, start + 1_000_000, 0, None);
            p.now()
        });
        assert_eq!(t.join().unwrap(), start + 1_000_000);
        p.unpark(holder);
        p.unpark(holder);
        // Held again: a sleeper cannot move time now.
        let t = std::thread::spawn(move || {
            p.block(sleeper, start + 2_000_000, 0, None);
            p.now()
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(p.now(), start + 1_000_000);
        p.park(holder);
        assert_eq!(t.join().unwrap(), start + 2_000_000);
    }

    #[test]
    fn coming_back_waits_for_a_step_already_under_way() {
        let p = page();
        let holder = p.join().unwrap();
        p.park(holder);
        let start = p.now();
        // As if another thread had taken the count to move time and been descheduled before
        // it stored the new time (the tenants.rs flake of stops 21 and 27).
        p.active.fetch_add(1, SeqCst);
        p.advancing.fetch_add(1, SeqCst);
        let back = std::thread::spawn(move || {
            p.unpark(holder);
            p.now()
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!back.is_finished(), "unpark returned while a step was under way");
        p.now.store(start + 1_300_000, SeqCst);
        p.advancing.fetch_sub(1, SeqCst);
        p.active.fetch_sub(1, SeqCst);
        assert_eq!(back.join().unwrap(), start + 1_300_000, "the held time is the one after the step");
        // And from here it stands still: the holder runs.
        let sleeper = p.join().unwrap();
        let t = std::thread::spawn(move || {
            p.block(sleeper, start + 5_000_000, 0, None);
            p.now()
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(p.now(), start + 1_300_000);
        p.park(holder);
        assert_eq!(t.join().unwrap(), start + 5_000_000);
    }

    #[test]
    fn a_dead_participant_does_not_hold_time() {
        let p = page();
        // A child process joins (running) and dies without leaving.
        // SAFETY: the child only joins and exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let _ = p.join();
            // SAFETY: leaving the child at once, no destructors.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        let start = p.now();
        let i = p.join().unwrap();
        p.block(i, start + 1_000_000, 0, None);
        assert_eq!(p.now(), start + 1_000_000);
        p.leave(i);
    }

    #[test]
    fn a_count_left_wrong_by_a_death_mid_step_is_repaired() {
        let p = page();
        // As if a process had died while moving time (holding the count at one).
        p.active.fetch_add(1, SeqCst);
        let start = p.now();
        let i = p.join().unwrap();
        let real = real_now_ns();
        p.block(i, start + 1_000_000, 0, None);
        assert_eq!(p.now(), start + 1_000_000);
        assert!(real_now_ns() - real < 3_000_000_000, "repaired within a few real-time checks");
        p.leave(i);
    }
}
