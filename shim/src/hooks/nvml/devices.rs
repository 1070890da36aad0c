//! Which devices a sliced process sees through NVML: those `CUDA_VISIBLE_DEVICES` lets it use,
//! in the driver's order and numbered from 0 the way the driver numbers them, so that no device
//! the tenant cannot use appears. Handles asked for by UUID, PCI bus id or serial work for the
//! visible devices and their MIG instances and answer "not found" for the others.
//!
//! The list is read as the driver reads the variable: comma-separated indices, `GPU-` UUIDs
//! (a unique prefix is enough) or `MIG-` UUIDs; at the first entry that names no device (or a
//! device twice) the list ends. Indices count in NVML's order (PCI bus order), which is CUDA's
//! with `CUDA_DEVICE_ORDER=PCI_BUS_ID` and, on a machine of identical GPUs, its default too.
//!
//! Only a list of UUIDs renumbers NVML. A list with an index in it is left to the program:
//! PyTorch (`torch.cuda.device_count()` counts through NVML), vLLM and others apply such a list
//! to NVML's own numbering themselves (index 1 means NVML's device 1), so renumbering under them
//! would make them count no device or open the wrong one. A list of UUIDs they match against
//! the devices NVML lists, which stays right when the hidden ones are gone.

use super::real_or_return;
use crate::sys::ffi::*;
use crate::sys::guard;
use crate::sys::real_nvml::{library, nvml, real, uuid_of};
use once_cell::sync::OnceCell;
use std::ffi::{c_char, c_uint};

/// One device the process may use.
pub struct Visible {
    /// The NVML handle of the GPU (a MIG instance's parent for a `MIG-` entry), as an address.
    pub handle: usize,
    /// The UUID the CUDA ordinal carries: the GPU's, or the MIG instance's.
    pub uuid: String,
}

type CountFn = unsafe extern "C" fn(*mut c_uint) -> NvmlReturn;
type ByIndexFn = unsafe extern "C" fn(c_uint, *mut NvmlDevice) -> NvmlReturn;
type ByStringFn = unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn;
type IndexFn = unsafe extern "C" fn(NvmlDevice, *mut c_uint) -> NvmlReturn;
type ParentFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlDevice) -> NvmlReturn;

/// Every GPU NVML lists, in its order: (handle, UUID).
fn all_gpus() -> Option<Vec<(usize, String)>> {
    nvml()?; // Initialised for the shim's own use.
    static COUNT: OnceCell<usize> = OnceCell::new();
    static BY_INDEX: OnceCell<usize> = OnceCell::new();
    let count = real::<CountFn>(&COUNT, c"nvmlDeviceGetCount_v2")?;
    let by_index = real::<ByIndexFn>(&BY_INDEX, c"nvmlDeviceGetHandleByIndex_v2")?;
    let mut n: c_uint = 0;
    // SAFETY: out-pointers to locals.
    if unsafe { count(&mut n) } != NVML_SUCCESS {
        return None;
    }
    (0..n)
        .map(|i| {
            let mut h: NvmlDevice = std::ptr::null_mut();
            // SAFETY: out-pointer to a local.
            (unsafe { by_index(i, &mut h) } == NVML_SUCCESS).then_some(())?;
            Some((h as usize, uuid_of(h)?))
        })
        .collect()
}

/// The parent GPU's handle of a MIG instance's handle.
fn mig_parent(mig: NvmlDevice) -> Option<usize> {
    let p = library()?.symbol(c"nvmlDeviceGetDeviceHandleFromMigDeviceHandle");
    if p.is_null() {
        return None;
    }
    // SAFETY: the real function of this name has this signature.
    let parent_of = unsafe { std::mem::transmute::<*mut std::ffi::c_void, ParentFn>(p) };
    let mut parent: NvmlDevice = std::ptr::null_mut();
    // SAFETY: out-pointer to a local.
    (unsafe { parent_of(mig, &mut parent) } == NVML_SUCCESS).then_some(parent as usize)
}

/// The devices `list` (a `CUDA_VISIBLE_DEVICES` value) lets a process use, out of `gpus`.
/// `by_mig_uuid` finds a MIG instance's (parent handle) by its UUID.
pub fn parse_visible(list: &str, gpus: &[(usize, String)], by_mig_uuid: impl Fn(&str) -> Option<usize>) -> Vec<Visible> {
    let mut out: Vec<Visible> = Vec::new();
    for entry in list.split(',').map(str::trim) {
        let lower = entry.to_ascii_lowercase();
        let found = if !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit()) {
            entry.parse::<usize>().ok().and_then(|i| gpus.get(i)).map(|(h, u)| Visible { handle: *h, uuid: u.clone() })
        } else if lower.starts_with("gpu-") {
            let mut matching = gpus.iter().filter(|(_, u)| u.to_ascii_lowercase().starts_with(&lower));
            match (matching.next(), matching.next()) {
                (Some((h, u)), None) => Some(Visible { handle: *h, uuid: u.clone() }),
                _ => None,
            }
        } else if lower.starts_with("mig-") {
            by_mig_uuid(entry).map(|h| Visible { handle: h, uuid: entry.to_string() })
        } else {
            None
        };
        match found {
            Some(v) if !out.iter().any(|o| o.handle == v.handle) => out.push(v),
            _ => break,
        }
    }
    out
}

