//! `libcuda.so.1` test double: a simulated CUDA driver for CI machines without a GPU.
//!
//! Device memory is accounted in a shared-memory file (see `state.rs`) so that several processes
//! see one device; kernels are simulated on a shared device timeline (`busy_until_ns`).
//! See tests/README.md for the environment variables and semantics.
//!
//! Every exported function is `extern "C"`, returns a `CUresult` as `u32` and is thread-safe
//! (process-local bookkeeping sits behind one mutex that is never held while sleeping).
//! The library is linked with `-Bsymbolic`, so its own references to its exported functions
//! (e.g. the addresses handed out by `cuGetProcAddress`) are never interposed by a preload.

#![allow(non_snake_case, clippy::too_many_arguments)]

mod clock;
mod record;
mod state;
mod visible;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use clock::{now_ns, sleep_until_ns};
use state::DeviceState;

// ---------------------------------------------------------------------------------------------
// CUresult values used here (cuda.h).
type CUresult = u32;
const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const NOT_INITIALIZED: CUresult = 3;
const NO_DEVICE: CUresult = 100;
const INVALID_DEVICE: CUresult = 101;
const INVALID_CONTEXT: CUresult = 201;
const FILE_NOT_FOUND: CUresult = 301;
const INVALID_HANDLE: CUresult = 400;
const ILLEGAL_STATE: CUresult = 401;
const NOT_FOUND: CUresult = 500;
const NOT_READY: CUresult = 600;
const STREAM_CAPTURE_UNSUPPORTED: CUresult = 900;
/// `CUDA_ERROR_OUT_OF_MEMORY` for host memory (cuMemHostAlloc answers the same code).
const OUT_OF_MEMORY_HOST: CUresult = OUT_OF_MEMORY;

type CUdevice = c_int;
type Handle = *mut c_void; // CUcontext, CUstream, CUevent, CUmodule, ... (opaque pointers)
type CUdeviceptr = u64;

pub const DRIVER_VERSION: c_int = 13000;
const GRANULARITY: u64 = 2 << 20;
/// A launch blocks while its stream has more than this much work queued (bounded push buffer).
const MAX_QUEUE_NS: u64 = 200_000_000;

const CU_STREAM_LEGACY: u64 = 0x1;
const CU_STREAM_PER_THREAD: u64 = 0x2;
const CU_EVENT_DISABLE_TIMING: c_uint = 0x2;

// Device attributes (CUdevice_attribute).
const ATTR_MULTIPROCESSOR_COUNT: c_int = 16;
/// The simulated device's SMs (an H100's).
const SMS: c_int = 132;
const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;

// ---------------------------------------------------------------------------------------------
// Structures from cuda.h (CUDA 13.0 layout).

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct CudaArrayDescriptor {
    pub width: usize,
    pub height: usize,
    pub format: c_uint,
    pub num_channels: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct CudaArray3DDescriptor {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub format: c_uint,
    pub num_channels: c_uint,
    pub flags: c_uint,
}

#[repr(C)]
pub struct CUmemLocation {
    pub type_: c_uint,
    pub id: c_int,
}

#[repr(C)]
pub struct CUmemAllocationProp {
    pub type_: c_uint,
    pub requested_handle_types: c_uint,
    pub location: CUmemLocation,
    pub win32_handle_meta_data: *mut c_void,
    pub alloc_flags: [u8; 8],
}

#[repr(C)]
pub struct CUlaunchConfig {
    pub grid_dim_x: c_uint,
    pub grid_dim_y: c_uint,
    pub grid_dim_z: c_uint,
    pub block_dim_x: c_uint,
    pub block_dim_y: c_uint,
    pub block_dim_z: c_uint,
    pub shared_mem_bytes: c_uint,
    pub h_stream: Handle,
    pub attrs: *mut c_void,
    pub num_attrs: c_uint,
}

// ---------------------------------------------------------------------------------------------
// Process-local bookkeeping.

struct Ctx {
    dev: CUdevice,
    primary: bool,
    active: bool,
    reserve: u64,
    /// End of the last piece of work queued in this context.
    last_end: u64,
    /// Its kernels run on this process's own lane of the device (`mps_lane`).
    lane: bool,
}

struct Alloc {
    size: u64,
    dev: CUdevice,
    ctx: u64,
}

struct Array {
    bytes: u64,
    dev: CUdevice,
    ctx: u64,
    desc: CudaArray3DDescriptor,
    mipmapped: bool,
}

struct Vmm {
    dev: CUdevice,
    size: u64,
    released: bool,
    maps: u32,
}

struct Module {
    ctx: u64,
    dev: CUdevice,
    charged: u64,
    funcs: BTreeMap<String, u64>,
    /// The kernels its PTX declares (`None`: not PTX, any name is a kernel).
    entries: Option<BTreeMap<String, record::Entry>>,
}

struct Library {
    dev: Option<CUdevice>,
    charged: u64,
    kernels: BTreeMap<String, u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum SKey {
    Explicit(u64),
    Legacy(u64),
    PerThread(u64, u64),
}

struct Stream {
    ctx: u64,
    tail: u64,
    capture: Option<Vec<u64>>,
}

struct Event {
    ctx: u64,
    flags: c_uint,
    time: Option<u64>,
}

#[derive(Default)]
struct Primary {
    refcount: u32,
    handle: u64,
}

struct Drv {
    primaries: BTreeMap<CUdevice, Primary>,
    ctxs: BTreeMap<u64, Ctx>,
    allocs: BTreeMap<u64, Alloc>,
    arrays: BTreeMap<u64, Array>,
    vmm: BTreeMap<u64, Vmm>,
    reservations: BTreeMap<u64, u64>,
    mappings: BTreeMap<u64, (u64, u64)>,
    modules: BTreeMap<u64, Module>,
    /// function handle -> owning module (0 for functions obtained from a library kernel)
    functions: BTreeMap<u64, u64>,
    libraries: BTreeMap<u64, Library>,
    /// kernel handle -> (library, function handle once asked for)
    kernels: BTreeMap<u64, (u64, u64)>,
    streams: BTreeMap<SKey, Stream>,
    events: BTreeMap<u64, Event>,
    graphs: BTreeMap<u64, Vec<u64>>,
    execs: BTreeMap<u64, Vec<u64>>,
    /// Per device: the end of the work on this process's own lane (`mps_lane`).
    lanes: BTreeMap<CUdevice, u64>,
}

static DRV: Mutex<Drv> = Mutex::new(Drv {
    primaries: BTreeMap::new(),
    ctxs: BTreeMap::new(),
    allocs: BTreeMap::new(),
    arrays: BTreeMap::new(),
    vmm: BTreeMap::new(),
    reservations: BTreeMap::new(),
    mappings: BTreeMap::new(),
    modules: BTreeMap::new(),
    functions: BTreeMap::new(),
    libraries: BTreeMap::new(),
    kernels: BTreeMap::new(),
    streams: BTreeMap::new(),
    events: BTreeMap::new(),
    graphs: BTreeMap::new(),
    execs: BTreeMap::new(),
    lanes: BTreeMap::new(),
});

static INITIALIZED: AtomicBool = AtomicBool::new(false);
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(0x5a5a_0000_1000);
static NEXT_VA: AtomicU64 = AtomicU64::new(0x7f00_0000_0000);
const POOL_BASE: u64 = 0x5a5b_0000_0000;

thread_local! {
    static CTX_STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

fn lock() -> MutexGuard<'static, Drv> {
    DRV.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_handle() -> u64 {
    NEXT_HANDLE.fetch_add(0x40, Ordering::Relaxed)
}

fn new_va(size: u64, align: u64) -> u64 {
    let align = align.max(256);
    let span = size.max(1).div_ceil(align) * align + align; // gap between ranges
    loop {
        let cur = NEXT_VA.load(Ordering::Relaxed);
        let start = cur.div_ceil(align) * align;
        if NEXT_VA.compare_exchange_weak(cur, start + span, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            return start;
        }
    }
}

/// Device addresses below 4 GiB for the 32-bit-era entry points (`CUdeviceptr_v1`).
static NEXT_VA32: AtomicU64 = AtomicU64::new(0x1000_0000);

fn new_va32(size: u64) -> Option<u64> {
    let span = size.max(1).div_ceil(256) * 256 + 256;
    let start = NEXT_VA32.fetch_add(span, Ordering::Relaxed);
    (start + span <= u64::from(u32::MAX)).then_some(start)
}

fn tid() -> u64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u64 }
}

fn ctx_reserve() -> u64 {
    static V: OnceLock<u64> = OnceLock::new();
    *V.get_or_init(|| state::env_bytes("SIMCUDA_CTX_RESERVE", 300 << 20))
}

fn module_bytes() -> u64 {
    static V: OnceLock<u64> = OnceLock::new();
    *V.get_or_init(|| state::env_bytes("SIMCUDA_MODULE_BYTES", 0))
}

/// The device bytes an image declares: a simulated image is a text beginning
/// `SIMMODULE <bytes>` (its `__device__` data); any other image takes `SIMCUDA_MODULE_BYTES`.
fn declared_bytes(head: &[u8]) -> u64 {
    let text = head.split(|&b| b == 0 || b == b'\n').next().unwrap_or(&[]);
    let text = String::from_utf8_lossy(text);
    match text.strip_prefix("SIMMODULE ") {
        Some(n) => n.trim().parse().unwrap_or(0),
        None => module_bytes(),
    }
}

/// The declared bytes of an in-memory image (read up to its first NUL or newline, 64 bytes at most).
///
/// # Safety
/// `image` points to a module image, whose length the API does not pass: a NUL-terminated text
/// (PTX, `SIMMODULE <bytes>`), or a binary of at least 64 bytes (an ELF cubin's header alone is
/// 64 bytes; a fat binary's header and first entry are longer). The read stops at the first NUL or
/// newline, so a text image is never read past its end; a shorter binary would be, as the
/// simulation cannot know its length (the real driver parses the image it is given too).
unsafe fn image_bytes(image: *const c_void) -> u64 {
    let p = image as *const u8;
    let mut head = Vec::new();
    for i in 0..64 {
        // SAFETY: byte `i` lies within the image: no NUL or newline came before it, and a binary
        // image is at least 64 bytes long (this function's `# Safety`).
        let b = unsafe { *p.add(i) };
        if b == 0 || b == b'\n' {
            break;
        }
        head.push(b);
    }
    declared_bytes(&head)
}

/// The declared bytes of an image file.
///
/// # Safety
/// `fname` is a NUL-terminated string.
unsafe fn file_bytes(fname: *const c_char) -> u64 {
    // SAFETY: the caller guarantees `fname` is a NUL-terminated string (`# Safety`).
    let path = unsafe { CStr::from_ptr(fname).to_string_lossy().into_owned() };
    let head = std::fs::read(&path).map(|mut v| {
        v.truncate(64);
        v
    });
    declared_bytes(&head.unwrap_or_default())
}

fn shared() -> &'static state::Shared {
    // Only called after cuInit succeeded, which mapped the state.
    state::opened().expect("simcuda: shared state not mapped")
}

fn devstate(d: CUdevice) -> &'static DeviceState {
    shared().dev(physical(d) as usize)
}

/// The state file's device (PCI order) behind CUDA ordinal `d` (see `visible`).
fn physical(d: CUdevice) -> u32 {
    visible::ordinals(shared().ndev())[d as usize]
}

fn ndev() -> c_int {
    state::opened().map(|s| visible::ordinals(s.ndev()).len() as c_int).unwrap_or(0)
}

fn valid_dev(d: CUdevice) -> bool {
    d >= 0 && d < ndev()
}

macro_rules! check_init {
    () => {
        if !INITIALIZED.load(Ordering::Acquire) {
            return NOT_INITIALIZED;
        }
        // A process locked by the checkpoint API waits here until it is unlocked.
        let _call = $crate::checkpoint::gate();
    };
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

// After the macros, which they use.
mod checkpoint;
mod contents;
mod echo;
mod sharing;

/// Writes an out-parameter; a null one is `INVALID_VALUE`, as the driver answers.
///
/// # Safety
/// `p` is null or valid for a write of one `T`.
unsafe fn put<T>(p: *mut T, v: T) -> Result<(), CUresult> {
    if p.is_null() {
        return Err(INVALID_VALUE);
    }
    // SAFETY: not null, hence valid for a write (this function's `# Safety`).
    unsafe { p.write(v) };
    Ok(())
}

fn current_ctx_handle() -> Option<u64> {
    CTX_STACK.with(|s| s.borrow().last().copied())
}

/// The current context of this thread, if any and alive.
fn cur_ctx(d: &Drv) -> Result<u64, CUresult> {
    let h = current_ctx_handle().ok_or(INVALID_CONTEXT)?;
    match d.ctxs.get(&h) {
        Some(c) if c.active => Ok(h),
        _ => Err(INVALID_CONTEXT),
    }
}

fn cur_dev(d: &Drv) -> Result<(u64, CUdevice), CUresult> {
    let c = cur_ctx(d)?;
    Ok((c, d.ctxs[&c].dev))
}

/// Free everything a context owns (its allocations, arrays, modules, streams, events).
fn teardown_ctx(d: &mut Drv, ctx: u64) {
    let Some(dev) = d.ctxs.get(&ctx).map(|c| c.dev) else { return };
    let ds = devstate(dev);
    let mut bytes = 0u64;
    d.allocs.retain(|_, a| {
        if a.ctx == ctx {
            bytes += a.size;
            false
        } else {
            true
        }
    });
    d.arrays.retain(|_, a| {
        if a.ctx == ctx {
            bytes += a.bytes;
            false
        } else {
            true
        }
    });
    let dead_mods: Vec<u64> = d.modules.iter().filter(|(_, m)| m.ctx == ctx).map(|(h, _)| *h).collect();
    for m in dead_mods {
        if let Some(m) = d.modules.remove(&m) {
            bytes += m.charged;
            for f in m.funcs.values() {
                d.functions.remove(f);
            }
        }
    }
    d.streams.retain(|_, s| s.ctx != ctx);
    d.events.retain(|_, e| e.ctx != ctx);
    if let Some(c) = d.ctxs.get_mut(&ctx) {
        bytes += c.reserve;
        c.reserve = 0;
        c.active = false;
    }
    ds.uncharge(dev as usize, bytes);
}

// ---------------------------------------------------------------------------------------------
// Initialization, devices.

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return INVALID_VALUE;
    }
    if let Some(code) = mps_init_error() {
        return code;
    }
    match state::shared() {
        // CUDA_VISIBLE_DEVICES that names no device: the real driver finds none.
        Ok(sh) if visible::ordinals(sh.ndev()).is_empty() => NO_DEVICE,
        Ok(sh) => {
            if !INITIALIZED.load(Ordering::Acquire) {
                for d in 0..sh.ndev() as usize {
                    sh.dev(d).forget_earlier_image();
                }
            }
            INITIALIZED.store(true, Ordering::Release);
            SUCCESS
        }
        Err(msg) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| eprintln!("{msg}"));
            NO_DEVICE
        }
    }
}

/// # Safety
/// `v`: null or valid for reads and writes of one `c_int`.
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
    unsafe { tri!(put(v, DRIVER_VERSION)) };
    SUCCESS
}

