//! `libnvidia-ml.so.1` test double: NVML views of the simulated device(s) of gpuslice-simcuda,
//! read from the same shared-memory state file.

#![allow(non_snake_case)]

#[path = "../../simcuda/src/state.rs"]
mod state;

mod export_table;

use std::ffi::{c_char, c_uint, c_void};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

type NvmlReturn = c_uint;
const SUCCESS: NvmlReturn = 0;
const ERROR_UNINITIALIZED: NvmlReturn = 1;
const ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
const ERROR_NOT_FOUND: NvmlReturn = 6;
const ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
const ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
const ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;

/// NVML_VALUE_NOT_AVAILABLE: instance ids of a process on a non-MIG device.
const VALUE_NOT_AVAILABLE: c_uint = 0xffff_ffff;

#[repr(C)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// nvmlMemory_v2 = NVML_STRUCT_VERSION(Memory, 2) = sizeof(nvmlMemory_v2_t) | (2 << 24).
pub const NVML_MEMORY_V2: c_uint = std::mem::size_of::<NvmlMemoryV2>() as c_uint | (2 << 24);

/// nvmlProcessInfo_t (= nvmlProcessInfo_v2_t), used by the _v2 and _v3 process queries.
#[repr(C)]
pub struct NvmlProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

static INIT_COUNT: AtomicU32 = AtomicU32::new(0);
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Device handles are addresses of this array's elements.
static HANDLES: [u64; state::MAX_DEVICES] = [0; state::MAX_DEVICES];
/// MIG device handles (`SIMCUDA_MIG`: one instance per device in MIG mode, the whole device).
static MIG_HANDLES: [u64; state::MAX_DEVICES] = [0; state::MAX_DEVICES];

fn mig_handle(i: usize) -> *mut c_void {
    &MIG_HANDLES[i] as *const u64 as *mut c_void
}

/// The device of a MIG device handle.
fn mig_index(h: *mut c_void) -> Option<usize> {
    let (base, a) = (MIG_HANDLES.as_ptr() as usize, h as usize);
    if a < base || !(a - base).is_multiple_of(8) {
        return None;
    }
    let i = (a - base) / 8;
    (i < state::opened()?.ndev() as usize && state::mig_mode(i as u32)).then_some(i)
}

fn inited() -> Option<&'static state::Shared> {
    if INIT_COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    state::opened()
}

/// The device of a GPU handle or of its MIG instance's handle (the instance is the whole device).
fn handle_index(h: *mut c_void) -> Option<usize> {
    if let Some(i) = mig_index(h) {
        return Some(i);
    }
    let base = HANDLES.as_ptr() as usize;
    let a = h as usize;
    if a < base || !(a - base).is_multiple_of(8) {
        return None;
    }
    let i = (a - base) / 8;
    let sh = state::opened()?;
    (i < sh.ndev() as usize).then_some(i)
}

