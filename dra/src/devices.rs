//! What the node has: its GPUs (and their MIG instances, each a device of its own) through NVML.

use nvml_wrapper::Nvml;
use nvml_wrapper_sys::bindings::{nvmlDevice_t, nvmlReturn_t};
use std::ffi::c_uint;

/// One device the plugin offers: a whole GPU, or a MIG instance of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// `GPU-...` or `MIG-...`.
    pub uuid: String,
    /// The NVML index of the GPU (of the parent GPU for a MIG instance).
    pub index: u32,
    pub model: String,
    pub memory: u64,
    /// (major, minor); `None` where NVML does not say.
    pub compute_capability: Option<(i32, i32)>,
    pub driver_version: Option<String>,
    /// For a MIG instance, the parent's UUID.
    pub parent: Option<String>,
}

impl Gpu {
    /// Its name in the ResourceSlice: `gpu-<index>` or `gpu-<index>-mig-<n>` (a DNS label, stable
    /// while the hardware is).
    pub fn device_name(&self, mig: Option<u32>) -> String {
        match mig {
            None => format!("gpu-{}", self.index),
            Some(m) => format!("gpu-{}-mig-{m}", self.index),
        }
    }
}

/// A device with its name in the slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub gpu: Gpu,
}

/// Every GPU NVML reports, with MIG instances listed after their parent.
pub fn discover(nvml_library: &str) -> Result<Vec<Named>, String> {
    let nvml = Nvml::builder()
        .lib_path(std::ffi::OsStr::new(nvml_library))
        .init()
        .map_err(|e| format!("NVML ({nvml_library}) is not available: {e}; is the NVIDIA driver installed on this node?"))?;
    let driver_version = nvml.sys_driver_version().ok();
    let count = nvml.device_count().map_err(|e| format!("NVML device count: {e}"))?;
    let mut out = Vec::new();
    for index in 0..count {
        let d = nvml.device_by_index(index).map_err(|e| format!("NVML device {index}: {e}"))?;
        let uuid = d.uuid().map_err(|e| format!("NVML device {index}: UUID: {e}"))?;
        let model = d.name().unwrap_or_else(|_| "NVIDIA GPU".into());
        let memory = d.memory_info().map_err(|e| format!("NVML device {index} ({uuid}): memory: {e}"))?.total;
        let compute_capability = d.cuda_compute_capability().ok().map(|c| (c.major, c.minor));
        let gpu = Gpu { uuid: uuid.clone(), index, model, memory, compute_capability, driver_version: driver_version.clone(), parent: None };
        // With MIG on, the instances are what processes can use; the parent itself is not offered.
        let mig_on = d.mig_mode().map(|m| m.current == 1).unwrap_or(false);
        if !mig_on {
            out.push(Named { name: gpu.device_name(None), gpu });
            continue;
        }
        let Some(mig_api) = MigApi::load(nvml_library) else { continue };
        for (m, mig) in (0u32..).zip(mig_api.instances(&nvml, &d)) {
            let Ok(mig_uuid) = mig.uuid() else { continue };
            let memory = mig.memory_info().map(|i| i.total).unwrap_or(0);
            let model = mig.name().unwrap_or_else(|_| format!("{} MIG", gpu.model));
            let instance = Gpu { uuid: mig_uuid, index, model, memory, compute_capability, driver_version: driver_version.clone(), parent: Some(uuid.clone()) };
            out.push(Named { name: gpu.device_name(Some(m)), gpu: instance });
        }
    }
    Ok(out)
}

type MaxMigDeviceCount = unsafe extern "C" fn(nvmlDevice_t, *mut c_uint) -> nvmlReturn_t;
type MigDeviceHandleByIndex = unsafe extern "C" fn(nvmlDevice_t, c_uint, *mut nvmlDevice_t) -> nvmlReturn_t;

/// The two NVML calls that list a GPU's MIG instances, which nvml-wrapper does not wrap.
struct MigApi {
    _lib: libloading::Library,
    max_count: MaxMigDeviceCount,
    by_index: MigDeviceHandleByIndex,
}

impl MigApi {
    fn load(nvml_library: &str) -> Option<MigApi> {
        // SAFETY: NVML is already loaded (this only takes another reference to it); the two
        // signatures are NVML's (nvml.h).
        unsafe {
            let lib = libloading::Library::new(nvml_library).ok()?;
            let max_count = *lib.get::<MaxMigDeviceCount>(b"nvmlDeviceGetMaxMigDeviceCount\0").ok()?;
            let by_index = *lib.get::<MigDeviceHandleByIndex>(b"nvmlDeviceGetMigDeviceHandleByIndex\0").ok()?;
            Some(MigApi { _lib: lib, max_count, by_index })
        }
    }

    /// The MIG instances that exist on `parent` (slots without one are skipped).
    fn instances<'n>(&self, nvml: &'n Nvml, parent: &nvml_wrapper::Device<'n>) -> Vec<nvml_wrapper::Device<'n>> {
        let mut count: c_uint = 0;
        // SAFETY: a valid device handle and an out-pointer to a local.
        if unsafe { (self.max_count)(parent.handle(), &mut count) } != 0 {
            return vec![];
        }
        (0..count)
            .filter_map(|i| {
                let mut handle: nvmlDevice_t = std::ptr::null_mut();
                // SAFETY: as above; the handle NVML returns lives as long as NVML is initialised.
                let r = unsafe { (self.by_index)(parent.handle(), i, &mut handle) };
                // SAFETY: NVML returned this handle with success, for the `nvml` it is tied to.
                (r == 0 && !handle.is_null()).then(|| unsafe { nvml_wrapper::Device::new(handle, nvml) })
            })
            .collect()
    }
}