/// (code, name, description) for `cuGetErrorName` / `cuGetErrorString`: the codes this driver
/// returns, plus the ones a shim may hand back (999).
const ERROR_TEXT: &[(CUresult, &CStr, &CStr)] = &[
    (SUCCESS, c"CUDA_SUCCESS", c"no error"),
    (INVALID_VALUE, c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
    (OUT_OF_MEMORY, c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
    (NOT_INITIALIZED, c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
    (NO_DEVICE, c"CUDA_ERROR_NO_DEVICE", c"no CUDA-capable device is detected"),
    (INVALID_DEVICE, c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
    (INVALID_CONTEXT, c"CUDA_ERROR_INVALID_CONTEXT", c"invalid device context"),
    (FILE_NOT_FOUND, c"CUDA_ERROR_FILE_NOT_FOUND", c"file not found"),
    (INVALID_HANDLE, c"CUDA_ERROR_INVALID_HANDLE", c"invalid resource handle"),
    (ILLEGAL_STATE, c"CUDA_ERROR_ILLEGAL_STATE", c"the operation cannot be performed in the present state"),
    (NOT_FOUND, c"CUDA_ERROR_NOT_FOUND", c"named symbol not found"),
    (NOT_READY, c"CUDA_ERROR_NOT_READY", c"device not ready"),
    (STREAM_CAPTURE_UNSUPPORTED, c"CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", c"operation not permitted when stream is capturing"),
    (801, c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
    (909, c"CUDA_ERROR_TIMEOUT", c"wait operation timed out"),
    (999, c"CUDA_ERROR_UNKNOWN", c"unknown error"),
];

/// Like the real driver: no `cuInit` needed; an unknown code gives `INVALID_VALUE` and NULL.
///
/// # Safety
/// `out`: null or valid for reads and writes of one `*const c_char`.
unsafe fn error_text(error: CUresult, out: *mut *const c_char, name: bool) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    match ERROR_TEXT.iter().find(|(code, _, _)| *code == error) {
        Some((_, n, d)) => {
            // SAFETY: `out` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
            unsafe { *out = if name { n.as_ptr() } else { d.as_ptr() } };
            SUCCESS
        }
        None => {
            // SAFETY: `out` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
            unsafe { *out = std::ptr::null() };
            INVALID_VALUE
        }
    }
}

/// # Safety
/// `out`: as `error_text` requires.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, out: *mut *const c_char) -> CUresult {
    // SAFETY: `error_text` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { error_text(error, out, true) }
}

/// # Safety
/// `out`: as `error_text` requires.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, out: *mut *const c_char) -> CUresult {
    // SAFETY: `error_text` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { error_text(error, out, false) }
}

/// # Safety
/// `count`: null or valid for reads and writes of one `c_int`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    check_init!();
    // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
    unsafe { tri!(put(count, ndev())) };
    SUCCESS
}

/// # Safety
/// `device`: null or valid for reads and writes of one `CUdevice`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    check_init!();
    if device.is_null() {
        return INVALID_VALUE;
    }
    if !valid_dev(ordinal) {
        return INVALID_DEVICE;
    }
    // SAFETY: `device` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *device = ordinal };
    SUCCESS
}

/// # Safety
/// `name`: null or valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    check_init!();
    if name.is_null() || len <= 0 {
        return INVALID_VALUE;
    }
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    let s = state::DEVICE_NAME.as_bytes();
    let n = s.len().min(len as usize - 1);
    // SAFETY: `name` is not null (checked above) and the caller guarantees `len` writable bytes
    // (`# Safety`); `n + 1 <= len` bytes are written, from a string that cannot overlap them.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), name as *mut u8, n);
        *name.add(n) = 0;
    }
    SUCCESS
}

/// # Safety
/// `uuid`: null or valid for reads and writes of one `[u8; 16]`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], dev: CUdevice) -> CUresult {
    check_init!();
    if uuid.is_null() {
        return INVALID_VALUE;
    }
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    // SAFETY: `uuid` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *uuid = state::device_uuid(physical(dev)) };
    SUCCESS
}

#[no_mangle]
/// A device in MIG mode answers with its MIG instance's UUID ("If the device is in MIG mode,
/// returns its MIG UUID", the driver API's reference); `cuDeviceGetUuid` keeps the GPU's.
///
/// # Safety
/// `uuid`: as `cuDeviceGetUuid` requires.
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], dev: CUdevice) -> CUresult {
    // SAFETY: `cuDeviceGetUuid` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    let code = unsafe { cuDeviceGetUuid(uuid, dev) };
    if code == SUCCESS && state::mig_mode(physical(dev)) {
        // SAFETY: `cuDeviceGetUuid` succeeded, so `uuid` is not null; the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *uuid = state::mig_uuid(physical(dev)) };
    }
    code
}

/// `SIMCUDA_MPS=1`: the device answers as one whose contexts MPS serves (attribute 133);
/// `SIMCUDA_MPS=pipe`: so it does when `CUDA_MPS_PIPE_DIRECTORY` names a folder holding a
/// `control` file (a daemon's pipe directory), as a real driver connects to the daemon it names.
/// The simulation itself does not change: MPS's settings are the shim's business to write.
fn mps_enabled() -> c_int {
    let served = match std::env::var("SIMCUDA_MPS").as_deref() {
        Ok("1") => true,
        Ok("pipe") => std::env::var_os("CUDA_MPS_PIPE_DIRECTORY").is_some_and(|d| std::path::Path::new(&d).join("control").exists()),
        _ => false,
    };
    c_int::from(served)
}

/// `SIMCUDA_MPS_LANES=1` with the device served by MPS: a context made while the process's
/// `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` is below 100 runs its kernels on a timeline of the
/// process's own, beside the shared one: an idealised spatial partition, where the SMs MPS
/// gives the process neither delay nor are delayed by the others' kernels (without it the
/// simulated device runs one kernel at a time for everyone, MPS or not).
fn mps_lane() -> bool {
    std::env::var("SIMCUDA_MPS_LANES").as_deref() == Ok("1")
        && mps_enabled() != 0
        && std::env::var("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE").ok().and_then(|p| p.trim().parse::<u32>().ok()).is_some_and(|p| p < 100)
}

/// `SIMCUDA_MPS_INIT_ERROR=N`: `cuInit` fails with N while `CUDA_MPS_PIPE_DIRECTORY` is set,
/// as a real one does when the daemon it names answers but its server refuses the client.
fn mps_init_error() -> Option<CUresult> {
    std::env::var_os("CUDA_MPS_PIPE_DIRECTORY")?;
    std::env::var("SIMCUDA_MPS_INIT_ERROR").ok()?.parse().ok()
}

fn attribute(attr: c_int, dev: CUdevice) -> Option<c_int> {
    Some(match attr {
        1 => 1024,                           // MAX_THREADS_PER_BLOCK
        2 | 3 => 1024,                       // MAX_BLOCK_DIM_X/Y
        4 => 64,                             // MAX_BLOCK_DIM_Z
        5 => i32::MAX,                       // MAX_GRID_DIM_X
        6 | 7 => 65535,                      // MAX_GRID_DIM_Y/Z
        8 => 49152,                          // MAX_SHARED_MEMORY_PER_BLOCK
        9 => 65536,                          // TOTAL_CONSTANT_MEMORY
        10 => 32,                            // WARP_SIZE
        11 => i32::MAX,                      // MAX_PITCH
        12 => 65536,                         // MAX_REGISTERS_PER_BLOCK
        13 => 1_980_000,                     // CLOCK_RATE (kHz)
        14 => 512,                           // TEXTURE_ALIGNMENT
        15 => 1,                             // GPU_OVERLAP
        ATTR_MULTIPROCESSOR_COUNT => SMS,    // MULTIPROCESSOR_COUNT
        17 | 18 => 0,                        // KERNEL_EXEC_TIMEOUT, INTEGRATED
        19 => 1,                             // CAN_MAP_HOST_MEMORY
        20 => 0,                             // COMPUTE_MODE default
        31 | 32 => 1,                        // CONCURRENT_KERNELS, ECC_ENABLED
        33 => 0x18 + physical(dev) as c_int, // PCI_BUS_ID
        34 | 35 => 0,                        // PCI_DEVICE_ID, TCC_DRIVER
        36 => 2_619_000,                     // MEMORY_CLOCK_RATE
        37 => 5120,                          // GLOBAL_MEMORY_BUS_WIDTH
        38 => 50 << 20,                      // L2_CACHE_SIZE
        39 => 2048,                          // MAX_THREADS_PER_MULTIPROCESSOR
        40 => 3,                             // ASYNC_ENGINE_COUNT
        41 => 1,                             // UNIFIED_ADDRESSING
        50 => 0,                             // PCI_DOMAIN_ID
        ATTR_CC_MAJOR => 9,
        ATTR_CC_MINOR => 0,
        78..=80 => 1,         // STREAM_PRIORITIES, GLOBAL/LOCAL L1 cache
        81 => 233_472,        // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        82 => 65536,          // MAX_REGISTERS_PER_MULTIPROCESSOR
        83 => 1,              // MANAGED_MEMORY
        84 => 0,              // MULTI_GPU_BOARD
        89 | 95 | 96 => 1,    // CONCURRENT_MANAGED_ACCESS, COOPERATIVE_LAUNCH(_MULTI_DEVICE)
        97 => 232_448,        // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        102 => 1,             // VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        106 => 32,            // MAX_BLOCKS_PER_MULTIPROCESSOR
        115 | 120 => 1,       // MEMORY_POOLS_SUPPORTED, CLUSTER_LAUNCH
        133 => mps_enabled(), // MPS_ENABLED: SIMCUDA_MPS=1 plays a device served by MPS
        a if (1..150).contains(&a) => 0,
        _ => return None,
    })
}

/// # Safety
/// `pi`: null or valid for reads and writes of one `c_int`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(pi: *mut c_int, attrib: c_int, dev: CUdevice) -> CUresult {
    check_init!();
    if pi.is_null() {
        return INVALID_VALUE;
    }
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    match attribute(attrib, dev) {
        Some(v) => {
            // SAFETY: `pi` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
            unsafe { *pi = v };
            SUCCESS
        }
        None => INVALID_VALUE,
    }
}

/// # Safety
/// `bytes`: null or valid for reads and writes of one `usize`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    check_init!();
    if bytes.is_null() {
        return INVALID_VALUE;
    }
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    // SAFETY: `bytes` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *bytes = devstate(dev).total.load(Ordering::Relaxed) as usize };
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Contexts.

/// # Safety
/// `pctx`: null or valid for reads and writes of one `Handle`.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut Handle, dev: CUdevice) -> CUresult {
    check_init!();
    if pctx.is_null() {
        return INVALID_VALUE;
    }
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    let mut d = lock();
    let p = d.primaries.entry(dev).or_default();
    if p.handle == 0 {
        p.handle = new_handle();
    }
    let h = p.handle;
    if p.refcount == 0 {
        let r = ctx_reserve();
        if !devstate(dev).charge(dev as usize, r) {
            return OUT_OF_MEMORY;
        }
        d.ctxs.insert(h, Ctx { dev, primary: true, active: true, reserve: r, last_end: 0, lane: mps_lane() });
    }
    d.primaries.get_mut(&dev).unwrap().refcount += 1;
    // SAFETY: `pctx` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *pctx = h as Handle };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    check_init!();
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    let mut d = lock();
    let Some(p) = d.primaries.get_mut(&dev) else { return INVALID_CONTEXT };
    if p.refcount == 0 {
        return INVALID_CONTEXT;
    }
    p.refcount -= 1;
    if p.refcount == 0 {
        let h = p.handle;
        teardown_ctx(&mut d, h);
    }
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    check_init!();
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    let mut d = lock();
    let Some(p) = d.primaries.get(&dev) else { return SUCCESS };
    let (h, rc) = (p.handle, p.refcount);
    if rc == 0 {
        return SUCCESS;
    }
    // Destroy all its resources; it stays retained, so re-create it (reserve charged again).
    teardown_ctx(&mut d, h);
    let r = ctx_reserve();
    if devstate(dev).charge(dev as usize, r) {
        let c = d.ctxs.get_mut(&h).unwrap();
        c.active = true;
        c.reserve = r;
    }
    SUCCESS
}

/// # Safety
/// `pctx`: null or valid for reads and writes of one `Handle`.
unsafe fn ctx_create(pctx: *mut Handle, dev: CUdevice) -> CUresult {
    check_init!();
    if pctx.is_null() {
        return INVALID_VALUE;
    }
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    let mut d = lock();
    let r = ctx_reserve();
    if !devstate(dev).charge(dev as usize, r) {
        return OUT_OF_MEMORY;
    }
    let h = new_handle();
    d.ctxs.insert(h, Ctx { dev, primary: false, active: true, reserve: r, last_end: 0, lane: mps_lane() });
    CTX_STACK.with(|s| s.borrow_mut().push(h));
    // SAFETY: `pctx` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *pctx = h as Handle };
    SUCCESS
}

/// # Safety
/// `pctx`: as `ctx_create` requires.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(pctx: *mut Handle, _flags: c_uint, dev: CUdevice) -> CUresult {
    // SAFETY: `ctx_create` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { ctx_create(pctx, dev) }
}

/// # Safety
/// `pctx`: as `ctx_create` requires.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v3(pctx: *mut Handle, _params: *mut c_void, _num_params: c_int, _flags: c_uint, dev: CUdevice) -> CUresult {
    // SAFETY: `ctx_create` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { ctx_create(pctx, dev) }
}

/// CUDA 13 `cuCtxCreate`: (CUcontext*, CUctxCreateParams*, unsigned flags, CUdevice).
///
/// # Safety
/// `pctx`: as `ctx_create` requires.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(pctx: *mut Handle, _params: *mut c_void, _flags: c_uint, dev: CUdevice) -> CUresult {
    // SAFETY: `ctx_create` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { ctx_create(pctx, dev) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: Handle) -> CUresult {
    check_init!();
    let h = ctx as u64;
    let mut d = lock();
    match d.ctxs.get(&h) {
        Some(c) if !c.primary => {}
        _ => return INVALID_CONTEXT,
    }
    teardown_ctx(&mut d, h);
    d.ctxs.remove(&h);
    CTX_STACK.with(|s| {
        let mut s = s.borrow_mut();
        if s.last() == Some(&h) {
            s.pop();
        }
    });
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: Handle) -> CUresult {
    check_init!();
    let h = ctx as u64;
    if h != 0 && !lock().ctxs.contains_key(&h) {
        return INVALID_CONTEXT;
    }
    CTX_STACK.with(|s| {
        let mut s = s.borrow_mut();
        if h == 0 {
            s.pop();
        } else if let Some(top) = s.last_mut() {
            *top = h;
        } else {
            s.push(h);
        }
    });
    SUCCESS
}

/// # Safety
/// `pctx`: null or valid for reads and writes of one `Handle`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut Handle) -> CUresult {
    check_init!();
    // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
    unsafe { tri!(put(pctx, current_ctx_handle().unwrap_or(0) as Handle)) };
    SUCCESS
}

/// # Safety
/// `device`: null or valid for reads and writes of one `CUdevice`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    check_init!();
    let d = lock();
    let (_, dev) = tri!(cur_dev(&d));
    // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
    unsafe { tri!(put(device, dev)) };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: Handle) -> CUresult {
    check_init!();
    let h = ctx as u64;
    if !lock().ctxs.contains_key(&h) {
        return INVALID_CONTEXT;
    }
    CTX_STACK.with(|s| s.borrow_mut().push(h));
    SUCCESS
}

/// # Safety
/// `pctx`: null or valid for reads and writes of one `Handle`.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut Handle) -> CUresult {
    check_init!();
    let Some(h) = CTX_STACK.with(|s| s.borrow_mut().pop()) else { return INVALID_CONTEXT };
    if !pctx.is_null() {
        // SAFETY: `pctx` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *pctx = h as Handle };
    }
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    check_init!();
    let t = {
        let d = lock();
        let c = tri!(cur_ctx(&d));
        d.ctxs[&c].last_end
    };
    sleep_until_ns(t);
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Linear memory.

/// # Safety
/// `free`: null or valid for reads and writes of one `usize`.
/// `total`: null or valid for reads and writes of one `usize`.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    check_init!();
    let dev = {
        let d = lock();
        tri!(cur_dev(&d)).1
    };
    if free.is_null() || total.is_null() {
        return INVALID_VALUE;
    }
    let ds = devstate(dev);
    // SAFETY: `total` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *total = ds.total.load(Ordering::Relaxed) as usize };
    // SAFETY: `free` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *free = ds.free_now() as usize };
    SUCCESS
}

/// Charge and record a linear allocation of `size` bytes in context `ctx` on `dev`.
fn alloc_linear(d: &mut Drv, ctx: u64, dev: CUdevice, size: u64) -> Result<u64, CUresult> {
    if size == 0 {
        return Err(INVALID_VALUE);
    }
    if !devstate(dev).charge(dev as usize, size) {
        return Err(OUT_OF_MEMORY);
    }
    let p = new_va(size, 256);
    d.allocs.insert(p, Alloc { size, dev, ctx });
    Ok(p)
}

fn free_linear(d: &mut Drv, p: u64) -> CUresult {
    if p == 0 {
        return SUCCESS;
    }
    match d.allocs.remove(&p) {
        Some(a) => {
            if !sharing::freed(p) {
                devstate(a.dev).uncharge(a.dev as usize, a.size);
            }
            SUCCESS
        }
        None => INVALID_VALUE,
    }
}

