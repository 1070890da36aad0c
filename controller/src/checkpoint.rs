//! The CUDA driver's checkpoint API (`cuCheckpointProcess*`, driver r550+), loaded at run time
//! from the `libcuda.so.1` the shim would find: the controller does not link the driver.

use std::ffi::c_int;
use std::time::Duration;

type CUresult = u32;
const SUCCESS: CUresult = 0;

/// `CUprocessState` (cuda.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    Locked,
    Checkpointed,
    Failed,
    Other(u32),
}

impl ProcessState {
    fn from_raw(v: u32) -> ProcessState {
        match v {
            0 => ProcessState::Running,
            1 => ProcessState::Locked,
            2 => ProcessState::Checkpointed,
            3 => ProcessState::Failed,
            v => ProcessState::Other(v),
        }
    }
}

/// `CUcheckpointLockArgs`: a timeout, then reserved words that must be zero (64 bytes).
#[repr(C)]
struct LockArgs {
    timeout_ms: u32,
    reserved0: u32,
    reserved1: [u64; 7],
}

/// `CUcheckpointCheckpointArgs`, `CUcheckpointUnlockArgs`: 64 reserved bytes.
#[repr(C)]
struct ReservedArgs {
    reserved: [u64; 8],
}

/// `CUcheckpointRestoreArgs` (CUDA 13.0): no GPU remapping, reserved bytes zero (64 bytes).
#[repr(C)]
struct RestoreArgs {
    gpu_pairs: *mut std::ffi::c_void,
    gpu_pairs_count: u32,
    reserved: [u8; 52 - std::mem::size_of::<*mut std::ffi::c_void>()],
    reserved1: u64,
}

const _: () = assert!(std::mem::size_of::<LockArgs>() == 64);
const _: () = assert!(std::mem::size_of::<ReservedArgs>() == 64);
const _: () = assert!(std::mem::size_of::<RestoreArgs>() == 64);

type GetStateFn = unsafe extern "C" fn(c_int, *mut u32) -> CUresult;
type LockFn = unsafe extern "C" fn(c_int, *mut LockArgs) -> CUresult;
type ReservedFn = unsafe extern "C" fn(c_int, *mut ReservedArgs) -> CUresult;
type RestoreFn = unsafe extern "C" fn(c_int, *mut RestoreArgs) -> CUresult;
type ErrorNameFn = unsafe extern "C" fn(CUresult, *mut *const std::ffi::c_char) -> CUresult;

/// The loaded driver's checkpoint entry points.
pub struct Driver {
    get_state: GetStateFn,
    lock: LockFn,
    checkpoint: ReservedFn,
    restore: RestoreFn,
    unlock: ReservedFn,
    error_name: Option<ErrorNameFn>,
    /// Kept loaded for as long as the pointers above are used.
    _library: libloading::Library,
}

/// Why a driver call failed: the function, the pid and the driver's code with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverError {
    pub code: u32,
    pub text: String,
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub const OUT_OF_MEMORY: u32 = 2;
/// `CUDA_ERROR_INVALID_VALUE` and `CUDA_ERROR_NOT_INITIALIZED`: what the checkpoint calls answer
/// for a pid that has no CUDA state (cuda.h lists both; the simulated driver answers the first).
pub const INVALID_VALUE: u32 = 1;
pub const NOT_INITIALIZED: u32 = 3;
/// `CUDA_ERROR_TIMEOUT`: what cuda.h says `cuCheckpointProcessLock` answers when `timeoutMs`
/// ran out before the target's calls under way ended (the process "left in the RUNNING state").
pub const TIMEOUT: u32 = 909;
/// `CUDA_ERROR_NOT_READY`: what the real driver answers in that case (580.159, H100, stop 24's
/// `tests/gpu/ckpt_semantics.sh`: a 500 ms lock of a process synchronizing behind a 20 s kernel
/// came back after 500.2 ms with 600, the target still RUNNING).
pub const NOT_READY: u32 = 600;

impl DriverError {
    /// `cuCheckpointProcessLock` gave up at its timeout (the target's calls under way outlasted
    /// it) and left the target running: the driver's 600 as measured, or cuda.h's 909.
    pub fn lock_timed_out(&self) -> bool {
        self.code == NOT_READY || self.code == TIMEOUT
    }

    /// The target has no CUDA state for the driver to act on (never started CUDA, or gone).
    /// The caller's own driver is initialised (`Driver::load` ran `cuInit`), so these codes
    /// speak of the target.
    pub fn no_cuda_state(&self) -> bool {
        self.code == INVALID_VALUE || self.code == NOT_INITIALIZED
    }
}

