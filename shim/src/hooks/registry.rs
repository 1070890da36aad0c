//! The one table of what the shim interposes (each exported name and its wrapper), and the
//! calls through which a program looks driver functions up, each answered from the table:
//! `dlsym`, `dlvsym`, `cuGetProcAddress` and `cuGetProcAddress_v2`.
//!
//! cudart `dlsym`s only `cuGetProcAddress_v2`, asks it for `"cuGetProcAddress"`, and resolves
//! everything else through the answer; PyTorch also `dlsym`s driver functions by name; `-lcuda`
//! programs bind to the exported symbols. All three end up at the same wrappers.
//!
//! The `dlsym` hook looks names up here; the `cuGetProcAddress` hooks look up the *address* the
//! real driver handed out, which works because the driver returns the very addresses of its
//! exported versioned symbols (checked on the H100/H200, see docs/NOTES.md). So whatever version
//! the driver picks for a caller's `cudaVersion` and flags, the wrapper of exactly that ABI
//! replaces it, and a version the shim has no wrapper for is passed through untouched.

use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::sys::{dl, guard, runtime};
use crate::{
    hooks::context, hooks::entry, hooks::gate, hooks::info, hooks::launch, hooks::legacy, hooks::memory, hooks::modules, hooks::nvml, hooks::sharing,
    hooks::vmm,
};
use once_cell::sync::OnceCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};

/// An exported name (with its NUL) and the wrapper behind it.
pub struct Hook {
    pub name: &'static CStr,
    pub wrapper: *const (),
}

// SAFETY: code addresses, immutable for the life of the process.
unsafe impl Sync for Hook {}

macro_rules! hooks {
    ($( $module:ident :: $name:ident ),* $(,)?) => {
        pub static HOOKS: &[Hook] = &[
            $( Hook {
                // SAFETY: a literal with exactly one trailing NUL.
                name: unsafe { CStr::from_bytes_with_nul_unchecked(concat!(stringify!($name), "\0").as_bytes()) },
                wrapper: $module::$name as *const (),
            }, )*
        ];
    };
}

hooks! {
    entry::cuInit,
    self::cuGetProcAddress,
    self::cuGetProcAddress_v2,
    entry::cuGetExportTable,
    memory::cuMemAlloc_v2,
    memory::cuMemAllocPitch_v2,
    memory::cuMemAllocManaged,
    memory::cuMemAllocAsync,
    memory::cuMemAllocAsync_ptsz,
    memory::cuMemAllocFromPoolAsync,
    memory::cuMemAllocFromPoolAsync_ptsz,
    memory::cuMemFree_v2,
    memory::cuMemFreeAsync,
    memory::cuMemFreeAsync_ptsz,
    memory::cuMemCreate,
    memory::cuMemRelease,
    memory::cuArrayCreate_v2,
    memory::cuArray3DCreate_v2,
    memory::cuMipmappedArrayCreate,
    memory::cuArrayDestroy,
    memory::cuMipmappedArrayDestroy,
    info::cuMemGetInfo_v2,
    info::cuDeviceTotalMem_v2,
    context::cuDevicePrimaryCtxRetain,
    context::cuDevicePrimaryCtxRelease_v2,
    context::cuDevicePrimaryCtxReset_v2,
    context::cuCtxCreate_v2,
    context::cuCtxCreate_v3,
    context::cuCtxCreate_v4,
    context::cuCtxDestroy_v2,
    launch::cuLaunchKernel,
    launch::cuLaunchKernel_ptsz,
    launch::cuLaunchKernelEx,
    launch::cuLaunchKernelEx_ptsz,
    launch::cuLaunchCooperativeKernel,
    launch::cuLaunchCooperativeKernel_ptsz,
    launch::cuGraphLaunch,
    launch::cuGraphLaunch_ptsz,
    modules::cuModuleLoad,
    modules::cuModuleLoadData,
    modules::cuModuleLoadDataEx,
    modules::cuModuleLoadFatBinary,
    modules::cuModuleUnload,
    modules::cuLibraryLoadData,
    modules::cuLibraryLoadFromFile,
    modules::cuLibraryUnload,
    legacy::cuMemAlloc,
    legacy::cuMemAllocPitch,
    legacy::cuMemFree,
    legacy::cuMemGetInfo,
    legacy::cuDeviceTotalMem,
    legacy::cuArrayCreate,
    legacy::cuArray3DCreate,
    context::cuCtxCreate,
    context::cuCtxDestroy,
    context::cuDevicePrimaryCtxRelease,
    context::cuDevicePrimaryCtxReset,
    nvml::nvmlDeviceGetMemoryInfo,
    nvml::nvmlDeviceGetMemoryInfo_v2,
    nvml::nvmlDeviceGetCount,
    nvml::nvmlDeviceGetCount_v2,
    nvml::nvmlDeviceGetHandleByIndex,
    nvml::nvmlDeviceGetHandleByIndex_v2,
    nvml::nvmlDeviceGetHandleByUUID,
    nvml::nvmlDeviceGetHandleByPciBusId,
    nvml::nvmlDeviceGetHandleByPciBusId_v2,
    nvml::nvmlDeviceGetHandleBySerial,
    nvml::nvmlDeviceGetIndex,
    nvml::nvmlDeviceGetComputeRunningProcesses,
    nvml::nvmlDeviceGetComputeRunningProcesses_v2,
    nvml::nvmlDeviceGetComputeRunningProcesses_v3,
    nvml::nvmlDeviceGetGraphicsRunningProcesses,
    nvml::nvmlDeviceGetGraphicsRunningProcesses_v2,
    nvml::nvmlDeviceGetGraphicsRunningProcesses_v3,
    nvml::nvmlDeviceGetMPSComputeRunningProcesses,
    nvml::nvmlDeviceGetMPSComputeRunningProcesses_v2,
    nvml::nvmlDeviceGetMPSComputeRunningProcesses_v3,
    nvml::nvmlDeviceGetRunningProcessDetailList,
    nvml::nvmlInternalGetExportTable,
    nvml::nvmlDeviceGetUtilizationRates,
    nvml::nvmlDeviceGetProcessUtilization,
    sharing::cuIpcGetMemHandle,
    vmm::cuMemGetAddressRange_v2,
    sharing::cuIpcOpenMemHandle_v2,
    sharing::cuIpcCloseMemHandle,
    sharing::cuMemExportToShareableHandle,
    sharing::cuMemImportFromShareableHandle,
    sharing::cuMemMap,
}