/// # Safety
/// `dptr`: null or valid for reads and writes of one `CUdeviceptr`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    check_init!();
    let mut d = lock();
    let (ctx, dev) = tri!(cur_dev(&d));
    if dptr.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `dptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *dptr = tri!(alloc_linear(&mut d, ctx, dev, bytesize as u64)) };
    SUCCESS
}

/// # Safety
/// `dptr`: null or valid for reads and writes of one `CUdeviceptr`.
/// `p_pitch`: null or valid for reads and writes of one `usize`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    p_pitch: *mut usize,
    width_in_bytes: usize,
    height: usize,
    element_size_bytes: c_uint,
) -> CUresult {
    check_init!();
    let mut d = lock();
    let (ctx, dev) = tri!(cur_dev(&d));
    if dptr.is_null() || p_pitch.is_null() || width_in_bytes == 0 || height == 0 {
        return INVALID_VALUE;
    }
    if !matches!(element_size_bytes, 4 | 8 | 16) {
        return INVALID_VALUE;
    }
    let pitch = (width_in_bytes as u64).div_ceil(512) * 512;
    let Some(bytes) = pitch.checked_mul(height as u64) else { return OUT_OF_MEMORY };
    // SAFETY: `dptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *dptr = tri!(alloc_linear(&mut d, ctx, dev, bytes)) };
    // SAFETY: `p_pitch` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *p_pitch = pitch as usize };
    SUCCESS
}

/// # Safety
/// `dptr`: null or valid for reads and writes of one `CUdeviceptr`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocManaged(dptr: *mut CUdeviceptr, bytesize: usize, flags: c_uint) -> CUresult {
    check_init!();
    let mut d = lock();
    let (ctx, dev) = tri!(cur_dev(&d));
    if dptr.is_null() || !matches!(flags, 1 | 2) {
        return INVALID_VALUE;
    }
    // SAFETY: `dptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *dptr = tri!(alloc_linear(&mut d, ctx, dev, bytesize as u64)) };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    check_init!();
    free_linear(&mut lock(), dptr)
}

/// Resolve a stream handle to its key, creating default streams on first use.
fn stream_key(d: &mut Drv, h: Handle, ptsz: bool) -> Result<SKey, CUresult> {
    let h = h as u64;
    let key = match h {
        0 | CU_STREAM_LEGACY | CU_STREAM_PER_THREAD => {
            let c = cur_ctx(d)?;
            if h == CU_STREAM_PER_THREAD || (h == 0 && ptsz) {
                SKey::PerThread(c, tid())
            } else {
                SKey::Legacy(c)
            }
        }
        _ => {
            let k = SKey::Explicit(h);
            return if d.streams.contains_key(&k) { Ok(k) } else { Err(INVALID_HANDLE) };
        }
    };
    if let SKey::Legacy(c) | SKey::PerThread(c, _) = key {
        d.streams.entry(key).or_insert(Stream { ctx: c, tail: 0, capture: None });
    }
    Ok(key)
}

fn stream_dev(d: &Drv, k: SKey) -> (u64, CUdevice) {
    let c = d.streams[&k].ctx;
    (c, d.ctxs[&c].dev)
}

/// # Safety
/// `dptr`: null or valid for reads and writes of one `CUdeviceptr`.
unsafe fn mem_alloc_async(dptr: *mut CUdeviceptr, size: usize, pool: Option<Handle>, stream: Handle, ptsz: bool) -> CUresult {
    check_init!();
    let mut d = lock();
    tri!(cur_ctx(&d));
    let k = tri!(stream_key(&mut d, stream, ptsz));
    let (ctx, mut dev) = stream_dev(&d, k);
    if let Some(pool) = pool {
        let p = pool as u64;
        if p < POOL_BASE || !(p - POOL_BASE).is_multiple_of(0x100) || !valid_dev(((p - POOL_BASE) / 0x100) as c_int) {
            return INVALID_VALUE;
        }
        dev = ((p - POOL_BASE) / 0x100) as c_int;
    }
    if dptr.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `dptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *dptr = tri!(alloc_linear(&mut d, ctx, dev, size as u64)) };
    SUCCESS
}

/// # Safety
/// `dptr`: as `mem_alloc_async` requires.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(dptr: *mut CUdeviceptr, bytesize: usize, h_stream: Handle) -> CUresult {
    // SAFETY: `mem_alloc_async` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { mem_alloc_async(dptr, bytesize, None, h_stream, false) }
}

/// # Safety
/// `dptr`: as `mem_alloc_async` requires.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(dptr: *mut CUdeviceptr, bytesize: usize, h_stream: Handle) -> CUresult {
    // SAFETY: `mem_alloc_async` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { mem_alloc_async(dptr, bytesize, None, h_stream, true) }
}

/// # Safety
/// `dptr`: as `mem_alloc_async` requires.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(dptr: *mut CUdeviceptr, bytesize: usize, pool: Handle, h_stream: Handle) -> CUresult {
    // SAFETY: `mem_alloc_async` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { mem_alloc_async(dptr, bytesize, Some(pool), h_stream, false) }
}

/// # Safety
/// `dptr`: as `mem_alloc_async` requires.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(dptr: *mut CUdeviceptr, bytesize: usize, pool: Handle, h_stream: Handle) -> CUresult {
    // SAFETY: `mem_alloc_async` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { mem_alloc_async(dptr, bytesize, Some(pool), h_stream, true) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn mem_free_async(dptr: CUdeviceptr, stream: Handle, ptsz: bool) -> CUresult {
    check_init!();
    let mut d = lock();
    tri!(stream_key(&mut d, stream, ptsz));
    free_linear(&mut d, dptr)
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, h_stream: Handle) -> CUresult {
    // SAFETY: `mem_free_async` is given no pointer here, so no contract is passed on.
    unsafe { mem_free_async(dptr, h_stream, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, h_stream: Handle) -> CUresult {
    // SAFETY: `mem_free_async` is given no pointer here, so no contract is passed on.
    unsafe { mem_free_async(dptr, h_stream, true) }
}

/// # Safety
/// `pool_out`: null or valid for reads and writes of one `Handle`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool_out: *mut Handle, dev: CUdevice) -> CUresult {
    check_init!();
    if pool_out.is_null() {
        return INVALID_VALUE;
    }
    if !valid_dev(dev) {
        return INVALID_DEVICE;
    }
    // SAFETY: `pool_out` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *pool_out = (POOL_BASE + dev as u64 * 0x100) as Handle };
    SUCCESS
}

/// # Safety
/// `pool`: as `cuDeviceGetDefaultMemPool` requires.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetMemPool(pool: *mut Handle, dev: CUdevice) -> CUresult {
    // SAFETY: `cuDeviceGetDefaultMemPool` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { cuDeviceGetDefaultMemPool(pool, dev) }
}

// ---------------------------------------------------------------------------------------------
// Virtual memory management.

/// # Safety
/// `prop`: null or points to a valid `CUmemAllocationProp`.
unsafe fn prop_device(prop: *const CUmemAllocationProp) -> Result<CUdevice, CUresult> {
    if prop.is_null() {
        return Err(INVALID_VALUE);
    }
    // SAFETY: `prop` is not null (checked above) and the caller guarantees it points to a valid value (`# Safety`).
    let p = unsafe { &*prop };
    if p.location.type_ != 1 {
        return Err(INVALID_VALUE); // only CU_MEM_LOCATION_TYPE_DEVICE
    }
    if !valid_dev(p.location.id) {
        return Err(INVALID_DEVICE);
    }
    Ok(p.location.id)
}

/// # Safety
/// `granularity`: null or valid for reads and writes of one `usize`.
/// `prop`: as `prop_device` requires.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(granularity: *mut usize, prop: *const CUmemAllocationProp, option: c_uint) -> CUresult {
    check_init!();
    if !sharing::on_host(prop) {
        // SAFETY: `prop_device` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
        unsafe { tri!(prop_device(prop)) };
    }
    if option > 1 {
        return INVALID_VALUE;
    }
    // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
    unsafe { tri!(put(granularity, GRANULARITY as usize)) };
    SUCCESS
}

/// # Safety
/// `handle`: null or valid for reads and writes of one `u64`.
/// `prop`: as `prop_device` requires.
#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(handle: *mut u64, size: usize, prop: *const CUmemAllocationProp, _flags: u64) -> CUresult {
    check_init!();
    if sharing::on_host(prop) {
        // SAFETY: `create_on_host` gets this function's own `handle`, under the contract its caller accepted (`# Safety`).
        return unsafe { sharing::create_on_host(handle, size) };
    }
    // SAFETY: `prop_device` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    let dev = unsafe { tri!(prop_device(prop)) };
    // SAFETY: `prop_device` above returned a device, so `prop` is not null; the caller guarantees
    // it points to a valid value (`# Safety`).
    let prop = unsafe { &*prop };
    if handle.is_null() || size == 0 || !(size as u64).is_multiple_of(GRANULARITY) || !matches!(prop.type_, 1 | 2) {
        return INVALID_VALUE;
    }
    let mut d = lock();
    if !devstate(dev).charge(dev as usize, size as u64) {
        return OUT_OF_MEMORY;
    }
    let h = new_handle();
    d.vmm.insert(h, Vmm { dev, size: size as u64, released: false, maps: 0 });
    sharing::created(h, prop);
    // SAFETY: `handle` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *handle = h };
    SUCCESS
}

