//! libgpuslice.so: preloaded into unmodified CUDA programs, it interposes the driver API and
//! holds each process to its device memory quota and its share of the device's time.
//!
//! The modules stand in four layers, each a folder, each importing only from itself and the
//! layers below (docs/layers.toml, checked by `make test`): `hooks` (what the program calls),
//! `policy` (what is decided), `state` (this process's accounting), `sys` (the real driver, the
//! C types, locks, the clock). Every export goes through `sys::guard`, the panic boundary.
//!
//! Reading order of an allocation (`cuMemAlloc_v2`): `hooks::registry` (how calls arrive: the
//! exports, and `dlsym` and `cuGetProcAddress` answered from its table) → `hooks::memory`
//! (`linear_hook!` → `charged`: which device, refused or not by `sys::runtime::refused`) →
//! `policy::budget` (`of`: the process's budget, attaching through `state::link` at first use;
//! `try_charge`: one compare-and-swap) → the real call (`sys::driver`, `call_real!`) →
//! `state::alloc_table` (remember the size, or give the charge back).
//!
//! Reading order of a launch (`cuLaunchKernel`): `hooks::launch` (`kernel_hook!` → `managed`:
//! anything at stake?) → `policy::sched` (priority classes) → `hooks::launch::throttled` →
//! `policy::throttle` (the share's token bucket) → `policy::board` (the device's turn between
//! throttled processes) and `policy::cost` (what a launch costs, measured with `sys::events`) →
//! the real call → `Bucket::charge`. All of them take their time from `sys::clock`.
//!
//! LD_PRELOAD.md explains the mechanism for users; docs/ARCHITECTURE.md the same two paths step
//! by step, the ledger's regions, and where to add a hook, a setting or a module.
#![allow(non_snake_case)]

mod hooks;
mod policy;
mod state;
mod sys;

/// The shim's version as a C string, so that a program (or a test) can tell that gpuslice is
/// loaded and which one: `dlsym(RTLD_DEFAULT, "gpuslice_version")`. Declared in gpuslice.h.
#[no_mangle]
pub extern "C" fn gpuslice_version() -> *const std::ffi::c_char {
    static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}
