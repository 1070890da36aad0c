//! NVML's process lists inside a slice: only the caller's group's processes, under the pids the
//! caller sees them by (a process in a pid namespace the caller cannot see is left out).
//!
//! The compute lists come from the ledger: the group's members that hold memory on the device,
//! each with what the group's figure counts for it (so the list adds up to `used`); the GPU or
//! compute instance comes from NVML's own entry when it has one. The graphics and MPS lists are
//! NVML's own entries, kept when they are the group's members. Outside a slice NVML answers.

use super::real_or_return;
use super::tenant::{self, Slice};
use crate::sys::ffi::*;
use crate::sys::guard;
use crate::sys::real_nvml::nvml;
use std::ffi::c_uint;

type ListFn<T> = unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut T) -> NvmlReturn;

/// A process record of one of NVML's layouts.
trait Record: Copy + Default {
    fn pid(&self) -> u32;
    fn new(pid: u32, used: u64, instances: (u32, u32)) -> Self;
    fn with_pid(self, pid: u32) -> Self;
}

impl Record for NvmlProcessInfoV1 {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn new(pid: u32, used: u64, _: (u32, u32)) -> Self {
        NvmlProcessInfoV1 { pid, used_gpu_memory: used }
    }
    fn with_pid(self, pid: u32) -> Self {
        NvmlProcessInfoV1 { pid, ..self }
    }
}

impl Record for NvmlProcessInfo {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn new(pid: u32, used: u64, (gpu_instance_id, compute_instance_id): (u32, u32)) -> Self {
        NvmlProcessInfo { pid, used_gpu_memory: used, gpu_instance_id, compute_instance_id }
    }
    fn with_pid(self, pid: u32) -> Self {
        NvmlProcessInfo { pid, ..self }
    }
}

impl Record for NvmlProcessDetail {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn new(pid: u32, used: u64, (gpu_instance_id, compute_instance_id): (u32, u32)) -> Self {
        NvmlProcessDetail { pid, used_gpu_memory: used, gpu_instance_id, compute_instance_id, used_gpu_cc_protected_memory: 0 }
    }
    fn with_pid(self, pid: u32) -> Self {
        NvmlProcessDetail { pid, ..self }
    }
}

/// The whole list a real query gives, however long.
fn real_list<T: Record>(real: ListFn<T>, device: NvmlDevice) -> Option<Vec<T>> {
    let mut buf = vec![T::default(); 32];
    for _ in 0..6 {
        let mut n = buf.len() as c_uint;
        // SAFETY: the buffer holds `n` records of the layout this function fills.
        match unsafe { real(device, &mut n, buf.as_mut_ptr()) } {
            NVML_SUCCESS => {
                buf.truncate(n as usize);
                return Some(buf);
            }
            NVML_ERROR_INSUFFICIENT_SIZE => buf.resize(n as usize + 16, T::default()),
            _ => return None,
        }
    }
    None
}

/// Writes `list` out as NVML does: the count always, the records when they fit.
unsafe fn answer<T: Record>(list: &[T], count: *mut c_uint, infos: *mut T) -> NvmlReturn {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `count` is non-null (checked above): the caller's in/out array length, readable.
    let room = unsafe { *count } as usize;
    // SAFETY: `count` is non-null (checked above) and the caller's in/out length, so writable.
    unsafe { *count = list.len() as c_uint };
    if list.is_empty() {
        return NVML_SUCCESS;
    }
    if room < list.len() || infos.is_null() {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller's buffer holds `room` >= len records.
    unsafe { std::ptr::copy_nonoverlapping(list.as_ptr(), infos, list.len()) };
    NVML_SUCCESS
}

/// The group's members holding memory on the slice's device, as compute processes.
fn compute_list<T: Record>(slice: &Slice, device: NvmlDevice) -> Vec<T> {
    // NVML's own entries, for the instance ids of a MIG device.
    let known: Vec<NvmlProcessInfo> = nvml().and_then(|n| n.processes).and_then(|f| real_list(f, device)).unwrap_or_default();
    slice
        .members()
        .into_iter()
        .filter(|m| m.used > 0)
        .map(|m| {
            let instances = known
                .iter()
                .find(|k| k.pid == m.node_pid)
                .map_or((NVML_VALUE_NOT_AVAILABLE, NVML_VALUE_NOT_AVAILABLE), |k| (k.gpu_instance_id, k.compute_instance_id));
            T::new(m.pid, m.used, instances)
        })
        .collect()
}

/// NVML's own entries that are the group's members, under the caller's pids.
fn filtered_list<T: Record>(slice: &Slice, real: ListFn<T>, device: NvmlDevice) -> Option<Vec<T>> {
    let members = slice.members();
    let list = real_list(real, device)?;
    Some(list.into_iter().filter_map(|r| members.iter().find(|m| m.node_pid == r.pid()).map(|m| r.with_pid(m.pid))).collect())
}

unsafe fn compute<T: Record>(real: ListFn<T>, device: NvmlDevice, count: *mut c_uint, infos: *mut T) -> NvmlReturn {
    match tenant::of(device) {
        // SAFETY: `count` and `infos` are the program's own NVML arguments, which is what `answer` needs.
        Some(slice) => unsafe { answer(&compute_list::<T>(&slice, device), count, infos) },
        // SAFETY: `real` is libnvidia-ml's own list function for `T`, given the caller's arguments unchanged.
        None => unsafe { real(device, count, infos) },
    }
}

unsafe fn filtered<T: Record>(real: ListFn<T>, device: NvmlDevice, count: *mut c_uint, infos: *mut T) -> NvmlReturn {
    match tenant::of(device).and_then(|slice| filtered_list(&slice, real, device)) {
        // SAFETY: `count` and `infos` are the program's own NVML arguments, which is what `answer` needs.
        Some(list) => unsafe { answer(&list, count, infos) },
        // SAFETY: `real` is libnvidia-ml's own list function for `T`, given the caller's arguments unchanged.
        None => unsafe { real(device, count, infos) },
    }
}

macro_rules! process_hooks {
    ($( $name:ident : $record:ty => $how:ident ; )*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(device: NvmlDevice, count: *mut c_uint, infos: *mut $record) -> NvmlReturn {
            guard::with_fallback(stringify!($name), NVML_ERROR_UNKNOWN, || {
                let real = real_or_return!(
                    // SAFETY: a literal with exactly one trailing NUL.
                    unsafe { std::ffi::CStr::from_bytes_with_nul_unchecked(concat!(stringify!($name), "\0").as_bytes()) },
                    ListFn<$record>
                );
                // SAFETY: `real` is NVML's own `$name` (ListFn<$record> ABI) and the rest are the program's own arguments.
                unsafe { $how(real, device, count, infos) }
            })
        }
    )*};
}

