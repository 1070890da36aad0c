//! The bytes of small allocations (up to `MAX_KEPT` each), so that a test can see data survive
//! a suspension: `cuMemsetD8_v2`, `cuMemcpyHtoD_v2` and `cuMemcpyDtoH_v2` on `cuMemAlloc`
//! memory. They live in a file per process next to the device state, `$SIMCUDA_STATE.mem-<pid>`
//! ("device memory"); a checkpoint moves it to `.host-<pid>` (the host copy) and a restore back
//! (see `checkpoint`). Bytes never written read as zero; larger allocations keep no bytes.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::{lock, CUdeviceptr, CUresult, INITIALIZED, INVALID_VALUE, NOT_INITIALIZED, SUCCESS};

/// The largest allocation whose bytes are kept.
const MAX_KEPT: u64 = 1 << 20;

/// Allocation base → where its bytes start in this process's file (given at the first write).
static PLACES: Mutex<(BTreeMap<u64, u64>, u64)> = Mutex::new((BTreeMap::new(), 0));

pub fn device_file(pid: u32) -> String {
    format!("{}.mem-{pid}", crate::state::state_path())
}

pub fn host_file(pid: u32) -> String {
    format!("{}.host-{pid}", crate::state::state_path())
}

/// The allocation holding `[ptr, ptr + n)`: its base, if it is small enough to keep bytes.
fn kept_base(ptr: CUdeviceptr, n: usize) -> Result<Option<u64>, CUresult> {
    let d = lock();
    let (&base, a) = d.allocs.range(..=ptr).next_back().ok_or(INVALID_VALUE)?;
    if ptr.checked_add(n as u64).is_none_or(|end| end > base + a.size) {
        return Err(INVALID_VALUE);
    }
    Ok((a.size <= MAX_KEPT).then_some(base))
}

/// Where `ptr` sits in the file, placing its allocation there first when `place` is set.
fn offset(base: u64, ptr: CUdeviceptr, place: bool) -> Option<u64> {
    let mut places = PLACES.lock().unwrap_or_else(|e| e.into_inner());
    let start = match places.0.get(&base) {
        Some(&s) => s,
        None if place => {
            let s = places.1;
            places.1 += MAX_KEPT;
            places.0.insert(base, s);
            s
        }
        None => return None,
    };
    Some(start + (ptr - base))
}

fn write(ptr: CUdeviceptr, bytes: &[u8]) -> CUresult {
    let base = match kept_base(ptr, bytes.len()) {
        Ok(Some(b)) => b,
        Ok(None) => return SUCCESS,
        Err(e) => return e,
    };
    let at = offset(base, ptr, true).expect("placed");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(device_file(std::process::id()));
    match file.and_then(|f| f.write_all_at(bytes, at)) {
        Ok(()) => SUCCESS,
        Err(_) => crate::checkpoint::UNKNOWN,
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: u8, n: usize) -> CUresult {
    check_init!();
    if n as u64 > MAX_KEPT {
        return tri!(kept_base(dst, n).map(|_| SUCCESS));
    }
    write(dst, &vec![value; n])
}

/// # Safety
/// `src`: null or valid for reads of `n` bytes, which no one writes during the call.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, n: usize) -> CUresult {
    check_init!();
    if src.is_null() {
        return INVALID_VALUE;
    }
    if n as u64 > MAX_KEPT {
        return tri!(kept_base(dst, n).map(|_| SUCCESS));
    }
    // SAFETY: `src` is not null (checked above) and the caller guarantees `n` readable bytes
    // there (`# Safety`), which no one writes during the call.
    write(dst, unsafe { std::slice::from_raw_parts(src as *const u8, n) })
}

/// # Safety
/// `dst`: null or valid for writes of `n` bytes, which nothing else touches during the call.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    check_init!();
    if dst.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `dst` is not null (checked above) and the caller guarantees `n` writable bytes
    // there (`# Safety`), which nothing else reads or writes during the call.
    let out = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, n) };
    out.fill(0);
    let Some(base) = tri!(kept_base(src, n)) else { return SUCCESS };
    let Some(at) = offset(base, src, false) else { return SUCCESS };
    // Past the end of the file: never written, zeros.
    if let Ok(f) = std::fs::File::open(device_file(std::process::id())) {
        let _ = f.read_at(out, at);
    }
    SUCCESS
}

/// The exports of this module, by name.
pub fn export_addr(name: &str) -> Option<*mut c_void> {
    Some(match name {
        "cuMemsetD8_v2" => cuMemsetD8_v2 as *mut c_void,
        "cuMemcpyHtoD_v2" => cuMemcpyHtoD_v2 as *mut c_void,
        "cuMemcpyDtoH_v2" => cuMemcpyDtoH_v2 as *mut c_void,
        _ => None?,
    })
}

/// A process that exits normally takes its device bytes with it.
extern "C" fn contents_fini() {
    if INITIALIZED.load(Ordering::Acquire) {
        let _ = std::fs::remove_file(device_file(std::process::id()));
    }
}

#[used]
#[link_section = ".fini_array"]
static CONTENTS_FINI: extern "C" fn() = contents_fini;
