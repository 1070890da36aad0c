//! Driver functions that only record their arguments, so that a test can check that the shim's
//! suspend-gate thunks (shim/src/hooks/gate) pass them through untouched: floats in xmm
//! registers (`cuTexRefSetMipmapLevelClamp`) and stack-passed arguments past the sixth
//! (`cuTensorMapEncodeTiled`, 12 parameters). `simcuda_echo` hands the record back.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::Mutex;

/// The latest call's arguments, each widened to 64 bits (a float as its bits).
static LAST: Mutex<Vec<u64>> = Mutex::new(Vec::new());

fn keep(args: Vec<u64>) -> c_int {
    *LAST.lock().unwrap_or_else(|p| p.into_inner()) = args;
    0
}

/// # Safety
/// None: nothing is dereferenced.
#[no_mangle]
pub unsafe extern "C" fn cuTexRefSetMipmapLevelClamp(tex: *mut c_void, min: f32, max: f32) -> c_int {
    keep(vec![tex as u64, u64::from(min.to_bits()), u64::from(max.to_bits())])
}

/// # Safety
/// None: nothing is dereferenced.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuTensorMapEncodeTiled(
    map: *mut c_void,
    data_type: c_uint,
    rank: c_uint,
    global_address: *mut c_void,
    global_dim: *const u64,
    global_strides: *const u64,
    box_dim: *const u32,
    element_strides: *const u32,
    interleave: c_uint,
    swizzle: c_uint,
    l2_promotion: c_uint,
    oob_fill: c_uint,
) -> c_int {
    keep(vec![
        map as u64,
        u64::from(data_type),
        u64::from(rank),
        global_address as u64,
        global_dim as u64,
        global_strides as u64,
        box_dim as u64,
        element_strides as u64,
        u64::from(interleave),
        u64::from(swizzle),
        u64::from(l2_promotion),
        u64::from(oob_fill),
    ])
}

/// Copies up to `n` recorded arguments of the latest echo call to `out`; returns how many
/// were recorded.
///
/// # Safety
/// `out`: valid for writes of `n` u64s.
#[no_mangle]
pub unsafe extern "C" fn simcuda_echo(out: *mut u64, n: c_int) -> c_int {
    let last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    for (i, v) in last.iter().take(n.max(0) as usize).enumerate() {
        // SAFETY: `i < n`, and the caller guarantees `n` writable slots (`# Safety`).
        unsafe { *out.add(i) = *v };
    }
    last.len() as c_int
}

/// The exports of this module, by name.
pub fn export_addr(name: &str) -> Option<*mut c_void> {
    Some(match name {
        "cuTexRefSetMipmapLevelClamp" => cuTexRefSetMipmapLevelClamp as *mut c_void,
        "cuTensorMapEncodeTiled" => cuTensorMapEncodeTiled as *mut c_void,
        _ => None?,
    })
}

/// A driver-library function that no CUDA header declares, so that a test can resolve a name
/// the shim's thunk table lacks (it gets a spare thunk; with none left, the process stops being
/// fast-suspendable). Answers `3x + 1`, so that a test sees its argument and result pass.
#[no_mangle]
pub extern "C" fn cuSimcudaUnlisted(x: c_int) -> c_int {
    x.wrapping_mul(3).wrapping_add(1)
}
