//! The bytes of small allocations (up to `MAX_KEPT` each), so that a test can see data survive
//! a suspension: `cuMemsetD8_v2`, `cuMemcpyHtoD_v2` and `cuMemcpyDtoH_v2` on `cuMemAlloc`
//! memory. They live in a file per process next to the device state, `$SIMCUDA_STATE.mem-<pid>`
//! ("device memory"); a checkpoint moves it to `.host-<pid>` (the host copy) and a restore back
//! (see `checkpoint`). Bytes never written read as zero; larger allocations keep no bytes.
//!
//! VMM memory (issue 22, the shim's own suspend path) keeps its bytes whatever its size, by
//! physical handle, in this process's memory (64 KiB pages, made at the first non-zero write):
//! a handle released and created again reads as zeros, as new physical memory may. An access
//! to a reserved range with nothing mapped is `CUDA_ERROR_ILLEGAL_ADDRESS`, as a kernel or copy
//! touching it would fault on the GPU. The copies `cuMemcpyDtoHAsync_v2` / `HtoDAsync_v2` run
//! at once (their stream is not waited for), and `cuMemHostAlloc` is plain host memory.
//! `SIMCUDA_FAIL_DTOH_ASYNC=N` / `SIMCUDA_FAIL_HTOD_ASYNC=N` fail the N-th async copy (once).

use std::collections::{BTreeMap, HashMap};
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

/// `CUDA_ERROR_ILLEGAL_ADDRESS`: an access to memory that is not mapped.
pub const ILLEGAL_ADDRESS: CUresult = 700;
/// VMM bytes are kept in pages of this size.
const PAGE: u64 = 64 << 10;

/// (VMM handle, page index) → its bytes; pages never written are absent (zeros).
type Pages = HashMap<(u64, u64), Box<[u8]>>;
static VMM_PAGES: Mutex<Option<Pages>> = Mutex::new(None);

fn vmm_pages() -> std::sync::MutexGuard<'static, Option<Pages>> {
    VMM_PAGES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The physical memory of `handle` is gone (released and unmapped): so are its bytes.
pub fn forget_handle(handle: u64) {
    if let Some(pages) = vmm_pages().as_mut() {
        pages.retain(|&(h, _), _| h != handle);
    }
}

/// Where `[ptr, ptr + n)` lives, when it is VMM memory: the handle mapped there and the offset
/// into it; `Err(ILLEGAL_ADDRESS)` for a reserved range with nothing mapped; `Ok(None)` when it
/// is no VMM range at all.
fn vmm_place(ptr: CUdeviceptr, n: usize) -> Result<Option<(u64, u64)>, CUresult> {
    let d = lock();
    if let Some((&start, &(len, handle))) = d.mappings.range(..=ptr).next_back() {
        if ptr < start + len {
            if ptr.checked_add(n as u64).is_none_or(|end| end > start + len) {
                return Err(INVALID_VALUE);
            }
            return Ok(Some((handle, ptr - start)));
        }
    }
    let reserved = d.reservations.range(..=ptr).next_back().is_some_and(|(&start, &len)| ptr < start + len);
    if reserved {
        Err(ILLEGAL_ADDRESS)
    } else {
        Ok(None)
    }
}

fn vmm_write(handle: u64, mut at: u64, mut bytes: &[u8]) {
    let mut guard = vmm_pages();
    let pages = guard.get_or_insert_with(HashMap::new);
    while !bytes.is_empty() {
        let (page, inside) = (at / PAGE, (at % PAGE) as usize);
        let take = bytes.len().min(PAGE as usize - inside);
        let (part, rest) = bytes.split_at(take);
        if let Some(p) = pages.get_mut(&(handle, page)) {
            p[inside..inside + take].copy_from_slice(part);
        } else if part.iter().any(|&b| b != 0) {
            let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
            p[inside..inside + take].copy_from_slice(part);
            pages.insert((handle, page), p);
        }
        at += take as u64;
        bytes = rest;
    }
}