fn vmm_maybe_free(d: &mut Drv, h: u64) {
    if let Some(v) = d.vmm.get(&h) {
        if v.released && v.maps == 0 {
            let v = d.vmm.remove(&h).unwrap();
            contents::forget_handle(h);
            if !sharing::freed(h) {
                devstate(v.dev).uncharge(v.dev as usize, v.size);
            }
        }
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemRelease(handle: u64) -> CUresult {
    check_init!();
    let mut d = lock();
    match d.vmm.get_mut(&handle) {
        Some(v) if !v.released => v.released = true,
        _ => return INVALID_VALUE,
    }
    // The memory goes away once it is released and no longer mapped anywhere.
    vmm_maybe_free(&mut d, handle);
    SUCCESS
}

/// # Safety
/// `ptr`: null or valid for reads and writes of one `CUdeviceptr`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAddressReserve(ptr: *mut CUdeviceptr, size: usize, alignment: usize, _addr: CUdeviceptr, _flags: u64) -> CUresult {
    check_init!();
    if ptr.is_null() || size == 0 || !(size as u64).is_multiple_of(GRANULARITY) {
        return INVALID_VALUE;
    }
    if alignment != 0 && !alignment.is_power_of_two() {
        return INVALID_VALUE;
    }
    let va = new_va(size as u64, (alignment as u64).max(GRANULARITY));
    lock().reservations.insert(va, size as u64);
    // SAFETY: `ptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *ptr = va };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) -> CUresult {
    check_init!();
    let mut d = lock();
    match d.reservations.get(&ptr) {
        Some(&s) if s == size as u64 => {
            d.reservations.remove(&ptr);
            SUCCESS
        }
        _ => INVALID_VALUE,
    }
}

fn in_reservation(d: &Drv, ptr: u64, size: u64) -> bool {
    d.reservations.range(..=ptr).next_back().is_some_and(|(&start, &len)| ptr + size <= start + len)
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemMap(ptr: CUdeviceptr, size: usize, offset: usize, handle: u64, _flags: u64) -> CUresult {
    check_init!();
    let mut d = lock();
    let size = size as u64;
    if size == 0 || !size.is_multiple_of(GRANULARITY) || !in_reservation(&d, ptr, size) {
        return INVALID_VALUE;
    }
    if d.mappings.range(ptr..ptr + size).next().is_some() || d.mappings.range(..ptr).next_back().is_some_and(|(&s, &(l, _))| s + l > ptr) {
        return INVALID_VALUE; // already mapped
    }
    match d.vmm.get_mut(&handle) {
        Some(v) if !v.released && offset as u64 + size <= v.size => v.maps += 1,
        _ => return INVALID_VALUE,
    }
    d.mappings.insert(ptr, (size, handle));
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    check_init!();
    let mut d = lock();
    let keys: Vec<u64> = d.mappings.range(ptr..ptr.saturating_add(size as u64)).map(|(k, _)| *k).collect();
    if keys.is_empty() {
        return INVALID_VALUE;
    }
    for k in keys {
        let (_, h) = d.mappings.remove(&k).unwrap();
        if let Some(v) = d.vmm.get_mut(&h) {
            v.maps -= 1;
        }
        vmm_maybe_free(&mut d, h);
    }
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemSetAccess(ptr: CUdeviceptr, size: usize, desc: *const c_void, count: usize) -> CUresult {
    check_init!();
    if desc.is_null() || count == 0 {
        return INVALID_VALUE;
    }
    let d = lock();
    if d.mappings.range(ptr..ptr.saturating_add(size as u64)).next().is_none() {
        return INVALID_VALUE;
    }
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Arrays.

fn format_size(format: c_uint) -> Option<u64> {
    Some(match format {
        1 | 8 => 1,       // (UN)SIGNED_INT8
        2 | 9 | 16 => 2,  // (UN)SIGNED_INT16, HALF
        3 | 10 | 32 => 4, // (UN)SIGNED_INT32, FLOAT
        176 => 1,         // NV12 (approximation)
        192 | 198 => 1,   // UNORM/SNORM_INT8X1
        193 | 199 => 2,   // ..X2
        194 | 200 => 4,   // ..X4
        195 | 201 => 2,   // UNORM/SNORM_INT16X1
        196 | 202 => 4,   // ..X2
        197 | 203 => 8,   // ..X4
        145..=158 => 1,   // block-compressed formats (approximation)
        _ => return None,
    })
}

fn array_bytes(desc: &CudaArray3DDescriptor) -> Result<u64, CUresult> {
    if desc.width == 0 || !matches!(desc.num_channels, 1 | 2 | 4) {
        return Err(INVALID_VALUE);
    }
    let es = format_size(desc.format).ok_or(INVALID_VALUE)?;
    (desc.width as u64)
        .checked_mul(desc.height.max(1) as u64)
        .and_then(|v| v.checked_mul(desc.depth.max(1) as u64))
        .and_then(|v| v.checked_mul(desc.num_channels as u64 * es))
        .ok_or(OUT_OF_MEMORY)
}

/// # Safety
/// `handle`: null or valid for reads and writes of one `Handle`.
unsafe fn array_create(handle: *mut Handle, desc: CudaArray3DDescriptor, levels: Option<c_uint>) -> CUresult {
    check_init!();
    let mut d = lock();
    let (ctx, dev) = tri!(cur_dev(&d));
    if handle.is_null() {
        return INVALID_VALUE;
    }
    let bytes = match levels {
        None => tri!(array_bytes(&desc)),
        Some(0) => return INVALID_VALUE,
        Some(n) => {
            let mut total = 0u64;
            for l in 0..n.min(64) {
                let lvl = CudaArray3DDescriptor {
                    width: (desc.width >> l).max(1),
                    height: if desc.height == 0 { 0 } else { (desc.height >> l).max(1) },
                    depth: if desc.depth == 0 { 0 } else { (desc.depth >> l).max(1) },
                    ..desc
                };
                if desc.width == 0 {
                    return INVALID_VALUE;
                }
                total = total.saturating_add(tri!(array_bytes(&lvl)));
            }
            total
        }
    };
    if !devstate(dev).charge(dev as usize, bytes) {
        return OUT_OF_MEMORY;
    }
    let h = new_handle();
    d.arrays.insert(h, Array { bytes, dev, ctx, desc, mipmapped: levels.is_some() });
    // SAFETY: `handle` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *handle = h as Handle };
    SUCCESS
}

/// # Safety
/// `handle`: as `array_create` requires.
/// `desc`: null or points to a valid `CudaArrayDescriptor`.
#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate_v2(handle: *mut Handle, desc: *const CudaArrayDescriptor) -> CUresult {
    if desc.is_null() {
        return if INITIALIZED.load(Ordering::Acquire) { INVALID_VALUE } else { NOT_INITIALIZED };
    }
    // SAFETY: `desc` is not null (checked above) and the caller guarantees it points to a valid value (`# Safety`).
    let d = unsafe { &*desc };
    let d3 = CudaArray3DDescriptor { width: d.width, height: d.height, depth: 0, format: d.format, num_channels: d.num_channels, flags: 0 };
    // SAFETY: `array_create` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { array_create(handle, d3, None) }
}

/// # Safety
/// `handle`: as `array_create` requires.
/// `desc`: null or points to a valid `CudaArray3DDescriptor`.
#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate_v2(handle: *mut Handle, desc: *const CudaArray3DDescriptor) -> CUresult {
    if desc.is_null() {
        return if INITIALIZED.load(Ordering::Acquire) { INVALID_VALUE } else { NOT_INITIALIZED };
    }
    // SAFETY: `desc` is not null (checked above) and the caller guarantees it points to a valid
    // descriptor; `handle` goes on under the contract the caller accepted (`# Safety`).
    unsafe { array_create(handle, *desc, None) }
}

/// # Safety
/// `handle`: as `array_create` requires.
/// `desc`: null or points to a valid `CudaArray3DDescriptor`.
#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayCreate(handle: *mut Handle, desc: *const CudaArray3DDescriptor, num_levels: c_uint) -> CUresult {
    if desc.is_null() {
        return if INITIALIZED.load(Ordering::Acquire) { INVALID_VALUE } else { NOT_INITIALIZED };
    }
    // SAFETY: `desc` is not null (checked above) and the caller guarantees it points to a valid
    // descriptor; `handle` goes on under the contract the caller accepted (`# Safety`).
    unsafe { array_create(handle, *desc, Some(num_levels)) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn array_destroy(h: Handle, mipmapped: bool) -> CUresult {
    check_init!();
    let mut d = lock();
    let h = h as u64;
    match d.arrays.get(&h) {
        Some(a) if a.mipmapped == mipmapped => {
            let a = d.arrays.remove(&h).unwrap();
            devstate(a.dev).uncharge(a.dev as usize, a.bytes);
            SUCCESS
        }
        _ => INVALID_HANDLE,
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuArrayDestroy(h: Handle) -> CUresult {
    // SAFETY: `array_destroy` is given no pointer here, so no contract is passed on.
    unsafe { array_destroy(h, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(h: Handle) -> CUresult {
    // SAFETY: `array_destroy` is given no pointer here, so no contract is passed on.
    unsafe { array_destroy(h, true) }
}

/// # Safety
/// `out`: null or valid for reads and writes of one `CudaArrayDescriptor`.
#[no_mangle]
pub unsafe extern "C" fn cuArrayGetDescriptor_v2(out: *mut CudaArrayDescriptor, h: Handle) -> CUresult {
    check_init!();
    let d = lock();
    match d.arrays.get(&(h as u64)) {
        Some(a) if !a.mipmapped => {
            let s = a.desc;
            // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
            unsafe { tri!(put(out, CudaArrayDescriptor { width: s.width, height: s.height, format: s.format, num_channels: s.num_channels })) };
            SUCCESS
        }
        _ => INVALID_HANDLE,
    }
}

/// # Safety
/// `out`: null or valid for reads and writes of one `CudaArray3DDescriptor`.
#[no_mangle]
pub unsafe extern "C" fn cuArray3DGetDescriptor_v2(out: *mut CudaArray3DDescriptor, h: Handle) -> CUresult {
    check_init!();
    let d = lock();
    match d.arrays.get(&(h as u64)) {
        Some(a) if !a.mipmapped => {
            // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
            unsafe { tri!(put(out, a.desc)) };
            SUCCESS
        }
        _ => INVALID_HANDLE,
    }
}

// ---------------------------------------------------------------------------------------------
// The 32-bit-era entry points (no `_v2`): `unsigned int` device pointers and sizes. Device
// pointers come from below 4 GiB; figures above 4 GiB are clamped to `UINT_MAX`.

/// # Safety
/// `dptr`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc(dptr: *mut c_uint, bytesize: c_uint) -> CUresult {
    check_init!();
    let mut d = lock();
    let (ctx, dev) = tri!(cur_dev(&d));
    if dptr.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `dptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *dptr = tri!(alloc_legacy(&mut d, ctx, dev, u64::from(bytesize))) };
    SUCCESS
}

fn alloc_legacy(d: &mut Drv, ctx: u64, dev: CUdevice, size: u64) -> Result<c_uint, CUresult> {
    if size == 0 {
        return Err(INVALID_VALUE);
    }
    let p = new_va32(size).ok_or(OUT_OF_MEMORY)?;
    if !devstate(dev).charge(dev as usize, size) {
        return Err(OUT_OF_MEMORY);
    }
    d.allocs.insert(p, Alloc { size, dev, ctx });
    Ok(p as c_uint)
}

/// # Safety
/// `dptr`: null or valid for reads and writes of one `c_uint`.
/// `p_pitch`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch(
    dptr: *mut c_uint,
    p_pitch: *mut c_uint,
    width_in_bytes: c_uint,
    height: c_uint,
    element_size_bytes: c_uint,
) -> CUresult {
    check_init!();
    let mut d = lock();
    let (ctx, dev) = tri!(cur_dev(&d));
    if dptr.is_null() || p_pitch.is_null() || width_in_bytes == 0 || height == 0 || !matches!(element_size_bytes, 4 | 8 | 16) {
        return INVALID_VALUE;
    }
    let pitch = u64::from(width_in_bytes).div_ceil(512) * 512;
    if pitch > u64::from(u32::MAX) {
        return INVALID_VALUE;
    }
    // SAFETY: `dptr` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *dptr = tri!(alloc_legacy(&mut d, ctx, dev, pitch * u64::from(height))) };
    // SAFETY: `p_pitch` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *p_pitch = pitch as c_uint };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuMemFree(dptr: c_uint) -> CUresult {
    check_init!();
    free_linear(&mut lock(), u64::from(dptr))
}

/// # Safety
/// `free`: null or valid for reads and writes of one `c_uint`.
/// `total`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult {
    let (mut f, mut t) = (0usize, 0usize);
    // SAFETY: out-pointers to the locals `f` and `t`.
    let code = unsafe { cuMemGetInfo_v2(&mut f, &mut t) };
    if code == SUCCESS {
        if free.is_null() || total.is_null() {
            return INVALID_VALUE;
        }
        // SAFETY: `free` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *free = f.min(u32::MAX as usize) as c_uint };
        // SAFETY: `total` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *total = t.min(u32::MAX as usize) as c_uint };
    }
    code
}

/// # Safety
/// `bytes`: null or valid for reads and writes of one `c_uint`.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem(bytes: *mut c_uint, dev: CUdevice) -> CUresult {
    let mut t = 0usize;
    // SAFETY: an out-pointer to the local `t`.
    let code = unsafe { cuDeviceTotalMem_v2(&mut t, dev) };
    if code == SUCCESS {
        if bytes.is_null() {
            return INVALID_VALUE;
        }
        // SAFETY: `bytes` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *bytes = t.min(u32::MAX as usize) as c_uint };
    }
    code
}

/// `CUDA_ARRAY_DESCRIPTOR_v1`.
#[repr(C)]
pub struct CudaArrayDescriptorV1 {
    width: c_uint,
    height: c_uint,
    format: c_uint,
    num_channels: c_uint,
}

/// `CUDA_ARRAY3D_DESCRIPTOR_v1`.
#[repr(C)]
pub struct CudaArray3DDescriptorV1 {
    width: c_uint,
    height: c_uint,
    depth: c_uint,
    format: c_uint,
    num_channels: c_uint,
    flags: c_uint,
}

/// # Safety
/// `handle`: as `cuArrayCreate_v2` requires.
/// `desc`: null or points to a valid `CudaArrayDescriptorV1`.
#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate(handle: *mut Handle, desc: *const CudaArrayDescriptorV1) -> CUresult {
    if desc.is_null() {
        return if INITIALIZED.load(Ordering::Acquire) { INVALID_VALUE } else { NOT_INITIALIZED };
    }
    // SAFETY: `desc` is not null (checked above) and the caller guarantees it points to a valid value (`# Safety`).
    let d = unsafe { &*desc };
    let d2 = CudaArrayDescriptor { width: d.width as usize, height: d.height as usize, format: d.format, num_channels: d.num_channels };
    // SAFETY: `cuArrayCreate_v2` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { cuArrayCreate_v2(handle, &d2) }
}

/// # Safety
/// `handle`: as `cuArray3DCreate_v2` requires.
/// `desc`: null or points to a valid `CudaArray3DDescriptorV1`.
#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate(handle: *mut Handle, desc: *const CudaArray3DDescriptorV1) -> CUresult {
    if desc.is_null() {
        return if INITIALIZED.load(Ordering::Acquire) { INVALID_VALUE } else { NOT_INITIALIZED };
    }
    // SAFETY: `desc` is not null (checked above) and the caller guarantees it points to a valid value (`# Safety`).
    let d = unsafe { &*desc };
    let d3 = CudaArray3DDescriptor {
        width: d.width as usize,
        height: d.height as usize,
        depth: d.depth as usize,
        format: d.format,
        num_channels: d.num_channels,
        flags: d.flags,
    };
    // SAFETY: `cuArray3DCreate_v2` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { cuArray3DCreate_v2(handle, &d3) }
}

/// # Safety
/// `pctx`: as `ctx_create` requires.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate(pctx: *mut Handle, _flags: c_uint, dev: CUdevice) -> CUresult {
    // SAFETY: `ctx_create` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { ctx_create(pctx, dev) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy(ctx: Handle) -> CUresult {
    // SAFETY: `cuCtxDestroy_v2` is given no pointer here, so no contract is passed on.
    unsafe { cuCtxDestroy_v2(ctx) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult {
    // SAFETY: `cuDevicePrimaryCtxRelease_v2` is given no pointer here, so no contract is passed on.
    unsafe { cuDevicePrimaryCtxRelease_v2(dev) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult {
    // SAFETY: `cuDevicePrimaryCtxReset_v2` is given no pointer here, so no contract is passed on.
    unsafe { cuDevicePrimaryCtxReset_v2(dev) }
}

// ---------------------------------------------------------------------------------------------
// Modules, libraries, functions.

/// # Safety
/// `module`: null or valid for reads and writes of one `Handle`.
unsafe fn module_load(module: *mut Handle, b: u64, ptx: Option<String>) -> CUresult {
    let mut d = lock();
    let (ctx, dev) = tri!(cur_dev(&d));
    if module.is_null() {
        return INVALID_VALUE;
    }
    if !devstate(dev).charge(dev as usize, b) {
        return OUT_OF_MEMORY;
    }
    let h = new_handle();
    let entries = ptx.as_deref().map(record::entries);
    if let Some(text) = &ptx {
        record::image(h, text);
    }
    d.modules.insert(h, Module { ctx, dev, charged: b, funcs: BTreeMap::new(), entries });
    // SAFETY: `module` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *module = h as Handle };
    SUCCESS
}

/// # Safety
/// `module`: as `module_load` requires.
/// `image`: a module image, as `image_bytes` requires.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut Handle, image: *const c_void) -> CUresult {
    check_init!();
    if image.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `module_load` and `record::ptx_text` get this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { module_load(module, image_bytes(image), record::ptx_text(image)) }
}

/// # Safety
/// `module`: as `cuModuleLoadData` requires.
/// `image`: as `cuModuleLoadData` requires.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut Handle,
    image: *const c_void,
    _num_options: c_uint,
    _options: *mut c_void,
    _option_values: *mut *mut c_void,
) -> CUresult {
    // SAFETY: `cuModuleLoadData` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { cuModuleLoadData(module, image) }
}

/// # Safety
/// `module`: as `cuModuleLoadData` requires.
/// `fat_cubin`: as `cuModuleLoadData` requires.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadFatBinary(module: *mut Handle, fat_cubin: *const c_void) -> CUresult {
    // SAFETY: `cuModuleLoadData` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { cuModuleLoadData(module, fat_cubin) }
}

/// # Safety
/// `fname`: null or a NUL-terminated string.
unsafe fn file_readable(fname: *const c_char) -> Result<(), CUresult> {
    if fname.is_null() {
        return Err(INVALID_VALUE);
    }
    // SAFETY: `fname` is not null (checked above) and the caller guarantees a NUL-terminated string (`# Safety`).
    if unsafe { libc::access(fname, libc::R_OK) } != 0 {
        return Err(FILE_NOT_FOUND);
    }
    Ok(())
}

/// # Safety
/// `module`: as `module_load` requires.
/// `fname`: null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(module: *mut Handle, fname: *const c_char) -> CUresult {
    check_init!();
    // SAFETY: `file_readable` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { tri!(file_readable(fname)) };
    // SAFETY: `fname` is a readable C string (file_readable checked it); `ptx_text` reads the NUL-terminated copy made here.
    let text = std::fs::read(unsafe { CStr::from_ptr(fname) }.to_string_lossy().as_ref()).ok().and_then(|mut v| {
        v.push(0);
        // SAFETY: `v` is NUL-terminated (pushed above) and outlives the call.
        unsafe { record::ptx_text(v.as_ptr().cast()) }
    });
    // SAFETY: `module_load` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { module_load(module, file_bytes(fname), text) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(hmod: Handle) -> CUresult {
    check_init!();
    let mut d = lock();
    let Some(m) = d.modules.remove(&(hmod as u64)) else { return INVALID_HANDLE };
    for f in m.funcs.values() {
        d.functions.remove(f);
    }
    devstate(m.dev).uncharge(m.dev as usize, m.charged);
    SUCCESS
}

/// # Safety
/// `hfunc`: null or valid for reads and writes of one `Handle`.
/// `name`: null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(hfunc: *mut Handle, hmod: Handle, name: *const c_char) -> CUresult {
    check_init!();
    if hfunc.is_null() || name.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `name` is not null (checked above) and the caller guarantees `name` is a NUL-terminated string (`# Safety`).
    let name = unsafe { CStr::from_ptr(name).to_string_lossy().into_owned() };
    let mut d = lock();
    let m = hmod as u64;
    let Some(module) = d.modules.get_mut(&m) else { return INVALID_HANDLE };
    if module.entries.as_ref().is_some_and(|e| !e.contains_key(&name)) {
        return NOT_FOUND;
    }
    let f = *module.funcs.entry(name).or_insert_with(new_handle);
    d.functions.insert(f, m);
    // SAFETY: `hfunc` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *hfunc = f as Handle };
    SUCCESS
}

/// The names `cuFuncGetName` hands out, kept for the life of the process (the driver's are
/// valid while the module is loaded).
static FUNC_NAMES: Mutex<BTreeMap<u64, &'static CStr>> = Mutex::new(BTreeMap::new());

/// The module and name of function `f` (a library kernel's function has module 0).
fn function_of(d: &Drv, f: u64) -> Option<(u64, String)> {
    let &m = d.functions.get(&f)?;
    let name = d.modules.get(&m).and_then(|module| module.funcs.iter().find(|(_, &h)| h == f).map(|(n, _)| n.clone()));
    Some((m, name.unwrap_or_default()))
}

/// # Safety
/// `hmod`: null or valid for a write of one `Handle`.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetModule(hmod: *mut Handle, hfunc: Handle) -> CUresult {
    check_init!();
    if hmod.is_null() {
        return INVALID_VALUE;
    }
    match function_of(&lock(), hfunc as u64) {
        Some((m, _)) if m != 0 => {
            // SAFETY: a non-null out-pointer from the caller.
            unsafe { *hmod = m as Handle };
            SUCCESS
        }
        Some(_) => NOT_FOUND,
        None => INVALID_HANDLE,
    }
}

/// # Safety
/// `name`: null or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetName(name: *mut *const c_char, hfunc: Handle) -> CUresult {
    check_init!();
    if name.is_null() || hfunc.is_null() {
        return INVALID_VALUE;
    }
    let Some((_, n)) = function_of(&lock(), hfunc as u64) else { return INVALID_HANDLE };
    let mut names = FUNC_NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let kept = *names.entry(hfunc as u64).or_insert_with(|| Box::leak(std::ffi::CString::new(n).unwrap_or_default().into_boxed_c_str()));
    // SAFETY: a non-null out-pointer from the caller; the name lives as long as the process.
    unsafe { *name = kept.as_ptr() };
    SUCCESS
}

/// # Safety
/// `library`: null or valid for reads and writes of one `Handle`.
unsafe fn library_load(library: *mut Handle, bytes: u64) -> CUresult {
    let mut d = lock();
    if library.is_null() {
        return INVALID_VALUE;
    }
    // Libraries are context-independent; their bytes go to the current context's device, if any.
    let dev = cur_dev(&d).ok().map(|(_, dev)| dev);
    let mut charged = 0;
    if let Some(dev) = dev {
        charged = bytes;
        if !devstate(dev).charge(dev as usize, charged) {
            return OUT_OF_MEMORY;
        }
    }
    let h = new_handle();
    d.libraries.insert(h, Library { dev, charged, kernels: BTreeMap::new() });
    // SAFETY: `library` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *library = h as Handle };
    SUCCESS
}

/// # Safety
/// `library`: as `library_load` requires.
/// `code`: a module image, as `image_bytes` requires.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadData(
    library: *mut Handle,
    code: *const c_void,
    _jit_options: *mut c_void,
    _jit_options_values: *mut *mut c_void,
    _num_jit_options: c_uint,
    _library_options: *mut c_void,
    _library_option_values: *mut *mut c_void,
    _num_library_options: c_uint,
) -> CUresult {
    check_init!();
    if code.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `library_load` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { library_load(library, image_bytes(code)) }
}

/// # Safety
/// `library`: as `library_load` requires.
/// `file_name`: a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadFromFile(
    library: *mut Handle,
    file_name: *const c_char,
    _jit_options: *mut c_void,
    _jit_options_values: *mut *mut c_void,
    _num_jit_options: c_uint,
    _library_options: *mut c_void,
    _library_option_values: *mut *mut c_void,
    _num_library_options: c_uint,
) -> CUresult {
    check_init!();
    // SAFETY: `file_readable` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { tri!(file_readable(file_name)) };
    // SAFETY: `library_load` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { library_load(library, file_bytes(file_name)) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryUnload(library: Handle) -> CUresult {
    check_init!();
    let mut d = lock();
    let Some(l) = d.libraries.remove(&(library as u64)) else { return INVALID_HANDLE };
    for k in l.kernels.values() {
        if let Some((_, f)) = d.kernels.remove(k) {
            d.functions.remove(&f);
        }
    }
    if let Some(dev) = l.dev {
        devstate(dev).uncharge(dev as usize, l.charged);
    }
    SUCCESS
}

