//! nvidia-smi's process list inside a slice. nvidia-smi does not call the public
//! `nvmlDevice*RunningProcesses` (those the `processes` hooks answer); it asks
//! `nvmlInternalGetExportTable` for one private table and calls three of its slots, each of
//! which fills one device's process list. This hook hands nvidia-smi a copy of that table whose
//! three slots call the real ones and then keep only the entries of the caller's group, under
//! the pids the caller sees them by, as the public lists do.
//!
//! What is known of the table comes from watching nvidia-smi 580 (docs/NOTES.md, issue 15): its
//! id, its size word, which slots list processes, their arguments `(device, in: room / out:
//! count, entries)` and an entry of 4128 bytes that starts with the pid (`u32`). Nothing of it is
//! documented, so the copy is handed out only where all of that was seen: the 580 driver
//! branch, a table large enough to hold the slots. Anywhere else nvidia-smi gets the real
//! table and lists every process on the card, as without the shim, and one `info` line says so.
//! A process outside any slice gets the real table too.

use super::real_or_return;
use super::tenant::{self, Slice};
use crate::sys::ffi::*;
use crate::sys::guard;
use crate::sys::real_nvml::library;
use once_cell::sync::OnceCell;
use std::ffi::{c_char, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The id nvidia-smi asks for (the GUID 6c3efec4-8fc9-4e6c-a327-ee696e12f7c4, as its 16 bytes
/// lie in memory).
const SMI_TABLE_ID: [u8; 16] = [0xc4, 0xfe, 0x3e, 0x6c, 0xc9, 0x8f, 0x6c, 0x4e, 0xa3, 0x27, 0xee, 0x69, 0x6e, 0x12, 0xf7, 0xc4];

/// The slots (word index; word 0 is the table's size in bytes) that list a device's processes.
const PROCESS_SLOTS: [usize; 3] = [213, 214, 215];

/// The bytes of one entry of those lists: `nvmlProcessDetail_v1_t`'s numbers (pid first), then
/// the process's name inline (4096 bytes).
const ENTRY_BYTES: usize = 4128;

/// The driver branches whose table was seen to have this shape.
const KNOWN_BRANCHES: [&str; 1] = ["580."];

/// More entries than any list can hold: a count above it is not a process list.
const MAX_ENTRIES: c_uint = 65_536;

type GetTableFn = unsafe extern "C" fn(*mut *const c_void, *const [u8; 16]) -> NvmlReturn;
type DriverVersionFn = unsafe extern "C" fn(*mut c_char, c_uint) -> NvmlReturn;

/// A process-list slot, called with six integer registers so that whatever the real function
/// takes beyond the three arguments known reaches it unchanged.
type SlotFn = unsafe extern "C" fn(usize, usize, usize, usize, usize, usize) -> NvmlReturn;

/// The real slot functions the copy's wrappers call, in `PROCESS_SLOTS` order.
static REAL_SLOTS: [AtomicUsize; 3] = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];

/// The real table the copy was made from, and the copy (leaked: nvidia-smi keeps the pointer).
static COPY: OnceCell<Option<(usize, &'static [usize])>> = OnceCell::new();

macro_rules! slot_wrappers {
    ($($name:ident => $k:expr;)*) => {$(
        unsafe extern "C" fn $name(a0: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize) -> NvmlReturn {
            // SAFETY: the copy holds this wrapper only after storing the real slot it stands for.
            let real: SlotFn = unsafe { std::mem::transmute::<usize, SlotFn>(REAL_SLOTS[$k].load(Relaxed)) };
            // SAFETY: the real slot, given nvidia-smi's own arguments unchanged.
            let code = unsafe { real(a0, a1, a2, a3, a4, a5) };
            if code == NVML_SUCCESS {
                guard::with_fallback(stringify!($name), (), || {
                    // SAFETY: the real slot succeeded with these arguments: a device, its count
                    // and its entries, as nvidia-smi passed them.
                    unsafe { keep_the_group(a0 as NvmlDevice, a1 as *mut c_uint, a2 as *mut u8) }
                });
            }
            code
        }
    )*};
}

slot_wrappers! {
    process_slot_0 => 0;
    process_slot_1 => 1;
    process_slot_2 => 2;
}

const WRAPPERS: [SlotFn; 3] = [process_slot_0, process_slot_1, process_slot_2];

/// Drops from a filled list every entry that is not a member of the caller's group on
/// `device`, gives the members the pids the caller sees them by, and closes the gaps.
///
/// # Safety
/// `count` and `entries` are what a process-list slot just filled for `device`.
unsafe fn keep_the_group(device: NvmlDevice, count: *mut c_uint, entries: *mut u8) {
    let Some(slice) = tenant::of(device) else { return };
    if count.is_null() || entries.is_null() {
        return;
    }
    // SAFETY: non-null (checked above): the count the slot wrote.
    let n = unsafe { *count };
    if n > MAX_ENTRIES {
        return;
    }
    // SAFETY: the slot wrote `n` entries of ENTRY_BYTES into `entries`.
    let kept = unsafe { keep_members(&slice, entries, n as usize) };
    // SAFETY: as above.
    unsafe { *count = kept as c_uint };
}

/// Compacts the members' entries to the front; their number.
///
/// # Safety
/// `entries` holds `n` entries of ENTRY_BYTES.
unsafe fn keep_members(slice: &Slice, entries: *mut u8, n: usize) -> usize {
    let members = slice.members();
    let mut kept = 0;
    for i in 0..n {
        // SAFETY: entry `i` of the `n` the caller vouches for.
        let entry = unsafe { entries.add(i * ENTRY_BYTES) };
        // SAFETY: an entry starts with its pid; entries are not aligned for us to rely on.
        let pid = unsafe { std::ptr::read_unaligned(entry.cast::<u32>()) };
        let Some(member) = members.iter().find(|m| m.node_pid == pid) else { continue };
        // SAFETY: entry `kept` <= `i` lies within the list; `copy` allows the overlap of equals.
        unsafe {
            let to = entries.add(kept * ENTRY_BYTES);
            std::ptr::copy(entry, to, ENTRY_BYTES);
            std::ptr::write_unaligned(to.cast::<u32>(), member.pid);
        }
        kept += 1;
    }
    kept
}

/// The driver's version string, from the real NVML (initialised by the caller by now).
fn driver_version() -> Option<String> {
    let f = library()?.symbol(c"nvmlSystemGetDriverVersion");
    if f.is_null() {
        return None;
    }
    // SAFETY: nvmlSystemGetDriverVersion(char *version, unsigned int length).
    let f: DriverVersionFn = unsafe { std::mem::transmute::<*mut c_void, DriverVersionFn>(f) };
    let mut buf = [0 as c_char; 96];
    // SAFETY: a buffer and its length.
    if unsafe { f(buf.as_mut_ptr(), buf.len() as c_uint) } != NVML_SUCCESS {
        return None;
    }
    // SAFETY: NVML wrote a NUL-terminated string into the buffer.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// The filtering copy of `real`, or why not.
///
/// # Safety
/// `real` is the table NVML just handed out for SMI_TABLE_ID.
unsafe fn filtering_copy(real: *const usize) -> Result<&'static [usize], String> {
    let version = driver_version().unwrap_or_else(|| "unknown".into());
    if !KNOWN_BRANCHES.iter().any(|b| version.starts_with(b)) {
        return Err(format!("driver {version} is not of a branch whose table was seen ({KNOWN_BRANCHES:?})"));
    }
    // SAFETY: the table's first word is its size in bytes.
    let bytes = unsafe { *real };
    let words = bytes / 8;
    if words <= PROCESS_SLOTS[2] || bytes > 64 * 1024 {
        return Err(format!("its table is {bytes} bytes"));
    }
    // SAFETY: the table holds `words` words, its size word says.
    let mut copy = unsafe { std::slice::from_raw_parts(real, words) }.to_vec();
    for (k, &slot) in PROCESS_SLOTS.iter().enumerate() {
        if copy[slot] == 0 {
            return Err(format!("slot {slot} is empty"));
        }
        REAL_SLOTS[k].store(copy[slot], Relaxed);
        copy[slot] = WRAPPERS[k] as usize;
    }
    Ok(Box::leak(copy.into_boxed_slice()))
}

/// `nvmlReturn_t nvmlInternalGetExportTable(const void **table, const nvmlExportTableId_t *id)`
/// (not in nvml.h; nvidia-smi looks it up with `dlsym`).
///
/// # Safety
/// The caller's NVML arguments: `table` writable or null, `id` 16 readable bytes or null.
#[no_mangle]
pub unsafe extern "C" fn nvmlInternalGetExportTable(table: *mut *const c_void, id: *const [u8; 16]) -> NvmlReturn {
    guard::with_fallback("nvmlInternalGetExportTable", NVML_ERROR_UNKNOWN, || {
        let real = real_or_return!(c"nvmlInternalGetExportTable", GetTableFn);
        // SAFETY: NVML's own function, given the caller's arguments unchanged.
        let code = unsafe { real(table, id) };
        // SAFETY: `id` is checked non-null first; then the caller's 16 bytes.
        if code != NVML_SUCCESS || table.is_null() || id.is_null() || unsafe { *id } != SMI_TABLE_ID {
            return code;
        }
        // SAFETY: non-null (checked above), and NVML just wrote it.
        let handed = unsafe { *table }.cast::<usize>();
        if handed.is_null() || crate::sys::runtime::runtime().slicing_settings().is_none() {
            return code;
        }
        let copy = COPY.get_or_init(|| {
            // SAFETY: the table NVML handed out for SMI_TABLE_ID.
            match unsafe { filtering_copy(handed) } {
                Ok(copy) => Some((handed as usize, copy)),
                Err(why) => {
                    tracing::info!("nvidia-smi's process list is not narrowed to the slice: {why}");
                    None
                }
            }
        });
        if let Some((from, copy)) = copy {
            if *from == handed as usize {
                // SAFETY: the caller's out-pointer, non-null (checked above).
                unsafe { *table = copy.as_ptr().cast() };
            }
        }
        code
    })
}
