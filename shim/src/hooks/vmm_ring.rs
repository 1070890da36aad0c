//! The suspend agent's fast copy path (issue 22, branch i22fast): a small pinned staging ring
//! and pageable host copies, so that a suspension's speed does not depend on pinning the
//! whole data (on the H100, pinning 17 GB took ~5.8 s of a 6.1 s suspension). Suspend: the
//! agent issues device-to-host copies into free slots and records each slot's event; once a
//! slot's copy is done, a worker thread memcpys it into the pageable copy (first touch, so the
//! page faulting is spread over the workers) and gives the slot back. Resume: the workers fill
//! free slots from the pageable copies, the agent issues the host-to-device copy of each
//! filled slot, and a slot is free again once its event is done. The link and the CPU copies
//! overlap.
//!
//! Only the agent thread calls the driver (`call_real!`, past the closed gate); the workers
//! only copy host memory, and no panic leaves them (`catch_unwind`: a failed copy fails the
//! move, all or nothing as `hooks::vmm` wants).

use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

/// `CU_MEMHOSTALLOC_PORTABLE`: the ring is pinned for every context, not only the current one.
const HOST_ALLOC_PORTABLE: u32 = 1;
/// `CU_EVENT_DISABLE_TIMING`: the cheapest event (only waited for).
const EVENT_DISABLE_TIMING: u32 = 2;
/// The huge page size the pageable copies are aligned to (2 MiB faults with THP).
const HUGE: usize = 2 << 20;

/// The ring's geometry and the workers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub slots: usize,
    pub slot: u64,
    pub workers: usize,
}

/// `GPUSLICE_SUSPEND_RING=<slots>x<size>` (default: one 64 MiB slot per worker, so 16 × 64 MiB
/// = 1 GiB of pinned host memory per process on a host of 16 cores or more, pinned by the agent
/// once the process has VMM-backed memory, and kept), `off` or `0` for the whole-range pinned
/// path; `GPUSLICE_SUSPEND_WORKERS=N` (default min(16, the cores this process may use)).
/// `None`: the ring is off.
///
/// Why these defaults (H100, 36.5 GB out of a 34 GiB training and back, docs/NOTES.md "Stop 17"):
/// out / back in GB/s, 8 workers × 8 slots 18.9-21.6 / 35.7-38.5, 16 × 8 slots 22.4 / 35.5, 8 ×
/// 16 slots 23.5 / 38.7, 16 × 16 slots 28.1-29.4 / 38.9-43.1 (the link: 55 GB/s each way). Out,
/// the pageable copy from a slot is the bottleneck: it wants a worker per slot and a slot per
/// worker.
pub fn settings() -> Option<Settings> {
    static S: OnceLock<Option<Settings>> = OnceLock::new();
    *S.get_or_init(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let workers = std::env::var("GPUSLICE_SUSPEND_WORKERS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(cores.min(DEFAULT_WORKERS)).clamp(1, 64);
        let ring = std::env::var("GPUSLICE_SUSPEND_RING").unwrap_or_default();
        let parsed = parse_ring(&ring, workers);
        if parsed.is_none() && !matches!(ring.trim(), "off" | "0") {
            tracing::warn!("GPUSLICE_SUSPEND_RING={ring:?} is not <slots>x<size> (e.g. 16x64M): the suspend agent pins whole ranges");
        }
        parsed.map(|(slots, slot)| Settings { slots, slot, workers })
    })
}

/// The most workers by default (more cores than this: no measured gain asked for).
const DEFAULT_WORKERS: usize = 16;
/// A slot of the default ring.
const DEFAULT_SLOT: u64 = 64 << 20;

/// "8x64M" → (8, 64 MiB); "" → the default for `workers` (one 64 MiB slot each, at least 2).
/// Slots 2..=256, a slot 4 KiB..=4 GiB (4 KiB-aligned so that every copy out of a slot starts
/// page-aligned).
fn parse_ring(v: &str, workers: usize) -> Option<(usize, u64)> {
    let v = v.trim();
    if v.is_empty() {
        return Some((workers.clamp(2, 256), DEFAULT_SLOT));
    }
    let (n, size) = v.split_once(['x', 'X'])?;
    let n: usize = n.trim().parse().ok()?;
    let size = gpuslice_common::size::parse_size(size.trim()).ok()?;
    ((2..=256).contains(&n) && (4096..=4 << 30).contains(&size) && size % 4096 == 0).then_some((n, size))
}