/// The wrapper exported under `name`, if the shim interposes it.
#[inline]
pub fn wrapper_for_name(name: &[u8]) -> Option<*mut c_void> {
    // Nearly every dlsym in a process is for something else: reject those on two bytes.
    if !(name.starts_with(b"cu") || name.starts_with(b"nvml")) {
        return None;
    }
    HOOKS.iter().find(|h| h.name.to_bytes() == name).map(|h| h.wrapper as *mut c_void)
}

/// What `dlsym` hands out for `name` when the lookup found `found`: the hook's wrapper, else
/// the gate thunk when `found` is the driver's function of that name or our own thunk (found
/// through the global scope; then null if the driver lacks the function, as the lookup would
/// have said without the shim), else `found` (a same-named function of another library stays
/// its own); a driver function the table lacks gets a spare thunk (`outside_the_table`).
pub fn for_dlsym(name: &[u8], found: *mut c_void) -> *mut c_void {
    if let Some(wrapper) = wrapper_for_name(name) {
        return wrapper;
    }
    if !name.starts_with(b"cu") {
        return found;
    }
    if let Some((thunk, real)) = gate::thunk_for_name(name) {
        if found == thunk {
            return if real.is_some() { thunk } else { std::ptr::null_mut() };
        }
        if real == Some(found as usize) {
            return thunk;
        }
        return found;
    }
    if in_driver(found) {
        return outside_the_table(name, found);
    }
    found
}

/// A driver function the thunk table lacks: a spare thunk for it, else (every spare taken) the
/// function itself, counted as a hole in the gate.
fn outside_the_table(name: &[u8], real: *mut c_void) -> *mut c_void {
    if let Some(spare) = gate::spare_for(real) {
        tracing::debug!("driver function {} is outside CUDA 13.0's table: a spare suspend-gate thunk passes it", String::from_utf8_lossy(name));
        return spare;
    }
    crate::sys::gate::note_unknown_name(&String::from_utf8_lossy(name));
    real
}

/// What `cuGetProcAddress` hands out for the real address `real` it found for `symbol`.
pub fn for_proc_address(symbol: &[u8], real: *mut c_void) -> *mut c_void {
    if let Some(wrapper) = wrapper_for_real(real) {
        return wrapper;
    }
    if let Some(thunk) = gate::thunk_for_real(real) {
        return thunk;
    }
    outside_the_table(symbol, real)
}

