//! Module and library loads: the device memory the driver takes for a module's code and its
//! `__device__` data, measured around the load and charged to the quota like an allocation.
//!
//! No argument of `cuModuleLoad*` / `cuLibraryLoad*` says how many bytes the driver will take
//! (a 256 MiB `__device__` array is one line of the image), so the hook measures before and
//! after the load: NVML's figure for this process when NVML lists it (other processes cannot
//! move it), else the device's real free memory (`cuMemGetInfo_v2` of the real driver), less
//! what this process's own allocations moved in between. A load that does not fit is unloaded again
//! and refused with `CUDA_ERROR_OUT_OF_MEMORY`; an unload gives the bytes back.
//!
//! Loads of one process are measured one at a time (a lock: loads are rare and slow anyway), so
//! two loads never count each other's bytes. Allocations and frees of other threads are not
//! serialised (that would put a lock on the hot path): each reading is taken at a moment when
//! none of them is half done (`charge::quiet_mark_but`, as `charge::true_up` does), and what
//! they completed between the readings is taken out through the tracking tables. Without NVML's
//! per-process figure (another pid namespace), what another process allocates or frees during
//! the few milliseconds of a load moves the measurement by that much (the residual race; the
//! controller's NVML cross-check bounds it, see LD_PRELOAD.md).
//!
//! Before the load, the image's declared `__device__` data is read (`module_image`: a cubin's
//! `.nv.global*` sections, PTX `.global` arrays) and reserved: a load that cannot fit is refused
//! without touching the device, and the charge is the larger of the declared and the measured
//! bytes, so data the driver places lazily is counted from the load on.
//!
//! A low-priority process's PTX is sliced on the way (`slicer`): the driver gets the sliced text
//! in place of the program's image (a fat binary's PTX entry, a `.ptx` file, PTX in memory), the
//! charge is measured around that load as around any other, and the module is remembered so that
//! its kernels' launches carry the slice parameter. Libraries are loaded as they are.
//!
//! Lazy loading (`CUDA_MODULE_LOADING=LAZY`, the default since CUDA 12.2) defers loading a
//! module's *kernels* to `cuModuleGetFunction`; its data segments (the `__device__` arrays) are
//! placed by `cuModuleLoad*` itself (on the H200 the ten 256 MiB loads took their memory
//! at load time under the default mode). Kernel code loaded later, and a *library* loaded with no
//! current context or lazily into a context at its first launch, is not measured here: it is
//! caught by the re-measurement near the limit (`charge::true_up`, NVML's per-process figure)
//! and by the controller's cross-check.

use crate::hooks::charge::{self, Operation, LIBRARIES, MODULES};
use crate::policy::budget;
use crate::policy::slicer::{self, Sliced};
use crate::state::alloc_table::{AllocTable, Entry};
use crate::sys::driver::{call_real, driver};
use crate::sys::ffi::*;
use crate::sys::real_nvml::nvml;
use crate::{policy::module_image, sys::guard, sys::locks, sys::runtime};
use gpuslice_common::size::format_size;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::Mutex;

/// `CUmodule` and `CUlibrary`: opaque driver handles.
type CUmodule = *mut c_void;
type CUlibrary = *mut c_void;

/// One load measured at a time in this process.
static LOADING: Mutex<()> = Mutex::new(());

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders it before `charge`: a
/// load holds `LOADING` while it reads and writes the tables).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: hold_for_fork, in_child: crate::sys::atfork::nothing_to_forget };

fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    h.take(&LOADING, |_| {});
}

/// One reading around a load: what NVML says this process holds on the device (exact, when
/// NVML lists it), the device's real free bytes, and what the process's allocations hold.
struct Snapshot {
    process: Option<u64>,
    free: Option<u64>,
    tracked: u64,
}

fn read(device: CUdevice) -> Snapshot {
    let process = nvml().and_then(|nv| nv.process_used(device)).map(|p| p.unwrap_or(0));
    let (mut free, mut total) = (0usize, 0usize);
    let free = (call_real!(cuMemGetInfo_v2(&mut free, &mut total)) == CUDA_SUCCESS).then_some(free as u64);
    Snapshot { process, free, tracked: charge::tracked_bytes(device) }
}

