//! The real CUDA driver: `libcuda.so.1`, opened lazily and once, with every function the shim
//! forwards to resolved in one go.
//!
//! The shim calls these pointers directly, never through its own exports, so a hook never
//! re-enters a hook.

use crate::sys::dl::Library;
use crate::sys::ffi::*;
use once_cell::sync::OnceCell;
use std::ffi::{c_char, c_int, c_uint, c_void};

macro_rules! real_functions {
    ($( $name:ident ( $($arg:ty),* ) ; )*) => {
        /// Pointers into the real driver; `None` where this driver lacks the function.
        #[allow(non_snake_case)]
        pub struct Driver {
            lib: Library,
            $( pub $name: Option<unsafe extern "C" fn($($arg),*) -> CuResult>, )*
        }

        impl Driver {
            fn resolve(lib: Library) -> Driver {
                Driver {
                    $( $name: {
                        let p = lib.symbol(&cstr(concat!(stringify!($name), "\0")));
                        // SAFETY: the symbol of this name has this C signature in the driver API.
                        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> CuResult>(p) })
                    }, )*
                    lib,
                }
            }
        }
    };
}

fn cstr(s: &'static str) -> &'static std::ffi::CStr {
    std::ffi::CStr::from_bytes_with_nul(s.as_bytes()).expect("literal with one trailing NUL")
}

real_functions! {
    cuInit(c_uint);
    cuGetProcAddress(*const c_char, *mut *mut c_void, c_int, u64);
    cuGetProcAddress_v2(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int);
    cuGetExportTable(*mut *const c_void, *const c_void);
    cuDeviceGet(*mut CUdevice, c_int);
    cuDeviceGetCount(*mut c_int);
    cuDeviceGetUuid_v2(*mut CUuuid, CUdevice);
    cuDeviceTotalMem_v2(*mut usize, CUdevice);
    cuDeviceGetAttribute(*mut c_int, c_int, CUdevice);
    cuCtxGetDevice(*mut CUdevice);
    cuDevicePrimaryCtxRetain(*mut CUcontext, CUdevice);
    cuDevicePrimaryCtxRelease_v2(CUdevice);
    cuDevicePrimaryCtxReset_v2(CUdevice);
    cuDevicePrimaryCtxGetState(CUdevice, *mut c_uint, *mut c_int);
    cuCtxCreate_v2(*mut CUcontext, c_uint, CUdevice);
    cuCtxCreate_v3(*mut CUcontext, *mut c_void, c_int, c_uint, CUdevice);
    cuCtxCreate_v4(*mut CUcontext, *mut c_void, c_uint, CUdevice);
    cuCtxDestroy_v2(CUcontext);
    cuMemGetInfo_v2(*mut usize, *mut usize);
    cuMemAlloc_v2(*mut CUdeviceptr, usize);
    cuMemAllocPitch_v2(*mut CUdeviceptr, *mut usize, usize, usize, c_uint);
    cuMemAllocManaged(*mut CUdeviceptr, usize, c_uint);
    cuMemAllocAsync(*mut CUdeviceptr, usize, CUstream);
    cuMemAllocAsync_ptsz(*mut CUdeviceptr, usize, CUstream);
    cuMemAllocFromPoolAsync(*mut CUdeviceptr, usize, CUmemoryPool, CUstream);
    cuMemAllocFromPoolAsync_ptsz(*mut CUdeviceptr, usize, CUmemoryPool, CUstream);
    cuMemFree_v2(CUdeviceptr);
    cuMemFreeAsync(CUdeviceptr, CUstream);
    cuMemFreeAsync_ptsz(CUdeviceptr, CUstream);
    cuMemCreate(*mut CUmemGenericAllocationHandle, usize, *const MemAllocationPropHead, u64);
    cuMemRelease(CUmemGenericAllocationHandle);
    cuArrayCreate_v2(*mut CUarray, *const ArrayDescriptor);
    cuArray3DCreate_v2(*mut CUarray, *const Array3dDescriptor);
    cuMipmappedArrayCreate(*mut CUmipmappedArray, *const Array3dDescriptor, c_uint);
    cuArrayDestroy(CUarray);
    cuMipmappedArrayDestroy(CUmipmappedArray);
    cuModuleLoad(*mut *mut c_void, *const c_char);
    cuModuleLoadData(*mut *mut c_void, *const c_void);
    cuModuleLoadDataEx(*mut *mut c_void, *const c_void, c_uint, *mut c_int, *mut *mut c_void);
    cuModuleLoadFatBinary(*mut *mut c_void, *const c_void);
    cuModuleUnload(*mut c_void);
    cuModuleGetFunction(*mut *mut c_void, *mut c_void, *const c_char);
    cuLibraryLoadData(*mut *mut c_void, *const c_void, *mut c_int, *mut *mut c_void, c_uint, *mut c_int, *mut *mut c_void, c_uint);
    cuLibraryLoadFromFile(*mut *mut c_void, *const c_char, *mut c_int, *mut *mut c_void, c_uint, *mut c_int, *mut *mut c_void, c_uint);
    cuLibraryUnload(*mut c_void);
    // The 32-bit-era entry points (before CUDA 3.2's `_v2`): device pointers and sizes are
    // `unsigned int`.
    cuMemAlloc(*mut c_uint, c_uint);
    cuMemAllocPitch(*mut c_uint, *mut c_uint, c_uint, c_uint, c_uint);
    cuMemFree(c_uint);
    cuMemGetInfo(*mut c_uint, *mut c_uint);
    cuDeviceTotalMem(*mut c_uint, CUdevice);
    cuArrayCreate(*mut CUarray, *const ArrayDescriptorV1);
    cuArray3DCreate(*mut CUarray, *const Array3dDescriptorV1);
    cuCtxCreate(*mut CUcontext, c_uint, CUdevice);
    cuCtxDestroy(CUcontext);
    cuDevicePrimaryCtxRelease(CUdevice);
    cuDevicePrimaryCtxReset(CUdevice);
    cuCtxGetCurrent(*mut CUcontext);
    cuCtxSetCurrent(CUcontext);
    cuThreadExchangeStreamCaptureMode(*mut c_int);
    cuEventCreate(*mut *mut c_void, c_uint);
    cuEventRecord(*mut c_void, CUstream);
    cuEventQuery(*mut c_void);
    cuEventSynchronize(*mut c_void);
    cuEventElapsedTime(*mut f32, *mut c_void, *mut c_void);
    cuStreamIsCapturing(CUstream, *mut c_uint);
    cuLaunchKernel(*mut c_void, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void);
    cuLaunchKernel_ptsz(*mut c_void, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void);
    cuLaunchKernelEx(*const LaunchConfig, *mut c_void, *mut *mut c_void, *mut *mut c_void);
    cuLaunchKernelEx_ptsz(*const LaunchConfig, *mut c_void, *mut *mut c_void, *mut *mut c_void);
    cuLaunchCooperativeKernel(*mut c_void, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void);
    cuLaunchCooperativeKernel_ptsz(*mut c_void, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void);
    cuGraphLaunch(*mut c_void, CUstream);
    cuGraphLaunch_ptsz(*mut c_void, CUstream);
    // Which kernel a launch is of (see `slicer`): CUDA 11.0 and 12.3.
    cuFuncGetModule(*mut *mut c_void, *mut c_void);
    cuFuncGetName(*mut *const c_char, *mut c_void);
    // How many blocks of a kernel an SM holds at once: a slice's wave (`slice_cost`).
    cuOccupancyMaxActiveBlocksPerMultiprocessor(*mut c_int, *mut c_void, c_int, usize);
    // Memory shared between processes (see `sharing`).
    cuIpcGetMemHandle(*mut IpcMemHandle, CUdeviceptr);
    cuIpcOpenMemHandle_v2(*mut CUdeviceptr, IpcMemHandle, c_uint);
    cuIpcCloseMemHandle(CUdeviceptr);
    cuMemExportToShareableHandle(*mut c_void, CUmemGenericAllocationHandle, c_uint, u64);
    cuMemGetAddressRange_v2(*mut CUdeviceptr, *mut usize, CUdeviceptr);
    cuPointerGetAttribute(*mut c_void, c_int, CUdeviceptr);
    cuMemImportFromShareableHandle(*mut CUmemGenericAllocationHandle, *mut c_void, c_uint);
    cuMemMap(CUdeviceptr, usize, usize, CUmemGenericAllocationHandle, u64);
    cuMemUnmap(CUdeviceptr, usize);
    cuMemGetAllocationPropertiesFromHandle(*mut MemAllocationProp, CUmemGenericAllocationHandle);
    // VMM backing and the suspend agent (issue 22; `hooks::vmm`, `hooks::suspend_agent`).
    cuMemAddressReserve(*mut CUdeviceptr, usize, usize, CUdeviceptr, u64);
    cuMemAddressFree(CUdeviceptr, usize);
    cuMemSetAccess(CUdeviceptr, usize, *const MemAccessDesc, usize);
    cuMemGetAllocationGranularity(*mut usize, *const MemAllocationProp, c_uint);
    cuCtxSynchronize();
    cuMemHostAlloc(*mut *mut c_void, usize, c_uint);
    cuMemFreeHost(*mut c_void);
    cuMemcpyDtoHAsync_v2(*mut c_void, CUdeviceptr, usize, CUstream);
    cuMemcpyHtoDAsync_v2(CUdeviceptr, *const c_void, usize, CUstream);
    cuStreamCreate(*mut CUstream, c_uint);
    cuStreamSynchronize(CUstream);
    cuStreamDestroy_v2(CUstream);
    cuEventDestroy_v2(*mut c_void);
}

static DRIVER: OnceCell<Option<Driver>> = OnceCell::new();

/// The real driver, or `None` if `libcuda.so.1` cannot be loaded in this process.
#[inline]
pub fn driver() -> Option<&'static Driver> {
    DRIVER
        .get_or_init(|| {
            let lib = Library::open(c"libcuda.so.1");
            if lib.is_none() {
                tracing::warn!("libcuda.so.1 could not be loaded; CUDA calls through gpuslice will fail");
            }
            lib.map(|lib| {
                crate::sys::clock::attach(&lib);
                Driver::resolve(lib)
            })
        })
        .as_ref()
}

