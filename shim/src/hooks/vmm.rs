//! VMM backing (issue 22, step 1): for a member of a group on the shim's suspend path,
//! `cuMemAlloc_v2` and `cuMemAllocPitch_v2` are served by `cuMemAddressReserve` + `cuMemCreate` +
//! `cuMemMap` + `cuMemSetAccess`, so that the suspend agent can release the physical memory and
//! later map new memory at the same addresses. The ledger is charged what the program asked
//! for, exactly as for a driver allocation; the rounding to the granularity (2 MiB on an H100)
//! is device memory the quota does not count (docs/NOTES.md, "VMM backing").
//!
//! The moves themselves (`move_out`, `move_in`) are here too: they are the inverse of the
//! allocation, with the same four calls.

use crate::hooks::charge::{charged_memory, current_device, released, POINTERS};
use crate::hooks::vmm_ring::{self, Way};
use crate::state::vmm_ranges::{self, Range};
use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use gpuslice_common::ledger::{
    CAP_AGENT, CAP_FAST, CAP_OTHER_MEMORY, MARK_SHIM_PATH, MARK_SUSPENDABLE, PHASES, PHASE_COPY_IN, PHASE_COPY_OUT, PHASE_HOST_ALLOC, PHASE_HOST_FREE,
    PHASE_MAP, PHASE_MEMCPY_IN, PHASE_MEMCPY_OUT, PHASE_PIN, PHASE_RELEASE, PHASE_RING, PHASE_SYNC,
};
use gpuslice_common::size::format_size;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::Instant;

/// Host-to-device and device-to-host copies are cut into pieces of this size and spread over
/// `STREAMS` streams, so that several DMA transfers are in flight at once (the probe's rows
/// b1–b9 measure the best pair on the GPU; 64 MiB × 4 is the design's starting point: large
/// enough that a copy's launch cost is noise, small enough that the streams stay balanced).
pub const CHUNK: u64 = 64 << 20;
/// See `CHUNK`.
pub const STREAMS: usize = 4;

/// Per device: the allocation granularity, read once (0: not yet).
static GRANULARITY: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];

/// True when this process's device allocations are to be VMM-backed: a controller marked its
/// group suspendable on the shim's path. One load per allocation once linked.
#[inline]
pub fn backing() -> bool {
    let Some(link) = crate::state::link::get() else { return false };
    let marks = link.members.marks.load(Relaxed);
    link.controlled && marks & (MARK_SUSPENDABLE | MARK_SHIM_PATH) == MARK_SUSPENDABLE | MARK_SHIM_PATH
}

/// Notes that the process holds device memory the agent cannot move (anything not made here),
/// so that the controller's `auto` takes the driver's path for it.
#[inline]
pub fn note_other_memory() {
    if let Some(link) = crate::state::link::get() {
        if link.process.suspend_caps.load(Relaxed) & CAP_OTHER_MEMORY == 0 {
            link.process.suspend_caps.fetch_or(CAP_OTHER_MEMORY, Relaxed);
        }
    }
}

/// The capabilities the agent announces when it starts, and again at each request: `CAP_FAST`
/// goes once a driver function was handed out that bypasses the gate (the controller reads
/// the caps when it decides which path a member takes).
pub fn announce_caps() {
    if let Some(link) = crate::state::link::get() {
        let caps = &link.process.suspend_caps;
        if crate::sys::gate::fast_suspendable() {
            caps.fetch_or(CAP_AGENT | CAP_FAST, Relaxed);
        } else {
            caps.fetch_or(CAP_AGENT, Relaxed);
            caps.fetch_and(!CAP_FAST, Relaxed);
        }
    }
}

fn device_prop(device: CUdevice) -> MemAllocationProp {
    MemAllocationProp {
        alloc_type: MEM_ALLOCATION_TYPE_PINNED,
        requested_handle_types: 0,
        location_type: MEM_LOCATION_TYPE_DEVICE,
        location_id: device,
        win32_handle_meta_data: std::ptr::null_mut(),
        alloc_flags: [0; 8],
    }
}

