//! Turns on the device between throttled gpuslice processes, kept in the device's `Turn`
//! (part of `DeviceSched`; the queue itself is `gpuslice_common::turns`): the ledger's device
//! slot when the process is attached to a controller, so that processes of every user and pod it
//! serves take turns; without one, one small shared page per user and device
//! (`/dev/shm/gpuslice-board7-<uid>-<device uuid>`; the number is the page layout's), which also
//! holds the device's priority state. The last process to let go of a page removes it.
//!
//! Without MPS the GPU time-slices between processes that both have work queued, and on the H200
//! that costs about a tenth of the device: two unthrottled processes got 45.1% + 45.1% of one
//! process's rate, and processes throttled to 30% + 70% got 29.9% + 61.1%. So throttled processes
//! take turns: a process holds the turn while its burst is on the device, waits for that burst to
//! finish before it lets go, and another process starts its burst only then. Hand-overs then
//! happen on an idle device, where they are cheap, and bursts are made longer while the device is
//! shared (`Bucket::saw_neighbour`) so there are few of them.
//!
//! Waiters queue in ticket order and sleep on a futex in the shared page (no polling). Nothing is
//! locked for long: the turn carries a lease (the holder's own estimate of when its queued work
//! is done, a little more), an expired lease is taken back, and a wait gives up after a bound
//! that grows with the queue ahead (`patience`). Processes are named by their token
//! (`link::token`: the controller's pick under a controller, else random), not their pid, since
//! pids repeat across pid namespaces. Without a controller a dead holder's turn may also be
//! taken back at once (its pid is checked: same user, same namespace); with one, the controller
//! frees it when it releases the process (by the token it gave it), else its lease bounds it.
//! Processes of other users do not share a page (mode 0600).

use crate::state::link;
use crate::state::link::MAX_ORDINALS;
use crate::sys::clock::{now_ns, TurnClock};
use crate::sys::ffi::CUdevice;
use crate::sys::real_nvml::cuda_uuid_string;
use gpuslice_common::ledger::{DeviceSched, Turn};
use gpuslice_common::turns::CLAIM_GRACE_MS;
use once_cell::sync::OnceCell;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};

const MAGIC: u64 = 0x4750_5553_4c42_4437; // "GPUSLBD7"
/// A lease runs this long past the holder's own estimate of its queue.
const LEASE_SLACK_NS: u64 = 500_000;

#[repr(C)]
struct Page {
    magic: AtomicU64,
    /// This user's processes running without a controller share the device's priority state
    /// and turn here (with one, the ledger's device slot holds them).
    sched: DeviceSched,
}

/// A mapped page and the descriptor whose shared `flock` says "in use" while this process lives.
struct Mapped {
    page: &'static Page,
    fd: AtomicI32,
    path: std::ffi::CString,
}

static PAGES: [OnceCell<Option<Mapped>>; MAX_ORDINALS] = [const { OnceCell::new() }; MAX_ORDINALS];

/// The ticket each device's turn is held under by this process (valid while `holding`).
static TICKETS: [AtomicU64; MAX_ORDINALS] = [const { AtomicU64::new(u64::MAX) }; MAX_ORDINALS];
/// 1 while a thread of this process queues for a device's turn: one thread queues at a time,
/// the others sleep on this word, then find the turn theirs. A word rather than a mutex, so
/// that a forked child can simply start over (`forget_in_child`).
static QUEUEING: [AtomicU32; MAX_ORDINALS] = [const { AtomicU32::new(0) }; MAX_ORDINALS];

/// Holds `QUEUEING[index]` until dropped.
struct Queueing(usize);

impl Queueing {
    fn enter(index: usize) -> Queueing {
        while QUEUEING[index].compare_exchange(0, 1, Acquire, Relaxed).is_err() {
            // Bounded, in case the queueing thread was lost (a fork).
            crate::policy::sched::futex_wait(&QUEUEING[index], 1, 10_000_000);
        }
        Queueing(index)
    }
}

impl Drop for Queueing {
    fn drop(&mut self) {
        QUEUEING[self.0].store(0, Release);
        crate::policy::sched::futex_wake_all(&QUEUEING[self.0]);
    }
}

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: crate::sys::atfork::nothing_to_hold, in_child: forget_in_child };

