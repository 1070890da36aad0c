//! Turns on the device between throttled gpuslice processes, through one small shared page per
//! device (`/dev/shm/gpuslice-board4-<uid>-<device uuid>`; the number is the page layout's).
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
//! queued work is done, a little more), an expired lease or a dead holder's turn may be taken,
//! and no wait here lasts longer than `MAX_WAIT_NS`. Processes of other users do not share a page
//! (mode 0600). The page becomes part of the controller's ledger (issue 4).

use crate::link::MAX_ORDINALS as MAX_DEVICES;
use crate::ffi::CUdevice;
use crate::nvml::cuda_uuid_string;
use crate::throttle::now_ns;
use gpuslice_common::ledger::DeviceSched;
use once_cell::sync::OnceCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

const MAGIC: u64 = 0x4750_5553_4c42_4434; // "GPUSLBD4"
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
    holder: AtomicU32,
    /// The latest process to hold the turn (to notice a hand-over between processes).
    last_holder: AtomicU32,
    lease_until: AtomicU64,
    last_handover: AtomicU64,
    /// Priority state of the device among this user's processes running without a controller
    /// (with one, the ledger's device slot holds it).
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
    let path = std::ffi::CString::new(format!("/dev/shm/gpuslice-board4-{uid}-{uuid}")).ok()?;
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

/// The priority state of `device` on this user's page.
pub fn sched(device: CUdevice) -> Option<&'static DeviceSched> {
    page(device).map(|p| &p.sched)
}

/// True unless `pid` is known to be gone.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence. EPERM means it exists under another user.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
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
    let Some(page) = page(device) else { return Taken { waited_ns: 0, neighbour: false } };
    let me = std::process::id();
    let start = now_ns();
    let mut neighbour = false;
    loop {
        let now = now_ns();
        let holder = page.holder.load(Acquire);
        if holder == me {
            page.lease_until.store(lease_until.max(now) + LEASE_SLACK_NS, Release);
            break;
        }
        let free = holder == 0 || now >= page.lease_until.load(Acquire) || !alive(holder);
        if free && page.holder.compare_exchange(holder, me, AcqRel, Relaxed).is_ok() {
            page.lease_until.store(lease_until.max(now) + LEASE_SLACK_NS, Release);
            let previous = page.last_holder.swap(me, AcqRel);
            if previous != me && previous != 0 && alive(previous) {
                page.last_handover.store(now, Release);
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
    let recent = now.saturating_sub(page.last_handover.load(Acquire)) < NEIGHBOUR_NS;
    Taken { waited_ns: now - start, neighbour: neighbour || recent }
}

/// Extends this process's lease if it holds the turn.
pub fn extend(device: CUdevice, lease_until: u64) {
    if let Some(page) = page(device) {
        if page.holder.load(Relaxed) == std::process::id() {
            page.lease_until.store(lease_until + LEASE_SLACK_NS, Release);
        }
    }
}

/// Lets go of the turn on `device`, if this process holds it.
pub fn release(device: CUdevice) {
    if let Some(page) = page(device) {
        let _ = page.holder.compare_exchange(std::process::id(), 0, AcqRel, Relaxed);
    }
}

/// True when this process holds the turn on `device`.
pub fn holding(device: CUdevice) -> bool {
    page(device).is_some_and(|p| p.holder.load(Relaxed) == std::process::id())
}