fn granularity(device: CUdevice) -> Result<u64, CuResult> {
    let slot = GRANULARITY.get(device as usize).ok_or(CUDA_ERROR_INVALID_VALUE)?;
    let known = slot.load(Relaxed);
    if known != 0 {
        return Ok(known);
    }
    let prop = device_prop(device);
    let mut g = 0usize;
    let code = call_real!(cuMemGetAllocationGranularity(&mut g, &prop, MEM_ALLOC_GRANULARITY_MINIMUM));
    if code != CUDA_SUCCESS || g == 0 {
        return Err(if code == CUDA_SUCCESS { CUDA_ERROR_INVALID_VALUE } else { code });
    }
    slot.store(g as u64, Relaxed);
    Ok(g as u64)
}

fn check(code: CuResult) -> Result<(), CuResult> {
    if code == CUDA_SUCCESS {
        Ok(())
    } else {
        Err(code)
    }
}

/// Creates physical memory for `range` and maps it at its address with its access; on any
/// failure what was made is undone. Returns the new handle.
fn map_new(range: &Range) -> Result<u64, CuResult> {
    let mut handle: CUmemGenericAllocationHandle = 0;
    let prop = (&range.prop as *const MemAllocationProp).cast::<MemAllocationPropHead>();
    check(call_real!(cuMemCreate(&mut handle, range.size as usize, prop, 0)))?;
    if let Err(code) = check(call_real!(cuMemMap(range.base, range.size as usize, 0, handle, 0))) {
        call_real!(cuMemRelease(handle));
        return Err(code);
    }
    if let Err(code) = check(call_real!(cuMemSetAccess(range.base, range.size as usize, &range.access, 1))) {
        call_real!(cuMemUnmap(range.base, range.size as usize));
        call_real!(cuMemRelease(handle));
        return Err(code);
    }
    Ok(handle)
}

/// Unmaps and releases `range`'s physical memory (the reservation stays).
fn unmap_release(range: &Range) -> Result<(), CuResult> {
    check(call_real!(cuMemUnmap(range.base, range.size as usize)))?;
    check(call_real!(cuMemRelease(range.handle)))
}

/// Reserves, creates, maps: a new VMM-backed allocation of `bytes` (rounded up).
fn make(device: CUdevice, bytes: u64) -> Result<CUdeviceptr, CuResult> {
    let g = granularity(device)?;
    let size = bytes.max(1).div_ceil(g) * g;
    let mut base: CUdeviceptr = 0;
    check(call_real!(cuMemAddressReserve(&mut base, size as usize, 0, 0, 0)))?;
    let context = crate::sys::driver::driver().and_then(|d| d.current_context()).unwrap_or(0);
    let mut range = Range {
        base,
        size,
        requested: bytes,
        handle: 0,
        prop: device_prop(device),
        access: MemAccessDesc { location_type: MEM_LOCATION_TYPE_DEVICE, location_id: device, flags: MEM_ACCESS_FLAGS_PROT_READWRITE },
        context,
        host: 0,
        pageable: false,
    };
    match map_new(&range) {
        Ok(handle) => range.handle = handle,
        Err(code) => {
            call_real!(cuMemAddressFree(base, size as usize));
            return Err(code);
        }
    }
    vmm_ranges::insert(range);
    Ok(base)
}

/// `cuMemAlloc_v2` for a VMM-backed process: `None` when the process is not one.
pub fn alloc(dptr: *mut CUdeviceptr, bytes: u64, what: &'static str) -> Option<CuResult> {
    if !backing() {
        return None;
    }
    if dptr.is_null() || bytes == 0 {
        return Some(CUDA_ERROR_INVALID_VALUE);
    }
    let device = current_device();
    let Some(d) = device else { return Some(CUDA_ERROR_INVALID_VALUE) };
    Some(charged_memory(&POINTERS, device, bytes, what, || match make(d, bytes) {
        Ok(base) => {
            // SAFETY: `dptr` is non-null (checked above) and by cuMemAlloc's contract writable.
            unsafe { *dptr = base };
            (CUDA_SUCCESS, base)
        }
        Err(code) => (code, 0),
    }))
}

