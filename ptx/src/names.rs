//! The names the sliced form adds to a module: the slice parameter kernels take, and the
//! registers the prologue declares. The rewrite and the call redirection both write them.

/// The trailing parameter of a sliced kernel (and of a device function's clone).
pub const SLICE_PARAM_NAME: &str = "__gpuslice_slice";
/// Offset x, y, z and original grid x, y, z: six `u32`.
pub const SLICE_PARAM_SIZE: u32 = 24;
pub(crate) const SLICE_PARAM_ALIGN: u32 = 4;
/// Prefix of the registers the prologue declares (`%gpuslice<7>`).
pub(crate) const REG: &str = "%gpuslice";