/// The pinned ring: `slots` × `slot` bytes at `RING_BASE`, allocated once (0: not yet). Only the
/// agent thread touches it; atomics so that a forked child can forget it without a lock.
static RING_BASE: AtomicUsize = AtomicUsize::new(0);
static RING_BYTES: AtomicU64 = AtomicU64::new(0);

/// The ring, pinned now if it is not yet (a context must be current): `Ok(None)` when it is
/// off, `Err` when it cannot be pinned (the caller falls back to the whole-range path).
pub fn ring() -> Result<Option<(Settings, usize)>, CuResult> {
    let Some(s) = settings() else { return Ok(None) };
    let base = RING_BASE.load(Relaxed);
    if base != 0 {
        return Ok(Some((s, base)));
    }
    let bytes = s.slots as u64 * s.slot;
    let mut p: *mut c_void = std::ptr::null_mut();
    let code = call_real!(cuMemHostAlloc(&mut p, bytes as usize, HOST_ALLOC_PORTABLE));
    if code != CUDA_SUCCESS || p.is_null() {
        return Err(if code == CUDA_SUCCESS { CUDA_ERROR_OUT_OF_MEMORY } else { code });
    }
    RING_BASE.store(p as usize, Relaxed);
    RING_BYTES.store(bytes, Relaxed);
    tracing::info!(
        "suspend agent: staging ring of {} × {} pinned ({} of host memory, kept for the process's life), {} workers; transparent huge pages: {}",
        s.slots,
        gpuslice_common::size::format_size(s.slot),
        gpuslice_common::size::format_size(bytes),
        s.workers,
        thp_mode()
    );
    Ok(Some((s, p as usize)))
}

/// A forked child has no CUDA: the parent's ring is not pinned for it (the mapping leaks).
pub fn forget_in_child() {
    RING_BASE.store(0, Relaxed);
    RING_BYTES.store(0, Relaxed);
}

/// Bytes of memory the system can still give (`MemAvailable`), if it says.
pub fn host_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// The system's transparent huge page mode ("always", "madvise", "never"), for the log: with
/// "never" every 4 KiB of the host copies faults on its own (about 6× slower first touch than
/// 2 MiB pages on the dev box, 0.5 against 3.1 GB/s per core).
pub fn thp_mode() -> String {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    text.split_whitespace().find(|w| w.starts_with('[')).map(|w| w.trim_matches(['[', ']']).to_string()).unwrap_or_else(|| "unknown".into())
}

/// Bytes of this process's anonymous memory in huge pages now (`AnonHugePages`), if it says.
pub fn anon_huge_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = text.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// One pageable mapping of `bytes`, aligned to 2 MiB and advised for huge pages (where the
/// system allows them: `madvise` failing is no error). Each range's part is later unmapped on
/// its own (`unmap`), so a part freed early never makes a later unmap hit someone else's map.
pub fn map_pageable(bytes: usize) -> Option<usize> {
    let len = bytes.checked_add(HUGE)?;
    // SAFETY: a new anonymous private mapping; no memory of ours is involved.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    if p == libc::MAP_FAILED {
        return None;
    }
    let start = p as usize;
    let aligned = start.next_multiple_of(HUGE);
    // SAFETY: the head and tail of the mapping made above, outside [aligned, aligned + bytes).
    unsafe {
        if aligned > start {
            libc::munmap(p, aligned - start);
        }
        let tail = start + len - (aligned + bytes);
        if tail > 0 {
            libc::munmap((aligned + bytes) as *mut c_void, tail);
        }
        libc::madvise(aligned as *mut c_void, bytes, libc::MADV_HUGEPAGE);
    }
    Some(aligned)
}

/// Unmaps part of a mapping `map_pageable` made.
pub fn unmap(host: usize, bytes: usize) {
    if host != 0 && bytes != 0 {
        // SAFETY: a part of a mapping of ours that nothing uses any more (the caller's word).
        unsafe { libc::munmap(host as *mut c_void, bytes) };
    }
}

/// Unmaps `parts` on a thread of its own (off the resume's critical path), or here if no
/// thread can start.
pub fn unmap_later(parts: Vec<(usize, usize)>) {
    if parts.is_empty() {
        return;
    }
    let shared = Arc::new(Mutex::new(parts));
    let theirs = Arc::clone(&shared);
    let spawned = std::thread::Builder::new().name("gpuslice-unmap".into()).spawn(move || {
        let _ = std::panic::catch_unwind(move || {
            for (host, bytes) in std::mem::take(&mut *theirs.lock().unwrap_or_else(|p| p.into_inner())) {
                unmap(host, bytes);
            }
        });
    });
    if spawned.is_err() {
        for (host, bytes) in std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner())) {
            unmap(host, bytes);
        }
    }
}