macro_rules! dev_or_return {
    ($h:expr) => {{
        let Some(sh) = inited() else { return ERROR_UNINITIALIZED };
        let Some(i) = handle_index($h) else { return ERROR_INVALID_ARGUMENT };
        (sh, i)
    }};
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    let _g = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match state::shared() {
        Ok(_) => {
            INIT_COUNT.fetch_add(1, Ordering::AcqRel);
            SUCCESS
        }
        Err(msg) => {
            eprintln!("{msg}");
            ERROR_DRIVER_NOT_LOADED
        }
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> NvmlReturn {
    // SAFETY: `nvmlInitWithFlags` is given no pointer here, so no contract is passed on.
    unsafe { nvmlInitWithFlags(0) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn nvmlInit() -> NvmlReturn {
    // SAFETY: `nvmlInitWithFlags` is given no pointer here, so no contract is passed on.
    unsafe { nvmlInitWithFlags(0) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> NvmlReturn {
    let _g = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if INIT_COUNT.load(Ordering::Acquire) == 0 {
        return ERROR_UNINITIALIZED;
    }
    INIT_COUNT.fetch_sub(1, Ordering::AcqRel);
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    let s: &'static [u8] = match result {
        0 => b"Success\0",
        1 => b"Uninitialized\0",
        2 => b"Invalid Argument\0",
        3 => b"Not Supported\0",
        4 => b"Insufficient Permissions\0",
        6 => b"Not Found\0",
        7 => b"Insufficient Size\0",
        9 => b"Driver Not Loaded\0",
        25 => b"Argument version mismatch\0",
        _ => b"Unknown Error\0",
    };
    s.as_ptr() as *const c_char
}

/// # Safety
/// `count`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    let Some(sh) = inited() else { return ERROR_UNINITIALIZED };
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `count` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *count = sh.ndev() };
    SUCCESS
}

/// # Safety
/// `device`: null or valid for reads and writes of one `*mut c_void`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut *mut c_void) -> NvmlReturn {
    let Some(sh) = inited() else { return ERROR_UNINITIALIZED };
    if device.is_null() || index >= sh.ndev() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `device` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *device = &HANDLES[index as usize] as *const u64 as *mut c_void };
    SUCCESS
}

/// Handle of the device whose UUID string ("GPU-...") is `uuid`, or of the MIG instance whose
/// UUID ("MIG-...") it is; NVML_ERROR_NOT_FOUND if none.
///
/// # Safety
/// `uuid`: null or a NUL-terminated string.
/// `device`: null or valid for reads and writes of one `*mut c_void`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(uuid: *const c_char, device: *mut *mut c_void) -> NvmlReturn {
    let Some(sh) = inited() else { return ERROR_UNINITIALIZED };
    if uuid.is_null() || device.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `uuid` is not null (checked above) and the caller guarantees `uuid` is a NUL-terminated string (`# Safety`).
    let want = unsafe { std::ffi::CStr::from_ptr(uuid).to_string_lossy() };
    for i in 0..sh.ndev() {
        if state::uuid_string(&state::device_uuid(i)).eq_ignore_ascii_case(&want) {
            // SAFETY: `device` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
            unsafe { *device = &HANDLES[i as usize] as *const u64 as *mut c_void };
            return SUCCESS;
        }
        if state::mig_mode(i) && state::mig_uuid_string(&state::mig_uuid(i)).eq_ignore_ascii_case(&want) {
            // SAFETY: `device` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
            unsafe { *device = mig_handle(i as usize) };
            return SUCCESS;
        }
    }
    ERROR_NOT_FOUND
}

/// # Safety
/// `index`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: *mut c_void, index: *mut c_uint) -> NvmlReturn {
    let (_, i) = dev_or_return!(device);
    if index.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `index` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *index = i as c_uint };
    SUCCESS
}

/// # Safety
/// `uuid`: null or valid for writes of `length` bytes (`device` is only compared with the handles handed out).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(device: *mut c_void, uuid: *mut c_char, length: c_uint) -> NvmlReturn {
    let (_, i) = dev_or_return!(device);
    if uuid.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let s = if mig_index(device).is_some() { state::mig_uuid_string(&state::mig_uuid(i as u32)) } else { state::uuid_string(&state::device_uuid(i as u32)) };
    if (length as usize) < s.len() + 1 {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `uuid` is not null (checked above) and the caller guarantees `length` writable bytes
    // (`# Safety`); `s.len() + 1 <= length` are written, from a string that cannot overlap them.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), uuid as *mut u8, s.len());
        *uuid.add(s.len()) = 0;
    }
    SUCCESS
}

/// # Safety
/// `name`: null or valid for writes of `length` bytes (`device` is only compared with the handles handed out).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(device: *mut c_void, name: *mut c_char, length: c_uint) -> NvmlReturn {
    let (_, _) = dev_or_return!(device);
    let s = state::DEVICE_NAME;
    if name.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if (length as usize) < s.len() + 1 {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `name` is not null (checked above) and the caller guarantees `length` writable bytes
    // (`# Safety`); `s.len() + 1 <= length` are written, from a string that cannot overlap them.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), name as *mut u8, s.len());
        *name.add(s.len()) = 0;
    }
    SUCCESS
}