/// `cuMemAllocPitch_v2` for a VMM-backed process: the pitch is the width rounded up to the
/// device's texture pitch alignment (a pitch the driver could have chosen; callers must use
/// the returned one), and pitch × height is charged, as the driver path charges in the end.
pub fn alloc_pitch(dptr: *mut CUdeviceptr, pitch: *mut usize, width: usize, height: usize, element: u32) -> Option<CuResult> {
    if !backing() {
        return None;
    }
    if pitch.is_null() || width == 0 || height == 0 || !matches!(element, 4 | 8 | 16) {
        return Some(CUDA_ERROR_INVALID_VALUE);
    }
    let device = current_device()?;
    let mut align: std::ffi::c_int = 0;
    let align = if call_real!(cuDeviceGetAttribute(&mut align, DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT, device)) == CUDA_SUCCESS && align > 0 {
        align as usize
    } else {
        512
    };
    let row = width.div_ceil(align) * align;
    let code = alloc(dptr, (row as u64).saturating_mul(height as u64), "cuMemAllocPitch")?;
    if code == CUDA_SUCCESS {
        // SAFETY: `pitch` is non-null (checked above) and by cuMemAllocPitch's contract writable.
        unsafe { *pitch = row };
    }
    Some(code)
}

/// `cuMemFree_v2` of a VMM-backed pointer: `None` when `dptr` is not one.
pub fn free(dptr: CUdeviceptr) -> Option<CuResult> {
    let range = vmm_ranges::get(dptr)?;
    Some(released(&POINTERS, dptr, || {
        // cudaFree is synchronising, and unmapping memory a kernel still reads would fault.
        let code = call_real!(cuCtxSynchronize());
        if code != CUDA_SUCCESS {
            return code;
        }
        if range.handle != 0 {
            if let Err(code) = unmap_release(&range) {
                return code;
            }
        } else if range.host != 0 {
            // Freed while suspended (a thread the gate let through before it closed).
            free_host(range.host, range.size, range.pageable);
        }
        vmm_ranges::remove(dptr);
        call_real!(cuMemAddressFree(range.base, range.size as usize))
    }))
}

/// `cuMemGetAddressRange_v2` of a VMM-backed pointer: the allocation as the program asked for
/// it (the driver would answer the rounded mapping). `None` when `dptr` is not in one.
pub fn address_range(dptr: CUdeviceptr) -> Option<(CUdeviceptr, u64)> {
    vmm_ranges::containing(dptr).map(|r| (r.base, r.requested))
}

/// The streams of one context for the moves.
struct Streams(Vec<CUstream>);

impl Streams {
    fn new() -> Result<Streams, CuResult> {
        let mut v = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            let mut s: CUstream = std::ptr::null_mut();
            // 1 = CU_STREAM_NON_BLOCKING: not ordered behind the legacy default stream.
            if let Err(code) = check(call_real!(cuStreamCreate(&mut s, 1))) {
                drop(Streams(v));
                return Err(code);
            }
            v.push(s);
        }
        Ok(Streams(v))
    }

    fn sync(&self) -> Result<(), CuResult> {
        for &s in &self.0 {
            check(call_real!(cuStreamSynchronize(s)))?;
        }
        Ok(())
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        for &s in &self.0 {
            call_real!(cuStreamDestroy_v2(s));
        }
    }
}

/// Runs `copy(offset, length, stream)` over `size` bytes in `CHUNK`s, round robin.
fn chunked(streams: &Streams, size: u64, mut copy: impl FnMut(u64, u64, CUstream) -> CuResult) -> Result<(), CuResult> {
    let mut offset = 0;
    let mut i = 0;
    while offset < size {
        let len = CHUNK.min(size - offset);
        check(copy(offset, len, streams.0[i % streams.0.len()]))?;
        offset += len;
        i += 1;
    }
    Ok(())
}

fn set_context(context: usize) -> Result<(), CuResult> {
    if context == 0 {
        return Ok(());
    }
    let set = crate::sys::driver::driver().and_then(|d| d.cuCtxSetCurrent).ok_or(CUDA_ERROR_NOT_INITIALIZED)?;
    // SAFETY: a context this process made and has not destroyed (its ranges are still recorded).
    check(unsafe { set(context as CUcontext) })
}

