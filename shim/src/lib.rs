//! libgpuslice.so: preloaded into unmodified CUDA programs, it interposes the driver API and
//! holds each process to its device memory quota and its share of the device's time.
//!
//! Start at `entry` (how calls arrive), then `memory` (what is counted) and `budget` (how the
//! limit is enforced). LD_PRELOAD.md explains the mechanism for users; docs/ARCHITECTURE.md
//! gives the layers (docs/layers.toml) and the reading order of an allocation and a launch.
#![allow(non_snake_case)]

mod alloc_table;
mod board;
mod budget;
mod clock;
mod context;
mod cost;
mod dl;
mod driver;
mod elf_symbols;
mod entry;
mod ffi;
mod flight_cost;
mod fork;
mod guard;
mod info;
mod launch;
mod legacy;
mod link;
mod locks;
mod make_room;
mod median;
mod memory;
mod module_image;
mod modules;
mod mps;
mod nvml;
mod pids;
mod refusal_log;
mod registry;
mod runtime;
mod sched;
mod sharing;
mod slice_args;
mod slice_cost;
mod slicer;
mod throttle;
mod trampoline;

/// The shim's version as a C string, so that a program (or a test) can tell that gpuslice is
/// loaded and which one: `dlsym(RTLD_DEFAULT, "gpuslice_version")`. Declared in gpuslice.h.
#[no_mangle]
pub extern "C" fn gpuslice_version() -> *const std::ffi::c_char {
    static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}