fn mem_numbers(sh: &state::Shared, i: usize) -> (u64, u64, u64) {
    let ds = sh.dev(i);
    let total = ds.total.load(Ordering::Relaxed);
    let used = ds.used_now().min(total);
    (total, total - used, used)
}

/// # Safety
/// `memory`: null or valid for reads and writes of one `NvmlMemory`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: *mut c_void, memory: *mut NvmlMemory) -> NvmlReturn {
    let (sh, i) = dev_or_return!(device);
    if memory.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let (total, free, used) = mem_numbers(sh, i);
    // SAFETY: `memory` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *memory = NvmlMemory { total, free, used } };
    SUCCESS
}

/// # Safety
/// `memory`: null or valid for reads and writes of one `NvmlMemoryV2`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: *mut c_void, memory: *mut NvmlMemoryV2) -> NvmlReturn {
    let (sh, i) = dev_or_return!(device);
    if memory.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `memory` is not null (checked above) and the caller guarantees it points to an
    // `nvmlMemory_v2_t` it may write (`# Safety`).
    let m = unsafe { &mut *memory };
    if m.version != NVML_MEMORY_V2 {
        return ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    let (total, free, used) = mem_numbers(sh, i);
    m.total = total;
    m.reserved = 0;
    m.free = free;
    m.used = used;
    SUCCESS
}

/// # Safety
/// `count`, `infos`: as `fill_processes` requires.
unsafe fn running_processes(device: *mut c_void, count: *mut c_uint, infos: *mut NvmlProcessInfo) -> NvmlReturn {
    // SAFETY: `fill_processes` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe {
        fill_processes(device, count, infos, |pid, used| NvmlProcessInfo {
            pid,
            used_gpu_memory: used,
            gpu_instance_id: VALUE_NOT_AVAILABLE,
            compute_instance_id: VALUE_NOT_AVAILABLE,
        })
    }
}

/// The device's processes into `infos` (`*count` records of the caller's version, each made
/// by `record` from a pid and its bytes), NVML's way: too small an array gets the count and
/// `ERROR_INSUFFICIENT_SIZE`.
///
/// # Safety
/// `count`: null or valid for reads and writes of one `c_uint`.
/// `infos`: null or valid for writes of `*count` entries (`device` is only compared with the handles handed out).
unsafe fn fill_processes<T>(device: *mut c_void, count: *mut c_uint, infos: *mut T, record: impl Fn(c_uint, u64) -> T) -> NvmlReturn {
    let (sh, i) = dev_or_return!(device);
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let procs = sh.dev(i).processes();
    let n = procs.len() as c_uint;
    // SAFETY: `count` is not null (checked above) and the caller guarantees it points to a `c_uint`
    // it may read and write (`# Safety`).
    let count = unsafe { &mut *count };
    if *count < n || (n > 0 && infos.is_null()) {
        *count = n;
        return ERROR_INSUFFICIENT_SIZE;
    }
    for (k, (pid, used)) in procs.iter().enumerate() {
        // SAFETY: `infos` is not null (n > 0, checked above) and the caller guarantees `*count`
        // entries there (`# Safety`); k < n <= *count.
        unsafe { *infos.add(k) = record(*pid, *used) };
    }
    *count = n;
    SUCCESS
}

/// # Safety
/// `info_count`, `infos`: as `fill_processes` requires.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(device: *mut c_void, info_count: *mut c_uint, infos: *mut NvmlProcessInfo) -> NvmlReturn {
    // SAFETY: `running_processes` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { running_processes(device, info_count, infos) }
}

/// # Safety
/// `info_count`, `infos`: as `fill_processes` requires.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(device: *mut c_void, info_count: *mut c_uint, infos: *mut NvmlProcessInfo) -> NvmlReturn {
    // SAFETY: `running_processes` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { running_processes(device, info_count, infos) }
}