/// # Safety
/// `kernel`: null or valid for reads and writes of one `Handle`.
/// `name`: null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryGetKernel(kernel: *mut Handle, library: Handle, name: *const c_char) -> CUresult {
    check_init!();
    if kernel.is_null() || name.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `name` is not null (checked above) and the caller guarantees `name` is a NUL-terminated string (`# Safety`).
    let name = unsafe { CStr::from_ptr(name).to_string_lossy().into_owned() };
    let mut d = lock();
    let lh = library as u64;
    let Some(l) = d.libraries.get_mut(&lh) else { return INVALID_HANDLE };
    let k = *l.kernels.entry(name).or_insert_with(new_handle);
    d.kernels.entry(k).or_insert((lh, 0));
    // SAFETY: `kernel` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *kernel = k as Handle };
    SUCCESS
}

/// # Safety
/// `func`: null or valid for reads and writes of one `Handle`.
#[no_mangle]
pub unsafe extern "C" fn cuKernelGetFunction(func: *mut Handle, kernel: Handle) -> CUresult {
    check_init!();
    let mut d = lock();
    tri!(cur_ctx(&d));
    if func.is_null() {
        return INVALID_VALUE;
    }
    let Some(k) = d.kernels.get_mut(&(kernel as u64)) else { return INVALID_HANDLE };
    if k.1 == 0 {
        k.1 = new_handle();
    }
    let f = k.1;
    d.functions.insert(f, 0);
    // SAFETY: `func` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *func = f as Handle };
    SUCCESS
}

/// Resident blocks per SM: `SIMCUDA_BLOCKS_PER_SM` (1 when unset), whatever the block size.
///
/// # Safety
/// `num_blocks`: null or valid for a write of one `c_int`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    num_blocks: *mut c_int,
    func: Handle,
    block_size: c_int,
    _dynamic_smem: usize,
) -> CUresult {
    check_init!();
    if num_blocks.is_null() || block_size <= 0 || block_size > 1024 {
        return INVALID_VALUE;
    }
    {
        let d = lock();
        let f = func as u64;
        if !d.functions.contains_key(&f) && !d.kernels.contains_key(&f) {
            return INVALID_HANDLE;
        }
    }
    // SAFETY: not null (checked above); the caller's out-pointer (`# Safety`).
    unsafe { *num_blocks = blocks_per_sm().unwrap_or(1) as c_int };
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Launches and the device timeline.

/// Queue `durs` (ns, back to back) on stream `stream`; blocks while the stream is too far ahead.
/// Launches into a capturing stream are recorded instead.
///
/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn submit(stream: Handle, ptsz: bool, check: impl Fn(&Drv) -> Result<(), CUresult>, durs: &[u64]) -> CUresult {
    check_init!();
    match submit_timed(stream, ptsz, check, durs) {
        Ok(_) => SUCCESS,
        Err(code) => code,
    }
}

/// `submit`, returning where the work went on the device timeline (`None`: captured).
fn submit_timed(stream: Handle, ptsz: bool, check: impl Fn(&Drv) -> Result<(), CUresult>, durs: &[u64]) -> Result<Option<(u64, u64)>, CUresult> {
    submit_after(stream, ptsz, check, durs, 0)
}

/// `submit_timed` for work that reaches an idle device `latency` ns after it is submitted
/// (a kernel launch, `SIMCUDA_LAUNCH_NS`); behind queued work the latency is hidden.
fn submit_after(stream: Handle, ptsz: bool, check: impl Fn(&Drv) -> Result<(), CUresult>, durs: &[u64], latency: u64) -> Result<Option<(u64, u64)>, CUresult> {
    macro_rules! tri {
        ($e:expr) => {
            $e?
        };
    }
    loop {
        let mut g = lock();
        let d: &mut Drv = &mut g;
        tri!(cur_ctx(d));
        tri!(check(d));
        let k = tri!(stream_key(d, stream, ptsz));
        let (ctx, dev) = stream_dev(d, k);
        let s = d.streams.get_mut(&k).unwrap();
        if let Some(cap) = s.capture.as_mut() {
            cap.extend_from_slice(durs);
            return Ok(None);
        }
        let now = now_ns();
        if s.tail > now + MAX_QUEUE_NS {
            let wait = s.tail - MAX_QUEUE_NS;
            drop(g);
            sleep_until_ns(wait);
            continue;
        }
        let total: u64 = durs.iter().sum();
        let earliest = (now + latency).max(s.tail);
        let (start, end) = if d.ctxs.get(&ctx).is_some_and(|c| c.lane) {
            let lane = d.lanes.entry(dev).or_default();
            let start = earliest.max(*lane);
            *lane = start + total;
            (start, start + total)
        } else {
            devstate(dev).reserve_time(earliest, total)
        };
        let s = d.streams.get_mut(&k).unwrap();
        devstate(dev).note_busy(dev as usize, end);
        s.tail = end;
        let c = d.ctxs.get_mut(&ctx).unwrap();
        c.last_end = c.last_end.max(end);
        return Ok(Some((start, end)));
    }
}

/// # Safety
/// `params`: null or the kernel's parameter array (`cuLaunchKernel`'s `kernelParams`), whose
/// first entry, if not null, points to the first parameter: a simulated kernel takes a u64 there.
unsafe fn kernel_duration(params: *mut *mut c_void) -> u64 {
    if params.is_null() {
        return 0;
    }
    // SAFETY: `params` is not null, and the caller guarantees it points to the kernel's parameter
    // array (`# Safety`), whose first entry is read.
    let first = unsafe { *params };
    if first.is_null() {
        return 0;
    }
    // SAFETY: the caller guarantees a non-null first entry points to the kernel's first parameter,
    // which a simulated kernel declares as a u64 (`# Safety`).
    unsafe { (first as *const u64).read_unaligned() }
}

/// The packed parameter buffer of an `extra` array (`CU_LAUNCH_PARAM_BUFFER_POINTER` = 1 and
/// `CU_LAUNCH_PARAM_BUFFER_SIZE` = 2, ended by `CU_LAUNCH_PARAM_END` = 0).
///
/// # Safety
/// `extra` is null or a `CU_LAUNCH_PARAM_END`-terminated array of key/value pairs whose buffer
/// is as long as its size says, valid for the launch.
unsafe fn packed(extra: *mut *mut c_void) -> Option<&'static [u8]> {
    if extra.is_null() {
        return None;
    }
    let (mut buf, mut size) = (std::ptr::null::<u8>(), None);
    for i in 0..32 {
        // SAFETY: the pairs go on until the end key (this function's contract).
        let (key, value) = unsafe { (*extra.add(2 * i) as usize, *extra.add(2 * i + 1)) };
        match key {
            0 => break,
            1 => buf = value as *const u8,
            // SAFETY: BUFFER_SIZE's value points to a size_t.
            2 if !value.is_null() => size = Some(unsafe { (value as *const usize).read() }),
            _ => return None,
        }
    }
    // SAFETY: the buffer is as long as its size (this function's contract).
    (!buf.is_null()).then(|| unsafe { std::slice::from_raw_parts(buf, size.unwrap_or(8)) })
}

/// A launch's duration (its first parameter, or the packed buffer's first 8 bytes) and, for a
/// kernel with a slice parameter, that parameter; a launch with the slice parameter runs its
/// share of the original grid's duration. `Err` for a slice that is not inside its grid.
///
/// # Safety
/// `params` null or one pointer per kernel parameter; `extra` as `packed` wants it.
unsafe fn launch_args(
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    entry: Option<&record::Entry>,
    grid: [c_uint; 3],
) -> Result<(u64, Option<[u32; 6]>), CUresult> {
    // SAFETY: the caller's `extra` (this function's contract).
    let buffer = if params.is_null() { unsafe { packed(extra) } } else { None };
    let dur = match buffer {
        Some(b) if b.len() >= 8 => u64::from_le_bytes(b[..8].try_into().unwrap()),
        // SAFETY: the caller's `params` (this function's contract).
        _ => unsafe { kernel_duration(params) },
    };
    let Some(at) = entry.and_then(|e| e.slice_at) else { return Ok((dur, None)) };
    // SAFETY: the kernel declares parameter `at`, so the program passed a pointer for it, to the
    // slice parameter's 24 bytes.
    let param = if params.is_null() { std::ptr::null() } else { unsafe { *params.add(at) as *const u8 } };
    let bytes = match buffer {
        Some(b) if b.len() >= 24 => &b[b.len() - 24..],
        // SAFETY: as above.
        _ if !param.is_null() => unsafe { std::slice::from_raw_parts(param, 24) },
        _ => return Err(INVALID_VALUE),
    };
    let s = record::slice_words(bytes).ok_or(INVALID_VALUE)?;
    let inside = (0..3).all(|i| grid[i] > 0 && u64::from(s[i]) + u64::from(grid[i]) <= u64::from(s[i + 3]));
    if !inside {
        return Err(INVALID_VALUE);
    }
    let volume = |g: &[u32]| g.iter().map(|&v| u128::from(v)).product::<u128>();
    let (part, whole) = match wave_blocks() {
        // Blocks run a wave at a time: a slice takes its share of the grid's waves, a part-filled
        // wave as long as a full one.
        Some(wave) => (volume(&grid).div_ceil(wave), volume(&s[3..]).div_ceil(wave)),
        None => (volume(&grid), volume(&s[3..])),
    };
    Ok(((u128::from(dur) * part / whole) as u64, Some(s)))
}

/// `SIMCUDA_BLOCKS_PER_SM`: blocks of a kernel resident on one SM at once (what
/// `cuOccupancyMaxActiveBlocksPerMultiprocessor` answers; 1 when unset).
fn blocks_per_sm() -> Option<u32> {
    static V: OnceLock<Option<u32>> = OnceLock::new();
    *V.get_or_init(|| std::env::var("SIMCUDA_BLOCKS_PER_SM").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0))
}

/// Blocks the device runs at once when `SIMCUDA_BLOCKS_PER_SM` is set (SMs × that): a slice of
/// a kernel then lasts by whole waves. Unset, a slice lasts its share of the blocks.
fn wave_blocks() -> Option<u128> {
    blocks_per_sm().map(|n| u128::from(n) * SMS as u128)
}

/// `SIMCUDA_LAUNCH_NS`: how long a kernel launched onto an idle stream takes to start (the
/// host-to-device latency of a real launch); 0 when unset.
fn launch_latency_ns() -> u64 {
    static V: OnceLock<u64> = OnceLock::new();
    *V.get_or_init(|| std::env::var("SIMCUDA_LAUNCH_NS").ok().and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn check_function(f: u64, grid: [c_uint; 3], block: [c_uint; 3]) -> impl Fn(&Drv) -> Result<(), CUresult> {
    move |d: &Drv| {
        if !d.functions.contains_key(&f) && !d.kernels.contains_key(&f) {
            return Err(INVALID_HANDLE);
        }
        if grid.contains(&0) || block.contains(&0) || block.iter().map(|&b| b as u64).product::<u64>() > 1024 {
            return Err(INVALID_VALUE);
        }
        Ok(())
    }
}

/// # Safety
/// `params`, `extra`: as `launch_args` requires.
unsafe fn launch(f: Handle, grid: [c_uint; 3], block: [c_uint; 3], stream: Handle, params: *mut *mut c_void, extra: *mut *mut c_void, ptsz: bool) -> CUresult {
    check_init!();
    let (name, entry) = {
        let d = lock();
        let name = function_of(&d, f as u64).map(|(_, n)| n).unwrap_or_default();
        let entry = d.functions.get(&(f as u64)).and_then(|m| d.modules.get(m)).and_then(|m| m.entries.as_ref()).and_then(|e| e.get(&name).cloned());
        (name, entry)
    };
    // SAFETY: the program's launch arguments, valid for this call.
    let (dur, slice) = tri!(unsafe { launch_args(params, extra, entry.as_ref(), grid) });
    match submit_after(stream, ptsz, check_function(f as u64, grid, block), &[dur], launch_latency_ns()) {
        Ok(Some((start, end))) => {
            record::launch(&name, grid, slice, start, end);
            SUCCESS
        }
        Ok(None) => SUCCESS,
        Err(code) => code,
    }
}

/// # Safety
/// `kernel_params`: as `launch` requires.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: Handle,
    grid_dim_x: c_uint,
    grid_dim_y: c_uint,
    grid_dim_z: c_uint,
    block_dim_x: c_uint,
    block_dim_y: c_uint,
    block_dim_z: c_uint,
    _shared_mem_bytes: c_uint,
    h_stream: Handle,
    kernel_params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: `launch` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { launch(f, [grid_dim_x, grid_dim_y, grid_dim_z], [block_dim_x, block_dim_y, block_dim_z], h_stream, kernel_params, _extra, false) }
}

/// # Safety
/// `kernel_params`: as `launch` requires.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel_ptsz(
    f: Handle,
    grid_dim_x: c_uint,
    grid_dim_y: c_uint,
    grid_dim_z: c_uint,
    block_dim_x: c_uint,
    block_dim_y: c_uint,
    block_dim_z: c_uint,
    _shared_mem_bytes: c_uint,
    h_stream: Handle,
    kernel_params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: `launch` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { launch(f, [grid_dim_x, grid_dim_y, grid_dim_z], [block_dim_x, block_dim_y, block_dim_z], h_stream, kernel_params, _extra, true) }
}

/// # Safety
/// `kernel_params`: as `launch` requires.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: Handle,
    grid_dim_x: c_uint,
    grid_dim_y: c_uint,
    grid_dim_z: c_uint,
    block_dim_x: c_uint,
    block_dim_y: c_uint,
    block_dim_z: c_uint,
    _shared_mem_bytes: c_uint,
    h_stream: Handle,
    kernel_params: *mut *mut c_void,
) -> CUresult {
    // SAFETY: `launch` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { launch(f, [grid_dim_x, grid_dim_y, grid_dim_z], [block_dim_x, block_dim_y, block_dim_z], h_stream, kernel_params, std::ptr::null_mut(), false) }
}

/// # Safety
/// `kernel_params`: as `launch` requires.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel_ptsz(
    f: Handle,
    grid_dim_x: c_uint,
    grid_dim_y: c_uint,
    grid_dim_z: c_uint,
    block_dim_x: c_uint,
    block_dim_y: c_uint,
    block_dim_z: c_uint,
    _shared_mem_bytes: c_uint,
    h_stream: Handle,
    kernel_params: *mut *mut c_void,
) -> CUresult {
    // SAFETY: `launch` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { launch(f, [grid_dim_x, grid_dim_y, grid_dim_z], [block_dim_x, block_dim_y, block_dim_z], h_stream, kernel_params, std::ptr::null_mut(), true) }
}

/// # Safety
/// `config`: null or points to a valid `CUlaunchConfig`.
/// `params`, `extra`: as `launch` requires.
unsafe fn launch_ex(config: *const CUlaunchConfig, f: Handle, params: *mut *mut c_void, extra: *mut *mut c_void, ptsz: bool) -> CUresult {
    check_init!();
    if config.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `config` is not null (checked above) and the caller guarantees it points to a valid value (`# Safety`).
    let c = unsafe { &*config };
    // SAFETY: `launch` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { launch(f, [c.grid_dim_x, c.grid_dim_y, c.grid_dim_z], [c.block_dim_x, c.block_dim_y, c.block_dim_z], c.h_stream, params, extra, ptsz) }
}

/// # Safety
/// `config`: as `launch_ex` requires.
/// `kernel_params`: as `launch_ex` requires.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx(config: *const CUlaunchConfig, f: Handle, kernel_params: *mut *mut c_void, _extra: *mut *mut c_void) -> CUresult {
    // SAFETY: `launch_ex` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { launch_ex(config, f, kernel_params, _extra, false) }
}