/// A reading taken while no other allocation or free of this process is half done (the load's
/// own operation is the one under way): an allocation the driver has made and the tables not
/// yet recorded would otherwise count as the module's. Retried for up to 50 ms; a process that
/// never pauses gets the last reading.
fn snapshot(device: CUdevice) -> Snapshot {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(50);
    loop {
        if let Some(mark) = charge::quiet_mark_but(1) {
            let s = read(device);
            if charge::quiet_mark_but(1) == Some(mark) {
                return s;
            }
        }
        if std::time::Instant::now() > deadline {
            return read(device);
        }
        std::thread::yield_now();
    }
}

/// What a load took: the growth of NVML's figure for this process when it has one before and
/// after (other processes cannot move it), else the drop in the device's free memory (which
/// they can: the residual race); less the growth of this process's own allocations meanwhile.
fn measure(before: &Snapshot, after: &Snapshot) -> u64 {
    let allocated = after.tracked as i128 - before.tracked as i128;
    match (before.process, after.process, before.free, after.free) {
        (Some(b), Some(a), _, _) => load_delta(a as i128 - b as i128, allocated),
        (_, _, Some(b), Some(a)) => load_delta(b as i128 - a as i128, allocated),
        _ => 0,
    }
}

/// The bytes a load took, from the growth of what was held (`grew`) less the growth of this
/// process's own allocations in between (a free in between adds back); never negative.
pub fn load_delta(grew: i128, allocated: i128) -> u64 {
    (grew - allocated).clamp(0, u64::MAX as i128) as u64
}