/// Pins the staging ring ahead of the first suspension, in the context of a range the process
/// holds (the agent thread has none of its own). True once there is nothing more to do: the
/// ring is pinned, off, or could not be pinned (the first suspension tries again).
pub fn prepare_ring() -> bool {
    let Some(context) = vmm_ranges::some_mapped_context() else { return false };
    if set_context(context).is_err() {
        return false;
    }
    if let Err(code) = vmm_ring::ring() {
        tracing::warn!("the suspend agent's staging ring could not be pinned ahead (driver code {code}); its first suspension tries again");
    }
    true
}

/// What a move did: the agent's answer and log line.
#[derive(Default, Debug, Clone, Copy)]
pub struct Moved {
    /// Device bytes moved (the ranges' mapped, rounded sizes).
    pub bytes: u64,
    /// What the program asked for of those ranges (what the ledger was charged for them).
    pub requested: u64,
    /// Allocations moved.
    pub ranges: u32,
    /// Where the time went, in µs, by `ledger::PHASE_*` (the move's own phases only).
    pub phase_us: [u64; PHASES],
    /// Which copy path ran (for the log line).
    pub path: &'static str,
    /// The ring's geometry when the ring ran.
    pub ring: Option<vmm_ring::Settings>,
}

/// µs since `t`.
fn us_since(t: Instant) -> u64 {
    t.elapsed().as_micros().min(u64::MAX as u128) as u64
}

/// The contexts of `ranges`, each once.
fn contexts_of<'a>(ranges: impl Iterator<Item = &'a Range>) -> Vec<usize> {
    let mut contexts: Vec<usize> = ranges.map(|r| r.context).collect();
    contexts.sort_unstable();
    contexts.dedup();
    contexts
}

/// Frees a range's host copy, however it was made.
fn free_host(host: usize, size: u64, pageable: bool) {
    if pageable {
        vmm_ring::unmap(host, size as usize);
    } else if host != 0 {
        call_real!(cuMemFreeHost(host as *mut c_void));
    }
}

/// Copies every mapped range to host memory, then releases its physical memory (the
/// reservation stays). All or nothing: a failure before the releases frees the host copies
/// and leaves everything mapped. Through the staging ring into pageable memory
/// (`hooks::vmm_ring`) when it is on and can be pinned, else the whole-range pinned path.
/// Times each phase (`PHASE_SYNC`, `PHASE_RING`, `PHASE_HOST_ALLOC`, `PHASE_COPY_OUT`,
/// `PHASE_MEMCPY_OUT`, `PHASE_PIN`, `PHASE_RELEASE`).
pub fn move_out() -> Result<Moved, CuResult> {
    let ranges: Vec<Range> = vmm_ranges::all().into_iter().filter(|r| r.handle != 0).collect();
    let mut moved = Moved::default();
    let t = Instant::now();
    for context in contexts_of(ranges.iter()) {
        set_context(context)?;
        check(call_real!(cuCtxSynchronize()))?;
    }
    moved.phase_us[PHASE_SYNC] = us_since(t);
    if ranges.is_empty() {
        moved.path = "nothing to move";
        return Ok(moved);
    }
    let (copies, pageable) = match ring_out(&ranges, &mut moved)? {
        Some(copies) => (copies, true),
        None => (pinned_out(&ranges, &mut moved)?, false),
    };
    let t = Instant::now();
    for (r, host) in copies {
        // A release that fails leaves this range mapped and its copy unused: it stays on the
        // device (counted as not moved) and the program keeps its data either way.
        if unmap_release(&r).is_ok() {
            vmm_ranges::update(r.base, 0, host, pageable);
            moved.bytes += r.size;
            moved.requested += r.requested;
            moved.ranges += 1;
        } else {
            free_host(host, r.size, pageable);
        }
    }
    moved.phase_us[PHASE_RELEASE] = us_since(t);
    Ok(moved)
}

