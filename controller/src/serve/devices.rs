//! The devices this node has, by NVML: the controller tracks only these (a registration that
//! names made-up UUIDs cannot take the device slots of real GPUs). MIG instances included.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

type Device = *mut c_void;
const NVML_SUCCESS: c_int = 0;

/// The UUIDs NVML lists (GPUs and their MIG instances), or `None` when NVML cannot be loaded
/// or initialised (then the controller says so and takes well-formed UUIDs on their word).
pub fn node_devices() -> Option<Vec<String>> {
    listed().map(|l| l.into_iter().map(|d| d.uuid).collect())
}

/// The GPUs that run CUDA work themselves: NVML's GPUs without MIG instances (a GPU in MIG mode
/// runs work only in its instances). What `--mps` gives a daemon each.
pub fn whole_gpus() -> Option<Vec<String>> {
    listed().map(|l| l.into_iter().filter(|d| d.kind == Kind::Gpu).map(|d| d.uuid).collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A GPU without MIG instances.
    Gpu,
    /// A GPU with MIG instances.
    MigParent,
    Mig,
}

struct Listed {
    uuid: String,
    kind: Kind,
}

fn listed() -> Option<Vec<Listed>> {
    // SAFETY: dlopen/dlsym of NVML's documented C entry points with their documented signatures
    // (nvml.h: nvmlInit_v2, nvmlDeviceGetCount_v2, nvmlDeviceGetHandleByIndex_v2,
    // nvmlDeviceGetUUID, nvmlDeviceGetMaxMigDeviceCount, nvmlDeviceGetMigDeviceHandleByIndex).
    unsafe {
        let lib = libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return None;
        }
        let sym = |name: &CStr| {
            let p = libc::dlsym(lib, name.as_ptr());
            (!p.is_null()).then_some(p)
        };
        let init: unsafe extern "C" fn() -> c_int = std::mem::transmute(sym(c"nvmlInit_v2")?);
        let count: unsafe extern "C" fn(*mut c_uint) -> c_int = std::mem::transmute(sym(c"nvmlDeviceGetCount_v2")?);
        let by_index: unsafe extern "C" fn(c_uint, *mut Device) -> c_int = std::mem::transmute(sym(c"nvmlDeviceGetHandleByIndex_v2")?);
        let get_uuid: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int = std::mem::transmute(sym(c"nvmlDeviceGetUUID")?);
        let mig_count: Option<unsafe extern "C" fn(Device, *mut c_uint) -> c_int> = sym(c"nvmlDeviceGetMaxMigDeviceCount").map(|p| std::mem::transmute(p));
        let mig_handle: Option<unsafe extern "C" fn(Device, c_uint, *mut Device) -> c_int> =
            sym(c"nvmlDeviceGetMigDeviceHandleByIndex").map(|p| std::mem::transmute(p));
        if init() != NVML_SUCCESS {
            return None;
        }
        let uuid_of = |d: Device| {
            let mut buf = [0 as c_char; 96];
            (get_uuid(d, buf.as_mut_ptr(), buf.len() as c_uint) == NVML_SUCCESS).then(|| CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned())
        };
        let mut n: c_uint = 0;
        if count(&mut n) != NVML_SUCCESS {
            return None;
        }
        let mut out = Vec::new();
        for i in 0..n.min(64) {
            let mut d: Device = std::ptr::null_mut();
            if by_index(i, &mut d) != NVML_SUCCESS {
                continue;
            }
            let Some(gpu) = uuid_of(d) else { continue };
            let mut instances = Vec::new();
            if let (Some(mig_count), Some(mig_handle)) = (mig_count, mig_handle) {
                let mut m: c_uint = 0;
                if mig_count(d, &mut m) == NVML_SUCCESS {
                    for k in 0..m.min(64) {
                        let mut h: Device = std::ptr::null_mut();
                        if mig_handle(d, k, &mut h) == NVML_SUCCESS {
                            instances.extend(uuid_of(h).map(|uuid| Listed { uuid, kind: Kind::Mig }));
                        }
                    }
                }
            }
            out.push(Listed { uuid: gpu, kind: if instances.is_empty() { Kind::Gpu } else { Kind::MigParent } });
            out.extend(instances);
        }
        // The library stays loaded: the controller may list again, and unloading NVML buys nothing.
        Some(out)
    }
}

/// True when a claimed UUID names one of `node`'s devices. CUDA and NVML may spell a MIG
/// instance's UUID with different prefixes ("GPU-" from a CUDA UUID's bytes, "MIG-" from
/// NVML): the hexadecimal part decides.
pub fn on_node(node: &[String], uuid: &str) -> bool {
    node.iter().any(|n| same_device(n, uuid))
}

/// True when two UUIDs name one device, whatever their prefix ("GPU-", "MIG-") and case.
pub fn same_device(a: &str, b: &str) -> bool {
    let hex = |u: &str| u.strip_prefix("GPU-").or_else(|| u.strip_prefix("MIG-")).unwrap_or(u).to_ascii_lowercase();
    hex(a) == hex(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_and_gpu_spellings_of_one_uuid_match() {
        let node = vec!["GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee".to_string(), "MIG-11111111-2222-3333-4444-555555555555".to_string()];
        assert!(on_node(&node, "GPU-AAAAAAAA-bbbb-cccc-dddd-eeeeeeeeeeee"));
        assert!(on_node(&node, "GPU-11111111-2222-3333-4444-555555555555"));
        assert!(!on_node(&node, "GPU-00000000-0000-0000-0000-000000000000"));
    }
}
