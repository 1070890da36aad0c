//! PTX slicing: parse the PTX text `nvcc -ptx` emits, rewrite each kernel so that one grid can run as
//! several sub-grid launches that still see the original `blockIdx`/`gridDim`, plan those launches,
//! and cache the rewritten module on disk.
//!
//! Layers, bottom up: [`lex`] (tokens that keep their whitespace and comments), [`syntax`] (the
//! statement tree; printing it gives the input back byte for byte), [`params`] (a kernel's
//! parameter layout), [`analyze`] (what each function reads and why a kernel cannot be sliced),
//! [`names`] (what the sliced form adds), [`rewrite`] (the sliced form; [`calls`]: device
//! functions that read the grid get a clone that takes the slice parameter), [`plan`] (the launches that cover a grid), [`cache`] (results on
//! disk keyed by a hash of the PTX and [`TRANSFORMER_VERSION`]); [`fatbin`] finds the PTX in a fat
//! binary.

pub mod analyze;
pub mod cache;
pub mod calls;
pub mod fatbin;
pub mod lex;
pub mod names;
pub mod params;
pub mod plan;
pub mod rewrite;
pub mod syntax;

pub use names::{SLICE_PARAM_NAME, SLICE_PARAM_SIZE};
pub use plan::{plan_slices, Dim3, Slice};
pub use rewrite::{slice_module, KernelOutcome, ModuleOutcome};

/// Bumped whenever the rewrite's output for a given input can change: it is part of the cache key.
pub const TRANSFORMER_VERSION: &str = "gpuslice-ptx/1";