/// Whether `address` lies in the real driver's library.
fn in_driver(address: *mut c_void) -> bool {
    let Some(d) = driver() else { return false };
    let base = |a: *const c_void| {
        // SAFETY: Dl_info is plain C data (pointers and integers): all zeroes is a valid value.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr only reads the loader's tables and writes `info`, a local.
        let found = unsafe { libc::dladdr(a, &mut info) } != 0;
        found.then_some(info.dli_fbase as usize)
    };
    let anchor = d.symbol(c"cuInit");
    !anchor.is_null() && base(anchor).is_some() && base(anchor) == base(address)
}

static BY_REAL_ADDRESS: OnceCell<HashMap<usize, usize>> = OnceCell::new();

/// The wrapper for a real driver address handed out by `cuGetProcAddress`, if it is one.
pub fn wrapper_for_real(address: *mut c_void) -> Option<*mut c_void> {
    let map = BY_REAL_ADDRESS.get_or_init(|| {
        let Some(d) = driver() else { return HashMap::new() };
        HOOKS
            .iter()
            .filter_map(|h| {
                let real = d.symbol(h.name);
                (!real.is_null()).then_some((real as usize, h.wrapper as usize))
            })
            .collect()
    });
    map.get(&(address as usize)).map(|&w| w as *mut c_void)
}

/// The Rust half of the exported `dlsym` (the trampoline has already handled `RTLD_NEXT`).
///
/// # Safety
/// `handle` and `name` are what the program passed `dlsym`: a handle from `dlopen` (or a
/// pseudo-handle such as `RTLD_DEFAULT`), and null or a NUL-terminated symbol name.
pub unsafe fn dlsym_hook(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let real = dl::real_dlsym();
    // SAFETY: forwarding the caller's own arguments.
    let found = unsafe { real(handle, name) };
    if found.is_null() || name.is_null() {
        return found;
    }
    guard::with_fallback("dlsym", found, || {
        // SAFETY: dlsym's name is a C string, and the real dlsym just accepted it.
        let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
        for_dlsym(bytes, found)
    })
}

/// The Rust half of the exported `dlvsym` (the trampoline has already handled `RTLD_NEXT`):
/// a versioned lookup of a driver function gets the wrapper just as `dlsym` does (libcuda's
/// symbols carry no version, so any version string finds them).
///
/// # Safety
/// `handle`, `name` and `version` are what the program passed `dlvsym`: a handle from `dlopen`
/// (or a pseudo-handle), and null or NUL-terminated name and version strings.
pub unsafe fn dlvsym_hook(handle: *mut c_void, name: *const c_char, version: *const c_char) -> *mut c_void {
    let real = dl::real_dlvsym();
    // SAFETY: forwarding the caller's own arguments.
    let found = unsafe { real(handle, name, version) };
    if found.is_null() || name.is_null() {
        return found;
    }
    guard::with_fallback("dlvsym", found, || {
        // SAFETY: dlvsym's name is a C string, and the real dlvsym just accepted it.
        let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
        for_dlsym(bytes, found)
    })
}

/// Replaces a real driver function in `*pfn` with its wrapper or its gate thunk.
fn substitute(code: CuResult, symbol: *const c_char, pfn: *mut *mut c_void) -> CuResult {
    if code == CUDA_SUCCESS && !pfn.is_null() {
        // SAFETY: the driver just wrote the pointer.
        let real = unsafe { *pfn };
        if !real.is_null() {
            // SAFETY: the driver accepted `symbol` as a C string (it found it).
            let name = if symbol.is_null() { &b"?"[..] } else { unsafe { CStr::from_ptr(symbol) }.to_bytes() };
            // SAFETY: `pfn` is non-null (checked above) and the driver just wrote through it, so it is a valid, writable `void*` slot.
            unsafe { *pfn = for_proc_address(name, real) };
        }
    }
    code
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(symbol: *const c_char, pfn: *mut *mut c_void, cuda_version: c_int, flags: u64, status: *mut c_int) -> CuResult {
    guard::cuda("cuGetProcAddress_v2", || {
        runtime::runtime(); // The first CUDA call: report bad settings now.
        substitute(call_real!(cuGetProcAddress_v2(symbol, pfn, cuda_version, flags, status)), symbol, pfn)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(symbol: *const c_char, pfn: *mut *mut c_void, cuda_version: c_int, flags: u64) -> CuResult {
    guard::cuda("cuGetProcAddress", || {
        runtime::runtime();
        substitute(call_real!(cuGetProcAddress(symbol, pfn, cuda_version, flags)), symbol, pfn)
    })
}