/// One piece of a move: `len` bytes between the device at `dev` and the host at `host`.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    pub dev: CUdeviceptr,
    pub host: usize,
    pub len: usize,
}

/// Cuts `size` bytes at `dev`/`host` into pieces of at most `slot` bytes.
pub fn cut(out: &mut Vec<Piece>, dev: CUdeviceptr, host: usize, size: u64, slot: u64) {
    let mut off = 0;
    while off < size {
        let len = slot.min(size - off);
        out.push(Piece { dev: dev + off, host: host + off as usize, len: len as usize });
        off += len;
    }
}

/// A host copy for a worker: `len` bytes from `src` to `dst`, then the slot goes back.
struct Job {
    slot: usize,
    src: usize,
    dst: usize,
    len: usize,
}

/// What a worker says of a job: its slot, how long the copy took, whether it panicked.
struct Done {
    slot: usize,
    ns: u64,
    ok: bool,
}

/// The jobs' queue (`None` in it: a worker's signal to stop).
type Queue = Arc<(Mutex<VecDeque<Option<Job>>>, Condvar)>;

fn copy(job: &Job) -> Done {
    let t = Instant::now();
    let ok = std::panic::catch_unwind(|| {
        // SAFETY: `src` and `dst` are a ring slot and a piece of a pageable copy (or the other
        // way round), each `len` bytes, not overlapping; the agent touches neither until the
        // job is done.
        unsafe { std::ptr::copy_nonoverlapping(job.src as *const u8, job.dst as *mut u8, job.len) }
    })
    .is_ok();
    Done { slot: job.slot, ns: t.elapsed().as_nanos() as u64, ok }
}

/// The workers, seen from the agent: hand a job out, take a finished one back. With no worker
/// (none could start) the agent copies itself, at `send`.
struct Pool {
    queue: Queue,
    done: Receiver<Done>,
    done_tx: Sender<Done>,
    workers: usize,
    /// Sum of the workers' copy time, ns.
    busy_ns: u64,
}

impl Pool {
    fn send(&mut self, job: Job) {
        if self.workers == 0 {
            let _ = self.done_tx.send(copy(&job));
            return;
        }
        let (q, cv) = &*self.queue;
        q.lock().unwrap_or_else(|p| p.into_inner()).push_back(Some(job));
        cv.notify_one();
    }

    /// The next finished job; `wait`: block for it. A channel closed (cannot happen while
    /// `self` holds a sender) reads as a failed copy of no slot.
    fn take(&mut self, wait: bool) -> Option<Done> {
        let d = if wait { self.done.recv().ok() } else { self.done.try_recv().ok() }?;
        self.busy_ns += d.ns;
        Some(d)
    }
}

fn worker(queue: &Queue, done: &Sender<Done>) {
    let (q, cv) = &**queue;
    loop {
        let job = {
            let mut g = q.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = g.pop_front() {
                    break j;
                }
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        let Some(job) = job else { return };
        if done.send(copy(&job)).is_err() {
            return;
        }
    }
}

/// Tells `.1` workers to stop when dropped.
struct Stop<'a>(&'a Queue, usize);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        let (q, cv) = &**self.0;
        q.lock().unwrap_or_else(|p| p.into_inner()).extend((0..self.1).map(|_| None));
        cv.notify_all();
    }
}

/// Runs `body` with `workers` copy threads (as many as start), then stops and joins them.
/// Returns `body`'s result and the workers' copy time averaged over them (µs).
fn with_pool<T>(workers: usize, body: impl FnOnce(&mut Pool) -> T) -> (T, u64) {
    let queue: Queue = Arc::new((Mutex::new(VecDeque::new()), Condvar::new()));
    let (done_tx, done) = channel();
    std::thread::scope(|scope| {
        let mut started = 0;
        for i in 0..workers {
            let (q, tx) = (Arc::clone(&queue), done_tx.clone());
            let spawned = std::thread::Builder::new().name(format!("gpuslice-copy{i}")).spawn_scoped(scope, move || {
                let _ = std::panic::catch_unwind(|| worker(&q, &tx));
            });
            if spawned.is_ok() {
                started += 1;
            }
        }
        // The workers stop however `body` ends (a panic included: the scope joins them, so a
        // worker left waiting would hang the agent).
        let _stop = Stop(&queue, started);
        let mut pool = Pool { queue: Arc::clone(&queue), done, done_tx, workers: started, busy_ns: 0 };
        let out = body(&mut pool);
        (out, pool.busy_ns / 1000 / started.max(1) as u64)
    })
}