/// In a forked child: no thread of it queues, and it holds no turn (its token is new).
pub fn forget_in_child() {
    for (q, t) in QUEUEING.iter().zip(&TICKETS) {
        q.store(0, Relaxed);
        t.store(u64::MAX, Relaxed);
    }
    // The inherited descriptors share the parent's lock (one open file description): the child
    // takes a lock of its own, so that neither removes a page the other still uses.
    for slot in &PAGES {
        let Some(Some(m)) = slot.get() else { continue };
        // SAFETY: open/flock/close are async-signal-safe; the descriptor is ours.
        unsafe {
            let old = m.fd.swap(-1, AcqRel);
            if old >= 0 {
                libc::close(old);
            }
            let fd = libc::open(m.path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW);
            if fd >= 0 && libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) == 0 {
                m.fd.store(fd, Release);
            } else if fd >= 0 {
                libc::close(fd);
            }
        }
    }
}

fn page(device: CUdevice) -> Option<&'static Page> {
    let slot = PAGES.get(usize::try_from(device).ok()?)?;
    slot.get_or_init(|| map(device)).as_ref().map(|m| m.page)
}

fn map(device: CUdevice) -> Option<Mapped> {
    let uuid = cuda_uuid_string(device)?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let path = std::ffi::CString::new(format!("/dev/shm/gpuslice-board7-{uid}-{uuid}")).ok()?;
    // SAFETY: plain open/flock/fstat/stat/ftruncate/mmap of a small file; the mapping lives
    // for the process.
    unsafe {
        for _ in 0..100 {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW, 0o600);
            if fd < 0 {
                return None;
            }
            // Held shared for the process's life: the last one out (the only one able to lock
            // it exclusively) removes the file. A file removed between our open and lock is not
            // the one others will find: open again.
            if libc::flock(fd, libc::LOCK_SH) != 0 {
                libc::close(fd);
                return None;
            }
            let mut st: libc::stat = std::mem::zeroed();
            let mut named: libc::stat = std::mem::zeroed();
            let same = libc::fstat(fd, &mut st) == 0 && libc::stat(path.as_ptr(), &mut named) == 0 && named.st_ino == st.st_ino && named.st_dev == st.st_dev;
            if !same {
                libc::close(fd);
                continue;
            }
            let ok = st.st_uid == uid && (st.st_size >= 4096 || libc::ftruncate(fd, 4096) == 0);
            let addr = if ok { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) } else { libc::MAP_FAILED };
            if addr == libc::MAP_FAILED {
                libc::close(fd);
                return None;
            }
            let page = &*(addr as *const Page);
            // A new file is all zeroes; a page of another layout is left alone.
            let _ = page.magic.compare_exchange(0, MAGIC, AcqRel, Relaxed);
            if page.magic.load(Acquire) != MAGIC {
                libc::close(fd);
                return None;
            }
            register_exit_handler();
            return Some(Mapped { page, fd: AtomicI32::new(fd), path });
        }
        None
    }
}

fn register_exit_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registering a plain extern "C" function.
    ONCE.call_once(|| unsafe {
        libc::atexit(leave_at_exit);
    });
}

/// At a normal exit: lets go of any turn this process holds, and removes each page nobody
/// else has open (issue 16: nothing gpuslice makes may be left behind).
extern "C" fn leave_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        for device in 0..MAX_ORDINALS {
            release(device as CUdevice);
        }
        for slot in &PAGES {
            let Some(Some(m)) = slot.get() else { continue };
            let fd = m.fd.swap(-1, AcqRel);
            if fd < 0 {
                continue;
            }
            // SAFETY: our own descriptor. A forked child shares its parent's lock (one open file
            // description): whichever exits last removes the file only when no other process
            // holds a lock, which a non-blocking exclusive lock tells.
            unsafe {
                if libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0 {
                    libc::unlink(m.path.as_ptr());
                }
                libc::close(fd);
            }
        }
    });
}

/// The priority state and turn of `device` on this user's page (for a process without a
/// controller; `link` hands it out as the device's `DeviceSched`).
pub fn sched(device: CUdevice) -> Option<&'static DeviceSched> {
    page(device).map(|p| &p.sched)
}

/// The turn on `device` as this process shares it (see the module's note), and whether its
/// holder's pid may be checked.
#[inline]
fn turn(device: CUdevice) -> Option<(&'static Turn, bool)> {
    let l = link::get()?;
    Some((&l.sched(device)?.turn, !l.controlled))
}

/// What taking the turn found.
pub struct Taken {
    pub waited_ns: u64,
    /// Another process held the turn or queued for it lately: the device is shared.
    pub neighbour: bool,
    /// Processes that take turns on the device, this one included, as its queue showed.
    pub peers: u32,
}

fn ticket(device: CUdevice) -> Option<u32> {
    let t = TICKETS.get(usize::try_from(device).ok()?)?.load(Acquire);
    u32::try_from(t).ok()
}

