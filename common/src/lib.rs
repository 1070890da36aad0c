//! What the shim and the controller share: sizes, settings and their sources, the version.
//!
//! One definition serves both sides, so that `gpuslice run --memory 4GiB` and
//! `GPUSLICE_MEMORY_LIMIT=4GiB` can never disagree about what "4GiB" means.

pub mod settings;
pub mod size;

/// The version of the shim, the controller and the C header (`GPUSLICE_VERSION_STRING`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
