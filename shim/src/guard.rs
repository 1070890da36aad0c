//! Keeps panics on our side of the FFI boundary: a bug in gpuslice becomes an error code for one
//! call, never an abort of the host program.

use crate::ffi::{CuResult, CUDA_ERROR_UNKNOWN};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs a hook body; a panic inside becomes `CUDA_ERROR_UNKNOWN` and one error line.
#[inline(always)]
pub fn cuda(hook: &'static str, body: impl FnOnce() -> CuResult) -> CuResult {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(code) => code,
        Err(_) => {
            report(hook);
            CUDA_ERROR_UNKNOWN
        }
    }
}

/// Like [`cuda`] for hooks that return something else (NVML codes, pointers): `fallback` is
/// what the host program sees if the body panics.
#[inline(always)]
pub fn with_fallback<T>(hook: &'static str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(_) => {
            report(hook);
            fallback
        }
    }
}

#[cold]
fn report(hook: &'static str) {
    // Logging itself must not be able to panic out of here.
    let _ = catch_unwind(|| {
        tracing::error!(
            "internal error in gpuslice's {hook} hook (a gpuslice bug; please report it): the call returned an error code instead"
        );
    });
}

/// Forces a panic inside `hook` when the test knob `GPUSLICE_TEST_PANIC_IN` names it, so that
/// tests can prove the boundary holds. Costs one relaxed load when unset.
#[inline(always)]
pub fn test_panic_point(hook: &'static str) {
    if let Some(name) = crate::runtime::test_panic_hook() {
        if name == hook {
            panic!("GPUSLICE_TEST_PANIC_IN={hook}: forced panic");
        }
    }
}
