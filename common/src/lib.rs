//! What the shim and the controller share: sizes, settings and their sources, the ledger's
//! layout, the wire protocol, the version.
//!
//! One definition serves both sides, so that `gpuslice run --memory 4GiB` and
//! `GPUSLICE_MEMORY_LIMIT=4GiB` can never disagree about what "4GiB" means, and the controller
//! and the shim can never disagree about where a counter lives in the ledger.

pub mod ledger;
pub mod mps_table;
pub mod protocol;
pub mod settings;
pub mod size;
pub mod turns;

/// The version of the shim, the controller and the C header (`GPUSLICE_VERSION_STRING`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
