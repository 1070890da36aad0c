//! The driver's entry points that hand out nothing from the table: `cuInit` (the settings, the
//! link to the controller, MPS) and `cuGetExportTable` (the driver's private tables). How a
//! program looks driver functions up (`dlsym`, `cuGetProcAddress`) is `registry`'s.

use crate::sys::driver::call_real;
use crate::sys::ffi::*;
use crate::{sys::guard, sys::runtime};
use std::ffi::{c_uint, c_void};

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
