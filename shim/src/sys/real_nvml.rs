//! The real NVML, for the shim's own use: the library (opened, or found already loaded), its
//! functions the pass-through hooks forward to, the handle of each CUDA device, and the UUID
//! strings that name devices in the ledger and the turn board. Below the hooks (`hooks::nvml`)
//! and every module that names a device by its UUID.

use crate::sys::dl::Library;
use crate::sys::driver::driver;
use crate::sys::ffi::*;
use crate::sys::locks;
use once_cell::sync::OnceCell;
use std::ffi::{c_char, c_uint, c_void, CStr};
use std::sync::Mutex;

type InitFn = unsafe extern "C" fn() -> NvmlReturn;
type HandleByUuidFn = unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn;
type UuidFn = unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> NvmlReturn;
type MemoryFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> NvmlReturn;
type ProcessesFn = unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut NvmlProcessInfo) -> NvmlReturn;
type CountFn = unsafe extern "C" fn(*mut c_uint) -> NvmlReturn;
type HandleByIndexFn = unsafe extern "C" fn(c_uint, *mut NvmlDevice) -> NvmlReturn;

/// The real NVML functions the shim uses.
pub struct Nvml {
    pub(crate) handle_by_uuid: Option<HandleByUuidFn>,
    pub(crate) uuid: Option<UuidFn>,
    pub(crate) memory: Option<MemoryFn>,
    pub(crate) processes: Option<ProcessesFn>,
    count: Option<CountFn>,
    handle_by_index: Option<HandleByIndexFn>,
    pub(crate) initialised: bool,
    /// CUDA ordinal → NVML handle, filled on first use.
    handles: Mutex<Vec<Option<usize>>>,
}

static NVML: OnceCell<Option<Nvml>> = OnceCell::new();
static LIBRARY: OnceCell<Option<Library>> = OnceCell::new();

/// The real library, opened (or found already loaded) but not initialised by the shim: what
/// the pass-through hooks forward to.
pub fn library() -> Option<&'static Library> {
    LIBRARY.get_or_init(|| Library::open(c"libnvidia-ml.so.1")).as_ref()
}

/// The real function `name` of the library, cached in `cell` (one per hook).
pub(crate) fn real<T: Copy>(cell: &OnceCell<usize>, name: &CStr) -> Option<T> {
    let p = *cell.get_or_init(|| library().map_or(0, |lib| lib.symbol(name) as usize));
    // SAFETY: T is the function-pointer type of the NVML symbol of this name.
    (p != 0).then(|| unsafe { std::mem::transmute_copy::<usize, T>(&p) })
}

