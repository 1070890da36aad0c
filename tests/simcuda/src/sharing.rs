//! Memory shared between processes and devices: legacy IPC (`cuIpcGetMemHandle`,
//! `cuIpcOpenMemHandle_v2`, `cuIpcCloseMemHandle`), VMM shareable handles
//! (`cuMemExportToShareableHandle` / `cuMemImportFromShareableHandle`, POSIX file descriptors and
//! fabric handles), `cuMemCreate` on host locations, and peer access (`cuDeviceCanAccessPeer`,
//! `cuCtxEnablePeerAccess`, `cuMemcpyPeer*`).
//!
//! An export lives in the state file (`state::ExportSlot`), so other processes find it by the id
//! written into the handle. Its bytes stay charged to the exporter, once, for as long as the
//! exporter holds the allocation or any live process holds an import of it (the real driver's
//! refcount); an import charges nothing. A process killed with imports open stops counting as
//! an importer (its pid is checked), so nothing leaks on `kill -9` of either side. Not modelled:
//! after the exporter dies its slot's bytes are reclaimed at once, although the real driver
//! would keep an imported allocation until its last importer lets go.

use crate::state::{self, ExportSlot};
use crate::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::*;

const PEER_ACCESS_ALREADY_ENABLED: CUresult = 704;
const PEER_ACCESS_NOT_ENABLED: CUresult = 705;
const NOT_SUPPORTED: CUresult = 801;

/// `CUmemAllocationHandleType`.
const HANDLE_TYPE_POSIX_FD: c_uint = 0x1;
const HANDLE_TYPE_FABRIC: c_uint = 0x8;

/// `CUmemLocationType`: HOST, HOST_NUMA, HOST_NUMA_CURRENT.
const HOST_LOCATIONS: std::ops::RangeInclusive<c_uint> = 2..=4;

/// What the handles carry in their first bytes, then the export's id.
const MAGIC: u64 = 0x5349_4d45_5850_4f52; // arbitrary

/// `CUipcMemHandle`: 64 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IpcMemHandle {
    pub reserved: [u8; 64],
}

#[derive(Default)]
struct Local {
    /// Exporter side: local key (device pointer or VMM handle) → export id.
    exported: BTreeMap<u64, u64>,
    /// VMM handles and the handle types they were created for.
    handle_types: BTreeMap<u64, c_uint>,
    /// Importer side: imported VMM handle → export id.
    imported_handles: BTreeMap<u64, u64>,
    /// Importer side, legacy IPC: export id → (mapped address, opens).
    ipc_opens: BTreeMap<u64, (u64, u32)>,
    /// VMM handles of host memory (not device memory: never charged).
    host: BTreeSet<u64>,
    /// Enabled peer access: (context, peer context).
    peers: BTreeSet<(u64, u64)>,
    /// Multicast objects of this process, by handle.
    multicast: BTreeMap<u64, Multicast>,
}

/// A multicast object: its team and the memory bound to it (no device memory of its own: what
/// is bound is `cuMemCreate` memory, charged on its own device).
struct Multicast {
    team: u32,
    size: u64,
    devices: Vec<CUdevice>,
    /// (device, bound handle, multicast offset, size)
    binds: Vec<(CUdevice, u64, u64, u64)>,
}

/// `CUmulticastObjectProp`.
#[repr(C)]
pub struct MulticastObjectProp {
    pub num_devices: c_uint,
    pub size: usize,
    pub handle_types: u64,
    pub flags: u64,
}

static LOCAL: Mutex<Option<Local>> = Mutex::new(None);

fn with_local<R>(f: impl FnOnce(&mut Local) -> R) -> R {
    let mut g = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Local::default))
}

fn me() -> u32 {
    std::process::id()
}

fn slots() -> &'static [ExportSlot] {
    &shared().exports
}

fn slot_of(id: u64) -> Option<&'static ExportSlot> {
    slots().iter().find(|s| id != 0 && s.id.load(Acquire) == id)
}

fn live_importers(s: &ExportSlot) -> usize {
    s.importers.iter().filter(|p| state::pid_alive_nonzero(p.load(Acquire))).count()
}