/// Runs `load`, measures it, and charges what it took (at least what the image declares);
/// refuses without loading when the declared bytes do not fit, and unloads and refuses when
/// the measured ones do not. `load` returns the driver's code and writes the handle.
fn measured(
    table: &AllocTable,
    what: &'static str,
    handle_out: *mut *mut c_void,
    declared: impl FnOnce() -> u64,
    load: impl FnOnce() -> CuResult,
    unload: impl FnOnce(*mut c_void) -> CuResult,
) -> CuResult {
    if runtime::refused() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let device = driver().and_then(|d| d.current_device());
    let Some((device, budget)) = device.and_then(|d| Some((d, budget::of(d)?))) else { return load() };
    let declared = declared();
    let _serial = locks::lock(&LOADING);
    let _op = Operation::begin();
    if let Err(refusal) = budget.try_charge(declared) {
        charge::report_refusal(what, device, declared, refusal);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let before = snapshot(device);
    let code = load();
    if code != CUDA_SUCCESS || handle_out.is_null() {
        budget.uncharge(declared);
        return code;
    }
    // SAFETY: the driver just wrote the handle.
    let handle = unsafe { *handle_out };
    let measured = measure(&before, &snapshot(device));
    // The declared bytes stay charged even when the driver has not placed them yet (lazy).
    let bytes = measured.max(declared);
    match budget.try_charge(bytes - declared) {
        Ok(()) => {
            table.insert(handle as u64, Entry { device, bytes });
            if bytes > 0 {
                tracing::debug!("{what} on device {device} took {} ({bytes} B); counted against the quota", format_size(bytes));
            }
            code
        }
        Err(refusal) => {
            budget.uncharge(declared);
            let undone = unload(handle);
            // SAFETY: the caller's out-pointer; the handle it held is no longer valid.
            unsafe { *handle_out = std::ptr::null_mut() };
            charge::report_refusal(what, device, bytes, refusal);
            if undone != CUDA_SUCCESS {
                tracing::warn!("{what}: unloading the refused load failed with CUresult {undone}; the driver may still hold its memory");
            }
            CUDA_ERROR_OUT_OF_MEMORY
        }
    }
}

/// A module load, with the sliced PTX in place of the program's image when there is one: `load`
/// gets the image to pass (the program's, or the sliced text, which then goes through
/// `cuModuleLoadData` or `cuModuleLoadDataEx` as `load` decides).
fn module_load(
    what: &'static str,
    module: *mut CUmodule,
    sliced: Option<Sliced>,
    declared: impl FnOnce() -> u64,
    load: impl FnOnce(Option<*const c_void>) -> CuResult,
) -> CuResult {
    let image = sliced.as_ref().map(|s| s.ptx.as_ptr().cast::<c_void>());
    let code = measured(&MODULES, what, module, declared, || load(image), module_unload);
    if let (CUDA_SUCCESS, Some(sliced)) = (code, sliced) {
        // SAFETY: the load succeeded and wrote the handle (`measured` checked the pointer).
        slicer::remember(unsafe { *module }, sliced);
    }
    code
}

fn module_unload(m: *mut c_void) -> CuResult {
    call_real!(cuModuleUnload(m))
}

fn library_unload(l: *mut c_void) -> CuResult {
    call_real!(cuLibraryUnload(l))
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(module: *mut CUmodule, fname: *const c_char) -> CuResult {
    guard::cuda("cuModuleLoad", || {
        // SAFETY: `fname` is non-null (checked) and, by cuModuleLoad's contract, a NUL-terminated path.
        let declared = || if fname.is_null() { 0 } else { module_image::declared_in_file(unsafe { CStr::from_ptr(fname) }) };
        // SAFETY: as above.
        let sliced = if fname.is_null() { None } else { slicer::for_file(unsafe { CStr::from_ptr(fname) }, "cuModuleLoad") };
        module_load("cuModuleLoad", module, sliced, declared, |sliced| match sliced {
            Some(image) => call_real!(cuModuleLoadData(module, image)),
            None => call_real!(cuModuleLoad(module, fname)),
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CuResult {
    guard::cuda("cuModuleLoadData", || {
        // SAFETY: `image` is the program's cuModuleLoadData argument: null (handled), a complete cubin or NUL-terminated PTX, as declared_in_memory requires.
        let declared = || unsafe { module_image::declared_in_memory(image.cast()) };
        // SAFETY: as above.
        let sliced = unsafe { slicer::for_image(image, "cuModuleLoadData") };
        module_load("cuModuleLoadData", module, sliced, declared, |sliced| call_real!(cuModuleLoadData(module, sliced.unwrap_or(image))))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut CUmodule,
    image: *const c_void,
    num_options: c_uint,
    options: *mut c_int,
    option_values: *mut *mut c_void,
) -> CuResult {
    guard::cuda("cuModuleLoadDataEx", || {
        // SAFETY: `image` is the program's cuModuleLoadDataEx argument: null (handled), a complete cubin, fat binary or NUL-terminated PTX.
        let sliced = unsafe { slicer::for_image(image, "cuModuleLoadDataEx") };
        module_load(
            "cuModuleLoadDataEx",
            module,
            sliced,
            // SAFETY: as above, what declared_in_memory requires.
            || unsafe { module_image::declared_in_memory(image.cast()) },
            |sliced| call_real!(cuModuleLoadDataEx(module, sliced.unwrap_or(image), num_options, options, option_values)),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadFatBinary(module: *mut CUmodule, fat_cubin: *const c_void) -> CuResult {
    guard::cuda("cuModuleLoadFatBinary", || {
        // SAFETY: `fat_cubin` is the program's fat binary (or its runtime wrapper), or null (handled).
        let sliced = unsafe { slicer::for_image(fat_cubin, "cuModuleLoadFatBinary") };
        module_load(
            "cuModuleLoadFatBinary",
            module,
            sliced,
            || 0,
            |sliced| match sliced {
                Some(image) => call_real!(cuModuleLoadData(module, image)),
                None => call_real!(cuModuleLoadFatBinary(module, fat_cubin)),
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(module: CUmodule) -> CuResult {
    guard::cuda("cuModuleUnload", || {
        let code = charge::released(&MODULES, module as u64, || call_real!(cuModuleUnload(module)));
        if code == CUDA_SUCCESS {
            slicer::forget(module);
        }
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadData(
    library: *mut CUlibrary,
    code: *const c_void,
    jit_options: *mut c_int,
    jit_option_values: *mut *mut c_void,
    num_jit_options: c_uint,
    library_options: *mut c_int,
    library_option_values: *mut *mut c_void,
    num_library_options: c_uint,
) -> CuResult {
    guard::cuda("cuLibraryLoadData", || {
        // SAFETY: `code` is the program's cuLibraryLoadData argument: null (handled), a cubin, fat binary or NUL-terminated PTX.
        unsafe { slicer::note_library(code, "cuLibraryLoadData") };
        measured(
            &LIBRARIES,
            "cuLibraryLoadData",
            library,
            // SAFETY: `code` is the program's cuLibraryLoadData argument: null (handled), a complete cubin or NUL-terminated PTX, as declared_in_memory requires.
            || unsafe { module_image::declared_in_memory(code.cast()) },
            || {
                call_real!(cuLibraryLoadData(
                    library,
                    code,
                    jit_options,
                    jit_option_values,
                    num_jit_options,
                    library_options,
                    library_option_values,
                    num_library_options
                ))
            },
            library_unload,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadFromFile(
    library: *mut CUlibrary,
    file_name: *const c_char,
    jit_options: *mut c_int,
    jit_option_values: *mut *mut c_void,
    num_jit_options: c_uint,
    library_options: *mut c_int,
    library_option_values: *mut *mut c_void,
    num_library_options: c_uint,
) -> CuResult {
    guard::cuda("cuLibraryLoadFromFile", || {
        measured(
            &LIBRARIES,
            "cuLibraryLoadFromFile",
            library,
            // SAFETY: `file_name` is non-null (checked) and, by cuLibraryLoadFromFile's contract, a NUL-terminated path.
            || if file_name.is_null() { 0 } else { module_image::declared_in_file(unsafe { CStr::from_ptr(file_name) }) },
            || {
                call_real!(cuLibraryLoadFromFile(
                    library,
                    file_name,
                    jit_options,
                    jit_option_values,
                    num_jit_options,
                    library_options,
                    library_option_values,
                    num_library_options
                ))
            },
            library_unload,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLibraryUnload(library: CUlibrary) -> CuResult {
    guard::cuda("cuLibraryUnload", || charge::released(&LIBRARIES, library as u64, || call_real!(cuLibraryUnload(library))))
}

#[cfg(test)]
mod tests {
    use super::{measure, Snapshot};

    fn at(process: Option<u64>, free: Option<u64>, tracked: u64) -> Snapshot {
        Snapshot { process, free, tracked }
    }

    #[test]
    fn a_load_is_what_was_taken_less_own_allocations() {
        const G: u64 = 1 << 30;
        const M: u64 = 1 << 20;
        // A 256 MiB module, nothing else moved: NVML's figure, or the free memory.
        assert_eq!(measure(&at(Some(G), Some(10 * G), 0), &at(Some(G + 256 * M), Some(10 * G - 256 * M), 0)), 256 * M);
        assert_eq!(measure(&at(None, Some(10 * G), 0), &at(None, Some(10 * G - 256 * M), 0)), 256 * M);
        // Another process allocated 3 MiB meanwhile: NVML's per-process figure does not see it.
        assert_eq!(measure(&at(Some(G), Some(10 * G), 0), &at(Some(G + 256 * M), Some(10 * G - 259 * M), 0)), 256 * M);
        // Another thread allocated 64 MiB meanwhile: not the module's.
        assert_eq!(measure(&at(None, Some(10 * G), M), &at(None, Some(10 * G - 320 * M), 65 * M)), 256 * M);
        // Another thread freed 64 MiB meanwhile: free memory dropped by less than the module.
        assert_eq!(measure(&at(Some(G), None, 64 * M), &at(Some(G + 192 * M), None, 0)), 256 * M);
        // Another process freed more than the module took: never negative.
        assert_eq!(measure(&at(None, Some(G), 0), &at(None, Some(2 * G), 0)), 0);
        // Nothing to measure with.
        assert_eq!(measure(&at(None, None, 0), &at(None, None, 0)), 0);
    }
}