fn sym<T>(lib: &Library, name: &CStr) -> Option<T> {
    let p = lib.symbol(name);
    // SAFETY: T is the function-pointer type of the NVML symbol of this name.
    (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

/// The real NVML, initialised for the shim's own use; `None` without NVML.
pub fn nvml() -> Option<&'static Nvml> {
    NVML.get_or_init(|| {
        let lib = library()?;
        let init: Option<InitFn> = sym(lib, c"nvmlInit_v2");
        // SAFETY: nvmlInit_v2 takes no arguments; it is reference-counted, so the host
        // program's own init/shutdown pairs are unaffected.
        let initialised = init.is_some_and(|f| unsafe { f() } == NVML_SUCCESS);
        if !initialised {
            tracing::info!("NVML present but nvmlInit_v2 failed; measuring without it");
        }
        Some(Nvml {
            handle_by_uuid: sym(lib, c"nvmlDeviceGetHandleByUUID"),
            uuid: sym(lib, c"nvmlDeviceGetUUID"),
            memory: sym(lib, c"nvmlDeviceGetMemoryInfo"),
            processes: sym(lib, c"nvmlDeviceGetComputeRunningProcesses_v3"),
            count: sym(lib, c"nvmlDeviceGetCount_v2"),
            handle_by_index: sym(lib, c"nvmlDeviceGetHandleByIndex_v2"),
            initialised,
            handles: Mutex::new(Vec::new()),
        })
    })
    .as_ref()
}

/// This module's part in a fork (`sys::atfork`; `hooks::fork` orders the modules).
pub const FORK: crate::sys::atfork::Handlers = crate::sys::atfork::Handlers { prepare: hold_for_fork, in_child: crate::sys::atfork::nothing_to_forget };

/// The handle cache's lock, for a fork (see `sys::atfork`); NVML handles stay valid in the child.
pub fn hold_for_fork(h: &mut crate::sys::atfork::Holder) {
    if let Some(Some(nv)) = NVML.get() {
        h.take(&nv.handles, crate::sys::atfork::keep);
    }
}

/// The hexadecimal part of CUDA device `device`'s UUID ("xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx").
/// For a MIG device `cuDeviceGetUuid_v2` gives the MIG instance's UUID.
fn cuda_uuid_hex(device: CUdevice) -> Option<String> {
    let d = driver()?;
    let get = d.cuDeviceGetUuid_v2?;
    let mut uuid = CUuuid { bytes: [0; 16] };
    // SAFETY: out-pointer to a local.
    if unsafe { get(&mut uuid, device) } != CUDA_SUCCESS {
        return None;
    }
    let b: Vec<u8> = uuid.bytes.iter().map(|&c| c as u8).collect();
    let hex = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    Some(format!("{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16)))
}

/// The UUID string of CUDA device `device` as NVML spells it: "GPU-" + hex for a GPU, "MIG-" +
/// hex for a MIG instance (CUDA's 16 bytes do not say which; NVML's handle for them does).
/// "GPU-" when NVML cannot tell.
pub fn cuda_uuid_string(device: CUdevice) -> Option<String> {
    let gpu = format!("GPU-{}", cuda_uuid_hex(device)?);
    match nvml().and_then(|n| n.handle_of(device)).and_then(uuid_of) {
        Some(named) if same_uuid(&named, &gpu) => Some(named),
        _ => Some(gpu),
    }
}

impl Nvml {
    /// The NVML handle of CUDA device ordinal `device` (matched by UUID, so that
    /// `CUDA_VISIBLE_DEVICES` reordering cannot mix devices up).
    pub fn handle_of(&self, device: CUdevice) -> Option<NvmlDevice> {
        if !self.initialised || device < 0 {
            return None;
        }
        let index = device as usize;
        if let Some(Some(h)) = locks::lock(&self.handles).get(index) {
            return Some(*h as NvmlDevice);
        }
        // A GPU, else a MIG instance: nvmlDeviceGetHandleByUUID takes either's UUID, and CUDA's
        // bytes are the instance's own for a MIG device.
        let hex = cuda_uuid_hex(device)?;
        let by_uuid = self.handle_by_uuid?;
        let mut handle: NvmlDevice = std::ptr::null_mut();
        let found = ["GPU-", "MIG-"].iter().any(|prefix| {
            let Ok(uuid) = std::ffi::CString::new(format!("{prefix}{hex}")) else { return false };
            // SAFETY: valid C string and out-pointer.
            unsafe { by_uuid(uuid.as_ptr(), &mut handle) == NVML_SUCCESS }
        });
        if !found {
            return None;
        }
        let mut handles = locks::lock(&self.handles);
        if handles.len() <= index {
            handles.resize(index + 1, None);
        }
        handles[index] = Some(handle as usize);
        Some(handle)
    }

    /// The UUIDs of the GPUs NVML lists for this process (in a container, the container's),
    /// without the driver: what the process may see when `CUDA_VISIBLE_DEVICES` does not say.
    /// `None` when NVML cannot tell.
    pub fn gpu_uuids(&self) -> Option<Vec<String>> {
        if !self.initialised {
            return None;
        }
        let mut n: c_uint = 0;
        // SAFETY: out-pointer to a local.
        if unsafe { (self.count?)(&mut n) } != NVML_SUCCESS {
            return None;
        }
        (0..n.min(64))
            .map(|i| {
                let mut handle: NvmlDevice = std::ptr::null_mut();
                // SAFETY: an index below the count and an out-pointer to a local.
                (unsafe { (self.handle_by_index?)(i, &mut handle) } == NVML_SUCCESS).then_some(())?;
                uuid_of(handle)
            })
            .collect()
    }

    /// Device memory used on `device` by all processes.
    pub fn device_used(&self, device: CUdevice) -> Option<u64> {
        let handle = self.handle_of(device)?;
        let mut m = NvmlMemory { total: 0, free: 0, used: 0 };
        // SAFETY: valid handle and out-pointer.
        (unsafe { (self.memory?)(handle, &mut m) } == NVML_SUCCESS).then_some(m.used)
    }

    /// Device memory NVML attributes to this process on `device`: `Some(None)` when NVML
    /// answers but does not list this pid (not using the device yet, or another pid namespace).
    pub fn process_used(&self, device: CUdevice) -> Option<Option<u64>> {
        let handle = self.handle_of(device)?;
        let get = self.processes?;
        let pid = std::process::id();
        let mut infos = vec![NvmlProcessInfo::default(); 64];
        for _ in 0..4 {
            let mut count = infos.len() as c_uint;
            // SAFETY: the buffer holds `count` entries.
            match unsafe { get(handle, &mut count, infos.as_mut_ptr()) } {
                NVML_SUCCESS => {
                    return Some(
                        infos[..count as usize].iter().find(|p| p.pid == pid).map(|p| p.used_gpu_memory),
                    )
                }
                7 /* NVML_ERROR_INSUFFICIENT_SIZE */ => infos.resize(count as usize + 16, NvmlProcessInfo::default()),
                _ => return None,
            }
        }
        None
    }
}

/// The UUID NVML gives `device`, as a string ("GPU-..." or "MIG-...").
pub fn uuid_of(device: NvmlDevice) -> Option<String> {
    let get = nvml()?.uuid?;
    let mut buf = [0 as c_char; 96];
    // SAFETY: buffer and its length.
    if unsafe { get(device, buf.as_mut_ptr(), buf.len() as c_uint) } != NVML_SUCCESS {
        return None;
    }
    // SAFETY: NVML wrote a NUL-terminated string into the buffer.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// True when two UUID strings name one device: CUDA's are spelt "GPU-" + hex whatever the
/// device (`cuda_uuid_string`), NVML's "MIG-" + hex for a MIG instance.
pub fn same_uuid(a: &str, b: &str) -> bool {
    let bare = |s: &str| {
        let t = s.trim().to_ascii_lowercase();
        match t.strip_prefix("gpu-").or_else(|| t.strip_prefix("mig-")) {
            Some(rest) => rest.to_string(),
            None => t,
        }
    };
    bare(a) == bare(b)
}
