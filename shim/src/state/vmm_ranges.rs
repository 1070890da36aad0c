//! The ranges whose device memory the shim serves VMM-backed (issue 22): each `cuMemAlloc` of a
//! member of a group on the shim's suspend path is one reserved virtual range with one physical
//! handle mapped over it. The suspend agent reads this table to copy each range out, release its
//! handle and later re-create it at the same address.
//!
//! One mutex: only processes with VMM backing ever take it (others see `ANY` false and never
//! look), and their allocations already cost four driver calls.

use crate::sys::ffi::{CUdeviceptr, MemAccessDesc, MemAllocationProp};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Mutex;

/// One VMM-backed allocation.
#[derive(Clone, Copy)]
pub struct Range {
    /// The reservation's start: the pointer the program got.
    pub base: CUdeviceptr,
    /// Reserved, mapped and moved (the request rounded up to the granularity).
    pub size: u64,
    /// What the program asked for (what the ledger was charged).
    pub requested: u64,
    /// The physical memory mapped there; 0 while suspended (released).
    pub handle: u64,
    pub prop: MemAllocationProp,
    pub access: MemAccessDesc,
    /// The context current when it was made (the copies run in it).
    pub context: usize,
    /// The host copy while suspended (the process's own); null otherwise.
    pub host: usize,
    /// How `host` was made: pageable (`mmap`, the staging ring's path: `munmap` it) or pinned
    /// (`cuMemHostAlloc`, the whole-range fallback: `cuMemFreeHost` it).
    pub pageable: bool,
}

// SAFETY: `prop`'s only pointer is the Windows handle metadata, always null here; `host` is
// an address kept as an integer.
unsafe impl Send for Range {}

static RANGES: Mutex<BTreeMap<CUdeviceptr, Range>> = Mutex::new(BTreeMap::new());
/// Set at the first range: until then a free never looks at the table.
static ANY: AtomicBool = AtomicBool::new(false);

fn table() -> std::sync::MutexGuard<'static, BTreeMap<CUdeviceptr, Range>> {
    RANGES.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn insert(range: Range) {
    ANY.store(true, Relaxed);
    table().insert(range.base, range);
}

/// The range starting at `base` (a pointer a VMM-backed allocation returned).
#[inline]
pub fn get(base: CUdeviceptr) -> Option<Range> {
    if !ANY.load(Relaxed) {
        return None;
    }
    table().get(&base).copied()
}

/// The range containing `ptr`.
pub fn containing(ptr: CUdeviceptr) -> Option<Range> {
    if !ANY.load(Relaxed) {
        return None;
    }
    table().range(..=ptr).next_back().map(|(_, r)| *r).filter(|r| ptr < r.base + r.size)
}

pub fn remove(base: CUdeviceptr) -> Option<Range> {
    table().remove(&base)
}

/// Every range now (the agent works on a copy and writes changes back with `update`).
pub fn all() -> Vec<Range> {
    if !ANY.load(Relaxed) {
        return Vec::new();
    }
    table().values().copied().collect()
}

/// The context of some range still on the device (the agent pins its staging ring in it).
pub fn some_mapped_context() -> Option<usize> {
    if !ANY.load(Relaxed) {
        return None;
    }
    table().values().find(|r| r.handle != 0).map(|r| r.context)
}

/// Writes back a range's handle and host copy (and how it was made) after the agent moved it.
pub fn update(base: CUdeviceptr, handle: u64, host: usize, pageable: bool) {
    if let Some(r) = table().get_mut(&base) {
        r.handle = handle;
        r.host = host;
        r.pageable = pageable;
    }
}

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules): a forked
/// child has no CUDA, the parent's ranges are not its own.
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: hold_for_fork, in_child: forget_in_child };

fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    h.take(&RANGES, BTreeMap::clear);
}

fn forget_in_child() {
    ANY.store(false, Relaxed);
}
