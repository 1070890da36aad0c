//! Turns on the device between throttled gpuslice processes, kept in the device's `Turn`
//! (part of `DeviceSched`): the ledger's device slot when the process is attached to a
//! controller, so that processes of every user and pod it serves take turns; without one, one
//! small shared page per user and device (`/dev/shm/gpuslice-board5-<uid>-<device uuid>`; the
//! number is the page layout's), which also holds the device's priority state.
//!
//! Without MPS the GPU time-slices between processes that both have work queued, and on the H200
//! that costs about a tenth of the device: two unthrottled processes got 45.1% + 45.1% of one
//! process's rate, and processes throttled to 30% + 70% got 29.9% + 61.1%. So throttled processes
//! take turns: a process holds the turn while its burst is on the device, waits for that burst to
//! finish before it lets go, and another process starts its burst only then. Hand-overs then
//! happen on an idle device, where they are cheap, and bursts are made longer while the device is
//! shared (`Bucket::saw_neighbour`) so there are few of them.
//!
//! Nothing is locked for long: the turn carries a lease (the holder's own estimate of when its
//! queued work is done, a little more), an expired lease may be taken, and no wait here lasts
//! longer than `MAX_WAIT_NS`. Processes are named by their random token (`link::token`), not
//! their pid, since pids repeat across pid namespaces. Without a controller a dead holder's turn
//! may also be taken at once (its pid is checked: same user, same namespace); with one, only its
//! lease bounds it. Processes of other users do not share a page (mode 0600).

use crate::link::MAX_ORDINALS as MAX_DEVICES;
use crate::ffi::CUdevice;
use crate::nvml::cuda_uuid_string;
use crate::throttle::now_ns;
use crate::link;
use gpuslice_common::ledger::{DeviceSched, Turn};
use once_cell::sync::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering::*};

const MAGIC: u64 = 0x4750_5553_4c42_4435; // "GPUSLBD5"
/// Longest a launch waits for another process's turn before going anyway.
const MAX_WAIT_NS: u64 = 30_000_000;
/// How often a waiting process looks again.
const NAP_NS: u64 = 50_000;
/// A lease runs this long past the holder's own estimate of its queue.
const LEASE_SLACK_NS: u64 = 500_000;
/// Another process's turn this recent means the device is shared.
const NEIGHBOUR_NS: u64 = 200_000_000;

#[repr(C)]
struct Page {
    magic: AtomicU64,
    /// This user's processes running without a controller share the device's priority state
    /// and turn here (with one, the ledger's device slot holds them).
    sched: DeviceSched,
}

static PAGES: [OnceCell<Option<&'static Page>>; MAX_DEVICES] = [const { OnceCell::new() }; MAX_DEVICES];

fn page(device: CUdevice) -> Option<&'static Page> {
    let slot = PAGES.get(usize::try_from(device).ok()?)?;
    *slot.get_or_init(|| map(device))
}

fn map(device: CUdevice) -> Option<&'static Page> {
    let uuid = cuda_uuid_string(device)?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let path = std::ffi::CString::new(format!("/dev/shm/gpuslice-board5-{uid}-{uuid}")).ok()?;
    // SAFETY: plain open/fstat/ftruncate/mmap of a small file; the mapping lives for the process.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW, 0o600);
        if fd < 0 {
            return None;
        }
        let mut st: libc::stat = std::mem::zeroed();
        let ok = libc::fstat(fd, &mut st) == 0 && st.st_uid == uid && (st.st_size >= 4096 || libc::ftruncate(fd, 4096) == 0);
        let addr = if ok {
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        } else {
            libc::MAP_FAILED
        };
        libc::close(fd);
        if addr == libc::MAP_FAILED {
            return None;
        }
        let page = &*(addr as *const Page);
        // A new file is all zeroes; a page of another layout is left alone.
        let _ = page.magic.compare_exchange(0, MAGIC, AcqRel, Relaxed);
        (page.magic.load(Acquire) == MAGIC).then_some(page)
    }
}

