//! How a program gets into the driver, and so into the shim: `dlsym`, `cuGetProcAddress` and
//! `cuGetProcAddress_v2`, and `cuInit`.
//!
//! cudart `dlsym`s only `cuGetProcAddress_v2`, asks it for `"cuGetProcAddress"`, and resolves
//! everything else through the answer; PyTorch also `dlsym`s driver functions by name; `-lcuda`
//! programs bind to the exported symbols. All three end up at the same wrappers.

use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use crate::{hooks::registry, sys::dl, sys::guard, sys::runtime};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

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
        registry::for_dlsym(bytes, found)
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
        registry::for_dlsym(bytes, found)
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
            unsafe { *pfn = registry::for_proc_address(name, real) };
        }
    }
    code
}

/// The driver's private tables (the runtime's module registration, lazy loading, ...): calls
/// through them bypass every thunk, so the process stops being fast-suspendable
/// (`sys::gate::fast_suspendable`; the known hole, docs/NOTES.md "The gate").
#[no_mangle]
pub unsafe extern "C" fn cuGetExportTable(table: *mut *const c_void, id: *const c_void) -> CuResult {
    guard::cuda("cuGetExportTable", || {
        crate::sys::gate::note_export_table();
        call_real!(cuGetExportTable(table, id))
    })
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

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CuResult {
    guard::cuda("cuInit", || {
        // What the layers below take from above, before the link attaches: the fork handlers'
        // order (installed at attach) and the turn board's per-user page (for a process alone).
        crate::hooks::fork::register();
        crate::sys::gate::init();
        crate::state::link::set_user_sched(crate::policy::board::sched);
        // Refused for want of a controller: a new cuInit waits for it again.
        crate::state::link::retry_after_refusal();
        if runtime::refused() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        guard::test_panic_point("cuInit");
        if let Ok(settings) = &runtime::runtime().settings {
            crate::policy::mps::before_init(settings);
        }
        let mut code = call_real!(cuInit(flags));
        // Sent to a GPU's MPS daemon that then failed it: once more, time-sliced.
        if crate::policy::mps_pipe::retry_without_daemon(code) {
            code = call_real!(cuInit(flags));
        }
        if code == CUDA_SUCCESS {
            // Register with the controller (or set up alone) now, before any allocation.
            let _ = crate::state::link::get_or_attach();
            if runtime::no_controller() {
                return crate::state::link::CUDA_ERROR_NOT_PERMITTED;
            }
        }
        code
    })
}
