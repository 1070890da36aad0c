//! Memory shared between processes: charged once, to the exporter's group.
//!
//! An allocation is charged when it is made, by the process that makes it; exporting it
//! (`cuIpcGetMemHandle`, `cuMemExportToShareableHandle`) changes nothing there. An import
//! (`cuIpcOpenMemHandle_v2`, `cuMemImportFromShareableHandle`) is therefore neither charged nor
//! refused — unless the exporter is outside gpuslice, whose allocation nobody has charged. To
//! tell, every export made under the shim is recorded with a key of the handle (its 64 bytes for
//! IPC and fabric handles, the descriptor's device and inode for a POSIX file descriptor):
//! - under a controller, in the controller's table (`Request::Export`, looked up at import with
//!   `Request::Import`; one round-trip each, both rare), whatever the users of the two ends;
//! - alone, in a small per-user page, `/dev/shm/gpuslice-exports-<uid>` (mode 0600) with the
//!   exporter's pid. Processes of another user cannot see the page, so there their exports
//!   count as outside gpuslice (charged twice: never fails open).
//!
//! An importer whose exporter is not found charges the import to its own group, on the GPU the
//! memory is on: a legacy IPC import (its size from `cuMemGetAddressRange_v2`) until
//! `cuIpcCloseMemHandle`; a VMM import at its first `cuMemMap` (the size mapped: the import
//! itself says no size) until its `cuMemRelease`.

use crate::policy::budget;
use crate::state::alloc_table::{AllocTable, Entry};
use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::{sys::guard, sys::runtime};
use gpuslice_common::protocol::{self, ExportKey, Request, Response};
use once_cell::sync::{Lazy, OnceCell};
use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::sync::Mutex;

/// `CUmemAllocationHandleType`.
const HANDLE_TYPE_POSIX_FD: c_uint = 0x1;
const HANDLE_TYPE_FABRIC: c_uint = 0x8;

/// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL` (an `int`).
const POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;

const ENTRIES: usize = 1024;

#[repr(C)]
struct Slot {
    key: AtomicU64,
    pid: AtomicU32,
    _pad: AtomicU32,
}

/// The page of exports: `ENTRIES` slots.
struct Registry(&'static [Slot; ENTRIES]);

fn registry() -> Option<&'static Registry> {
    static PAGE: OnceCell<Option<Registry>> = OnceCell::new();
    PAGE.get_or_init(|| {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let path = std::ffi::CString::new(format!("/dev/shm/gpuslice-exports-{uid}")).ok()?;
        let size = std::mem::size_of::<[Slot; ENTRIES]>();
        // SAFETY: open/fstat/ftruncate/mmap of a small file; the mapping lives for the process.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW, 0o600);
            if fd < 0 {
                return None;
            }
            let mut st: libc::stat = std::mem::zeroed();
            let ok = libc::fstat(fd, &mut st) == 0 && st.st_uid == uid && (st.st_size as usize >= size || libc::ftruncate(fd, size as libc::off_t) == 0);
            let p = if ok { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) } else { libc::MAP_FAILED };
            libc::close(fd);
            (p != libc::MAP_FAILED).then(|| Registry(&*(p as *const [Slot; ENTRIES])))
        }
    })
    .as_ref()
}

impl Registry {
    /// Records that this process exported `key`.
    fn add(&self, key: u64) {
        let me = std::process::id();
        if self.0.iter().any(|s| s.key.load(Acquire) == key && s.pid.load(Acquire) == me) {
            return;
        }
        for s in self.0.iter() {
            let pid = s.pid.load(Acquire);
            // A free slot, or a dead exporter's.
            if (pid == 0 || !crate::sys::pids::alive(pid)) && s.pid.compare_exchange(pid, me, AcqRel, Relaxed).is_ok() {
                s.key.store(key, Release);
                return;
            }
        }
        tracing::warn!("pid {me}: gpuslice's table of exports is full; an import of this export will be charged to its importer too");
    }

    /// True when a live process under gpuslice exported `key`.
    fn exported_by_gpuslice(&self, key: u64) -> bool {
        self.0.iter().any(|s| s.key.load(Acquire) == key && s.pid.load(Acquire) != 0 && crate::sys::pids::alive(s.pid.load(Acquire)))
    }
}