/// The devices this process may use, in ordinal order; `None` when NVML cannot say.
pub fn visible() -> Option<&'static [Visible]> {
    static VISIBLE: OnceCell<Option<Vec<Visible>>> = OnceCell::new();
    VISIBLE
        .get_or_init(|| {
            let gpus = all_gpus()?;
            Some(match std::env::var("CUDA_VISIBLE_DEVICES") {
                Err(_) => gpus.into_iter().map(|(handle, uuid)| Visible { handle, uuid }).collect(),
                Ok(list) => parse_visible(&list, &gpus, |uuid| {
                    let by_uuid = nvml()?.handle_by_uuid?;
                    let c = std::ffi::CString::new(uuid).ok()?;
                    let mut h: NvmlDevice = std::ptr::null_mut();
                    // SAFETY: a C string and an out-pointer to a local.
                    (unsafe { by_uuid(c.as_ptr(), &mut h) } == NVML_SUCCESS).then_some(())?;
                    mig_parent(h)
                }),
            })
        })
        .as_deref()
}

/// True when a `CUDA_VISIBLE_DEVICES` value may renumber NVML: it names devices by UUID only
/// (see the module's note on indices).
pub fn renumbers(list: &str) -> bool {
    !list.split(',').map(str::trim).any(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
}

/// The visible devices when the process is sliced and a `CUDA_VISIBLE_DEVICES` of UUIDs
/// restricts it; `None` otherwise (NVML's own answers stand).
fn restricted() -> Option<&'static [Visible]> {
    crate::sys::runtime::runtime().slicing_settings()?;
    renumbers(&std::env::var("CUDA_VISIBLE_DEVICES").ok()?).then_some(())?;
    visible()
}

/// False when `handle` is one of NVML's GPUs that the restriction hides (a MIG instance's
/// handle counts as its parent's).
fn allowed(handle: NvmlDevice, shown: &[Visible]) -> bool {
    let h = mig_parent(handle).unwrap_or(handle as usize);
    shown.iter().any(|v| v.handle == h) || !all_gpus().unwrap_or_default().iter().any(|(g, _)| *g == h)
}

unsafe fn count(real: CountFn, out: *mut c_uint) -> NvmlReturn {
    // SAFETY: `real` is libnvidia-ml's own count function (CountFn ABI), given the caller's out-pointer unchanged.
    let code = unsafe { real(out) };
    if code == NVML_SUCCESS && !out.is_null() {
        if let Some(shown) = restricted() {
            // SAFETY: `out` is non-null (checked above) and NVML just wrote the count through it, so it is writable.
            unsafe { *out = shown.len() as c_uint };
        }
    }
    code
}

unsafe fn by_index(real: ByIndexFn, index: c_uint, out: *mut NvmlDevice) -> NvmlReturn {
    // SAFETY: `real` is libnvidia-ml's own by-index lookup (ByIndexFn ABI), given the caller's arguments unchanged.
    let Some(shown) = restricted() else { return unsafe { real(index, out) } };
    if out.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match shown.get(index as usize) {
        Some(v) => {
            // SAFETY: `out` was checked non-null above; it is the caller's slot for a device handle.
            unsafe { *out = v.handle as NvmlDevice };
            NVML_SUCCESS
        }
        None => NVML_ERROR_INVALID_ARGUMENT,
    }
}

unsafe fn by_string(real: ByStringFn, key: *const c_char, out: *mut NvmlDevice) -> NvmlReturn {
    // SAFETY: `real` is libnvidia-ml's own by-string lookup (ByStringFn ABI), given the caller's key and out-pointer unchanged.
    let code = unsafe { real(key, out) };
    if code == NVML_SUCCESS && !out.is_null() {
        if let Some(shown) = restricted() {
            // SAFETY: `out` is non-null (checked above) and NVML just wrote a handle through it.
            if !allowed(unsafe { *out }, shown) {
                return NVML_ERROR_NOT_FOUND;
            }
        }
    }
    code
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount(out: *mut c_uint) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetCount", NVML_ERROR_UNKNOWN, || {
        let real = real_or_return!(c"nvmlDeviceGetCount", CountFn);
        // SAFETY: `real` is NVML's nvmlDeviceGetCount and `out` the program's own argument, which is what `count` needs.
        unsafe { count(real, out) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(out: *mut c_uint) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetCount_v2", NVML_ERROR_UNKNOWN, || {
        let real = real_or_return!(c"nvmlDeviceGetCount_v2", CountFn);
        // SAFETY: `real` is NVML's nvmlDeviceGetCount_v2 and `out` the program's own argument, which is what `count` needs.
        unsafe { count(real, out) }
    })
}