/// Takes the turn on `device` (or extends it when already held), waiting in ticket order
/// while other processes hold it or queue before this one. `lease_until` is when this process
/// expects its queued work done; `returning`: this process comes back from idle (it tells a
/// borrowing holder to hand over at once, `returner_waiting`).
pub fn take(device: CUdevice, lease_until: u64, returning: bool) -> Taken {
    let none = Taken { waited_ns: 0, neighbour: false, peers: 1 };
    let Some((turn, check_pids)) = turn(device) else { return none };
    let Some(index) = usize::try_from(device).ok().filter(|&i| i < MAX_ORDINALS) else { return none };
    let start = now_ns();
    let me = link::token();
    let _queueing = Queueing::enter(index);
    register_exit_handler();
    if let Some(t) = ticket(device).filter(|&t| turn.held_by(me, t)) {
        // Another thread of this process took it while this one waited to queue.
        turn.extend(me, t, lease_until + LEASE_SLACK_NS);
        return Taken { waited_ns: now_ns() - start, neighbour: turn.recent_handover(now_ns()), peers: turn.queued() + 1 };
    }
    // Only without a controller: its processes share this namespace (the page is per user and
    // /dev/shm), a controller's may not.
    let pid = if check_pids { std::process::id() } else { 0 };
    let stamp = returning.then(|| turn.mark_returning(now_ns()));
    let taken = turn.take(me, pid, lease_until, LEASE_SLACK_NS, &TurnClock { check_pids }, patience);
    if let (Some(stamp), Some(_)) = (stamp, taken.ticket) {
        // Holding the turn, it no longer waits: its own stamp must not make it hand the turn
        // back early when a neighbour queues behind it (`Turn::unmark_returning`).
        turn.unmark_returning(stamp);
    }
    TICKETS[index].store(taken.ticket.map_or(u64::MAX, u64::from), Release);
    Taken { waited_ns: now_ns() - start, neighbour: taken.neighbour, peers: taken.queued.saturating_add(1) }
}

/// How long a waiter with `ahead` tickets before it waits at most before it launches anyway (a
/// wedged or damaged turn must not hang the program). The holders ahead hold at most a burst of
/// their share each: together at most `SHARED_CAPACITY_WALL_NS` of wall time while the shares
/// sum to ≤ 100% (the bound the issue asks to state), plus a lease slack per holder (tickets
/// beyond the process table's 1024 cannot be live). Twice that, two claim graces (a dead waiter
/// or two) and a margin for a loaded machine: 1.5 s at most. A page written with garbage (a
/// far `next_ticket`, a lease in the future) costs each launch at most this, never a hang.
fn patience(ahead: u32) -> u64 {
    let holders = u64::from(ahead.min(1024));
    2 * (crate::policy::throttle::SHARED_CAPACITY_WALL_NS + holders * LEASE_SLACK_NS) + 2 * CLAIM_GRACE_MS * 1_000_000 + 200_000_000
}

/// Extends this process's lease if it holds the turn.
pub fn extend(device: CUdevice, lease_until: u64) {
    if let (Some((turn, _)), Some(t)) = (turn(device), ticket(device)) {
        turn.extend(link::token(), t, lease_until + LEASE_SLACK_NS);
    }
}

/// Lets go of the turn on `device`, if this process holds it.
pub fn release(device: CUdevice) {
    if let Some((turn, _)) = turn(device) {
        if let Ok(index) = usize::try_from(device) {
            release_on(turn, index);
        }
    }
}

fn release_on(turn: &Turn, index: usize) {
    let Some(slot) = TICKETS.get(index) else { return };
    if let Ok(t) = u32::try_from(slot.load(Acquire)) {
        turn.release(link::token(), t, &TurnClock { check_pids: false });
    }
}

/// True when this process holds the turn on `device`.
pub fn holding(device: CUdevice) -> bool {
    match (turn(device), ticket(device)) {
        (Some((t, _)), Some(ticket)) => t.held_by(link::token(), ticket),
        _ => false,
    }
}

/// True when a process back from idle queues for the turn on `device` (it queued within the last
/// `within_ms`).
pub fn returner_waiting(device: CUdevice, within_ms: u32) -> bool {
    turn(device).is_some_and(|(t, _)| t.returner_waiting(now_ns(), within_ms))
}

/// True when other processes queue for the turn on `device`.
pub fn others_waiting(device: CUdevice) -> bool {
    turn(device).is_some_and(|(t, _)| t.queued() > 0)
}
