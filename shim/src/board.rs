//! Turns on the device between throttled gpuslice processes: one small shared page per device
//! (`/dev/shm/gpuslice-board-<uid>-<device uuid>`) saying whose work is on the device and until
//! when.
//!
//! Without MPS the GPU time-slices between processes that both have work queued, and every
//! switch costs device time nobody gets: measured on the H200, two processes throttled to 30%
//! and 70% got 29.9% and 61% (9% lost). So a throttled process waits at the launch boundary
//! until the other's queued work should be done (by that process's own model of its queue), and
//! then posts its own. Nothing is locked: a stale or bogus entry expires on its own, and no wait
//! here lasts longer than `MAX_WAIT`. Processes of other users do not share a page (mode 0600).
//! This page becomes part of the controller's ledger (issue 4).

use crate::budget::MAX_DEVICES;
use crate::ffi::CUdevice;
use crate::nvml::cuda_uuid_string;
use crate::throttle::now_ns;
use once_cell::sync::OnceCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

const MAGIC: u64 = 0x4750_5553_4c42_4431; // "GPUSLBD1"
/// Longest a launch waits for another process's turn.
const MAX_WAIT_NS: u64 = 20_000_000;
const MAX_NAP_NS: u64 = 2_000_000;

#[repr(C)]
struct Page {
    magic: AtomicU64,
    /// Pid whose work is on the device.
    holder: AtomicU32,
    _pad: u32,
    /// CLOCK_MONOTONIC ns at which the holder's queued work should be done.
    busy_until: AtomicU64,
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
    let path = std::ffi::CString::new(format!("/dev/shm/gpuslice-board-{uid}-{uuid}")).ok()?;
    // SAFETY: plain open/ftruncate/mmap of a small file; the mapping lives for the process.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW, 0o600);
        if fd < 0 {
            return None;
        }
        let mut st: libc::stat = std::mem::zeroed();
        let ok = libc::fstat(fd, &mut st) == 0
            && st.st_uid == uid
            && (st.st_size as usize >= std::mem::size_of::<Page>() || libc::ftruncate(fd, 4096) == 0);
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
        // A new file is all zeroes; anything else that is not ours is left alone.
        let _ = page.magic.compare_exchange(0, MAGIC, AcqRel, Relaxed);
        (page.magic.load(Acquire) == MAGIC).then_some(page)
    }
}

/// Waits, boundedly, while another process's work should still be on `device`.
pub fn wait_turn(device: CUdevice) -> u64 {
    let Some(page) = page(device) else { return 0 };
    let me = std::process::id();
    let start = now_ns();
    loop {
        let now = now_ns();
        let until = page.busy_until.load(Acquire);
        let holder = page.holder.load(Acquire);
        if holder == me || holder == 0 || now >= until || now - start >= MAX_WAIT_NS {
            return now - start;
        }
        let nap = (until - now).min(MAX_NAP_NS).min(MAX_WAIT_NS - (now - start));
        std::thread::sleep(std::time::Duration::from_nanos(nap));
    }
}

/// Posts that this process's work is on `device` until `until`.
pub fn claim(device: CUdevice, until: u64) {
    if let Some(page) = page(device) {
        page.holder.store(std::process::id(), Release);
        page.busy_until.store(until, Release);
    }
}