/// The events of one move in one context, one per slot.
struct Events(Vec<*mut c_void>);

impl Events {
    fn new(n: usize) -> Result<Events, CuResult> {
        let mut v = Events(Vec::with_capacity(n));
        for _ in 0..n {
            let mut e: *mut c_void = std::ptr::null_mut();
            let code = call_real!(cuEventCreate(&mut e, EVENT_DISABLE_TIMING));
            if code != CUDA_SUCCESS {
                return Err(code);
            }
            v.0.push(e);
        }
        Ok(v)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        for &e in &self.0 {
            call_real!(cuEventDestroy_v2(e));
        }
    }
}

/// Which way a move goes.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Way {
    Out,
    In,
}

/// Moves `pieces` through the ring at `base` (geometry `s`), one context's worth: the
/// context is current, `streams` are its own. Returns the workers' averaged copy time (µs).
/// On any failure it stops issuing, waits for every copy in flight (device and host), and
/// returns the first error: no slot is written after it returns.
pub fn run(way: Way, s: Settings, base: usize, streams: &[CUstream], pieces: &[Piece]) -> Result<u64, CuResult> {
    let events = Events::new(s.slots)?;
    let slot_at = |k: usize| base + k * s.slot as usize;
    let (result, memcpy_us) = with_pool(s.workers, |pool| {
        let mut err: Option<CuResult> = None;
        match way {
            Way::Out => out(pool, &events, streams, pieces, s.slots, &slot_at, &mut err),
            Way::In => into(pool, &events, streams, pieces, s.slots, &slot_at, &mut err),
        }
        err
    });
    // Every copy the device may still run on a slot ends before the ring is used again.
    let mut synced = Ok(());
    for &st in streams {
        let code = call_real!(cuStreamSynchronize(st));
        if code != CUDA_SUCCESS && synced.is_ok() {
            synced = Err(code);
        }
    }
    match result {
        Some(code) => Err(code),
        None => synced.map(|_| memcpy_us),
    }
}

fn fail(err: &mut Option<CuResult>, code: CuResult) {
    if err.is_none() {
        *err = Some(code);
    }
}

/// Device → slot (the agent), slot → pageable (a worker).
fn out(pool: &mut Pool, events: &Events, streams: &[CUstream], pieces: &[Piece], slots: usize, slot_at: &dyn Fn(usize) -> usize, err: &mut Option<CuResult>) {
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut piece_of = vec![0usize; slots];
    let mut dma: VecDeque<usize> = VecDeque::new();
    let (mut next, mut copying) = (0, 0usize);
    loop {
        while err.is_none() && next < pieces.len() {
            let Some(k) = free.pop() else { break };
            let p = pieces[next];
            let st = streams[k % streams.len()];
            let mut code = call_real!(cuMemcpyDtoHAsync_v2(slot_at(k) as *mut c_void, p.dev, p.len, st));
            if code == CUDA_SUCCESS {
                code = call_real!(cuEventRecord(events.0[k], st));
            }
            if code != CUDA_SUCCESS {
                // The stream is synchronised before `run` returns, so the slot is not reused
                // under a copy in flight.
                fail(err, code);
                break;
            }
            piece_of[k] = next;
            dma.push_back(k);
            next += 1;
        }
        if let Some(k) = dma.pop_front() {
            if err.is_none() {
                let code = call_real!(cuEventSynchronize(events.0[k]));
                if code == CUDA_SUCCESS {
                    let p = pieces[piece_of[k]];
                    pool.send(Job { slot: k, src: slot_at(k), dst: p.host, len: p.len });
                    copying += 1;
                } else {
                    fail(err, code);
                    free.push(k);
                }
            } else {
                free.push(k);
            }
            while let Some(d) = pool.take(false) {
                copying -= 1;
                if !d.ok {
                    fail(err, CUDA_ERROR_UNKNOWN);
                }
                free.push(d.slot);
            }
        } else if copying > 0 {
            match pool.take(true) {
                Some(d) => {
                    copying -= 1;
                    if !d.ok {
                        fail(err, CUDA_ERROR_UNKNOWN);
                    }
                    free.push(d.slot);
                }
                None => {
                    fail(err, CUDA_ERROR_UNKNOWN);
                    return;
                }
            }
        } else {
            return;
        }
    }
}