impl Driver {
    /// Loads `libcuda.so.1` and initialises it; the message says why not.
    pub fn load() -> Result<Driver, String> {
        // SAFETY: loading the CUDA driver runs its initialisers, which have no preconditions.
        let library = unsafe { libloading::Library::new("libcuda.so.1") }.map_err(|e| format!("cannot load libcuda.so.1 ({e})"))?;
        // SAFETY: the types are those of cuda.h for each name; the library outlives the pointers
        // (it is kept in the struct).
        unsafe {
            let init: libloading::Symbol<unsafe extern "C" fn(u32) -> CUresult> = library.get(b"cuInit\0").map_err(|e| format!("libcuda.so.1: {e}"))?;
            let rc = init(0);
            if rc != SUCCESS {
                return Err(format!("cuInit failed with CUresult {rc}"));
            }
            let missing = |e: libloading::Error| format!("this driver has no checkpoint API (r550 or later is needed): {e}");
            let driver = Driver {
                get_state: *library.get::<GetStateFn>(b"cuCheckpointProcessGetState\0").map_err(missing)?,
                lock: *library.get::<LockFn>(b"cuCheckpointProcessLock\0").map_err(missing)?,
                checkpoint: *library.get::<ReservedFn>(b"cuCheckpointProcessCheckpoint\0").map_err(missing)?,
                restore: *library.get::<RestoreFn>(b"cuCheckpointProcessRestore\0").map_err(missing)?,
                unlock: *library.get::<ReservedFn>(b"cuCheckpointProcessUnlock\0").map_err(missing)?,
                error_name: library.get::<ErrorNameFn>(b"cuGetErrorName\0").ok().map(|s| *s),
                _library: library,
            };
            Ok(driver)
        }
    }

    fn check(&self, what: &str, pid: u32, rc: CUresult) -> Result<(), DriverError> {
        if rc == SUCCESS {
            return Ok(());
        }
        let mut name: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a pointer to a static string or NULL.
        let known = self.error_name.is_some_and(|f| unsafe { f(rc, &mut name) } == SUCCESS && !name.is_null());
        // SAFETY: a non-NULL name from the driver is a NUL-terminated static string.
        let name = if known { unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned() } else { "unknown".into() };
        Err(DriverError { code: rc, text: format!("{what}(pid {pid}) failed: {name} ({rc})") })
    }

    pub fn state(&self, pid: u32) -> Result<ProcessState, DriverError> {
        let mut raw = 0u32;
        // SAFETY: the pointer is to a local u32, as cuda.h's CUprocessState* is.
        let rc = unsafe { (self.get_state)(pid as c_int, &mut raw) };
        self.check("cuCheckpointProcessGetState", pid, rc)?;
        Ok(ProcessState::from_raw(raw))
    }

    /// Locks the process: its CUDA calls block from now; waits for those under way, at most
    /// `timeout` (then the process stays running and the error says so).
    pub fn lock(&self, pid: u32, timeout: Duration) -> Result<(), DriverError> {
        let mut args = LockArgs { timeout_ms: timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u32, reserved0: 0, reserved1: [0; 7] };
        // SAFETY: args is a zeroed CUcheckpointLockArgs but for the timeout.
        let rc = unsafe { (self.lock)(pid as c_int, &mut args) };
        self.check("cuCheckpointProcessLock", pid, rc)
    }

    pub fn checkpoint(&self, pid: u32) -> Result<(), DriverError> {
        self.call_reserved(self.checkpoint, "cuCheckpointProcessCheckpoint", pid)
    }

    /// A call whose arguments are 64 reserved bytes (checkpoint, unlock): all zero.
    fn call_reserved(&self, f: ReservedFn, name: &str, pid: u32) -> Result<(), DriverError> {
        let mut args = ReservedArgs { reserved: [0; 8] };
        // SAFETY: f takes (int, CUcheckpoint*Args*) and args is a zeroed 64-byte struct.
        let rc = unsafe { f(pid as c_int, &mut args) };
        self.check(name, pid, rc)
    }

    pub fn restore(&self, pid: u32) -> Result<(), DriverError> {
        let mut args = RestoreArgs { gpu_pairs: std::ptr::null_mut(), gpu_pairs_count: 0, reserved: [0; 44], reserved1: 0 };
        // SAFETY: args is a zeroed CUcheckpointRestoreArgs: no GPU remapping.
        let rc = unsafe { (self.restore)(pid as c_int, &mut args) };
        self.check("cuCheckpointProcessRestore", pid, rc)
    }

    pub fn unlock(&self, pid: u32) -> Result<(), DriverError> {
        self.call_reserved(self.unlock, "cuCheckpointProcessUnlock", pid)
    }
}