fn vmm_read(handle: u64, mut at: u64, mut out: &mut [u8]) {
    let guard = vmm_pages();
    while !out.is_empty() {
        let (page, inside) = (at / PAGE, (at % PAGE) as usize);
        let take = out.len().min(PAGE as usize - inside);
        let (part, rest) = out.split_at_mut(take);
        match guard.as_ref().and_then(|pages| pages.get(&(handle, page))) {
            Some(p) => part.copy_from_slice(&p[inside..inside + take]),
            None => part.fill(0),
        }
        at += take as u64;
        out = rest;
    }
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
    match vmm_place(ptr, bytes.len()) {
        Ok(Some((handle, at))) => {
            vmm_write(handle, at, bytes);
            return SUCCESS;
        }
        Err(e) => return e,
        Ok(None) => {}
    }
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
    if tri!(vmm_place(dst, n)).is_none() && n as u64 > MAX_KEPT {
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
    if tri!(vmm_place(dst, n)).is_none() && n as u64 > MAX_KEPT {
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
    if let Some((handle, at)) = tri!(vmm_place(src, n)) {
        vmm_read(handle, at, out);
        return SUCCESS;
    }
    let Some(base) = tri!(kept_base(src, n)) else { return SUCCESS };
    let Some(at) = offset(base, src, false) else { return SUCCESS };
    // Past the end of the file: never written, zeros.
    if let Ok(f) = std::fs::File::open(device_file(std::process::id())) {
        let _ = f.read_at(out, at);
    }
    SUCCESS
}

/// `CUDA_ERROR_UNKNOWN`: what an injected copy failure answers.
const UNKNOWN: CUresult = 999;

/// Failure injection (issue 22's tests of the shim's move): `SIMCUDA_FAIL_DTOH_ASYNC=N` makes
/// this process's N-th `cuMemcpyDtoHAsync_v2` fail (once) with `CUDA_ERROR_UNKNOWN`, copying
/// nothing; `SIMCUDA_FAIL_HTOD_ASYNC=N` the same for `cuMemcpyHtoDAsync_v2`.
fn injected(var: &'static str, calls: &std::sync::atomic::AtomicU64, at: &std::sync::OnceLock<u64>) -> bool {
    let n = *at.get_or_init(|| std::env::var(var).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0));
    n != 0 && calls.fetch_add(1, Ordering::Relaxed) + 1 == n
}

static DTOH_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static HTOD_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DTOH_FAIL: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
static HTOD_FAIL: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// # Safety
/// As `cuMemcpyDtoH_v2`; the stream is not waited for (the copy is done on return).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: CUdeviceptr, n: usize, _stream: *mut c_void) -> CUresult {
    if injected("SIMCUDA_FAIL_DTOH_ASYNC", &DTOH_CALLS, &DTOH_FAIL) {
        return UNKNOWN;
    }
    // SAFETY: the caller's own arguments, under the same contract.
    unsafe { cuMemcpyDtoH_v2(dst, src, n) }
}

/// # Safety
/// As `cuMemcpyHtoD_v2`; the stream is not waited for (the copy is done on return).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(dst: CUdeviceptr, src: *const c_void, n: usize, _stream: *mut c_void) -> CUresult {
    if injected("SIMCUDA_FAIL_HTOD_ASYNC", &HTOD_CALLS, &HTOD_FAIL) {
        return UNKNOWN;
    }
    // SAFETY: the caller's own arguments, under the same contract.
    unsafe { cuMemcpyHtoD_v2(dst, src, n) }
}

/// Host allocations by address → their size (for `cuMemFreeHost`).
static HOST: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

/// # Safety
/// `pp`: null or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, bytes: usize, _flags: std::ffi::c_uint) -> CUresult {
    check_init!();
    if pp.is_null() || bytes == 0 {
        return INVALID_VALUE;
    }
    // SAFETY: an anonymous private mapping; no pointer of ours is involved.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    if p == libc::MAP_FAILED {
        return crate::OUT_OF_MEMORY_HOST;
    }
    HOST.lock().unwrap_or_else(|e| e.into_inner()).insert(p as usize, bytes);
    // SAFETY: `pp` is not null (checked above) and the caller guarantees it is writable.
    unsafe { *pp = p };
    SUCCESS
}

/// # Safety
/// `p`: a pointer `cuMemHostAlloc` returned (anything else is refused).
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    check_init!();
    let Some(bytes) = HOST.lock().unwrap_or_else(|e| e.into_inner()).remove(&(p as usize)) else { return INVALID_VALUE };
    // SAFETY: a mapping `cuMemHostAlloc` made, of this size, forgotten above (freed once).
    unsafe { libc::munmap(p, bytes) };
    SUCCESS
}

/// The exports of this module, by name.
pub fn export_addr(name: &str) -> Option<*mut c_void> {
    Some(match name {
        "cuMemcpyDtoHAsync_v2" => cuMemcpyDtoHAsync_v2 as *mut c_void,
        "cuMemcpyHtoDAsync_v2" => cuMemcpyHtoDAsync_v2 as *mut c_void,
        "cuMemHostAlloc" => cuMemHostAlloc as *mut c_void,
        "cuMemFreeHost" => cuMemFreeHost as *mut c_void,
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