/// Publishes an export of `size` bytes on CUDA device `dev`; its id.
fn publish(dev: CUdevice, size: u64) -> Option<u64> {
    settle();
    let id = new_handle() ^ (u64::from(me()) << 40) | 1;
    let slot = slots().iter().find(|s| s.id.compare_exchange(0, u64::MAX, AcqRel, Relaxed).is_ok())?;
    slot.owner_pid.store(me(), Relaxed);
    slot.dev.store(physical(dev), Relaxed);
    slot.size.store(size, Relaxed);
    slot.owner_holds.store(1, Relaxed);
    for p in &slot.importers {
        p.store(0, Relaxed);
    }
    slot.id.store(id, Release);
    Some(id)
}

fn add_importer(s: &ExportSlot) -> bool {
    s.importers.iter().any(|p| p.compare_exchange(0, me(), AcqRel, Relaxed).is_ok())
        || s.importers.iter().any(|p| {
            let v = p.load(Acquire);
            !state::pid_alive_nonzero(v) && p.compare_exchange(v, me(), AcqRel, Relaxed).is_ok()
        })
}

fn remove_importer(id: u64) {
    if let Some(s) = slot_of(id) {
        if let Some(p) = s.importers.iter().find(|p| p.load(Acquire) == me()) {
            p.store(0, Release);
        }
    }
    settle();
}

/// Frees every export that nobody holds any more (see `state::Shared::settle_exports`).
pub fn settle() {
    if let Some(sh) = state::opened() {
        sh.settle_exports();
    }
}

/// A freed allocation (`key`: device pointer or VMM handle) of this process: true when its bytes
/// are this module's business (an import, host memory, or an export still imported elsewhere),
/// so the caller must not uncharge them.
pub fn freed(key: u64) -> bool {
    enum Kind {
        Import(u64),
        Host,
        Export(u64),
        Plain,
    }
    let kind = with_local(|l| {
        if let Some(id) = l.imported_handles.remove(&key) {
            Kind::Import(id)
        } else if l.host.remove(&key) || l.multicast.remove(&key).is_some() {
            Kind::Host
        } else if let Some(id) = l.exported.remove(&key) {
            l.handle_types.remove(&key);
            Kind::Export(id)
        } else {
            l.handle_types.remove(&key);
            Kind::Plain
        }
    });
    match kind {
        Kind::Import(id) => {
            remove_importer(id);
            true
        }
        Kind::Host => true,
        Kind::Plain => false,
        Kind::Export(id) => {
            let Some(s) = slot_of(id) else { return false };
            if live_importers(s) > 0 {
                s.owner_holds.store(0, Release); // Charged to us until the last import goes.
                true
            } else if s.id.compare_exchange(id, 0, AcqRel, Relaxed).is_ok() {
                false
            } else {
                true // Someone settled it at this instant and uncharged it.
            }
        }
    }
}

/// Remembers the handle types a VMM allocation may be exported as.
pub fn created(handle: u64, prop: &CUmemAllocationProp) {
    with_local(|l| l.handle_types.insert(handle, prop.requested_handle_types));
}

/// True for a location that is host memory.
pub fn on_host(prop: *const CUmemAllocationProp) -> bool {
    // SAFETY: checked for null; the caller's struct.
    !prop.is_null() && HOST_LOCATIONS.contains(unsafe { &(*prop).location.type_ })
}