process_hooks! {
    nvmlDeviceGetComputeRunningProcesses: NvmlProcessInfoV1 => compute;
    nvmlDeviceGetComputeRunningProcesses_v2: NvmlProcessInfo => compute;
    nvmlDeviceGetComputeRunningProcesses_v3: NvmlProcessInfo => compute;
    nvmlDeviceGetGraphicsRunningProcesses: NvmlProcessInfoV1 => filtered;
    nvmlDeviceGetGraphicsRunningProcesses_v2: NvmlProcessInfo => filtered;
    nvmlDeviceGetGraphicsRunningProcesses_v3: NvmlProcessInfo => filtered;
    nvmlDeviceGetMPSComputeRunningProcesses: NvmlProcessInfoV1 => filtered;
    nvmlDeviceGetMPSComputeRunningProcesses_v2: NvmlProcessInfo => filtered;
    nvmlDeviceGetMPSComputeRunningProcesses_v3: NvmlProcessInfo => filtered;
}

type DetailFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlProcessDetailList) -> NvmlReturn;

/// `nvmlDeviceGetRunningProcessDetailList`'s whole answer for one mode, however long.
fn real_details(real: DetailFn, device: NvmlDevice, version: u32, mode: u32) -> Option<Vec<NvmlProcessDetail>> {
    let mut buf = vec![NvmlProcessDetail::default(); 32];
    for _ in 0..6 {
        let mut list = NvmlProcessDetailList { version, mode, num_proc_array_entries: buf.len() as u32, proc_array: buf.as_mut_ptr() };
        // SAFETY: the array holds `num_proc_array_entries` records.
        match unsafe { real(device, &mut list) } {
            NVML_SUCCESS => {
                buf.truncate(list.num_proc_array_entries as usize);
                return Some(buf);
            }
            NVML_ERROR_INSUFFICIENT_SIZE => buf.resize(list.num_proc_array_entries as usize + 16, NvmlProcessDetail::default()),
            _ => return None,
        }
    }
    None
}

/// The one-call form of the three lists (`mode` 0 compute, 1 graphics, 2 MPS), as the others.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRunningProcessDetailList(device: NvmlDevice, list: *mut NvmlProcessDetailList) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetRunningProcessDetailList", NVML_ERROR_UNKNOWN, || {
        let real = real_or_return!(c"nvmlDeviceGetRunningProcessDetailList", DetailFn);
        // SAFETY: `real` is libnvidia-ml's own nvmlDeviceGetRunningProcessDetailList, given the caller's arguments unchanged.
        let Some(slice) = (!list.is_null()).then(|| tenant::of(device)).flatten() else { return unsafe { real(device, list) } };
        // SAFETY: `list` is non-null (the `let else` above returned otherwise): the caller's NvmlProcessDetailList, readable.
        let (version, mode) = unsafe { ((*list).version, (*list).mode) };
        // A version or mode NVML refuses: its own answer.
        // SAFETY: `real` is libnvidia-ml's own nvmlDeviceGetRunningProcessDetailList, given the caller's arguments unchanged.
        let Some(all) = real_details(real, device, version, mode) else { return unsafe { real(device, list) } };
        let shown = if mode == 0 {
            compute_list::<NvmlProcessDetail>(&slice, device)
        } else {
            let members = slice.members();
            all.into_iter().filter_map(|r| members.iter().find(|m| m.node_pid == r.pid).map(|m| r.with_pid(m.pid))).collect()
        };
        // SAFETY: `list` is non-null (checked above) and the caller's struct; no other reference to it is live.
        let l = unsafe { &mut *list };
        let mut count = l.num_proc_array_entries;
        // SAFETY: `count` is a local and `proc_array` the caller's array of `num_proc_array_entries` records, which is what `answer` needs.
        let code = unsafe { answer(&shown, &mut count, l.proc_array) };
        l.num_proc_array_entries = count;
        code
    })
}