/// The handle lookups: each calls the real function of its own name through `$how`
/// (`by_index`, `by_string`), which answers only for the devices this process may see.
macro_rules! handle_hooks {
    ($( $name:ident ( $key:ty ) : $real:ty => $how:ident ; )*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(key: $key, out: *mut NvmlDevice) -> NvmlReturn {
            guard::with_fallback(stringify!($name), NVML_ERROR_UNKNOWN, || {
                let real = real_or_return!(
                    // SAFETY: a literal with exactly one trailing NUL.
                    unsafe { std::ffi::CStr::from_bytes_with_nul_unchecked(concat!(stringify!($name), "\0").as_bytes()) },
                    $real
                );
                // SAFETY: `real` is NVML's own `$name` (`$real` ABI) and `key`/`out` the program's own arguments, which is what `$how` needs.
                unsafe { $how(real, key, out) }
            })
        }
    )*};
}

handle_hooks! {
    nvmlDeviceGetHandleByIndex(c_uint): ByIndexFn => by_index;
    nvmlDeviceGetHandleByIndex_v2(c_uint): ByIndexFn => by_index;
    nvmlDeviceGetHandleByUUID(*const c_char): ByStringFn => by_string;
    nvmlDeviceGetHandleByPciBusId(*const c_char): ByStringFn => by_string;
    nvmlDeviceGetHandleByPciBusId_v2(*const c_char): ByStringFn => by_string;
    nvmlDeviceGetHandleBySerial(*const c_char): ByStringFn => by_string;
}

/// A visible device's index is its position among the visible ones (the driver's numbering).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: NvmlDevice, out: *mut c_uint) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetIndex", NVML_ERROR_UNKNOWN, || {
        let real = real_or_return!(c"nvmlDeviceGetIndex", IndexFn);
        // SAFETY: `real` is libnvidia-ml's own nvmlDeviceGetIndex, given the caller's arguments unchanged.
        let code = unsafe { real(device, out) };
        if code == NVML_SUCCESS && !out.is_null() {
            if let Some(i) = restricted().and_then(|shown| shown.iter().position(|v| v.handle == device as usize)) {
                // SAFETY: `out` is non-null (checked above) and NVML just wrote the index through it, so it is writable.
                unsafe { *out = i as c_uint };
            }
        }
        code
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus() -> Vec<(usize, String)> {
        vec![(10, "GPU-aaaa1111-0000".into()), (20, "GPU-aaaa2222-0000".into()), (30, "GPU-bbbb0000-0000".into())]
    }

    fn shown(list: &str) -> Vec<usize> {
        parse_visible(list, &gpus(), |u| (u == "MIG-1234").then_some(20)).iter().map(|v| v.handle).collect()
    }

    #[test]
    fn indices_uuids_and_prefixes_in_the_order_given() {
        assert_eq!(shown("2,0"), vec![30, 10]);
        assert_eq!(shown(" 1 "), vec![20]);
        assert_eq!(shown("GPU-bbbb"), vec![30]);
        assert_eq!(shown("gpu-AAAA2222-0000,0"), vec![20, 10]);
        assert_eq!(shown("MIG-1234"), vec![20]);
    }

    #[test]
    fn only_lists_of_uuids_renumber_nvml() {
        assert!(renumbers("GPU-aaaa,MIG-1234"));
        assert!(renumbers(""));
        assert!(renumbers("-1"));
        assert!(!renumbers("1"));
        assert!(!renumbers("GPU-aaaa, 0"));
    }

    #[test]
    fn the_list_ends_at_the_first_entry_naming_no_device() {
        assert_eq!(shown("1,7,0"), vec![20]);
        assert_eq!(shown("0,GPU-aaaa,2"), vec![10], "an ambiguous prefix names no device");
        assert_eq!(shown("0,0,1"), vec![10], "a device named twice ends the list");
        assert_eq!(shown(""), Vec::<usize>::new());
        assert_eq!(shown("-1"), Vec::<usize>::new());
        assert_eq!(shown("x,0"), Vec::<usize>::new());
    }
}