/// The ring's way out: `Ok(None)` when the ring is off or cannot be pinned (the caller takes
/// the pinned path), `Err` when the move failed (the copies are freed, nothing released).
fn ring_out(ranges: &[Range], moved: &mut Moved) -> Result<Option<Vec<(Range, usize)>>, CuResult> {
    let t = Instant::now();
    let ring = vmm_ring::ring();
    moved.phase_us[PHASE_RING] = us_since(t);
    let (s, base) = match ring {
        Ok(Some(r)) => r,
        Ok(None) => {
            moved.path = "whole ranges pinned (GPUSLICE_SUSPEND_RING=off)";
            return Ok(None);
        }
        Err(code) => {
            tracing::warn!("the suspend agent's staging ring could not be pinned (driver code {code}): whole ranges are pinned instead");
            moved.path = "whole ranges pinned (the ring could not be pinned)";
            return Ok(None);
        }
    };
    let total: u64 = ranges.iter().map(|r| r.size).sum();
    if let Some(avail) = vmm_ring::host_available() {
        if total > avail {
            tracing::warn!("not suspended: {} to move, the host has {} available", format_size(total), format_size(avail));
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        }
    }
    let t = Instant::now();
    let host = vmm_ring::map_pageable(total as usize).ok_or(CUDA_ERROR_OUT_OF_MEMORY)?;
    moved.phase_us[PHASE_HOST_ALLOC] = us_since(t);
    let mut copies = Vec::with_capacity(ranges.len());
    let mut at = host;
    for r in ranges {
        copies.push((*r, at));
        at += r.size as usize;
    }
    let t = Instant::now();
    let result = (|| {
        for context in contexts_of(ranges.iter()) {
            set_context(context)?;
            let streams = Streams::new()?;
            let mut pieces = Vec::new();
            for (r, h) in copies.iter().filter(|(r, _)| r.context == context) {
                vmm_ring::cut(&mut pieces, r.base, *h, r.size, s.slot);
            }
            moved.phase_us[PHASE_MEMCPY_OUT] += vmm_ring::run(Way::Out, s, base, &streams.0, &pieces)?;
        }
        Ok(())
    })();
    moved.phase_us[PHASE_COPY_OUT] = us_since(t);
    if let Err(code) = result {
        vmm_ring::unmap(host, total as usize);
        return Err(code);
    }
    moved.path = "staging ring";
    moved.ring = Some(s);
    if let Some(huge) = vmm_ring::anon_huge_bytes() {
        // Whether the first touch faulted 2 MiB at a time (the memcpy_out phase depends on it).
        tracing::info!("suspend agent: {} of host copies; the process has {} of anonymous memory in huge pages", format_size(total), format_size(huge));
    }
    Ok(Some(copies))
}

/// The whole-range pinned way out (the fallback): `cuMemHostAlloc` of each range, chunked
/// copies over `STREAMS` streams. The host allocations happen while earlier ranges' copies
/// run, so `PHASE_PIN` is time the copy-issuing thread spent pinning, and `PHASE_COPY_OUT` the
/// rest of the copy loop and the wait for the streams.
fn pinned_out(ranges: &[Range], moved: &mut Moved) -> Result<Vec<(Range, usize)>, CuResult> {
    let mut copies: Vec<(Range, usize)> = Vec::new();
    let result = (|| {
        for context in contexts_of(ranges.iter()) {
            set_context(context)?;
            let copy_started = Instant::now();
            let mut pinning = 0;
            let streams = Streams::new()?;
            for r in ranges.iter().filter(|r| r.context == context) {
                let mut host: *mut c_void = std::ptr::null_mut();
                let t = Instant::now();
                let code = call_real!(cuMemHostAlloc(&mut host, r.size as usize, 0));
                pinning += us_since(t);
                check(code)?;
                copies.push((*r, host as usize));
                chunked(&streams, r.size, |off, len, s| {
                    call_real!(cuMemcpyDtoHAsync_v2((host as usize + off as usize) as *mut c_void, r.base + off, len as usize, s))
                })?;
            }
            streams.sync()?;
            drop(streams);
            moved.phase_us[PHASE_PIN] += pinning;
            moved.phase_us[PHASE_COPY_OUT] += us_since(copy_started).saturating_sub(pinning);
        }
        Ok(())
    })();
    if let Err(code) = result {
        for (_, host) in copies {
            call_real!(cuMemFreeHost(host as *mut c_void));
        }
        return Err(code);
    }
    Ok(copies)
}

