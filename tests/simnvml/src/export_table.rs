//! NVML's internal export table, the way nvidia-smi reads process lists: it never calls the public
//! `nvmlDevice*RunningProcesses`, it asks `nvmlInternalGetExportTable` for one table and calls
//! its slots 213–215 (one device's processes each). The table's size, id, slots and entry layout
//! are driver 580's, as nvidia-smi 580 was seen to use them (docs/NOTES.md, issue 15); the
//! simulator fills the three slots with the device's processes and every other slot with a
//! function that answers NOT_SUPPORTED, so that the shim's handling of the table is tested on
//! the same shapes.

use super::{fill_processes, NvmlReturn, ERROR_INVALID_ARGUMENT, ERROR_NOT_SUPPORTED, SUCCESS};
use std::ffi::{c_uint, c_void};
use std::sync::OnceLock;

/// The table's id as nvidia-smi passes it (the GUID 6c3efec4-8fc9-4e6c-a327-ee696e12f7c4 in
/// memory order).
const SMI_TABLE_ID: [u8; 16] = [0xc4, 0xfe, 0x3e, 0x6c, 0xc9, 0x8f, 0x6c, 0x4e, 0xa3, 0x27, 0xee, 0x69, 0x6e, 0x12, 0xf7, 0xc4];

/// The table's size in bytes, its first word (driver 580.159).
const TABLE_BYTES: usize = 0x870;

/// The slots (word index; word 0 is the size) that list a device's processes.
const PROCESS_SLOTS: [usize; 3] = [213, 214, 215];

/// One entry of those lists: `nvmlProcessDetail_v1_t`'s numbers, then the process's name inline.
#[repr(C)]
struct SmiProcess {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
    used_gpu_cc_protected_memory: u64,
    name: [u8; 4096],
}

const _: () = assert!(std::mem::size_of::<SmiProcess>() == 4128);

fn process_name(pid: c_uint) -> [u8; 4096] {
    let mut name = [0u8; 4096];
    let comm = std::fs::read(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
    let n = comm.len().min(name.len() - 1);
    name[..n].copy_from_slice(&comm[..n]);
    name
}

/// A process-list slot: `(device, in: room / out: count, entries)`.
unsafe extern "C" fn process_list(device: *mut c_void, count: *mut c_uint, entries: *mut SmiProcess) -> NvmlReturn {
    // SAFETY: the caller's NVML arguments, passed on as the public lists take them.
    unsafe {
        fill_processes(device, count, entries, |pid, used| SmiProcess {
            pid,
            used_gpu_memory: used,
            gpu_instance_id: super::VALUE_NOT_AVAILABLE,
            compute_instance_id: super::VALUE_NOT_AVAILABLE,
            used_gpu_cc_protected_memory: 0,
            name: process_name(pid),
        })
    }
}

/// Every slot the simulator does not implement.
unsafe extern "C" fn not_supported() -> NvmlReturn {
    ERROR_NOT_SUPPORTED
}

fn table() -> &'static [usize] {
    static TABLE: OnceLock<Vec<usize>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![not_supported as *const () as usize; TABLE_BYTES / 8];
        t[0] = TABLE_BYTES;
        for slot in PROCESS_SLOTS {
            t[slot] = process_list as *const () as usize;
        }
        t
    })
}

/// `nvmlReturn_t nvmlInternalGetExportTable(const void **table, const nvmlExportTableId *id)`:
/// the table for nvidia-smi's id, NOT_SUPPORTED for any other.
///
/// # Safety
/// `table` is null or writable; `id` is null or 16 readable bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlInternalGetExportTable(table_out: *mut *const c_void, id: *const [u8; 16]) -> NvmlReturn {
    if table_out.is_null() || id.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null (checked above): the caller's 16-byte id.
    if unsafe { *id } != SMI_TABLE_ID {
        return ERROR_NOT_SUPPORTED;
    }
    // SAFETY: non-null (checked above): the caller's out-pointer.
    unsafe { *table_out = table().as_ptr().cast() };
    SUCCESS
}