/// # Safety
/// `config`: as `launch_ex` requires.
/// `kernel_params`: as `launch_ex` requires.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const CUlaunchConfig,
    f: Handle,
    kernel_params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: `launch_ex` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { launch_ex(config, f, kernel_params, _extra, true) }
}

// ---------------------------------------------------------------------------------------------
// Streams.

/// # Safety
/// `ph`: null or valid for reads and writes of one `Handle`.
unsafe fn stream_create(ph: *mut Handle, flags: c_uint) -> CUresult {
    check_init!();
    let mut d = lock();
    let ctx = tri!(cur_ctx(&d));
    if ph.is_null() || flags > 1 {
        return INVALID_VALUE;
    }
    let h = new_handle();
    d.streams.insert(SKey::Explicit(h), Stream { ctx, tail: 0, capture: None });
    // SAFETY: `ph` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *ph = h as Handle };
    SUCCESS
}

/// # Safety
/// `ph`: as `stream_create` requires.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph: *mut Handle, flags: c_uint) -> CUresult {
    // SAFETY: `stream_create` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { stream_create(ph, flags) }
}

/// # Safety
/// `ph`: as `stream_create` requires.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(ph: *mut Handle, flags: c_uint, _priority: c_int) -> CUresult {
    // SAFETY: `stream_create` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { stream_create(ph, flags) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(h: Handle) -> CUresult {
    check_init!();
    let mut d = lock();
    match d.streams.remove(&SKey::Explicit(h as u64)) {
        Some(_) => SUCCESS,
        None => INVALID_HANDLE,
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn stream_sync(h: Handle, ptsz: bool) -> CUresult {
    check_init!();
    let t = {
        let mut d = lock();
        let k = tri!(stream_key(&mut d, h, ptsz));
        let s = &d.streams[&k];
        if s.capture.is_some() {
            return STREAM_CAPTURE_UNSUPPORTED;
        }
        s.tail
    };
    sleep_until_ns(t);
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(h: Handle) -> CUresult {
    // SAFETY: `stream_sync` is given no pointer here, so no contract is passed on.
    unsafe { stream_sync(h, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize_ptsz(h: Handle) -> CUresult {
    // SAFETY: `stream_sync` is given no pointer here, so no contract is passed on.
    unsafe { stream_sync(h, true) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn stream_query(h: Handle, ptsz: bool) -> CUresult {
    check_init!();
    let mut d = lock();
    let k = tri!(stream_key(&mut d, h, ptsz));
    let s = &d.streams[&k];
    if s.capture.is_some() {
        return STREAM_CAPTURE_UNSUPPORTED;
    }
    if s.tail > now_ns() {
        NOT_READY
    } else {
        SUCCESS
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(h: Handle) -> CUresult {
    // SAFETY: `stream_query` is given no pointer here, so no contract is passed on.
    unsafe { stream_query(h, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery_ptsz(h: Handle) -> CUresult {
    // SAFETY: `stream_query` is given no pointer here, so no contract is passed on.
    unsafe { stream_query(h, true) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn stream_wait_event(h: Handle, ev: Handle, ptsz: bool) -> CUresult {
    check_init!();
    let mut d = lock();
    let k = tri!(stream_key(&mut d, h, ptsz));
    let Some(e) = d.events.get(&(ev as u64)) else { return INVALID_HANDLE };
    let t = e.time.unwrap_or(0);
    let s = d.streams.get_mut(&k).unwrap();
    if s.capture.is_none() {
        s.tail = s.tail.max(t);
    }
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(h: Handle, ev: Handle, _flags: c_uint) -> CUresult {
    // SAFETY: `stream_wait_event` is given no pointer here, so no contract is passed on.
    unsafe { stream_wait_event(h, ev, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent_ptsz(h: Handle, ev: Handle, _flags: c_uint) -> CUresult {
    // SAFETY: `stream_wait_event` is given no pointer here, so no contract is passed on.
    unsafe { stream_wait_event(h, ev, true) }
}

// ---------------------------------------------------------------------------------------------
// Events.

/// # Safety
/// `ph`: null or valid for reads and writes of one `Handle`.
#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph: *mut Handle, flags: c_uint) -> CUresult {
    check_init!();
    let mut d = lock();
    let ctx = tri!(cur_ctx(&d));
    if ph.is_null() || flags & !0xf != 0 {
        return INVALID_VALUE;
    }
    let h = new_handle();
    d.events.insert(h, Event { ctx, flags, time: None });
    // SAFETY: `ph` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *ph = h as Handle };
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(ev: Handle) -> CUresult {
    check_init!();
    match lock().events.remove(&(ev as u64)) {
        Some(_) => SUCCESS,
        None => INVALID_HANDLE,
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn event_record(ev: Handle, h: Handle, ptsz: bool) -> CUresult {
    check_init!();
    let mut d = lock();
    let k = tri!(stream_key(&mut d, h, ptsz));
    if !d.events.contains_key(&(ev as u64)) {
        return INVALID_HANDLE;
    }
    let s = &d.streams[&k];
    if s.capture.is_some() {
        return SUCCESS; // an event node in the graph; nothing to time
    }
    let t = s.tail.max(now_ns());
    d.events.get_mut(&(ev as u64)).unwrap().time = Some(t);
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(ev: Handle, h: Handle) -> CUresult {
    // SAFETY: `event_record` is given no pointer here, so no contract is passed on.
    unsafe { event_record(ev, h, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecord_ptsz(ev: Handle, h: Handle) -> CUresult {
    // SAFETY: `event_record` is given no pointer here, so no contract is passed on.
    unsafe { event_record(ev, h, true) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(ev: Handle, h: Handle, _flags: c_uint) -> CUresult {
    // SAFETY: `event_record` is given no pointer here, so no contract is passed on.
    unsafe { event_record(ev, h, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags_ptsz(ev: Handle, h: Handle, _flags: c_uint) -> CUresult {
    // SAFETY: `event_record` is given no pointer here, so no contract is passed on.
    unsafe { event_record(ev, h, true) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(ev: Handle) -> CUresult {
    check_init!();
    match lock().events.get(&(ev as u64)) {
        None => INVALID_HANDLE,
        Some(Event { time: Some(t), .. }) if *t > now_ns() => NOT_READY,
        Some(_) => SUCCESS,
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(ev: Handle) -> CUresult {
    check_init!();
    let t = match lock().events.get(&(ev as u64)) {
        None => return INVALID_HANDLE,
        Some(e) => e.time.unwrap_or(0),
    };
    sleep_until_ns(t);
    SUCCESS
}

/// # Safety
/// `ms`: null or valid for reads and writes of one `f32`.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Handle, end: Handle) -> CUresult {
    check_init!();
    if ms.is_null() {
        return INVALID_VALUE;
    }
    let d = lock();
    let (Some(s), Some(e)) = (d.events.get(&(start as u64)), d.events.get(&(end as u64))) else {
        return INVALID_HANDLE;
    };
    if (s.flags | e.flags) & CU_EVENT_DISABLE_TIMING != 0 {
        return INVALID_HANDLE;
    }
    let (Some(ts), Some(te)) = (s.time, e.time) else { return INVALID_HANDLE };
    if ts.max(te) > now_ns() {
        return NOT_READY;
    }
    // SAFETY: `ms` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *ms = ((te as i64 - ts as i64) as f64 / 1e6) as f32 };
    SUCCESS
}

/// CUDA 13's `cuEventElapsedTime`.
///
/// # Safety
/// `ms`: as `cuEventElapsedTime` requires.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, start: Handle, end: Handle) -> CUresult {
    // SAFETY: `cuEventElapsedTime` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { cuEventElapsedTime(ms, start, end) }
}

// ---------------------------------------------------------------------------------------------
// Stream capture and graphs.

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn begin_capture(h: Handle, mode: c_uint, ptsz: bool) -> CUresult {
    check_init!();
    if mode > 2 {
        return INVALID_VALUE;
    }
    let mut d = lock();
    let k = tri!(stream_key(&mut d, h, ptsz));
    if let SKey::Legacy(_) = k {
        return STREAM_CAPTURE_UNSUPPORTED;
    }
    let s = d.streams.get_mut(&k).unwrap();
    if s.capture.is_some() {
        return ILLEGAL_STATE;
    }
    s.capture = Some(Vec::new());
    SUCCESS
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(h: Handle, mode: c_uint) -> CUresult {
    // SAFETY: `begin_capture` is given no pointer here, so no contract is passed on.
    unsafe { begin_capture(h, mode, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2_ptsz(h: Handle, mode: c_uint) -> CUresult {
    // SAFETY: `begin_capture` is given no pointer here, so no contract is passed on.
    unsafe { begin_capture(h, mode, true) }
}

/// The pre-10.1 form without a mode (global mode).
///
/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture(h: Handle) -> CUresult {
    // SAFETY: `begin_capture` is given no pointer here, so no contract is passed on.
    unsafe { begin_capture(h, 0, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_ptsz(h: Handle) -> CUresult {
    // SAFETY: `begin_capture` is given no pointer here, so no contract is passed on.
    unsafe { begin_capture(h, 0, true) }
}

/// # Safety
/// `graph`: null or valid for reads and writes of one `Handle`.
unsafe fn end_capture(h: Handle, graph: *mut Handle, ptsz: bool) -> CUresult {
    check_init!();
    if graph.is_null() {
        return INVALID_VALUE;
    }
    let mut d = lock();
    let k = tri!(stream_key(&mut d, h, ptsz));
    let Some(durs) = d.streams.get_mut(&k).unwrap().capture.take() else { return ILLEGAL_STATE };
    let g = new_handle();
    d.graphs.insert(g, durs);
    // SAFETY: `graph` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *graph = g as Handle };
    SUCCESS
}

/// # Safety
/// `graph`: as `end_capture` requires.
#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(h: Handle, graph: *mut Handle) -> CUresult {
    // SAFETY: `end_capture` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { end_capture(h, graph, false) }
}

/// # Safety
/// `graph`: as `end_capture` requires.
#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture_ptsz(h: Handle, graph: *mut Handle) -> CUresult {
    // SAFETY: `end_capture` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { end_capture(h, graph, true) }
}

/// # Safety
/// `status`: null or valid for reads and writes of one `c_uint`.
unsafe fn is_capturing(h: Handle, status: *mut c_uint, ptsz: bool) -> CUresult {
    check_init!();
    let mut d = lock();
    let k = tri!(stream_key(&mut d, h, ptsz));
    let c = d.streams[&k].capture.is_some() as c_uint;
    // SAFETY: `put` refuses a null pointer; the caller guarantees a non-null one valid for a write (`# Safety`).
    unsafe { tri!(put(status, c)) };
    SUCCESS
}

/// # Safety
/// `status`: as `is_capturing` requires.
#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(h: Handle, status: *mut c_uint) -> CUresult {
    // SAFETY: `is_capturing` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { is_capturing(h, status, false) }
}

/// # Safety
/// `status`: as `is_capturing` requires.
#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing_ptsz(h: Handle, status: *mut c_uint) -> CUresult {
    // SAFETY: `is_capturing` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { is_capturing(h, status, true) }
}

/// # Safety
/// `exec`: null or valid for reads and writes of one `Handle`.
unsafe fn instantiate(exec: *mut Handle, graph: Handle) -> CUresult {
    check_init!();
    if exec.is_null() {
        return INVALID_VALUE;
    }
    let mut d = lock();
    let Some(g) = d.graphs.get(&(graph as u64)).cloned() else { return INVALID_VALUE };
    let e = new_handle();
    d.execs.insert(e, g);
    // SAFETY: `exec` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *exec = e as Handle };
    SUCCESS
}

/// # Safety
/// `exec`: as `instantiate` requires.
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(exec: *mut Handle, graph: Handle, _flags: u64) -> CUresult {
    // SAFETY: `instantiate` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { instantiate(exec, graph) }
}

/// # Safety
/// `exec`: as `instantiate` requires.
/// `error_node`: null or valid for a write of one `Handle`.
/// `log_buffer`: null or valid for writes of `buffer_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiate_v2(
    exec: *mut Handle,
    graph: Handle,
    error_node: *mut Handle,
    log_buffer: *mut c_char,
    buffer_size: usize,
) -> CUresult {
    if !error_node.is_null() {
        // SAFETY: `error_node` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *error_node = std::ptr::null_mut() };
    }
    if !log_buffer.is_null() && buffer_size > 0 {
        // SAFETY: `log_buffer` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *log_buffer = 0 };
    }
    // SAFETY: `instantiate` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { instantiate(exec, graph) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
unsafe fn graph_launch(exec: Handle, h: Handle, ptsz: bool) -> CUresult {
    check_init!();
    let durs = match lock().execs.get(&(exec as u64)) {
        Some(v) => v.clone(),
        None => return INVALID_VALUE,
    };
    // SAFETY: `submit` is given no pointer here, so no contract is passed on.
    unsafe { submit(h, ptsz, |_| Ok(()), &durs) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: Handle, h: Handle) -> CUresult {
    // SAFETY: `graph_launch` is given no pointer here, so no contract is passed on.
    unsafe { graph_launch(exec, h, false) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch_ptsz(exec: Handle, h: Handle) -> CUresult {
    // SAFETY: `graph_launch` is given no pointer here, so no contract is passed on.
    unsafe { graph_launch(exec, h, true) }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: Handle) -> CUresult {
    check_init!();
    match lock().execs.remove(&(exec as u64)) {
        Some(_) => SUCCESS,
        None => INVALID_VALUE,
    }
}

/// # Safety
/// None: no pointer argument is dereferenced (handles are only looked up); `unsafe` as the
/// other driver entry points are.
#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(graph: Handle) -> CUresult {
    check_init!();
    match lock().graphs.remove(&(graph as u64)) {
        Some(_) => SUCCESS,
        None => INVALID_VALUE,
    }
}

// ---------------------------------------------------------------------------------------------
// cuGetProcAddress.

/// Address of an exported function by its exported (versioned) name.
macro_rules! export_table {
    ($($f:ident),* $(,)?) => {
        fn export_addr(name: &str) -> Option<*mut c_void> {
            match name {
                $(stringify!($f) => Some($f as *mut c_void),)*
                _ => None,
            }
        }
    };
}

export_table!(
    cuMemAlloc,
    cuMemAllocPitch,
    cuMemFree,
    cuMemGetInfo,
    cuDeviceTotalMem,
    cuArrayCreate,
    cuArray3DCreate,
    cuCtxCreate,
    cuCtxDestroy,
    cuDevicePrimaryCtxRelease,
    cuDevicePrimaryCtxReset,
    cuInit,
    cuDriverGetVersion,
    cuGetErrorName,
    cuGetErrorString,
    cuDeviceGetCount,
    cuDeviceGet,
    cuDeviceGetName,
    cuDeviceGetUuid,
    cuDeviceGetUuid_v2,
    cuDeviceGetAttribute,
    cuDeviceTotalMem_v2,
    cuDevicePrimaryCtxRetain,
    cuDevicePrimaryCtxRelease_v2,
    cuDevicePrimaryCtxReset_v2,
    cuCtxCreate_v2,
    cuCtxCreate_v3,
    cuCtxCreate_v4,
    cuCtxDestroy_v2,
    cuCtxSetCurrent,
    cuCtxGetCurrent,
    cuCtxGetDevice,
    cuCtxPushCurrent_v2,
    cuCtxPopCurrent_v2,
    cuCtxSynchronize,
    cuMemGetInfo_v2,
    cuMemAlloc_v2,
    cuMemAllocPitch_v2,
    cuMemAllocManaged,
    cuMemFree_v2,
    cuMemAllocAsync,
    cuMemAllocAsync_ptsz,
    cuMemAllocFromPoolAsync,
    cuMemAllocFromPoolAsync_ptsz,
    cuMemFreeAsync,
    cuMemFreeAsync_ptsz,
    cuDeviceGetDefaultMemPool,
    cuDeviceGetMemPool,
    cuMemGetAllocationGranularity,
    cuMemCreate,
    cuMemRelease,
    cuMemAddressReserve,
    cuMemAddressFree,
    cuMemMap,
    cuMemUnmap,
    cuMemSetAccess,
    cuArrayCreate_v2,
    cuArray3DCreate_v2,
    cuMipmappedArrayCreate,
    cuArrayDestroy,
    cuMipmappedArrayDestroy,
    cuArrayGetDescriptor_v2,
    cuArray3DGetDescriptor_v2,
    cuModuleLoadData,
    cuModuleLoadDataEx,
    cuModuleLoadFatBinary,
    cuModuleLoad,
    cuModuleUnload,
    cuModuleGetFunction,
    cuFuncGetModule,
    cuFuncGetName,
    cuOccupancyMaxActiveBlocksPerMultiprocessor,
    cuLibraryLoadData,
    cuLibraryLoadFromFile,
    cuLibraryUnload,
    cuLibraryGetKernel,
    cuKernelGetFunction,
    cuLaunchKernel,
    cuLaunchKernel_ptsz,
    cuLaunchCooperativeKernel,
    cuLaunchCooperativeKernel_ptsz,
    cuLaunchKernelEx,
    cuLaunchKernelEx_ptsz,
    cuStreamCreate,
    cuStreamCreateWithPriority,
    cuStreamDestroy_v2,
    cuStreamSynchronize,
    cuStreamSynchronize_ptsz,
    cuStreamQuery,
    cuStreamQuery_ptsz,
    cuStreamWaitEvent,
    cuStreamWaitEvent_ptsz,
    cuEventCreate,
    cuEventDestroy_v2,
    cuEventRecord,
    cuEventRecord_ptsz,
    cuEventRecordWithFlags,
    cuEventRecordWithFlags_ptsz,
    cuEventQuery,
    cuEventSynchronize,
    cuEventElapsedTime,
    cuEventElapsedTime_v2,
    cuStreamBeginCapture,
    cuStreamBeginCapture_ptsz,
    cuStreamBeginCapture_v2,
    cuStreamBeginCapture_v2_ptsz,
    cuStreamEndCapture,
    cuStreamEndCapture_ptsz,
    cuStreamIsCapturing,
    cuStreamIsCapturing_ptsz,
    cuGraphInstantiateWithFlags,
    cuGraphInstantiate_v2,
    cuGraphLaunch,
    cuGraphLaunch_ptsz,
    cuGraphExecDestroy,
    cuGraphDestroy,
    cuGetProcAddress,
    cuGetProcAddress_v2,
);

use sharing::{
    cuCtxDisablePeerAccess, cuCtxEnablePeerAccess, cuDeviceCanAccessPeer, cuIpcCloseMemHandle, cuIpcGetMemHandle, cuIpcOpenMemHandle_v2,
    cuMemExportToShareableHandle, cuMemGetAddressRange_v2, cuMemGetAllocationPropertiesFromHandle, cuMemImportFromShareableHandle, cuMemcpyPeer,
    cuMemcpyPeerAsync, cuMulticastAddDevice, cuMulticastBindAddr, cuMulticastBindMem, cuMulticastCreate, cuMulticastGetGranularity, cuMulticastUnbind,
    cuPointerGetAttribute,
};

/// The exports of `sharing`, by name.
fn sharing_export_addr(name: &str) -> Option<*mut c_void> {
    Some(match name {
        "cuIpcGetMemHandle" => cuIpcGetMemHandle as *mut c_void,
        "cuMemGetAddressRange_v2" => cuMemGetAddressRange_v2 as *mut c_void,
        "cuPointerGetAttribute" => cuPointerGetAttribute as *mut c_void,
        "cuMulticastGetGranularity" => cuMulticastGetGranularity as *mut c_void,
        "cuMulticastCreate" => cuMulticastCreate as *mut c_void,
        "cuMulticastAddDevice" => cuMulticastAddDevice as *mut c_void,
        "cuMulticastBindMem" => cuMulticastBindMem as *mut c_void,
        "cuMulticastBindAddr" => cuMulticastBindAddr as *mut c_void,
        "cuMulticastUnbind" => cuMulticastUnbind as *mut c_void,
        "cuMemGetAllocationPropertiesFromHandle" => cuMemGetAllocationPropertiesFromHandle as *mut c_void,
        "cuIpcOpenMemHandle_v2" => cuIpcOpenMemHandle_v2 as *mut c_void,
        "cuIpcCloseMemHandle" => cuIpcCloseMemHandle as *mut c_void,
        "cuMemExportToShareableHandle" => cuMemExportToShareableHandle as *mut c_void,
        "cuMemImportFromShareableHandle" => cuMemImportFromShareableHandle as *mut c_void,
        "cuDeviceCanAccessPeer" => cuDeviceCanAccessPeer as *mut c_void,
        "cuCtxEnablePeerAccess" => cuCtxEnablePeerAccess as *mut c_void,
        "cuCtxDisablePeerAccess" => cuCtxDisablePeerAccess as *mut c_void,
        "cuMemcpyPeer" => cuMemcpyPeer as *mut c_void,
        "cuMemcpyPeerAsync" => cuMemcpyPeerAsync as *mut c_void,
        _ => return None,
    })
}

/// (base name, lowest cudaVersion, exported name, exported per-thread-default-stream name or "").
/// Rows of one base name are ordered newest first; the first row whose version is reached wins.
const PROC_TABLE: &[(&str, c_int, &str, &str)] = &[
    ("cuInit", 2000, "cuInit", ""),
    ("cuDriverGetVersion", 2020, "cuDriverGetVersion", ""),
    ("cuGetErrorName", 6000, "cuGetErrorName", ""),
    ("cuGetErrorString", 6000, "cuGetErrorString", ""),
    ("cuDeviceGetCount", 2000, "cuDeviceGetCount", ""),
    ("cuDeviceGet", 2000, "cuDeviceGet", ""),
    ("cuDeviceGetName", 2000, "cuDeviceGetName", ""),
    ("cuDeviceGetUuid", 11040, "cuDeviceGetUuid_v2", ""),
    ("cuDeviceGetUuid", 9020, "cuDeviceGetUuid", ""),
    ("cuDeviceGetAttribute", 2000, "cuDeviceGetAttribute", ""),
    ("cuDeviceTotalMem", 3020, "cuDeviceTotalMem_v2", ""),
    ("cuDeviceTotalMem", 2000, "cuDeviceTotalMem", ""),
    ("cuDevicePrimaryCtxRetain", 7000, "cuDevicePrimaryCtxRetain", ""),
    ("cuDevicePrimaryCtxRelease", 11000, "cuDevicePrimaryCtxRelease_v2", ""),
    ("cuDevicePrimaryCtxRelease", 7000, "cuDevicePrimaryCtxRelease", ""),
    ("cuDevicePrimaryCtxReset", 11000, "cuDevicePrimaryCtxReset_v2", ""),
    ("cuDevicePrimaryCtxReset", 7000, "cuDevicePrimaryCtxReset", ""),
    // CUDA 12.5-12.9 headers declare cuCtxCreate (= _v2) and cuCtxCreate_v4 side by side;
    // only CUDA 13.0 made "cuCtxCreate" the 4-argument _v4.
    ("cuCtxCreate", 13000, "cuCtxCreate_v4", ""),
    ("cuCtxCreate", 3020, "cuCtxCreate_v2", ""),
    ("cuCtxCreate", 2000, "cuCtxCreate", ""),
    ("cuCtxCreate_v3", 11040, "cuCtxCreate_v3", ""),
    ("cuCtxCreate_v4", 12050, "cuCtxCreate_v4", ""),
    ("cuCtxDestroy", 4000, "cuCtxDestroy_v2", ""),
    ("cuCtxDestroy", 2000, "cuCtxDestroy", ""),
    ("cuCtxSetCurrent", 4000, "cuCtxSetCurrent", ""),
    ("cuCtxGetCurrent", 4000, "cuCtxGetCurrent", ""),
    ("cuCtxGetDevice", 2000, "cuCtxGetDevice", ""),
    ("cuCtxPushCurrent", 4000, "cuCtxPushCurrent_v2", ""),
    ("cuCtxPopCurrent", 4000, "cuCtxPopCurrent_v2", ""),
    ("cuCtxSynchronize", 2000, "cuCtxSynchronize", ""),
    ("cuMemGetInfo", 3020, "cuMemGetInfo_v2", ""),
    ("cuMemGetInfo", 2000, "cuMemGetInfo", ""),
    ("cuMemAlloc", 3020, "cuMemAlloc_v2", ""),
    ("cuMemAlloc", 2000, "cuMemAlloc", ""),
    ("cuMemAllocPitch", 3020, "cuMemAllocPitch_v2", ""),
    ("cuMemAllocPitch", 2000, "cuMemAllocPitch", ""),
    ("cuMemAllocManaged", 6000, "cuMemAllocManaged", ""),
    ("cuMemFree", 3020, "cuMemFree_v2", ""),
    ("cuMemFree", 2000, "cuMemFree", ""),
    ("cuMemAllocAsync", 11020, "cuMemAllocAsync", "cuMemAllocAsync_ptsz"),
    ("cuMemAllocFromPoolAsync", 11020, "cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync_ptsz"),
    ("cuMemFreeAsync", 11020, "cuMemFreeAsync", "cuMemFreeAsync_ptsz"),
    ("cuDeviceGetDefaultMemPool", 11020, "cuDeviceGetDefaultMemPool", ""),
    ("cuDeviceGetMemPool", 11020, "cuDeviceGetMemPool", ""),
    ("cuMemGetAllocationGranularity", 10020, "cuMemGetAllocationGranularity", ""),
    ("cuMemCreate", 10020, "cuMemCreate", ""),
    ("cuMemRelease", 10020, "cuMemRelease", ""),
    ("cuMemAddressReserve", 10020, "cuMemAddressReserve", ""),
    ("cuMemAddressFree", 10020, "cuMemAddressFree", ""),
    ("cuMemMap", 10020, "cuMemMap", ""),
    ("cuMemUnmap", 10020, "cuMemUnmap", ""),
    ("cuMemSetAccess", 10020, "cuMemSetAccess", ""),
    ("cuArrayCreate", 3020, "cuArrayCreate_v2", ""),
    ("cuArrayCreate", 2000, "cuArrayCreate", ""),
    ("cuArray3DCreate", 3020, "cuArray3DCreate_v2", ""),
    ("cuArray3DCreate", 2000, "cuArray3DCreate", ""),
    ("cuMipmappedArrayCreate", 5000, "cuMipmappedArrayCreate", ""),
    ("cuArrayDestroy", 2000, "cuArrayDestroy", ""),
    ("cuMipmappedArrayDestroy", 5000, "cuMipmappedArrayDestroy", ""),
    ("cuArrayGetDescriptor", 3020, "cuArrayGetDescriptor_v2", ""),
    ("cuArray3DGetDescriptor", 3020, "cuArray3DGetDescriptor_v2", ""),
    ("cuModuleLoadData", 2000, "cuModuleLoadData", ""),
    ("cuModuleLoadDataEx", 2010, "cuModuleLoadDataEx", ""),
    ("cuModuleLoadFatBinary", 2000, "cuModuleLoadFatBinary", ""),
    ("cuModuleLoad", 2000, "cuModuleLoad", ""),
    ("cuModuleUnload", 2000, "cuModuleUnload", ""),
    ("cuModuleGetFunction", 2000, "cuModuleGetFunction", ""),
    ("cuFuncGetModule", 11000, "cuFuncGetModule", ""),
    ("cuFuncGetName", 12030, "cuFuncGetName", ""),
    ("cuOccupancyMaxActiveBlocksPerMultiprocessor", 6050, "cuOccupancyMaxActiveBlocksPerMultiprocessor", ""),
    ("cuLibraryLoadData", 12000, "cuLibraryLoadData", ""),
    ("cuLibraryLoadFromFile", 12000, "cuLibraryLoadFromFile", ""),
    ("cuLibraryUnload", 12000, "cuLibraryUnload", ""),
    ("cuLibraryGetKernel", 12000, "cuLibraryGetKernel", ""),
    ("cuKernelGetFunction", 12000, "cuKernelGetFunction", ""),
    ("cuLaunchKernel", 4000, "cuLaunchKernel", "cuLaunchKernel_ptsz"),
    ("cuLaunchKernelEx", 11060, "cuLaunchKernelEx", "cuLaunchKernelEx_ptsz"),
    ("cuLaunchCooperativeKernel", 9000, "cuLaunchCooperativeKernel", "cuLaunchCooperativeKernel_ptsz"),
    ("cuStreamCreate", 2000, "cuStreamCreate", ""),
    ("cuStreamCreateWithPriority", 5050, "cuStreamCreateWithPriority", ""),
    ("cuStreamDestroy", 4000, "cuStreamDestroy_v2", ""),
    ("cuStreamSynchronize", 2000, "cuStreamSynchronize", "cuStreamSynchronize_ptsz"),
    ("cuStreamQuery", 2000, "cuStreamQuery", "cuStreamQuery_ptsz"),
    ("cuStreamWaitEvent", 3020, "cuStreamWaitEvent", "cuStreamWaitEvent_ptsz"),
    ("cuEventCreate", 2000, "cuEventCreate", ""),
    ("cuEventDestroy", 4000, "cuEventDestroy_v2", ""),
    ("cuEventRecord", 2000, "cuEventRecord", "cuEventRecord_ptsz"),
    ("cuEventRecordWithFlags", 11010, "cuEventRecordWithFlags", "cuEventRecordWithFlags_ptsz"),
    ("cuEventQuery", 2000, "cuEventQuery", ""),
    ("cuEventSynchronize", 2000, "cuEventSynchronize", ""),
    ("cuEventElapsedTime", 13000, "cuEventElapsedTime_v2", ""),
    ("cuEventElapsedTime", 2000, "cuEventElapsedTime", ""),
    ("cuStreamBeginCapture", 10010, "cuStreamBeginCapture_v2", "cuStreamBeginCapture_v2_ptsz"),
    ("cuStreamBeginCapture", 10000, "cuStreamBeginCapture", "cuStreamBeginCapture_ptsz"),
    ("cuStreamEndCapture", 10000, "cuStreamEndCapture", "cuStreamEndCapture_ptsz"),
    ("cuStreamIsCapturing", 10000, "cuStreamIsCapturing", "cuStreamIsCapturing_ptsz"),
    ("cuGraphInstantiate", 12000, "cuGraphInstantiateWithFlags", ""),
    ("cuGraphInstantiate", 11000, "cuGraphInstantiate_v2", ""),
    ("cuGraphInstantiateWithFlags", 11040, "cuGraphInstantiateWithFlags", ""),
    ("cuGraphLaunch", 10000, "cuGraphLaunch", "cuGraphLaunch_ptsz"),
    ("cuGraphExecDestroy", 10000, "cuGraphExecDestroy", ""),
    ("cuGraphDestroy", 10000, "cuGraphDestroy", ""),
    ("cuIpcGetMemHandle", 4010, "cuIpcGetMemHandle", ""),
    ("cuMemGetAddressRange", 3020, "cuMemGetAddressRange_v2", ""),
    ("cuPointerGetAttribute", 4000, "cuPointerGetAttribute", ""),
    ("cuMulticastGetGranularity", 12010, "cuMulticastGetGranularity", ""),
    ("cuMulticastCreate", 12010, "cuMulticastCreate", ""),
    ("cuMulticastAddDevice", 12010, "cuMulticastAddDevice", ""),
    ("cuMulticastBindMem", 12010, "cuMulticastBindMem", ""),
    ("cuMulticastBindAddr", 12010, "cuMulticastBindAddr", ""),
    ("cuMulticastUnbind", 12010, "cuMulticastUnbind", ""),
    ("cuMemGetAllocationPropertiesFromHandle", 10020, "cuMemGetAllocationPropertiesFromHandle", ""),
    ("cuIpcOpenMemHandle", 11000, "cuIpcOpenMemHandle_v2", ""),
    ("cuIpcCloseMemHandle", 4010, "cuIpcCloseMemHandle", ""),
    ("cuMemExportToShareableHandle", 10020, "cuMemExportToShareableHandle", ""),
    ("cuMemImportFromShareableHandle", 10020, "cuMemImportFromShareableHandle", ""),
    ("cuDeviceCanAccessPeer", 4000, "cuDeviceCanAccessPeer", ""),
    ("cuCtxEnablePeerAccess", 4000, "cuCtxEnablePeerAccess", ""),
    ("cuCtxDisablePeerAccess", 4000, "cuCtxDisablePeerAccess", ""),
    ("cuMemcpyPeer", 4000, "cuMemcpyPeer", ""),
    ("cuMemcpyPeerAsync", 4000, "cuMemcpyPeerAsync", ""),
    ("cuMemsetD8", 3020, "cuMemsetD8_v2", ""),
    ("cuMemcpyHtoD", 3020, "cuMemcpyHtoD_v2", ""),
    ("cuMemcpyDtoH", 3020, "cuMemcpyDtoH_v2", ""),
    ("cuCheckpointProcessGetRestoreThreadId", 12080, "cuCheckpointProcessGetRestoreThreadId", ""),
    ("cuCheckpointProcessGetState", 12080, "cuCheckpointProcessGetState", ""),
    ("cuCheckpointProcessLock", 12080, "cuCheckpointProcessLock", ""),
    ("cuCheckpointProcessCheckpoint", 12080, "cuCheckpointProcessCheckpoint", ""),
    ("cuCheckpointProcessRestore", 12080, "cuCheckpointProcessRestore", ""),
    ("cuCheckpointProcessUnlock", 12080, "cuCheckpointProcessUnlock", ""),
    ("cuTexRefSetMipmapLevelClamp", 3020, "cuTexRefSetMipmapLevelClamp", ""),
    ("cuTensorMapEncodeTiled", 12000, "cuTensorMapEncodeTiled", ""),
    ("cuGetProcAddress", 12000, "cuGetProcAddress_v2", ""),
    ("cuGetProcAddress", 11030, "cuGetProcAddress", ""),
];

const PROC_FOUND: c_int = 0;
const PROC_SYMBOL_NOT_FOUND: c_int = 1;
const PROC_VERSION_NOT_SUFFICIENT: c_int = 2;
const CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM: u64 = 2;

/// Resolve a base name as the real driver does: version rows, then the per-thread variant.
pub fn proc_lookup(name: &str, version: c_int, flags: u64) -> Result<*mut c_void, c_int> {
    let mut known = false;
    for &(base, min, exp, ptsz) in PROC_TABLE {
        if base != name {
            continue;
        }
        known = true;
        if version < min {
            continue;
        }
        let sym = if flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM != 0 && !ptsz.is_empty() { ptsz } else { exp };
        return export_addr(sym)
            .or_else(|| sharing_export_addr(sym))
            .or_else(|| checkpoint::export_addr(sym))
            .or_else(|| contents::export_addr(sym))
            .or_else(|| echo::export_addr(sym))
            .ok_or(PROC_SYMBOL_NOT_FOUND);
    }
    Err(if known { PROC_VERSION_NOT_SUFFICIENT } else { PROC_SYMBOL_NOT_FOUND })
}

/// # Safety
/// `symbol`: null or a NUL-terminated string.
/// `pfn`: null or valid for reads and writes of one `*mut c_void`.
/// `symbol_status`: null or valid for reads and writes of one `c_int`.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    symbol_status: *mut c_int,
) -> CUresult {
    if symbol.is_null() || pfn.is_null() || flags > 2 {
        return INVALID_VALUE;
    }
    // SAFETY: `symbol` is not null (checked above) and the caller guarantees `symbol` is a NUL-terminated string (`# Safety`).
    let name = unsafe { CStr::from_ptr(symbol).to_string_lossy() };
    let (r, st) = match proc_lookup(&name, cuda_version, flags) {
        Ok(p) => {
            // SAFETY: `pfn` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
            unsafe { *pfn = p };
            (SUCCESS, PROC_FOUND)
        }
        Err(st) => {
            // SAFETY: `pfn` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
            unsafe { *pfn = std::ptr::null_mut() };
            (NOT_FOUND, st)
        }
    };
    if !symbol_status.is_null() {
        // SAFETY: `symbol_status` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
        unsafe { *symbol_status = st };
    }
    r
}

/// # Safety
/// `symbol`: as `cuGetProcAddress_v2` requires.
/// `pfn`: as `cuGetProcAddress_v2` requires.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(symbol: *const c_char, pfn: *mut *mut c_void, cuda_version: c_int, flags: u64) -> CUresult {
    // SAFETY: `cuGetProcAddress_v2` gets this function's own pointer arguments, under the contract its caller accepted (`# Safety`).
    unsafe { cuGetProcAddress_v2(symbol, pfn, cuda_version, flags, std::ptr::null_mut()) }
}

// ---------------------------------------------------------------------------------------------
// Process exit: the real driver returns a process's memory when it exits.

extern "C" fn simcuda_fini() {
    if let Some(sh) = state::opened() {
        for d in 0..sh.ndev() as usize {
            sh.dev(d).release_self();
        }
    }
}

#[used]
#[link_section = ".fini_array"]
static SIMCUDA_FINI: extern "C" fn() = simcuda_fini;

// ---------------------------------------------------------------------------------------------
// fork(): a child forked while another thread is inside the driver must not find its locks
// taken for ever. (A real CUDA child of a CUDA parent cannot use the driver at all; the tests
// use this one in forked children to exercise the shim there.)

thread_local! {
    static FORK_HELD: RefCell<Option<(MutexGuard<'static, Drv>, MutexGuard<'static, ()>)>> = const { RefCell::new(None) };
}

extern "C" fn fork_prepare() {
    // The same order as every call path: the process lock, then the slot-claim lock.
    let held = (lock(), state::claim_lock());
    FORK_HELD.with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn fork_release() {
    FORK_HELD.with(|h| drop(h.borrow_mut().take()));
}

extern "C" fn simcuda_init() {
    // SAFETY: registering plain extern "C" functions.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_release)) };
    clock::on_load();
}

// ---------------------------------------------------------------------------------------------
// The simulated clock (`SIMCUDA_CLOCK`, see clock.rs), for the shim and the test clients: only
// this library provides it, so a program on a real driver never runs on it.

/// 1 when the simulated clock is on (the shim then reads and sleeps on it).
#[no_mangle]
pub extern "C" fn simcuda_clock_enabled() -> c_int {
    c_int::from(clock::enabled())
}

#[no_mangle]
pub extern "C" fn simcuda_clock_now_ns() -> u64 {
    now_ns()
}

#[no_mangle]
pub extern "C" fn simcuda_clock_sleep_until_ns(t: u64) {
    sleep_until_ns(t)
}

/// Sleeps while the u32 at `word` is `expected`, until a `simcuda_clock_futex_wake` with a bit
/// of `mask`, at most `timeout_ns` of the clock's time.
///
/// # Safety
/// `word`: null or points to a valid `std::sync::atomic::AtomicU32`.
#[no_mangle]
pub unsafe extern "C" fn simcuda_clock_futex_wait(word: *const std::sync::atomic::AtomicU32, expected: u32, mask: u32, timeout_ns: u64) {
    // SAFETY: the caller guarantees `word` is null or points to a live `AtomicU32` (`# Safety`).
    if let Some(word) = unsafe { word.as_ref() } {
        clock::futex_wait(word, expected, mask, timeout_ns)
    }
}

/// # Safety
/// `word`: null or points to a valid `std::sync::atomic::AtomicU32`.
#[no_mangle]
pub unsafe extern "C" fn simcuda_clock_futex_wake(word: *const std::sync::atomic::AtomicU32, mask: u32) {
    // SAFETY: the caller guarantees `word` is null or points to a live `AtomicU32` (`# Safety`).
    if let Some(word) = unsafe { word.as_ref() } {
        clock::futex_wake(word, mask)
    }
}

/// What this process asked of the clock so far, into `out[..n]` (n ≤ 4): sleeps, futex waits,
/// futex wakes, and the sleeps and waits that blocked. Tests count wake-ups with it.
///
/// # Safety
/// `out`: null or valid for writes of `n` `u64`s.
#[no_mangle]
pub unsafe extern "C" fn simcuda_clock_counts(out: *mut u64, n: c_int) {
    use std::sync::atomic::Ordering::SeqCst;
    let counts = [clock::SLEEPS.load(SeqCst), clock::FUTEX_WAITS.load(SeqCst), clock::FUTEX_WAKES.load(SeqCst), clock::BLOCKED_CALLS.load(SeqCst)];
    if out.is_null() {
        return;
    }
    for (i, c) in counts.iter().enumerate().take(usize::try_from(n).unwrap_or(0)) {
        // SAFETY: the caller guarantees `out` holds `n` values (`# Safety`).
        unsafe { *out.add(i) = *c };
    }
}

/// The calling thread takes part in the clock from now on (time waits for it), as it would
/// from its first wait: a thread that is about to start work calls it before its starter lets
/// time run.
#[no_mangle]
pub extern "C" fn simcuda_clock_join() {
    clock::join()
}

/// The calling thread waits outside the driver (a thread join): time moves without it.
#[no_mangle]
pub extern "C" fn simcuda_clock_park() {
    clock::park()
}

#[no_mangle]
pub extern "C" fn simcuda_clock_unpark() {
    clock::unpark()
}

#[used]
#[link_section = ".init_array"]
static SIMCUDA_INIT: extern "C" fn() = simcuda_init;

// ---------------------------------------------------------------------------------------------
// Unit tests of semantics the C client does not reach (stream/event queries, waits, capture).

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::null_mut;

    fn setup() -> Handle {
        static STATE: OnceLock<String> = OnceLock::new();
        STATE.get_or_init(|| {
            let p = format!("{}/simcuda-unit-{}", std::env::temp_dir().display(), std::process::id());
            let _ = std::fs::remove_file(&p);
            std::env::set_var("SIMCUDA_STATE", &p);
            std::env::set_var("SIMCUDA_CTX_RESERVE", "0");
            // SAFETY: cuInit takes no pointer.
            assert_eq!(unsafe { cuInit(0) }, SUCCESS);
            let _ = std::fs::remove_file(&p); // the mapping outlives the name
            p
        });
        // SAFETY: the out-pointer is a local.
        unsafe {
            assert_eq!(cuInit(0), SUCCESS);
            let mut ctx = null_mut();
            assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, 0), SUCCESS);
            assert_eq!(cuCtxSetCurrent(ctx), SUCCESS);
            ctx
        }
    }

    fn function() -> Handle {
        let (mut m, mut f) = (null_mut(), null_mut());
        // SAFETY: out-pointers to locals and NUL-terminated literals.
        unsafe {
            assert_eq!(cuModuleLoadData(&mut m, c"x".as_ptr() as *const c_void), SUCCESS);
            assert_eq!(cuModuleGetFunction(&mut f, m, c"k".as_ptr()), SUCCESS);
        }
        f
    }

    fn launch_ns(f: Handle, s: Handle, ns: u64) -> CUresult {
        let mut d = ns;
        let mut params = [&mut d as *mut u64 as *mut c_void];
        // SAFETY: the parameter array and its one u64 are locals that outlive the call.
        unsafe { cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, s, params.as_mut_ptr(), null_mut()) }
    }

    #[test]
    fn streams_events_and_waits() {
        setup();
        // SAFETY: every pointer passed is to a local of this test; handles come from the calls.
        unsafe {
            let f = function();
            let (mut s1, mut s2, mut ev) = (null_mut(), null_mut(), null_mut());
            assert_eq!(cuStreamCreate(&mut s1, 0), SUCCESS);
            assert_eq!(cuStreamCreate(&mut s2, 1), SUCCESS);
            assert_eq!(cuEventCreate(&mut ev, 0), SUCCESS);
            assert_eq!(cuEventQuery(ev), SUCCESS, "never recorded");
            assert_eq!(launch_ns(f, s1, 30_000_000), SUCCESS);
            assert_eq!(cuStreamQuery(s1), NOT_READY);
            assert_eq!(cuEventRecord(ev, s1), SUCCESS);
            assert_eq!(cuEventQuery(ev), NOT_READY);
            assert_eq!(cuStreamWaitEvent(s2, ev, 0), SUCCESS);
            assert_eq!(launch_ns(f, s2, 0), SUCCESS);
            assert_eq!(cuStreamQuery(s2), NOT_READY, "s2 waits for s1's event");
            assert_eq!(cuStreamSynchronize(s2), SUCCESS);
            assert_eq!(cuEventQuery(ev), SUCCESS);
            assert_eq!(cuStreamQuery(s1), SUCCESS);
            assert_eq!(cuEventDestroy_v2(ev), SUCCESS);
            assert_eq!(cuEventDestroy_v2(ev), INVALID_HANDLE);
            assert_eq!(cuStreamDestroy_v2(s1), SUCCESS);
            assert_eq!(cuStreamDestroy_v2(s1), INVALID_HANDLE);
            assert_eq!(launch_ns(f, s1, 0), INVALID_HANDLE);
            assert_eq!(launch_ns(null_mut(), null_mut(), 0), INVALID_HANDLE);
        }
    }

    #[test]
    fn capture_rules() {
        setup();
        // SAFETY: every pointer passed is to a local of this test; handles come from the calls.
        unsafe {
            let f = function();
            let mut st = 9;
            assert_eq!(cuStreamBeginCapture_v2(null_mut(), 0), STREAM_CAPTURE_UNSUPPORTED, "legacy stream");
            assert_eq!(cuStreamBeginCapture_v2_ptsz(null_mut(), 0), SUCCESS, "per-thread stream");
            assert_eq!(cuStreamIsCapturing_ptsz(null_mut(), &mut st), SUCCESS);
            assert_eq!(st, 1);
            assert_eq!(launch_ns(f, CU_STREAM_PER_THREAD as Handle, 1000), SUCCESS);
            assert_eq!(cuStreamSynchronize_ptsz(null_mut()), STREAM_CAPTURE_UNSUPPORTED);
            let (mut g, mut e) = (null_mut(), null_mut());
            assert_eq!(cuStreamEndCapture_ptsz(null_mut(), &mut g), SUCCESS);
            assert_eq!(cuStreamEndCapture_ptsz(null_mut(), &mut g), ILLEGAL_STATE);
            assert_eq!(cuGraphInstantiateWithFlags(&mut e, g, 0), SUCCESS);
            assert_eq!(cuGraphLaunch_ptsz(e, null_mut()), SUCCESS);
            assert_eq!(cuStreamSynchronize_ptsz(null_mut()), SUCCESS);
            assert_eq!(cuGraphExecDestroy(e), SUCCESS);
            assert_eq!(cuGraphDestroy(g), SUCCESS);
        }
    }

    #[test]
    fn vmm_memory_lives_until_released_and_unmapped() {
        setup();
        // SAFETY: every pointer passed is to a local of this test; handles come from the calls.
        unsafe {
            let prop = CUmemAllocationProp {
                type_: 1,
                requested_handle_types: 0,
                location: CUmemLocation { type_: 1, id: 1 },
                win32_handle_meta_data: null_mut(),
                alloc_flags: [0; 8],
            };
            let used = || devstate(1).my_slot(1).unwrap().used.load(Ordering::Relaxed);
            let before = used();
            let (mut h, mut va) = (0u64, 0u64);
            assert_eq!(cuMemCreate(&mut h, 4 << 20, &prop, 0), SUCCESS);
            assert_eq!(used() - before, 4 << 20);
            assert_eq!(cuMemAddressReserve(&mut va, 4 << 20, 0, 0, 0), SUCCESS);
            assert_eq!(cuMemMap(va, 4 << 20, 0, h, 0), SUCCESS);
            assert_eq!(cuMemMap(va, 4 << 20, 0, h, 0), INVALID_VALUE, "already mapped");
            assert_eq!(cuMemRelease(h), SUCCESS);
            assert_eq!(used() - before, 4 << 20, "still mapped");
            assert_eq!(cuMemUnmap(va, 4 << 20), SUCCESS);
            assert_eq!(used(), before);
            assert_eq!(cuMemAddressFree(va, 4 << 20), SUCCESS);
            assert_eq!(cuMemRelease(h), INVALID_VALUE);
        }
    }

    #[test]
    fn error_names_and_strings() {
        // SAFETY: out-pointers to locals; the strings read back are the driver's static ones.
        unsafe {
            let mut s: *const c_char = std::ptr::null();
            assert_eq!(cuGetErrorName(OUT_OF_MEMORY, &mut s), SUCCESS);
            assert_eq!(CStr::from_ptr(s), c"CUDA_ERROR_OUT_OF_MEMORY");
            assert_eq!(cuGetErrorString(OUT_OF_MEMORY, &mut s), SUCCESS);
            assert_eq!(CStr::from_ptr(s), c"out of memory");
            assert_eq!(cuGetErrorString(12345, &mut s), INVALID_VALUE);
            assert!(s.is_null());
            assert_eq!(cuGetErrorName(SUCCESS, std::ptr::null_mut()), INVALID_VALUE);
        }
    }

    #[test]
    fn proc_table_names_are_all_exported() {
        for (base, _, exp, ptsz) in PROC_TABLE {
            assert!(
                export_addr(exp)
                    .or_else(|| sharing_export_addr(exp))
                    .or_else(|| checkpoint::export_addr(exp))
                    .or_else(|| contents::export_addr(exp))
                    .or_else(|| echo::export_addr(exp))
                    .is_some(),
                "{base} -> {exp} is not exported"
            );
            assert!(ptsz.is_empty() || export_addr(ptsz).is_some(), "{base} -> {ptsz} is not exported");
        }
    }
}