/// Records an export made by this process: with the controller when one holds this process,
/// else in the user's page.
fn record_export(key: ExportKey) {
    if let Some(socket) = crate::state::link::controller_socket() {
        match protocol::call(socket, &Request::Export(protocol::Shared { key }), CONTROLLER_TIMEOUT) {
            Ok((Response::Done { .. }, _)) => {}
            Ok((Response::Error { message }, _)) => tracing::warn!(
                "pid {}: the controller did not record an export ({message}); an import of it will be charged to its importer too",
                std::process::id()
            ),
            other => tracing::warn!(
                "pid {}: the controller did not record an export ({other:?}); an import of it will be charged to its importer too",
                std::process::id()
            ),
        }
    } else if let Some(r) = registry() {
        r.add(page_key(&key));
    }
}

/// True when a live process under gpuslice exported `key` (so its exporter is charged for it).
/// Under a controller only the controller's table counts: the page could be written by any
/// process of this user, and under a controller users are not tenants.
fn exported_by_gpuslice(key: &ExportKey) -> bool {
    if crate::state::link::get().is_some_and(|l| l.controlled) {
        let Some(socket) = crate::state::link::controller_socket() else { return false };
        return match protocol::call(socket, &Request::Import(protocol::Shared { key: key.clone() }), CONTROLLER_TIMEOUT) {
            Ok((Response::Imported { by_gpuslice }, _)) => by_gpuslice,
            other => {
                tracing::warn!("pid {}: the controller did not say who exported an import ({other:?}); it is charged to this process", std::process::id());
                false
            }
        };
    }
    registry().is_some_and(|r| r.exported_by_gpuslice(page_key(key)))
}

/// How long an export or import waits for the controller.
const CONTROLLER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The page's 8-byte form of a key.
fn page_key(key: &ExportKey) -> u64 {
    match key {
        ExportKey::Handle(bytes) => hash(bytes),
        ExportKey::File { dev, ino } => hash(&[dev.to_le_bytes(), ino.to_le_bytes()].concat()),
    }
}

fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)).max(1)
}

/// The key of a POSIX descriptor handle: the file it is (both ends see the same one).
fn fd_key(fd: c_int) -> Option<ExportKey> {
    // SAFETY: fstat into a local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into the local `st`; any `fd` value is fine (a bad one returns -1).
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(ExportKey::File { dev: st.st_dev, ino: st.st_ino })
}

/// The key of a 64-byte handle (legacy IPC, fabric).
fn handle_key(bytes: &[u8]) -> ExportKey {
    ExportKey::Handle(bytes.to_vec())
}

/// Imports charged to this process (exporter outside gpuslice): mapped pointer → what it holds,
/// with the driver's open count.
static CHARGED: Lazy<AllocTable> = Lazy::new(AllocTable::new);
static OPENS: Mutex<Option<HashMap<u64, u32>>> = Mutex::new(None);

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: hold_for_fork, in_child: crate::sys::atfork::nothing_to_forget };

/// This module's locks, for a fork: the child starts with none of the parent's imports (they
/// are the parent's, charged to the parent's slot).
pub fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    CHARGED.hold_for_fork(h);
    h.take(&OPENS, |o| *o = None);
    h.take(&OUTSIDE, |o| {
        *o = None;
        OUTSIDE_PENDING.store(0, Release);
    });
}

