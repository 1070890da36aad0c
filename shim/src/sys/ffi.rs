//! The driver ABI as the shim sees it: result codes, handle types, and mirrors of the few
//! structs the shim reads.
//!
//! Handle types come from `cudarc::driver::sys`. Result codes are plain `u32` and the descriptor
//! structs are mirrored here with their enum fields as integers, because cudarc models C enums as
//! Rust enums and a value the host program or a newer driver passes that the enum lacks would be
//! undefined behaviour the moment the shim read it.

pub use cudarc::driver::sys::{CUarray, CUcontext, CUdevice, CUdeviceptr, CUmemGenericAllocationHandle, CUmemoryPool, CUmipmappedArray, CUstream, CUuuid};
use std::ffi::{c_int, c_uint, c_void};

/// `CUresult`, kept as its integer.
pub type CuResult = u32;

pub const CUDA_SUCCESS: CuResult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CuResult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CuResult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CuResult = 3;
pub const CUDA_ERROR_NOT_FOUND: CuResult = 500;
pub const CUDA_ERROR_NOT_READY: CuResult = 600;
pub const CUDA_ERROR_UNKNOWN: CuResult = 999;

/// `nvmlReturn_t`, kept as its integer.
pub type NvmlReturn = u32;
pub const NVML_SUCCESS: NvmlReturn = 0;
pub const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
pub const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
pub const NVML_ERROR_FUNCTION_NOT_FOUND: NvmlReturn = 13;
pub const NVML_ERROR_UNKNOWN: NvmlReturn = 999;
/// `NVML_VALUE_NOT_AVAILABLE`: a process's GPU/compute instance on a device without MIG.
pub const NVML_VALUE_NOT_AVAILABLE: u32 = 0xffff_ffff;

/// `CUDA_ARRAY_DESCRIPTOR` (the `_v2` layout).
#[repr(C)]
pub struct ArrayDescriptor {
    pub width: usize,
    pub height: usize,
    pub format: u32,
    pub num_channels: u32,
}

/// `CUDA_ARRAY3D_DESCRIPTOR` (the `_v2` layout).
#[repr(C)]
pub struct Array3dDescriptor {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub format: u32,
    pub num_channels: u32,
    pub flags: u32,
}

/// The leading part of `CUmemAllocationProp`: its type, the requested handle types and the
/// location. The shim reads only these and never writes the struct.
#[repr(C)]
pub struct MemAllocationPropHead {
    pub alloc_type: u32,
    pub requested_handle_types: u32,
    pub location_type: u32,
    pub location_id: i32,
}

/// `CUmemAccessDesc` (cuda.h: `{ CUmemLocation location; CUmemAccess_flags flags; }`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MemAccessDesc {
    pub location_type: u32,
    pub location_id: i32,
    pub flags: u32,
}

/// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE`.
pub const MEM_ACCESS_FLAGS_PROT_READWRITE: u32 = 3;
/// `CU_MEM_ALLOCATION_TYPE_PINNED`: ordinary device memory.
pub const MEM_ALLOCATION_TYPE_PINNED: u32 = 1;
/// `CU_MEM_ALLOC_GRANULARITY_MINIMUM`.
pub const MEM_ALLOC_GRANULARITY_MINIMUM: u32 = 0;
/// `CU_DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT`.
pub const DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT: i32 = 35;
/// `CUDA_ERROR_NOT_SUPPORTED`.
pub const CUDA_ERROR_NOT_SUPPORTED: CuResult = 801;

/// `CU_MEM_LOCATION_TYPE_DEVICE`.
pub const MEM_LOCATION_TYPE_DEVICE: u32 = 1;

/// Bytes per channel element of a `CUarray_format`; `None` for packed or block formats whose
/// size the shim does not model (they are then charged at four bytes per channel).
pub fn array_format_bytes(format: u32) -> Option<u64> {
    match format {
        0x01 | 0x08 => Some(1),        // UNSIGNED_INT8, SIGNED_INT8
        0x02 | 0x09 | 0x10 => Some(2), // UNSIGNED_INT16, SIGNED_INT16, HALF
        0x03 | 0x0a | 0x20 => Some(4), // UNSIGNED_INT32, SIGNED_INT32, FLOAT
        _ => None,
    }
}

/// `CUlaunchConfig`, as `cuLaunchKernelEx` takes it.
#[repr(C)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
    pub stream: CUstream,
    pub attrs: *mut c_void,
    pub num_attrs: u32,
}

/// `CU_STREAM_PER_THREAD`: what stream 0 means to a `_ptsz` entry point.
pub const STREAM_PER_THREAD: usize = 0x2;

/// `nvmlMemory_t`.
#[repr(C)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: u32,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlProcessInfo_t` (= `nvmlProcessInfo_v2_t`) as the `_v2` and `_v3` process queries fill it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct NvmlProcessInfo {
    pub pid: u32,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// `nvmlProcessInfo_v1_t`, as the unversioned process queries fill it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct NvmlProcessInfoV1 {
    pub pid: u32,
    pub used_gpu_memory: u64,
}

/// `nvmlProcessDetail_v1_t`, the records of `nvmlDeviceGetRunningProcessDetailList`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct NvmlProcessDetail {
    pub pid: u32,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    pub used_gpu_cc_protected_memory: u64,
}

/// `nvmlProcessDetailList_v1_t`.
#[repr(C)]
pub struct NvmlProcessDetailList {
    pub version: u32,
    /// 0 compute, 1 graphics, 2 MPS compute.
    pub mode: u32,
    pub num_proc_array_entries: u32,
    pub proc_array: *mut NvmlProcessDetail,
}

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct NvmlUtilization {
    pub gpu: u32,
    pub memory: u32,
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NvmlProcessUtilizationSample {
    pub pid: u32,
    pub time_stamp: u64,
    pub sm_util: u32,
    pub mem_util: u32,
    pub enc_util: u32,
    pub dec_util: u32,
}

pub type NvmlDevice = *mut c_void;

/// `CUDA_ARRAY_DESCRIPTOR_v1`.
#[repr(C)]
pub struct ArrayDescriptorV1 {
    pub width: c_uint,
    pub height: c_uint,
    pub format: u32,
    pub num_channels: c_uint,
}

/// `CUDA_ARRAY3D_DESCRIPTOR_v1`.
#[repr(C)]
pub struct Array3dDescriptorV1 {
    pub width: c_uint,
    pub height: c_uint,
    pub depth: c_uint,
    pub format: u32,
    pub num_channels: c_uint,
    pub flags: c_uint,
}

/// `CUipcMemHandle`: 64 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IpcMemHandle {
    pub reserved: [u8; 64],
}

/// `CUmemAllocationProp`, whole (the driver writes it in
/// `cuMemGetAllocationPropertiesFromHandle`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemAllocationProp {
    pub alloc_type: c_uint,
    pub requested_handle_types: c_uint,
    pub location_type: c_uint,
    pub location_id: c_int,
    pub win32_handle_meta_data: *mut c_void,
    pub alloc_flags: [u8; 8],
}
