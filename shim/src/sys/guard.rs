//! Keeps panics on our side of the FFI boundary: a bug in gpuslice becomes an error code for one
//! call, never an abort of the host program.

use crate::sys::ffi::{CuResult, CUDA_ERROR_UNKNOWN};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

thread_local! {
    /// What the latest panic on this thread said and where, for the one line `report` writes.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs a hook body inside the suspend gate (`sys::gate`: every driver call of the program
/// passes it, hooked or thunked); a panic inside becomes `CUDA_ERROR_UNKNOWN` and one error line.
#[inline(always)]
pub fn cuda(hook: &'static str, body: impl FnOnce() -> CuResult) -> CuResult {
    let _inside = crate::sys::gate::enter();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(code) => code,
        Err(_) => {
            report(hook, "CUDA_ERROR_UNKNOWN");
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
            report(hook, "its error code");
            fallback
        }
    }
}

/// Replaces the default panic output (several lines on the host program's stderr, whatever
/// `GPUSLICE_LOG_FILE` says) with a note kept for `report`'s single log line. The hook belongs
/// to the shim's own copy of the standard library: a Rust host program keeps its own.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(format!("{message}{place}")));
    }));
}

#[cold]
fn report(hook: &'static str, returned: &str) {
    // Logging itself must not be able to panic out of here.
    let _ = catch_unwind(|| {
        let why = LAST_PANIC.try_with(|p| p.borrow_mut().take()).ok().flatten().unwrap_or_else(|| "see the panic message above".into());
        tracing::error!("internal error in gpuslice's {hook} hook (panicked: {why}); the call returned {returned} instead (a gpuslice bug; please report it)");
    });
}

/// The hook name (or `hook:stage`) that must panic, for tests of the FFI boundary: set once by
/// `sys::runtime` from `GPUSLICE_TEST_PANIC_IN` when it reads the settings; unset in real use.
static TEST_PANIC: OnceLock<String> = OnceLock::new();

/// Arms the forced panics of [`test_panic_point`] and [`test_panic_stage`] (once per process).
pub fn arm_test_panics(hook: String) {
    let _ = TEST_PANIC.set(hook);
}

/// Forces a panic inside `hook` when the test knob `GPUSLICE_TEST_PANIC_IN` names it, so that
/// tests can prove the boundary holds. Costs one load when unset; placed in allocation, free
/// and start-up hooks only, never on the launch path.
#[inline(always)]
pub fn test_panic_point(hook: &'static str) {
    if let Some(name) = TEST_PANIC.get() {
        if name == hook {
            panic!("GPUSLICE_TEST_PANIC_IN={hook}: forced panic");
        }
    }
}

/// The same at a named stage of `hook`: armed by `GPUSLICE_TEST_PANIC_IN=<hook>:<stage>`.
#[inline(always)]
pub fn test_panic_stage(hook: &'static str, stage: &'static str) {
    if let Some(name) = TEST_PANIC.get() {
        if name.strip_suffix(stage).and_then(|n| n.strip_suffix(':')) == Some(hook) {
            panic!("GPUSLICE_TEST_PANIC_IN={hook}:{stage}: forced panic");
        }
    }
}
