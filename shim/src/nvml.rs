//! NVML, the shim's second source of truth about device memory: the real library for measuring
//! what the process holds, and the hooks that make NVML's memory queries report the quota.
//!
//! The shim opens `libnvidia-ml.so.1` only when a memory limit is set or the host program itself
//! asks NVML for memory information, so that a process without limits is left exactly as it was.

use crate::dl::Library;
use crate::driver::driver;
use crate::ffi::*;
use crate::{budget, guard, locks, runtime};
use once_cell::sync::OnceCell;
use std::sync::Mutex;
use std::ffi::{c_char, c_uint, c_void, CStr};

type InitFn = unsafe extern "C" fn() -> NvmlReturn;
type HandleByUuidFn = unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn;
type UuidFn = unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> NvmlReturn;
type MemoryFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> NvmlReturn;
type MemoryV2Fn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemoryV2) -> NvmlReturn;
type ProcessesFn = unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut NvmlProcessInfo) -> NvmlReturn;

/// The real NVML functions the shim uses.
pub struct Nvml {
    handle_by_uuid: Option<HandleByUuidFn>,
    uuid: Option<UuidFn>,
    memory: Option<MemoryFn>,
    memory_v2: Option<MemoryV2Fn>,
    processes: Option<ProcessesFn>,
    initialised: bool,
    /// CUDA ordinal → NVML handle, filled on first use.
    handles: Mutex<Vec<Option<usize>>>,
}

static NVML: OnceCell<Option<Nvml>> = OnceCell::new();

fn sym<T>(lib: &Library, name: &CStr) -> Option<T> {
    let p = lib.symbol(name);
    // SAFETY: T is the function-pointer type of the NVML symbol of this name.
    (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

/// The real NVML, initialised for the shim's own use; `None` without NVML.
pub fn nvml() -> Option<&'static Nvml> {
    NVML.get_or_init(|| {
        let lib = Library::open(c"libnvidia-ml.so.1")?;
        let init: Option<InitFn> = sym(&lib, c"nvmlInit_v2");
        // SAFETY: nvmlInit_v2 takes no arguments; it is reference-counted, so the host
        // program's own init/shutdown pairs are unaffected.
        let initialised = init.is_some_and(|f| unsafe { f() } == NVML_SUCCESS);
        if !initialised {
            tracing::info!("NVML present but nvmlInit_v2 failed; measuring without it");
        }
        Some(Nvml {
            handle_by_uuid: sym(&lib, c"nvmlDeviceGetHandleByUUID"),
            uuid: sym(&lib, c"nvmlDeviceGetUUID"),
            memory: sym(&lib, c"nvmlDeviceGetMemoryInfo"),
            memory_v2: sym(&lib, c"nvmlDeviceGetMemoryInfo_v2"),
            processes: sym(&lib, c"nvmlDeviceGetComputeRunningProcesses_v3"),
            initialised,
            handles: Mutex::new(Vec::new()),
        })
    })
    .as_ref()
}

/// The handle cache's lock, for a fork (see `fork`); NVML handles stay valid in the child.
pub fn hold_for_fork(h: &mut crate::fork::Holder) {
    if let Some(Some(nv)) = NVML.get() {
        h.take(&nv.handles, crate::fork::keep);
    }
}

/// The NVML-style UUID string ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx") of CUDA device `device`.
pub fn cuda_uuid_string(device: CUdevice) -> Option<String> {
    let d = driver()?;
    let get = d.cuDeviceGetUuid_v2?;
    let mut uuid = CUuuid { bytes: [0; 16] };
    // SAFETY: out-pointer to a local.
    if unsafe { get(&mut uuid, device) } != CUDA_SUCCESS {
        return None;
    }
    let b: Vec<u8> = uuid.bytes.iter().map(|&c| c as u8).collect();
    let hex = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    Some(format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16)))
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
        let uuid = std::ffi::CString::new(cuda_uuid_string(device)?).ok()?;
        let mut handle: NvmlDevice = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer.
        if unsafe { (self.handle_by_uuid?)(uuid.as_ptr(), &mut handle) } != NVML_SUCCESS {
            return None;
        }
        let mut handles = locks::lock(&self.handles);
        if handles.len() <= index {
            handles.resize(index + 1, None);
        }
        handles[index] = Some(handle as usize);
        Some(handle)
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

/// The CUDA ordinal of an NVML device handle, by UUID; initialises the driver if needed.
fn cuda_ordinal_of(nvml_device: NvmlDevice) -> Option<CUdevice> {
    let nv = nvml()?;
    let mut buf = [0 as c_char; 96];
    // SAFETY: buffer and its length.
    if unsafe { (nv.uuid?)(nvml_device, buf.as_mut_ptr(), buf.len() as c_uint) } != NVML_SUCCESS {
        return None;
    }
    // SAFETY: NVML wrote a NUL-terminated string into the buffer.
    let wanted = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().ok()?.to_string();
    let d = driver()?;
    // SAFETY: cuInit is idempotent; the shim only needs device enumeration.
    if unsafe { (d.cuInit?)(0) } != CUDA_SUCCESS {
        return None;
    }
    let mut count = 0;
    // SAFETY: out-pointer.
    if unsafe { (d.cuDeviceGetCount?)(&mut count) } != CUDA_SUCCESS {
        return None;
    }
    let device_get = d.cuDeviceGet?;
    (0..count).find_map(|ordinal| {
        let mut dev = 0;
        // SAFETY: out-pointer.
        let ok = unsafe { device_get(&mut dev, ordinal) } == CUDA_SUCCESS;
        (ok && cuda_uuid_string(dev).as_deref() == Some(wanted.as_str())).then_some(dev)
    })
}

/// The quota view of one device: total, free and used as NVML should report them.
fn quota_view(nvml_device: NvmlDevice, real_total: u64, real_free: u64) -> Option<(u64, u64, u64)> {
    let settings = runtime::runtime().settings.as_ref().ok()?;
    if settings.is_unlimited() {
        return None;
    }
    budget::of_attached(cuda_ordinal_of(nvml_device)?)?.quota_view(real_total, real_free)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: NvmlDevice, memory: *mut NvmlMemory) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetMemoryInfo", NVML_ERROR_UNKNOWN, || {
        guard::test_panic_point("nvmlDeviceGetMemoryInfo");
        let Some(real) = nvml().and_then(|n| n.memory) else { return NVML_ERROR_UNKNOWN };
        let code = unsafe { real(device, memory) };
        if code == NVML_SUCCESS && !memory.is_null() {
            let m = unsafe { &mut *memory };
            if let Some((total, free, used)) = quota_view(device, m.total, m.free) {
                (m.total, m.free, m.used) = (total, free, used);
            }
        }
        code
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: NvmlDevice, memory: *mut NvmlMemoryV2) -> NvmlReturn {
    guard::with_fallback("nvmlDeviceGetMemoryInfo_v2", NVML_ERROR_UNKNOWN, || {
        let Some(real) = nvml().and_then(|n| n.memory_v2) else { return NVML_ERROR_UNKNOWN };
        let code = unsafe { real(device, memory) };
        if code == NVML_SUCCESS && !memory.is_null() {
            let m = unsafe { &mut *memory };
            if let Some((total, free, used)) = quota_view(device, m.total, m.free) {
                // Inside a quota the driver's reserve is part of what the process may use.
                (m.total, m.reserved, m.free, m.used) = (total, 0, free, used);
            }
        }
        code
    })
}