/// # Safety
/// `count`: as `nvmlDeviceGetCount_v2` requires.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> NvmlReturn {
    // SAFETY: `nvmlDeviceGetCount_v2` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { nvmlDeviceGetCount_v2(count) }
}

/// # Safety
/// `device`: as `nvmlDeviceGetHandleByIndex_v2` requires.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(index: c_uint, device: *mut *mut c_void) -> NvmlReturn {
    // SAFETY: `nvmlDeviceGetHandleByIndex_v2` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { nvmlDeviceGetHandleByIndex_v2(index, device) }
}

/// nvmlProcessInfo_v1_t: what the unversioned process queries fill.
#[repr(C)]
pub struct NvmlProcessInfoV1 {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
}

/// # Safety
/// `info_count`, `infos`: as `fill_processes` requires.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses(device: *mut c_void, info_count: *mut c_uint, infos: *mut NvmlProcessInfoV1) -> NvmlReturn {
    // SAFETY: `fill_processes` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { fill_processes(device, info_count, infos, |pid, used| NvmlProcessInfoV1 { pid, used_gpu_memory: used }) }
}

// The simulated device runs every context as both compute and graphics: the graphics lists are
// the compute lists, so that a filter applied to them can be seen at work.

/// # Safety
/// `info_count`, `infos`: as `nvmlDeviceGetComputeRunningProcesses` requires.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses(device: *mut c_void, info_count: *mut c_uint, infos: *mut NvmlProcessInfoV1) -> NvmlReturn {
    // SAFETY: `nvmlDeviceGetComputeRunningProcesses` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { nvmlDeviceGetComputeRunningProcesses(device, info_count, infos) }
}

/// # Safety
/// `info_count`, `infos`: as `fill_processes` requires.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v2(device: *mut c_void, info_count: *mut c_uint, infos: *mut NvmlProcessInfo) -> NvmlReturn {
    // SAFETY: `running_processes` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { running_processes(device, info_count, infos) }
}

/// # Safety
/// `info_count`, `infos`: as `fill_processes` requires.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(device: *mut c_void, info_count: *mut c_uint, infos: *mut NvmlProcessInfo) -> NvmlReturn {
    // SAFETY: `running_processes` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { running_processes(device, info_count, infos) }
}

/// nvmlUtilization_t.
#[repr(C)]
pub struct NvmlUtilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// 100 while the simulated device has work queued or running, else 0 (the simulator keeps no
/// history to average over); the memory controller's figure is always 0.
///
/// # Safety
/// `utilization`: null or valid for reads and writes of one `NvmlUtilization`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(device: *mut c_void, utilization: *mut NvmlUtilization) -> NvmlReturn {
    let (sh, i) = dev_or_return!(device);
    if utilization.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let busy = sh.dev(i).busy_until_ns.load(Ordering::Relaxed) > state::now_ns();
    // SAFETY: `utilization` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *utilization = NvmlUtilization { gpu: if busy { 100 } else { 0 }, memory: 0 } };
    SUCCESS
}

/// nvmlProcessDetail_v1_t.
#[repr(C)]
pub struct NvmlProcessDetail {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
    pub used_gpu_cc_protected_memory: u64,
}

/// nvmlProcessDetailList_v1_t.
#[repr(C)]
pub struct NvmlProcessDetailList {
    pub version: c_uint,
    pub mode: c_uint,
    pub num_proc_array_entries: c_uint,
    pub proc_array: *mut NvmlProcessDetail,
}

/// nvmlProcessDetailList_v1 = NVML_STRUCT_VERSION(ProcessDetailList, 1).
pub const NVML_PROCESS_DETAIL_LIST_V1: c_uint = std::mem::size_of::<NvmlProcessDetailList>() as c_uint | (1 << 24);