/// The priority state and turn of `device` on this user's page (for a process without a
/// controller; `link` hands it out as the device's `DeviceSched`).
pub fn sched(device: CUdevice) -> Option<&'static DeviceSched> {
    page(device).map(|p| &p.sched)
}

/// True unless `pid` is known to be gone.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence. EPERM means it exists under another user.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The turn on `device` as this process shares it (see the module's note), and whether its
/// holder's pid may be checked.
#[inline]
fn turn(device: CUdevice) -> Option<(&'static Turn, bool)> {
    let l = link::get()?;
    Some((&l.sched(device)?.turn, !l.controlled))
}

/// True unless the process named `pid` (0: unknown) is known to be gone.
fn holder_alive(pid: u32) -> bool {
    pid == 0 || alive(pid)
}

/// What taking the turn found.
pub struct Taken {
    pub waited_ns: u64,
    /// Another process held the turn recently: the device is shared.
    pub neighbour: bool,
}

/// Takes the turn on `device` (or extends it when already held), waiting boundedly while
/// another process holds it. `lease_until` is when this process expects its queued work done.
pub fn take(device: CUdevice, lease_until: u64) -> Taken {
    let Some((turn, check_pids)) = turn(device) else { return Taken { waited_ns: 0, neighbour: false } };
    let me = link::token();
    // Only without a controller: its processes share this namespace (the page is per user and
    // /dev/shm), a controller's may not.
    let my_pid = if check_pids { std::process::id() } else { 0 };
    let start = now_ns();
    let mut neighbour = false;
    loop {
        let now = now_ns();
        let holder = turn.holder.load(Acquire);
        if holder == me {
            turn.lease_until.store(lease_until.max(now) + LEASE_SLACK_NS, Release);
            break;
        }
        let pid = turn.holder_pid.load(Acquire);
        let expired = holder == 0 || now >= turn.lease_until.load(Acquire);
        // A dead holder's pid is cleared before its turn is taken, so that a process looking
        // between the taking and the taker's pid never judges the taker by it.
        let dead = !expired && check_pids && !holder_alive(pid) && turn.holder_pid.compare_exchange(pid, 0, AcqRel, Relaxed).is_ok();
        if (expired || dead) && turn.holder.compare_exchange(holder, me, AcqRel, Relaxed).is_ok() {
            turn.lease_until.store(lease_until.max(now) + LEASE_SLACK_NS, Release);
            turn.holder_pid.store(my_pid, Release);
            let previous = turn.last_holder.swap(me, AcqRel);
            let previous_pid = turn.last_holder_pid.swap(my_pid, AcqRel);
            if previous != me && previous != 0 && (!check_pids || holder_alive(previous_pid)) {
                turn.last_handover.store(now, Release);
            }
            break;
        }
        if holder != 0 {
            neighbour = true;
        }
        if now - start >= MAX_WAIT_NS {
            break;
        }
        std::thread::sleep(std::time::Duration::from_nanos(NAP_NS));
    }
    let now = now_ns();
    let recent = now.saturating_sub(turn.last_handover.load(Acquire)) < NEIGHBOUR_NS;
    Taken { waited_ns: now - start, neighbour: neighbour || recent }
}

/// Extends this process's lease if it holds the turn.
pub fn extend(device: CUdevice, lease_until: u64) {
    if let Some((turn, _)) = turn(device) {
        if turn.holder.load(Relaxed) == link::token() {
            turn.lease_until.store(lease_until + LEASE_SLACK_NS, Release);
        }
    }
}

/// Lets go of the turn on `device`, if this process holds it.
pub fn release(device: CUdevice) {
    if let Some((turn, _)) = turn(device) {
        let me = link::token();
        if turn.holder.load(Acquire) == me {
            // Cleared first (see `take`): the next holder writes its own.
            turn.holder_pid.store(0, Release);
            let _ = turn.holder.compare_exchange(me, 0, AcqRel, Relaxed);
        }
    }
}

/// True when this process holds the turn on `device`.
pub fn holding(device: CUdevice) -> bool {
    turn(device).is_some_and(|(t, _)| t.holder.load(Relaxed) == link::token())
}