/// Pageable → slot (a worker), slot → device (the agent).
fn into(pool: &mut Pool, events: &Events, streams: &[CUstream], pieces: &[Piece], slots: usize, slot_at: &dyn Fn(usize) -> usize, err: &mut Option<CuResult>) {
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut piece_of = vec![0usize; slots];
    let mut dma: VecDeque<usize> = VecDeque::new();
    let (mut next, mut filling) = (0, 0usize);
    loop {
        while err.is_none() && next < pieces.len() {
            let Some(k) = free.pop() else { break };
            let p = pieces[next];
            piece_of[k] = next;
            pool.send(Job { slot: k, src: p.host, dst: slot_at(k), len: p.len });
            filling += 1;
            next += 1;
        }
        if filling > 0 {
            let Some(d) = pool.take(true) else {
                fail(err, CUDA_ERROR_UNKNOWN);
                return;
            };
            filling -= 1;
            let k = d.slot;
            if !d.ok {
                fail(err, CUDA_ERROR_UNKNOWN);
            }
            if err.is_some() {
                free.push(k);
                continue;
            }
            let p = pieces[piece_of[k]];
            let st = streams[k % streams.len()];
            let mut code = call_real!(cuMemcpyHtoDAsync_v2(p.dev, slot_at(k) as *const c_void, p.len, st));
            if code == CUDA_SUCCESS {
                code = call_real!(cuEventRecord(events.0[k], st));
            }
            if code != CUDA_SUCCESS {
                fail(err, code);
                continue;
            }
            dma.push_back(k);
            // Slots whose copy is done go back without waiting.
            while let Some(&k) = dma.front() {
                match call_real!(cuEventQuery(events.0[k])) {
                    CUDA_SUCCESS => {
                        dma.pop_front();
                        free.push(k);
                    }
                    CUDA_ERROR_NOT_READY => break,
                    code => {
                        fail(err, code);
                        break;
                    }
                }
            }
        } else if let Some(k) = dma.pop_front() {
            if err.is_none() {
                let code = call_real!(cuEventSynchronize(events.0[k]));
                if code != CUDA_SUCCESS {
                    fail(err, code);
                }
            }
            free.push(k);
        } else {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_settings_parse_and_refuse_nonsense() {
        assert_eq!(parse_ring("", 16), Some((16, 64 << 20)), "a slot per worker");
        assert_eq!(parse_ring("", 1), Some((2, 64 << 20)), "never fewer than two slots");
        assert_eq!(parse_ring("4x256M", 16), Some((4, 256 << 20)));
        assert_eq!(parse_ring(" 3X768K ", 16), Some((3, 768 << 10)));
        for bad in ["off", "0", "1x64M", "8", "8x", "8x100", "300x1M", "8x5G"] {
            assert_eq!(parse_ring(bad, 16), None, "{bad}");
        }
    }

    #[test]
    fn pieces_cover_a_range_that_is_no_multiple_of_the_slot() {
        let mut v = Vec::new();
        cut(&mut v, 0x1000_0000, 0x7000_0000, 10 << 20, 3 << 20);
        assert_eq!(v.iter().map(|p| p.len).collect::<Vec<_>>(), vec![3 << 20, 3 << 20, 3 << 20, 1 << 20]);
        assert_eq!(v[3].dev, 0x1000_0000 + (9 << 20));
        assert_eq!(v[3].host, 0x7000_0000 + (9 << 20));
    }

    #[test]
    fn the_pool_copies_every_job_with_workers_or_without() {
        for workers in [3, 0] {
            pool_copies_every_job(workers);
        }
    }

    fn pool_copies_every_job(workers: usize) {
        let src: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; 1 << 20];
        let ((), _) = with_pool(workers, |pool| {
            let chunk = 1 << 16;
            for k in 0..16 {
                pool.send(Job { slot: k, src: src.as_ptr() as usize + k * chunk, dst: dst.as_mut_ptr() as usize + k * chunk, len: chunk });
            }
            let mut slots: Vec<usize> = (0..16).map(|_| pool.take(true).expect("a job comes back")).inspect(|d| assert!(d.ok)).map(|d| d.slot).collect();
            slots.sort_unstable();
            assert_eq!(slots, (0..16).collect::<Vec<_>>());
        });
        assert_eq!(src, dst);
    }

    #[test]
    fn a_pageable_map_is_huge_page_aligned() {
        let p = map_pageable(5 << 20).expect("mmap");
        assert_eq!(p % HUGE, 0);
        // SAFETY: 5 MiB of the mapping made above.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0xab, 5 << 20) };
        unmap(p, 5 << 20);
    }
}