/// Creates, maps and fills again every range `move_out` released, at the same addresses. All
/// or nothing: out of memory (or any failure) releases what this attempt made, keeps the host
/// copies, and the process stays suspended (to be retried). Pageable copies come back through
/// the staging ring (directly from pageable memory if the ring cannot be had), pinned ones
/// directly. Times `PHASE_MAP`, `PHASE_COPY_IN`, `PHASE_MEMCPY_IN` and `PHASE_HOST_FREE` (the
/// pageable copies are unmapped on a thread of their own, after the resume).
pub fn move_in() -> Result<Moved, CuResult> {
    let ranges: Vec<Range> = vmm_ranges::all().into_iter().filter(|r| r.handle == 0 && r.host != 0).collect();
    let mut made: Vec<(Range, u64)> = Vec::new();
    let mut moved = Moved::default();
    let result = (|| {
        let t = Instant::now();
        for r in &ranges {
            made.push((*r, map_new(r)?));
        }
        moved.phase_us[PHASE_MAP] = us_since(t);
        let t = Instant::now();
        let ring = if ranges.iter().any(|r| r.pageable) { vmm_ring::ring().ok().flatten() } else { None };
        moved.path = match (ranges.iter().any(|r| r.pageable), ring) {
            (false, _) => "whole ranges pinned",
            (true, Some(_)) => "staging ring",
            (true, None) => "pageable copies without the ring",
        };
        moved.ring = ring.map(|(s, _)| s);
        for context in contexts_of(ranges.iter()) {
            set_context(context)?;
            let streams = Streams::new()?;
            let mut pieces = Vec::new();
            for r in ranges.iter().filter(|r| r.context == context) {
                match ring {
                    Some((s, _)) if r.pageable => vmm_ring::cut(&mut pieces, r.base, r.host, r.size, s.slot),
                    _ => chunked(&streams, r.size, |off, len, s| {
                        call_real!(cuMemcpyHtoDAsync_v2(r.base + off, (r.host + off as usize) as *const c_void, len as usize, s))
                    })?,
                }
            }
            streams.sync()?;
            if let Some((s, base)) = ring.filter(|_| !pieces.is_empty()) {
                moved.phase_us[PHASE_MEMCPY_IN] += vmm_ring::run(Way::In, s, base, &streams.0, &pieces)?;
            }
        }
        moved.phase_us[PHASE_COPY_IN] = us_since(t);
        Ok(())
    })();
    if let Err(code) = result {
        for (r, handle) in made {
            let _ = unmap_release(&Range { handle, ..r });
        }
        return Err(code);
    }
    let t = Instant::now();
    let mut later = Vec::new();
    for (r, handle) in made {
        if r.pageable {
            later.push((r.host, r.size as usize));
        } else {
            free_host(r.host, r.size, false);
        }
        vmm_ranges::update(r.base, handle, 0, false);
        moved.bytes += r.size;
        moved.requested += r.requested;
        moved.ranges += 1;
    }
    vmm_ring::unmap_later(later);
    moved.phase_us[PHASE_HOST_FREE] = us_since(t);
    Ok(moved)
}

/// `cuMemGetAddressRange_v2`: for a VMM-backed pointer, the allocation's base and the size the
/// program asked for (the driver would answer the rounded mapping); others go to the driver.
///
/// # Safety
/// As the driver's: `pbase` and `psize` null or writable.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(pbase: *mut CUdeviceptr, psize: *mut usize, dptr: CUdeviceptr) -> CuResult {
    crate::sys::guard::cuda("cuMemGetAddressRange_v2", || {
        let Some((base, size)) = address_range(dptr) else { return call_real!(cuMemGetAddressRange_v2(pbase, psize, dptr)) };
        if !pbase.is_null() {
            // SAFETY: non-null, and writable by the function's contract.
            unsafe { *pbase = base };
        }
        if !psize.is_null() {
            // SAFETY: as above.
            unsafe { *psize = size as usize };
        }
        CUDA_SUCCESS
    })
}