/// Compute (mode 0) and graphics (1) list the process table; MPS (2) lists nobody.
///
/// # Safety
/// `list`: null or valid for reads and writes of one `NvmlProcessDetailList`, whose `proc_array`
/// is null or valid for writes of `num_proc_array_entries` entries.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRunningProcessDetailList(device: *mut c_void, list: *mut NvmlProcessDetailList) -> NvmlReturn {
    let (sh, i) = dev_or_return!(device);
    if list.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `list` is not null (checked above) and the caller guarantees it points to an
    // `nvmlProcessDetailList_t` it may write (`# Safety`).
    let l = unsafe { &mut *list };
    if l.mode > 2 {
        return ERROR_INVALID_ARGUMENT;
    }
    if l.version != NVML_PROCESS_DETAIL_LIST_V1 {
        return ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    let procs = if l.mode == 2 { Vec::new() } else { sh.dev(i).processes() };
    let n = procs.len() as c_uint;
    if l.num_proc_array_entries < n || (n > 0 && l.proc_array.is_null()) {
        l.num_proc_array_entries = n;
        return ERROR_INSUFFICIENT_SIZE;
    }
    for (k, (pid, used)) in procs.iter().enumerate() {
        // SAFETY: `proc_array` is not null (n > 0, checked above) and the caller guarantees
        // `num_proc_array_entries` entries there (`# Safety`); k < n <= num_proc_array_entries.
        unsafe {
            *l.proc_array.add(k) = NvmlProcessDetail {
                pid: *pid,
                used_gpu_memory: *used,
                gpu_instance_id: VALUE_NOT_AVAILABLE,
                compute_instance_id: VALUE_NOT_AVAILABLE,
                used_gpu_cc_protected_memory: 0,
            }
        };
    }
    l.num_proc_array_entries = n;
    SUCCESS
}

/// nvmlProcessUtilizationSample_t.
#[repr(C)]
pub struct NvmlProcessUtilizationSample {
    pub pid: c_uint,
    pub time_stamp: u64,
    pub sm_util: c_uint,
    pub mem_util: c_uint,
    pub enc_util: c_uint,
    pub dec_util: c_uint,
}

/// One sample per process of the table, stamped now (µs). Its SM figure is 100 when the process
/// had work on the device during the sample period, else 0 (the simulator keeps only the end of
/// each process's last kernel, not a history to average over; the other figures are 0). The
/// period is the time since `last_seen` (µs, the stamp of the caller's previous samples), or the
/// last second when that is 0. NULL samples or too small a count: the count needed, and
/// NVML_ERROR_INSUFFICIENT_SIZE.
///
/// # Safety
/// `samples`: null or valid for writes of `*count` entries.
/// `count`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: *mut c_void,
    samples: *mut NvmlProcessUtilizationSample,
    count: *mut c_uint,
    last_seen: u64,
) -> NvmlReturn {
    let (sh, i) = dev_or_return!(device);
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let procs = sh.dev(i).processes();
    let n = procs.len() as c_uint;
    // SAFETY: `count` is not null (checked above) and the caller guarantees it points to a `c_uint`
    // it may read and write (`# Safety`).
    let count = unsafe { &mut *count };
    if samples.is_null() || *count < n {
        *count = n;
        return ERROR_INSUFFICIENT_SIZE;
    }
    let now = state::now_ns();
    let since = if last_seen == 0 { now.saturating_sub(1_000_000_000) } else { last_seen.saturating_mul(1000) };
    let busy = sh.dev(i).busy_until();
    for (k, (pid, _)) in procs.iter().enumerate() {
        let worked = busy.iter().any(|&(p, until)| p == *pid && until > since);
        let sample =
            NvmlProcessUtilizationSample { pid: *pid, time_stamp: now / 1000, sm_util: if worked { 100 } else { 0 }, mem_util: 0, enc_util: 0, dec_util: 0 };
        // SAFETY: `samples` is not null (checked above) and the caller guarantees `*count` entries
        // there (`# Safety`); k < n <= *count.
        unsafe { *samples.add(k) = sample };
    }
    *count = n;
    SUCCESS
}