/// `cuMemCreate` of host memory: a handle that maps like any other, charged to no device.
///
/// # Safety
/// `handle`: null or valid for reads and writes of one `u64`.
pub unsafe fn create_on_host(handle: *mut u64, size: usize) -> CUresult {
    if handle.is_null() || size == 0 || !(size as u64).is_multiple_of(GRANULARITY) {
        return INVALID_VALUE;
    }
    let h = new_handle();
    lock().vmm.insert(h, Vmm { dev: 0, size: size as u64, released: false, maps: 0 });
    with_local(|l| l.host.insert(h));
    // SAFETY: `handle` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *handle = h };
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Legacy IPC.

fn write_handle(out: &mut [u8], id: u64) {
    out.fill(0);
    out[..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&id.to_le_bytes());
}

fn read_handle(bytes: &[u8]) -> Option<u64> {
    (bytes.len() >= 16 && bytes[..8] == MAGIC.to_le_bytes()).then(|| u64::from_le_bytes(bytes[8..16].try_into().unwrap()))
}

/// # Safety
/// `handle`: null or valid for reads and writes of one `IpcMemHandle`.
#[no_mangle]
pub unsafe extern "C" fn cuIpcGetMemHandle(handle: *mut IpcMemHandle, dptr: CUdeviceptr) -> CUresult {
    check_init!();
    if handle.is_null() {
        return INVALID_VALUE;
    }
    let (dev, size) = {
        let d = lock();
        match d.allocs.get(&dptr) {
            Some(a) => (a.dev, a.size),
            None => return INVALID_VALUE,
        }
    };
    let existing = with_local(|l| l.exported.get(&dptr).copied());
    let id = match existing {
        Some(id) => id,
        None => {
            let Some(id) = publish(dev, size) else { return OUT_OF_MEMORY };
            with_local(|l| l.exported.insert(dptr, id));
            id
        }
    };
    // SAFETY: `handle` is not null (checked above) and the caller guarantees it points to a valid value (`# Safety`).
    unsafe { write_handle(&mut (*handle).reserved, id) };
    SUCCESS
}

/// # Safety
/// `pdptr`: null or valid for reads and writes of one `CUdeviceptr`.
#[no_mangle]
pub unsafe extern "C" fn cuIpcOpenMemHandle_v2(pdptr: *mut CUdeviceptr, handle: IpcMemHandle, _flags: c_uint) -> CUresult {
    check_init!();
    if pdptr.is_null() {
        return INVALID_VALUE;
    }
    tri!(cur_ctx(&lock()));
    let Some(id) = read_handle(&handle.reserved) else { return INVALID_VALUE };
    let Some(slot) = slot_of(id) else { return INVALID_VALUE };
    if slot.owner_pid.load(Acquire) == me() {
        return INVALID_CONTEXT; // A process cannot open its own handle.
    }
    let again = with_local(|l| {
        l.ipc_opens.get_mut(&id).map(|(va, n)| {
            *n += 1;
            *va
        })
    });
    if let Some(va) = again {
        // SAFETY: `pdptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *pdptr = va };
        return SUCCESS;
    }
    if !add_importer(slot) {
        return OUT_OF_MEMORY;
    }
    let va = new_va(slot.size.load(Acquire), GRANULARITY);
    with_local(|l| l.ipc_opens.insert(id, (va, 1)));
    // SAFETY: `pdptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *pdptr = va };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuIpcCloseMemHandle(dptr: CUdeviceptr) -> CUresult {
    check_init!();
    let closed = with_local(|l| {
        let (&id, _) = l.ipc_opens.iter().find(|(_, (va, _))| *va == dptr)?;
        let entry = l.ipc_opens.get_mut(&id)?;
        entry.1 -= 1;
        if entry.1 == 0 {
            l.ipc_opens.remove(&id);
            Some(Some(id))
        } else {
            Some(None)
        }
    });
    match closed {
        None => INVALID_VALUE,
        Some(Some(id)) => {
            remove_importer(id);
            SUCCESS
        }
        Some(None) => SUCCESS,
    }
}

// ---------------------------------------------------------------------------------------------
// VMM shareable handles.

/// # Safety
/// `out`: null or valid for a write of one `c_int` (POSIX descriptor) or of the 64 bytes of a
/// fabric handle, as `kind` says.
#[no_mangle]
pub unsafe extern "C" fn cuMemExportToShareableHandle(out: *mut c_void, handle: u64, kind: c_uint, flags: u64) -> CUresult {
    check_init!();
    if out.is_null() || flags != 0 {
        return INVALID_VALUE;
    }
    if kind != HANDLE_TYPE_POSIX_FD && kind != HANDLE_TYPE_FABRIC {
        return NOT_SUPPORTED;
    }
    let (dev, size) = match lock().vmm.get(&handle) {
        Some(v) if !v.released => (v.dev, v.size),
        _ => return INVALID_VALUE,
    };
    let (requested, imported, host) =
        with_local(|l| (l.handle_types.get(&handle).copied().unwrap_or(0), l.imported_handles.contains_key(&handle), l.host.contains(&handle)));
    if requested & kind == 0 || imported || host {
        return INVALID_VALUE; // Not created for this handle type.
    }
    let existing = with_local(|l| l.exported.get(&handle).copied());
    let id = match existing {
        Some(id) => id,
        None => {
            let Some(id) = publish(dev, size) else { return OUT_OF_MEMORY };
            with_local(|l| l.exported.insert(handle, id));
            id
        }
    };
    let mut bytes = [0u8; 64];
    write_handle(&mut bytes, id);
    if kind == HANDLE_TYPE_FABRIC {
        // SAFETY: `out` is not null (checked above) and, for a fabric handle, the caller guarantees
        // the 64 bytes of a `CUmemFabricHandle` (`# Safety`); `bytes` is a distinct local.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast::<u8>(), 64) };
        return SUCCESS;
    }
    // A file of its own (a unique inode), as a descriptor the program can pass on.
    // SAFETY: a NUL-terminated literal name; the result is a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"simcuda-export".as_ptr(), libc::MFD_CLOEXEC) };
    // SAFETY: `fd` is the memfd just made; 16 bytes are read from the 64-byte local `bytes`.
    if fd < 0 || unsafe { libc::pwrite(fd, bytes.as_ptr().cast(), 16, 0) } != 16 {
        return OUT_OF_MEMORY;
    }
    // SAFETY: `out` is not null (checked above) and, for a POSIX descriptor, the caller
    // guarantees room for an `int` (`# Safety`).
    unsafe { *out.cast::<c_int>() = fd };
    SUCCESS
}

/// # Safety
/// `handle`: null or valid for a write of one `u64`.
/// `os_handle`: for a POSIX descriptor, the descriptor itself (not dereferenced); for a fabric
/// handle, null or valid for reads of its 64 bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemImportFromShareableHandle(handle: *mut u64, os_handle: *mut c_void, kind: c_uint) -> CUresult {
    check_init!();
    if handle.is_null() {
        return INVALID_VALUE;
    }
    let mut bytes = [0u8; 64];
    match kind {
        HANDLE_TYPE_POSIX_FD => {
            let fd = os_handle as usize as c_int;
            // SAFETY: reads at most 16 bytes into the 64-byte local `bytes`; a bad descriptor is an error return.
            if unsafe { libc::pread(fd, bytes.as_mut_ptr().cast(), 16, 0) } != 16 {
                return INVALID_VALUE;
            }
        }
        // SAFETY: `os_handle` is not null and, for a fabric handle, the caller guarantees it points
        // to the 64 bytes of a `CUmemFabricHandle` (`# Safety`); `bytes` is a distinct local.
        HANDLE_TYPE_FABRIC if !os_handle.is_null() => unsafe { std::ptr::copy_nonoverlapping(os_handle.cast::<u8>(), bytes.as_mut_ptr(), 64) },
        HANDLE_TYPE_FABRIC => return INVALID_VALUE,
        _ => return NOT_SUPPORTED,
    }
    let Some(id) = read_handle(&bytes) else { return INVALID_VALUE };
    let Some(slot) = slot_of(id) else { return INVALID_VALUE };
    if !add_importer(slot) {
        return OUT_OF_MEMORY;
    }
    // Its device, as this process numbers it (the first one if it cannot see it).
    let physical_dev = slot.dev.load(Acquire);
    let dev = visible::ordinals(shared().ndev()).iter().position(|p| *p == physical_dev).unwrap_or(0) as CUdevice;
    let h = new_handle();
    lock().vmm.insert(h, Vmm { dev, size: slot.size.load(Acquire), released: false, maps: 0 });
    with_local(|l| l.imported_handles.insert(h, id));
    // SAFETY: `handle` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *handle = h };
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Peer access.

/// # Safety
/// `can`: null or valid for reads and writes of one `c_int`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceCanAccessPeer(can: *mut c_int, dev: CUdevice, peer: CUdevice) -> CUresult {
    check_init!();
    if !valid_dev(dev) || !valid_dev(peer) {
        return INVALID_DEVICE;
    }
    // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
    unsafe { tri!(put(can, c_int::from(dev != peer))) };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuCtxEnablePeerAccess(peer: Handle, flags: c_uint) -> CUresult {
    check_init!();
    if flags != 0 {
        return INVALID_VALUE;
    }
    let d = lock();
    let (ctx, dev) = tri!(cur_dev(&d));
    let peer = peer as u64;
    match d.ctxs.get(&peer) {
        Some(p) if p.active && p.dev != dev => {}
        Some(p) if p.active => return INVALID_DEVICE,
        _ => return INVALID_CONTEXT,
    }
    if with_local(|l| l.peers.insert((ctx, peer))) {
        SUCCESS
    } else {
        PEER_ACCESS_ALREADY_ENABLED
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuCtxDisablePeerAccess(peer: Handle) -> CUresult {
    check_init!();
    let ctx = tri!(cur_ctx(&lock()));
    if with_local(|l| l.peers.remove(&(ctx, peer as u64))) {
        SUCCESS
    } else {
        PEER_ACCESS_NOT_ENABLED
    }
}

fn copy_peer(dst_ctx: Handle, src_ctx: Handle) -> CUresult {
    let d = lock();
    for c in [dst_ctx as u64, src_ctx as u64] {
        if !d.ctxs.get(&c).is_some_and(|c| c.active) {
            return INVALID_CONTEXT;
        }
    }
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeer(_dst: CUdeviceptr, dst_ctx: Handle, _src: CUdeviceptr, src_ctx: Handle, _bytes: usize) -> CUresult {
    check_init!();
    copy_peer(dst_ctx, src_ctx)
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeerAsync(_dst: CUdeviceptr, dst_ctx: Handle, _src: CUdeviceptr, src_ctx: Handle, _bytes: usize, _stream: Handle) -> CUresult {
    check_init!();
    copy_peer(dst_ctx, src_ctx)
}

/// `cuMemGetAddressRange_v2`: the allocation (or IPC import) containing `dptr`.
///
/// # Safety
/// `base`: null or valid for reads and writes of one `CUdeviceptr`.
/// `size`: null or valid for reads and writes of one `usize`.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(base: *mut CUdeviceptr, size: *mut usize, dptr: CUdeviceptr) -> CUresult {
    check_init!();
    let found = {
        let d = lock();
        d.allocs.range(..=dptr).next_back().filter(|(b, a)| dptr < **b + a.size).map(|(b, a)| (*b, a.size))
    };
    let found = found.or_else(|| {
        let opens: Vec<(u64, u64)> = with_local(|l| l.ipc_opens.iter().map(|(id, (va, _))| (*id, *va)).collect());
        opens.into_iter().find_map(|(id, va)| {
            let size = slot_of(id)?.size.load(Acquire);
            (va <= dptr && dptr < va + size).then_some((va, size))
        })
    });
    let Some((b, s)) = found else { return NOT_FOUND };
    if !base.is_null() {
        // SAFETY: `base` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *base = b };
    }
    if !size.is_null() {
        // SAFETY: `size` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *size = s as usize };
    }
    SUCCESS
}

/// `cuPointerGetAttribute`: only `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL` (9), of allocations and
/// IPC imports; any other attribute is `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// `data`: null or, for the attribute served (the device ordinal), valid for a write of one `c_int`.
#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(data: *mut c_void, attribute: c_int, dptr: CUdeviceptr) -> CUresult {
    check_init!();
    if data.is_null() || attribute != 9 {
        return INVALID_VALUE;
    }
    let own = {
        let d = lock();
        d.allocs.range(..=dptr).next_back().filter(|(b, a)| dptr < **b + a.size).map(|(_, a)| a.dev)
    };
    let dev = own.or_else(|| {
        let opens: Vec<(u64, u64)> = with_local(|l| l.ipc_opens.iter().map(|(id, (va, _))| (*id, *va)).collect());
        opens.into_iter().find_map(|(id, va)| {
            let s = slot_of(id)?;
            let physical_dev = s.dev.load(Acquire);
            (va <= dptr && dptr < va + s.size.load(Acquire))
                .then(|| visible::ordinals(shared().ndev()).iter().position(|p| *p == physical_dev).map_or(-1, |o| o as c_int))
        })
    });
    match dev {
        Some(d) => {
            // SAFETY: `data` is not null (checked above) and, for the device ordinal, the caller
            // guarantees room for an `int` (`# Safety`).
            unsafe { *data.cast::<c_int>() = d };
            SUCCESS
        }
        None => INVALID_VALUE,
    }
}

/// `cuMemGetAllocationPropertiesFromHandle`: the device (as this process numbers it) and the
/// handle types of a VMM handle, imported ones included.
///
/// # Safety
/// `prop`: null or valid for a write of one `CUmemAllocationProp`.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetAllocationPropertiesFromHandle(prop: *mut CUmemAllocationProp, handle: u64) -> CUresult {
    check_init!();
    if prop.is_null() {
        return INVALID_VALUE;
    }
    let Some(dev) = lock().vmm.get(&handle).map(|v| v.dev) else { return INVALID_VALUE };
    let (host, types) = with_local(|l| (l.host.contains(&handle), l.handle_types.get(&handle).copied().unwrap_or(0)));
    // SAFETY: `prop` is not null (checked above) and the caller guarantees it points to a
    // `CUmemAllocationProp` it may write (`# Safety`); zeroed first, as the driver leaves no field unset.
    unsafe {
        std::ptr::write_bytes(prop, 0, 1);
        (*prop).type_ = 1;
        (*prop).requested_handle_types = types;
        (*prop).location = CUmemLocation { type_: if host { 2 } else { 1 }, id: if host { 0 } else { dev } };
    }
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Multicast objects (process-local: not exported to other processes here).

/// # Safety
/// `granularity`: null or valid for reads and writes of one `usize`.
#[no_mangle]
pub unsafe extern "C" fn cuMulticastGetGranularity(granularity: *mut usize, prop: *const MulticastObjectProp, option: c_uint) -> CUresult {
    check_init!();
    if prop.is_null() || option > 1 {
        return INVALID_VALUE;
    }
    // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
    unsafe { tri!(put(granularity, GRANULARITY as usize)) };
    SUCCESS
}

/// # Safety
/// `handle`: null or valid for reads and writes of one `u64`.
/// `prop`: null or points to a valid `MulticastObjectProp`.
#[no_mangle]
pub unsafe extern "C" fn cuMulticastCreate(handle: *mut u64, prop: *const MulticastObjectProp) -> CUresult {
    check_init!();
    if handle.is_null() || prop.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `prop` is not null (checked above) and the caller guarantees it points to a valid value (`# Safety`).
    let p = unsafe { &*prop };
    if p.num_devices == 0 || p.size == 0 || !(p.size as u64).is_multiple_of(GRANULARITY) || p.flags != 0 {
        return INVALID_VALUE;
    }
    let h = new_handle();
    // A VMM handle as far as cuMemRelease and cuMemMap are concerned; charged to no device.
    lock().vmm.insert(h, Vmm { dev: 0, size: p.size as u64, released: false, maps: 0 });
    with_local(|l| l.multicast.insert(h, Multicast { team: p.num_devices, size: p.size as u64, devices: Vec::new(), binds: Vec::new() }));
    // SAFETY: `handle` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *handle = h };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMulticastAddDevice(mc: u64, dev: CUdevice) -> CUresult {
    check_init!();
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    with_local(|l| match l.multicast.get_mut(&mc) {
        Some(m) if m.devices.contains(&dev) || m.devices.len() as u32 >= m.team => INVALID_VALUE,
        Some(m) => {
            m.devices.push(dev);
            SUCCESS
        }
        None => INVALID_HANDLE,
    })
}

fn bind(mc: u64, mc_offset: u64, mem: u64, size: u64) -> CUresult {
    let Some((dev, mem_size)) = lock().vmm.get(&mem).filter(|v| !v.released).map(|v| (v.dev, v.size)) else { return INVALID_HANDLE };
    with_local(|l| match l.multicast.get_mut(&mc) {
        // All of the team must have joined before memory binds (the real driver blocks).
        Some(m) if (m.devices.len() as u32) < m.team => ILLEGAL_STATE,
        Some(m) if !m.devices.contains(&dev) || size > mem_size || mc_offset + size > m.size => INVALID_VALUE,
        Some(m) => {
            m.binds.push((dev, mem, mc_offset, size));
            SUCCESS
        }
        None => INVALID_HANDLE,
    })
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMulticastBindMem(mc: u64, mc_offset: usize, mem: u64, _mem_offset: usize, size: usize, flags: u64) -> CUresult {
    check_init!();
    if flags != 0 {
        return INVALID_VALUE;
    }
    bind(mc, mc_offset as u64, mem, size as u64)
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMulticastBindAddr(mc: u64, mc_offset: usize, memptr: CUdeviceptr, size: usize, flags: u64) -> CUresult {
    check_init!();
    if flags != 0 {
        return INVALID_VALUE;
    }
    let mem = lock().mappings.get(&memptr).map(|(_, h)| *h);
    match mem {
        Some(mem) => bind(mc, mc_offset as u64, mem, size as u64),
        None => INVALID_VALUE,
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMulticastUnbind(mc: u64, dev: CUdevice, mc_offset: usize, size: usize) -> CUresult {
    check_init!();
    with_local(|l| match l.multicast.get_mut(&mc) {
        Some(m) => {
            let before = m.binds.len();
            m.binds.retain(|b| !(b.0 == dev && b.2 == mc_offset as u64 && b.3 == size as u64));
            if m.binds.len() < before {
                SUCCESS
            } else {
                INVALID_VALUE
            }
        }
        None => INVALID_HANDLE,
    })
}
