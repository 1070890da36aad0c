//! NVML's hooks: in the submodules, what shows a tenant its slice instead of the card (memory,
//! processes, utilization, which devices exist). The real library, which the shim also uses to
//! measure what the process holds, is `sys::real_nvml`.
//!
//! Every hook forwards to the function of the same name in the real library, and changes its
//! answer only for a device where a memory limit or an SM share applies to the process
//! (`tenant::of`). A process without any sees exactly what it sees without the shim; one whose
//! settings ask for nothing, without a controller, does not even make the shim initialise NVML.

mod devices;
mod memory_view;
mod processes;
mod smi_table;
pub mod tenant;
mod utilization;

pub use devices::{
    nvmlDeviceGetCount, nvmlDeviceGetCount_v2, nvmlDeviceGetHandleByIndex, nvmlDeviceGetHandleByIndex_v2, nvmlDeviceGetHandleByPciBusId,
    nvmlDeviceGetHandleByPciBusId_v2, nvmlDeviceGetHandleBySerial, nvmlDeviceGetHandleByUUID, nvmlDeviceGetIndex,
};
pub use memory_view::{nvmlDeviceGetMemoryInfo, nvmlDeviceGetMemoryInfo_v2};
pub use processes::{
    nvmlDeviceGetComputeRunningProcesses, nvmlDeviceGetComputeRunningProcesses_v2, nvmlDeviceGetComputeRunningProcesses_v3,
    nvmlDeviceGetGraphicsRunningProcesses, nvmlDeviceGetGraphicsRunningProcesses_v2, nvmlDeviceGetGraphicsRunningProcesses_v3,
    nvmlDeviceGetMPSComputeRunningProcesses, nvmlDeviceGetMPSComputeRunningProcesses_v2, nvmlDeviceGetMPSComputeRunningProcesses_v3,
    nvmlDeviceGetRunningProcessDetailList,
};
pub use smi_table::nvmlInternalGetExportTable;
pub use utilization::{nvmlDeviceGetProcessUtilization, nvmlDeviceGetUtilizationRates};

/// The real function of the enclosing hook's own name and type, or `NVML_ERROR_FUNCTION_NOT_FOUND`.
macro_rules! real_or_return {
    ($name:expr, $ty:ty) => {{
        static CELL: once_cell::sync::OnceCell<usize> = once_cell::sync::OnceCell::new();
        match $crate::sys::real_nvml::real::<$ty>(&CELL, $name) {
            Some(f) => f,
            None => return $crate::sys::ffi::NVML_ERROR_FUNCTION_NOT_FOUND,
        }
    }};
}
pub(crate) use real_or_return;