/// The compute capability of the H100/H200 the simulated device stands for (sm_90, as its name says).
///
/// # Safety
/// `major`: null or valid for reads and writes of one `i32`.
/// `minor`: null or valid for reads and writes of one `i32`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(device: *mut c_void, major: *mut i32, minor: *mut i32) -> NvmlReturn {
    let (_, _) = dev_or_return!(device);
    if major.is_null() || minor.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `major` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *major = 9 };
    // SAFETY: `minor` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *minor = 0 };
    SUCCESS
}

/// The simulated driver's version string, unless `SIMNVML_DRIVER_VERSION` names another (to test
/// what depends on the driver's branch).
pub const DRIVER_VERSION: &str = "580.159.03";

fn driver_version() -> String {
    std::env::var("SIMNVML_DRIVER_VERSION").unwrap_or_else(|_| DRIVER_VERSION.to_string())
}

/// # Safety
/// `version`: null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> NvmlReturn {
    if inited().is_none() {
        return ERROR_UNINITIALIZED;
    }
    if version.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let v = driver_version();
    if (length as usize) < v.len() + 1 {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `version` is not null (checked above) and the caller guarantees `length` writable bytes
    // (`# Safety`); `v.len() + 1 <= length` are written, from a string that cannot overlap them.
    unsafe {
        std::ptr::copy_nonoverlapping(v.as_ptr(), version as *mut u8, v.len());
        *version.add(v.len()) = 0;
    }
    SUCCESS
}

const ERROR_NOT_SUPPORTED: NvmlReturn = 3;

/// MIG mode: on for the devices `SIMCUDA_MIG` names (current and pending), else
/// NVML_ERROR_NOT_SUPPORTED, as on a GPU without MIG.
///
/// # Safety
/// `current`: null or valid for reads and writes of one `c_uint`.
/// `pending`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(device: *mut c_void, current: *mut c_uint, pending: *mut c_uint) -> NvmlReturn {
    let (_, i) = dev_or_return!(device);
    if !state::mig_mode(i as u32) {
        return ERROR_NOT_SUPPORTED;
    }
    if current.is_null() || pending.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `current` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { (*current, *pending) = (1, 1) };
    SUCCESS
}

/// How many MIG devices a GPU in MIG mode may hold (here: its one instance).
///
/// # Safety
/// `count`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(device: *mut c_void, count: *mut c_uint) -> NvmlReturn {
    let (_, i) = dev_or_return!(device);
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `count` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *count = u32::from(state::mig_mode(i as u32)) };
    SUCCESS
}

/// The MIG device `index` of a GPU in MIG mode.
///
/// # Safety
/// `mig`: null or valid for reads and writes of one `*mut c_void`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(device: *mut c_void, index: c_uint, mig: *mut *mut c_void) -> NvmlReturn {
    let (_, i) = dev_or_return!(device);
    if mig.is_null() || mig_index(device).is_some() {
        return ERROR_INVALID_ARGUMENT;
    }
    if !state::mig_mode(i as u32) || index != 0 {
        return ERROR_NOT_FOUND;
    }
    // SAFETY: `mig` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *mig = mig_handle(i) };
    SUCCESS
}

/// The GPU a MIG device handle belongs to.
///
/// # Safety
/// `device`: null or valid for reads and writes of one `*mut c_void`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig: *mut c_void, device: *mut *mut c_void) -> NvmlReturn {
    let Some(_) = inited() else { return ERROR_UNINITIALIZED };
    let Some(i) = mig_index(mig) else { return ERROR_INVALID_ARGUMENT };
    if device.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `device` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *device = &HANDLES[i] as *const u64 as *mut c_void };
    SUCCESS
}

/// 1 for a MIG device handle, 0 for a GPU's.
///
/// # Safety
/// `is_mig`: null or valid for a write of one `c_uint` (`device` is only compared with the handles handed out).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(device: *mut c_void, is_mig: *mut c_uint) -> NvmlReturn {
    let (_, _) = dev_or_return!(device);
    if is_mig.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `is_mig` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *is_mig = u32::from(mig_index(device).is_some()) };
    SUCCESS
}