impl Driver {
    /// The real address of a driver symbol by exact name, or null.
    pub fn symbol(&self, name: &std::ffi::CStr) -> *mut c_void {
        self.lib.symbol(name)
    }

    /// The calling thread's current context, if there is one.
    pub fn current_context(&self) -> Option<usize> {
        let get = self.cuCtxGetCurrent?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        (unsafe { get(&mut ctx) } == CUDA_SUCCESS && !ctx.is_null()).then_some(ctx as usize)
    }

    /// Records one of the shim's own events on the program's stream.
    pub fn record_event(&self, event: usize, stream: CUstream) -> bool {
        let Some(record) = self.cuEventRecord else { return false };
        // SAFETY: our own event, the program's stream.
        unsafe { record(event as *mut c_void, stream) == CUDA_SUCCESS }
    }

    /// The device of the calling thread's current context, if there is one.
    pub fn current_device(&self) -> Option<CUdevice> {
        let get = self.cuCtxGetDevice?;
        let mut device: CUdevice = -1;
        // SAFETY: out-pointer to a local.
        (unsafe { get(&mut device) } == CUDA_SUCCESS).then_some(device)
    }
}

/// Calls a real driver function, or returns `CUDA_ERROR_NOT_FOUND` when this driver lacks it
/// (or `CUDA_ERROR_NOT_INITIALIZED` when there is no driver at all).
macro_rules! call_real {
    ($name:ident ( $($arg:expr),* )) => {
        match $crate::sys::driver::driver() {
            None => $crate::sys::ffi::CUDA_ERROR_NOT_INITIALIZED,
            Some(d) => match d.$name {
                None => $crate::sys::ffi::CUDA_ERROR_NOT_FOUND,
                // SAFETY: forwarding the host program's own arguments to the real function.
                Some(f) => unsafe { f($($arg),*) },
            },
        }
    };
}
pub(crate) use call_real;