#[no_mangle]
pub unsafe extern "C" fn cuIpcGetMemHandle(handle: *mut IpcMemHandle, dptr: CUdeviceptr) -> CuResult {
    guard::cuda("cuIpcGetMemHandle", || {
        if crate::hooks::vmm::address_range(dptr).is_some() {
            // Legacy IPC cannot export VMM memory (the driver refuses it too, less clearly).
            tracing::warn!(
                "pid {}: cuIpcGetMemHandle refused: this process's memory is VMM-backed because its group is on the shim's suspend path; legacy CUDA IPC (torch.multiprocessing's CUDA tensors) needs `suspend_path = \"driver\"` for the group: CUDA_ERROR_NOT_SUPPORTED",
                std::process::id()
            );
            return CUDA_ERROR_NOT_SUPPORTED;
        }
        let code = call_real!(cuIpcGetMemHandle(handle, dptr));
        if code == CUDA_SUCCESS && !handle.is_null() {
            // SAFETY: `handle` is non-null (checked above) and the driver just filled it.
            record_export(handle_key(unsafe { &(*handle).reserved }));
        }
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemExportToShareableHandle(out: *mut c_void, handle: CUmemGenericAllocationHandle, kind: c_uint, flags: u64) -> CuResult {
    guard::cuda("cuMemExportToShareableHandle", || {
        let code = call_real!(cuMemExportToShareableHandle(out, handle, kind, flags));
        if code == CUDA_SUCCESS && !out.is_null() {
            let key = match kind {
                // SAFETY: `out` is non-null (checked above); for a POSIX fd handle type the driver wrote an int through it.
                HANDLE_TYPE_POSIX_FD => fd_key(unsafe { *out.cast::<c_int>() }),
                // SAFETY: for a fabric handle type `out` points at the 64-byte CUmemFabricHandle the driver just wrote.
                HANDLE_TYPE_FABRIC => Some(handle_key(unsafe { std::slice::from_raw_parts(out.cast::<u8>(), 64) })),
                _ => None,
            };
            if let Some(key) = key {
                record_export(key);
            }
        }
        code
    })
}

/// Charges a legacy IPC import from outside gpuslice: `dptr` was just opened by the driver.
fn charge_import(dptr: CUdeviceptr) -> CuResult {
    let first = {
        let mut opens = crate::sys::locks::lock(&OPENS);
        let n = opens.get_or_insert_with(HashMap::new).entry(dptr).or_insert(0);
        *n += 1;
        *n == 1
    };
    if !first {
        return CUDA_SUCCESS; // The same mapping again: the driver counts it, charged once.
    }
    let (mut base, mut size): (CUdeviceptr, usize) = (0, 0);
    // The device the memory is on (an import may map another GPU's memory), else the current.
    let mut ordinal: c_int = -1;
    let on = call_real!(cuPointerGetAttribute((&mut ordinal as *mut c_int).cast(), POINTER_ATTRIBUTE_DEVICE_ORDINAL, dptr));
    let device = if on == CUDA_SUCCESS && ordinal >= 0 { Some(ordinal) } else { driver().and_then(|d| d.current_device()) };
    let (Some(device), CUDA_SUCCESS) = (device, call_real!(cuMemGetAddressRange_v2(&mut base, &mut size, dptr))) else {
        return CUDA_SUCCESS; // Nothing to charge it to, or no size: as before this module.
    };
    let Some(budget) = budget::of(device) else { return CUDA_SUCCESS };
    match budget.try_charge(size as u64) {
        Ok(()) => {
            CHARGED.insert(dptr, Entry { device, bytes: size as u64 });
            tracing::info!("pid {}: an IPC import of {size} B on device {device} comes from outside gpuslice; charged to this process", std::process::id());
            CUDA_SUCCESS
        }
        Err(refusal) => {
            crate::sys::locks::lock(&OPENS).as_mut().map(|o| o.remove(&dptr));
            let _ = call_real!(cuIpcCloseMemHandle(dptr));
            tracing::warn!(
                "pid {}: cuIpcOpenMemHandle refused on device {device}: an import of {size} B from a process outside gpuslice, used {} B of {} B: CUDA_ERROR_OUT_OF_MEMORY",
                std::process::id(),
                refusal.used,
                refusal.limit
            );
            CUDA_ERROR_OUT_OF_MEMORY
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuIpcOpenMemHandle_v2(pdptr: *mut CUdeviceptr, handle: IpcMemHandle, flags: c_uint) -> CuResult {
    guard::cuda("cuIpcOpenMemHandle_v2", || {
        let code = call_real!(cuIpcOpenMemHandle_v2(pdptr, handle, flags));
        if code != CUDA_SUCCESS || pdptr.is_null() || runtime::refused() {
            return code;
        }
        let ours = exported_by_gpuslice(&handle_key(&handle.reserved));
        if ours {
            return code; // Charged to its exporter already.
        }
        // SAFETY: `pdptr` is non-null (checked above) and the successful open wrote the mapped pointer through it.
        charge_import(unsafe { *pdptr })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuIpcCloseMemHandle(dptr: CUdeviceptr) -> CuResult {
    guard::cuda("cuIpcCloseMemHandle", || {
        let code = call_real!(cuIpcCloseMemHandle(dptr));
        if code == CUDA_SUCCESS {
            let last = {
                let mut opens = crate::sys::locks::lock(&OPENS);
                match opens.as_mut().and_then(|o| o.get_mut(&dptr)) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        false
                    }
                    Some(_) => {
                        opens.as_mut().map(|o| o.remove(&dptr));
                        true
                    }
                    None => false,
                }
            };
            if last {
                if let Some(e) = CHARGED.remove(dptr) {
                    if let Some(b) = budget::of(e.device) {
                        b.uncharge(e.bytes);
                    }
                }
            }
        }
        code
    })
}

/// VMM handles imported from outside gpuslice, not charged yet (charged at their first map),
/// and how many there are: `cuMemMap` (PyTorch's expandable segments call it for every chunk)
/// looks at the set only while it is not empty.
static OUTSIDE: Mutex<Option<std::collections::HashSet<u64>>> = Mutex::new(None);
static OUTSIDE_PENDING: AtomicU64 = AtomicU64::new(0);

fn await_map(handle: u64) {
    if crate::sys::locks::lock(&OUTSIDE).get_or_insert_with(Default::default).insert(handle) {
        OUTSIDE_PENDING.fetch_add(1, AcqRel);
    }
}

fn mapped(handle: u64) -> bool {
    if OUTSIDE_PENDING.load(Acquire) == 0 {
        return false;
    }
    let removed = crate::sys::locks::lock(&OUTSIDE).as_mut().is_some_and(|s| s.remove(&handle));
    if removed {
        OUTSIDE_PENDING.fetch_sub(1, AcqRel);
    }
    removed
}

#[no_mangle]
pub unsafe extern "C" fn cuMemImportFromShareableHandle(handle: *mut CUmemGenericAllocationHandle, os_handle: *mut c_void, kind: c_uint) -> CuResult {
    guard::cuda("cuMemImportFromShareableHandle", || {
        let code = call_real!(cuMemImportFromShareableHandle(handle, os_handle, kind));
        if code != CUDA_SUCCESS || handle.is_null() || runtime::refused() {
            return code;
        }
        let key = match kind {
            HANDLE_TYPE_POSIX_FD => fd_key(os_handle as usize as c_int),
            // SAFETY: for a fabric handle, a non-null `os_handle` points at the caller's 64-byte CUmemFabricHandle (cuMemImportFromShareableHandle's contract).
            HANDLE_TYPE_FABRIC if !os_handle.is_null() => Some(handle_key(unsafe { std::slice::from_raw_parts(os_handle.cast::<u8>(), 64) })),
            _ => None,
        };
        let ours = key.is_some_and(|k| exported_by_gpuslice(&k));
        if !ours {
            // SAFETY: `handle` is non-null (checked above) and the successful import wrote the handle through it.
            await_map(unsafe { *handle });
        }
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemMap(ptr: CUdeviceptr, size: usize, offset: usize, handle: CUmemGenericAllocationHandle, flags: u64) -> CuResult {
    guard::cuda("cuMemMap", || {
        let code = call_real!(cuMemMap(ptr, size, offset, handle, flags));
        if code != CUDA_SUCCESS {
            return code;
        }
        // The common case (the handle is the program's own): one atomic load.
        if !mapped(handle) {
            return code;
        }
        // SAFETY: MemAllocationProp is a repr(C) struct of integers, a raw pointer and bytes, for which all-zero is valid.
        let mut prop: MemAllocationProp = unsafe { std::mem::zeroed() };
        let device = (call_real!(cuMemGetAllocationPropertiesFromHandle(&mut prop, handle)) == CUDA_SUCCESS && prop.location_type == MEM_LOCATION_TYPE_DEVICE)
            .then_some(prop.location_id);
        let Some((device, budget)) = device.and_then(|d| Some((d, budget::of(d)?))) else { return code };
        match budget.try_charge(size as u64) {
            Ok(()) => {
                crate::hooks::charge::record_handle(handle, device, size as u64);
                tracing::info!("pid {}: a VMM import of {size} B on device {device} comes from outside gpuslice; charged to this process", std::process::id());
                code
            }
            Err(refusal) => {
                let _ = call_real!(cuMemUnmap(ptr, size));
                await_map(handle);
                tracing::warn!(
                    "pid {}: cuMemMap refused on device {device}: {size} B of an import from a process outside gpuslice, used {} B of {} B: CUDA_ERROR_OUT_OF_MEMORY",
                    std::process::id(),
                    refusal.used,
                    refusal.limit
                );
                CUDA_ERROR_OUT_OF_MEMORY
            }
        }
    })
}
