//! The driver's checkpoint API (`cuCheckpointProcess*`, CUDA 12.8+/13.0 `cuda.h`), simulated
//! across processes: another process locks a target (its later driver calls block until the
//! unlock), checkpoints it (its device memory leaves the device and is kept as an accounted host
//! copy), restores it (the bytes come back, or `OUT_OF_MEMORY` and nothing changes) and unlocks it.
//!
//! The per-process checkpoint state lives in a file next to the device state,
//! `$SIMCUDA_STATE.ckpt`, mapped `MAP_SHARED`, all zeros = every process running: so the device
//! state's layout (and its version) is untouched. An entry whose process is gone is free again,
//! which is how a target that dies while checkpointed loses its host copy, as with the real driver.

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, Ordering::SeqCst};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::state::{self, pid_alive_nonzero, MAX_DEVICES};
use crate::{CUresult, ILLEGAL_STATE, INITIALIZED, INVALID_VALUE, NOT_INITIALIZED, NOT_READY, OUT_OF_MEMORY, SUCCESS};

pub const NOT_SUPPORTED: CUresult = 801;
pub const UNKNOWN: CUresult = 999;

/// `CUprocessState` (cuda.h).
pub const RUNNING: u32 = 0;
pub const LOCKED: u32 = 1;
pub const CHECKPOINTED: u32 = 2;
pub const FAILED: u32 = 3;

const MAX_ENTRIES: usize = 256;
/// How often a blocked call or a waiting lock looks again.
const POLL: Duration = Duration::from_millis(1);

/// `CUcheckpointLockArgs`: 64 bytes.
#[repr(C)]
pub struct CUcheckpointLockArgs {
    pub timeout_ms: u32,
    pub reserved0: u32,
    pub reserved1: [u64; 7],
}

/// `CUcheckpointCheckpointArgs` and `CUcheckpointUnlockArgs`: 64 reserved bytes each.
#[repr(C)]
pub struct CUcheckpointReservedArgs {
    pub reserved: [u64; 8],
}

/// `CUcheckpointRestoreArgs` (CUDA 13.0): a GPU remapping table, then reserved bytes; 64 bytes.
#[repr(C)]
pub struct CUcheckpointRestoreArgs {
    pub gpu_pairs: *mut std::ffi::c_void,
    pub gpu_pairs_count: u32,
    pub reserved: [u8; 52 - std::mem::size_of::<*mut std::ffi::c_void>()],
    pub reserved1: u64,
}

const _: () = assert!(std::mem::size_of::<CUcheckpointLockArgs>() == 64);
const _: () = assert!(std::mem::size_of::<CUcheckpointReservedArgs>() == 64);
const _: () = assert!(std::mem::size_of::<CUcheckpointRestoreArgs>() == 64);

/// One process's checkpoint state.
#[repr(C)]
struct Entry {
    /// 0 = free, else the process's pid.
    pid: AtomicU32,
    state: AtomicU32,
    /// Outermost driver calls of the process under way (a lock waits for them to end).
    in_flight: AtomicU32,
    /// 1 while a lock is waiting for `in_flight` to drain: new calls wait too.
    locking: AtomicU32,
    /// Bytes of the host copy (the sum of `moved`).
    host_bytes: AtomicU64,
    /// Device bytes checkpointed, per physical device (the state file's index).
    moved: [AtomicU64; MAX_DEVICES],
}

#[repr(C)]
struct Table {
    entries: [Entry; MAX_ENTRIES],
}

fn table() -> Option<&'static Table> {
    static TABLE: OnceLock<Option<&'static Table>> = OnceLock::new();
    *TABLE.get_or_init(|| {
        let path = std::ffi::CString::new(format!("{}.ckpt", state::state_path())).ok()?;
        let size = std::mem::size_of::<Table>();
        // SAFETY: plain libc calls on a path we own; the mapping is checked before use and
        // never unmapped, so the 'static reference stays valid.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC, 0o600);
            if fd < 0 {
                return None;
            }
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || ((st.st_size as usize) < size && libc::ftruncate(fd, size as libc::off_t) != 0) {
                libc::close(fd);
                return None;
            }
            let p = libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
            libc::close(fd);
            (p != libc::MAP_FAILED).then(|| &*(p as *const Table))
        }
    })
}

fn my_pid() -> u32 {
    std::process::id()
}

/// The entry of `pid`, if it has one and is alive; dead entries are freed on the way.
fn find(t: &Table, pid: u32) -> Option<&Entry> {
    t.entries.iter().find(|e| {
        let p = e.pid.load(SeqCst);
        if p != 0 && !pid_alive_nonzero(p) {
            free_dead(e, p);
            return false;
        }
        p == pid && pid != 0
    })
}

/// A dead process's entry: its host copy goes with it (and its device bytes, if it was killed).
fn free_dead(e: &Entry, pid: u32) {
    if e.pid.compare_exchange(pid, u32::MAX, SeqCst, SeqCst).is_ok() {
        clear(e);
        let _ = std::fs::remove_file(crate::contents::host_file(pid));
        let _ = std::fs::remove_file(crate::contents::device_file(pid));
        e.pid.store(0, SeqCst);
    }
}

fn clear(e: &Entry) {
    e.state.store(RUNNING, SeqCst);
    e.in_flight.store(0, SeqCst);
    e.locking.store(0, SeqCst);
    e.host_bytes.store(0, SeqCst);
    for m in &e.moved {
        m.store(0, SeqCst);
    }
}

/// This process's entry (claimed at its first driver call; again after a fork).
fn mine() -> Option<&'static Entry> {
    static CACHE: AtomicUsize = AtomicUsize::new(0); // (pid << 32) | (index + 1)
    let t = table()?;
    let me = my_pid();
    let c = CACHE.load(SeqCst);
    if c >> 32 == me as usize && c & 0xffff_ffff != 0 {
        return Some(&t.entries[(c & 0xffff_ffff) - 1]);
    }
    let index = match t.entries.iter().position(|e| e.pid.load(SeqCst) == me) {
        // An earlier image of this pid (before an exec): its state died with it.
        Some(i) => {
            clear(&t.entries[i]);
            i
        }
        None => {
            let _ = find(t, 0); // frees dead entries
            let i = t.entries.iter().position(|e| e.pid.compare_exchange(0, me, SeqCst, SeqCst).is_ok())?;
            clear(&t.entries[i]);
            i
        }
    };
    CACHE.store(((me as usize) << 32) | (index + 1), SeqCst);
    Some(&t.entries[index])
}

thread_local! {
    /// Nesting depth of driver calls on this thread: only the outermost one waits and counts.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Held for the length of one driver call (see `check_init!`): the call has waited while the
/// process was locked or checkpointed, and counts as in flight for a lock that comes later.
pub struct CallGate(Option<&'static Entry>);

impl Drop for CallGate {
    fn drop(&mut self) {
        let outermost = DEPTH.try_with(|d| {
            d.set(d.get().saturating_sub(1));
            d.get() == 0
        });
        if let (Ok(true), Some(e)) = (outermost, self.0) {
            e.in_flight.fetch_sub(1, SeqCst);
        }
    }
}

/// Entry to a driver call of this process: blocks while a lock holds the process.
pub fn gate() -> CallGate {
    let nested = DEPTH.try_with(|d| {
        d.set(d.get() + 1);
        d.get() > 1
    });
    // A nested call (or a thread being torn down) neither waits nor counts.
    if nested != Ok(false) {
        return CallGate(None);
    }
    let Some(e) = mine() else { return CallGate(None) };
    loop {
        if e.state.load(SeqCst) == RUNNING && e.locking.load(SeqCst) == 0 {
            e.in_flight.fetch_add(1, SeqCst);
            if e.state.load(SeqCst) == RUNNING && e.locking.load(SeqCst) == 0 {
                return CallGate(Some(e));
            }
            e.in_flight.fetch_sub(1, SeqCst);
        }
        std::thread::sleep(POLL);
    }
}

/// The target's entry, for the calls made on it by another process.
fn target(pid: c_int) -> Result<&'static Entry, CUresult> {
    let t = table().ok_or(NOT_INITIALIZED)?;
    let pid = u32::try_from(pid).map_err(|_| INVALID_VALUE)?;
    find(t, pid).ok_or(INVALID_VALUE)
}

/// Reserved fields must be zero (cuda.h: "must be zeroed").
fn zeroed(words: &[u64]) -> bool {
    words.iter().all(|w| *w == 0)
}

/// # Safety
/// `tid`: null or valid for reads and writes of one `c_int`.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessGetRestoreThreadId(pid: c_int, tid: *mut c_int) -> CUresult {
    check_init!();
    tri!(target(pid));
    if tid.is_null() {
        return INVALID_VALUE;
    }
    // The simulated driver does its restore work from the caller; the main thread stands in.
    // SAFETY: `tid` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *tid = pid };
    SUCCESS
}

/// # Safety
/// `out`: null or valid for reads and writes of one `u32`.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessGetState(pid: c_int, out: *mut u32) -> CUresult {
    check_init!();
    let e = tri!(target(pid));
    if out.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: `out` is not null (checked above) and the caller guarantees it is valid for a write (`# Safety`).
    unsafe { *out = e.state.load(SeqCst) };
    SUCCESS
}

/// # Safety
/// `args`: null or valid for reads and writes of one `CUcheckpointLockArgs`.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessLock(pid: c_int, args: *mut CUcheckpointLockArgs) -> CUresult {
    check_init!();
    let e = tri!(target(pid));
    if pid as u32 == my_pid() {
        return INVALID_VALUE; // would wait for its own call
    }
    // SAFETY: the caller guarantees `args` is null or points to valid lock arguments (`# Safety`).
    let timeout_ms = match unsafe { args.as_ref() } {
        Some(a) if a.reserved0 != 0 || !zeroed(&a.reserved1) => return INVALID_VALUE,
        Some(a) => a.timeout_ms,
        None => 0,
    };
    if e.locking.compare_exchange(0, 1, SeqCst, SeqCst).is_err() {
        return ILLEGAL_STATE; // another lock is under way
    }
    if e.state.load(SeqCst) != RUNNING {
        e.locking.store(0, SeqCst);
        return ILLEGAL_STATE;
    }
    let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(u64::from(timeout_ms)));
    while e.in_flight.load(SeqCst) != 0 {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // cuda.h: "the process will be left in the RUNNING state". The code is the real
            // driver's (580.159: CUDA_ERROR_NOT_READY after the timeout), not cuda.h's TIMEOUT.
            e.locking.store(0, SeqCst);
            return NOT_READY;
        }
        std::thread::sleep(POLL);
    }
    e.state.store(LOCKED, SeqCst);
    e.locking.store(0, SeqCst);
    SUCCESS
}

/// The target's slot on physical device `d`, if it holds one.
fn slot_of(d: usize, pid: u32) -> Option<&'static state::ProcSlot> {
    let sh = state::opened()?;
    sh.dev(d).procs.iter().find(|s| s.pid.load(SeqCst) == pid)
}

/// True when another process holds an import of memory `pid` exported. An export nobody else
/// imported has nobody to pull memory from under: checkpointed like the rest.
fn exports_memory(pid: u32) -> bool {
    state::opened().is_some_and(|sh| {
        sh.exports.iter().any(|x| x.id.load(SeqCst) != 0 && x.owner_pid.load(SeqCst) == pid && x.importers.iter().any(|i| ![0, pid].contains(&i.load(SeqCst))))
    })
}

/// # Safety
/// `args`: null or valid for reads and writes of one `CUcheckpointReservedArgs`.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessCheckpoint(pid: c_int, args: *mut CUcheckpointReservedArgs) -> CUresult {
    check_init!();
    let e = tri!(target(pid));
    // SAFETY: the caller guarantees `args` is null or points to valid arguments (`# Safety`).
    if unsafe { args.as_ref() }.is_some_and(|a| !zeroed(&a.reserved)) {
        return INVALID_VALUE;
    }
    if e.state.compare_exchange(LOCKED, CHECKPOINTED, SeqCst, SeqCst).is_err() {
        return ILLEGAL_STATE;
    }
    // Memory another process imports cannot leave the device under it.
    if exports_memory(pid as u32) {
        e.state.store(LOCKED, SeqCst);
        return NOT_SUPPORTED;
    }
    let sh = state::opened().expect("initialised");
    for d in 0..sh.ndev() as usize {
        let Some(slot) = slot_of(d, pid as u32) else { continue };
        // The target is locked: nothing of it charges or frees meanwhile.
        let bytes = slot.used.swap(0, SeqCst);
        sh.dev(d).used.fetch_sub(bytes, SeqCst);
        e.moved[d].store(bytes, SeqCst);
        e.host_bytes.fetch_add(bytes, SeqCst);
    }
    // The bytes the simulated device keeps (see `contents`) leave with it.
    let _ = std::fs::rename(crate::contents::device_file(pid as u32), crate::contents::host_file(pid as u32));
    SUCCESS
}

/// Puts `bytes` back on device `d` for the target's `slot`, if the device has them free.
fn take_back(d: usize, slot: &state::ProcSlot, bytes: u64) -> bool {
    let dev = state::opened().expect("initialised").dev(d);
    dev.reclaim_dead();
    let total = dev.total.load(SeqCst);
    let taken = dev.used.fetch_update(SeqCst, SeqCst, |used| used.checked_add(bytes).filter(|n| *n <= total)).is_ok();
    if taken {
        slot.used.fetch_add(bytes, SeqCst);
    }
    taken
}

/// # Safety
/// `args`: null or valid for reads and writes of one `CUcheckpointRestoreArgs`.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessRestore(pid: c_int, args: *mut CUcheckpointRestoreArgs) -> CUresult {
    check_init!();
    let e = tri!(target(pid));
    // SAFETY: the caller guarantees `args` is null or points to valid restore arguments (`# Safety`).
    if let Some(a) = unsafe { args.as_ref() } {
        if a.reserved.iter().any(|b| *b != 0) || a.reserved1 != 0 {
            return INVALID_VALUE;
        }
        if a.gpu_pairs_count != 0 || !a.gpu_pairs.is_null() {
            return NOT_SUPPORTED; // remapping GPUs at restore is not simulated
        }
    }
    if e.state.load(SeqCst) != CHECKPOINTED {
        return ILLEGAL_STATE;
    }
    let sh = state::opened().expect("initialised");
    let mut restored: Vec<(usize, &state::ProcSlot, u64)> = Vec::new();
    for d in 0..sh.ndev() as usize {
        let bytes = e.moved[d].load(SeqCst);
        if bytes == 0 {
            continue;
        }
        let Some(slot) = slot_of(d, pid as u32) else {
            e.state.store(FAILED, SeqCst);
            return UNKNOWN;
        };
        if !take_back(d, slot, bytes) {
            // All or nothing: what came back goes out again; the process stays checkpointed.
            for (d, slot, bytes) in restored {
                slot.used.fetch_sub(bytes, SeqCst);
                sh.dev(d).used.fetch_sub(bytes, SeqCst);
            }
            return OUT_OF_MEMORY;
        }
        restored.push((d, slot, bytes));
    }
    for m in &e.moved {
        m.store(0, SeqCst);
    }
    let _ = std::fs::rename(crate::contents::host_file(pid as u32), crate::contents::device_file(pid as u32));
    e.host_bytes.store(0, SeqCst);
    e.state.store(LOCKED, SeqCst);
    SUCCESS
}

/// # Safety
/// `args`: null or valid for reads and writes of one `CUcheckpointReservedArgs`.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessUnlock(pid: c_int, args: *mut CUcheckpointReservedArgs) -> CUresult {
    check_init!();
    let e = tri!(target(pid));
    // SAFETY: the caller guarantees `args` is null or points to valid arguments (`# Safety`).
    if unsafe { args.as_ref() }.is_some_and(|a| !zeroed(&a.reserved)) {
        return INVALID_VALUE;
    }
    match e.state.compare_exchange(LOCKED, RUNNING, SeqCst, SeqCst) {
        Ok(_) => SUCCESS,
        Err(_) => ILLEGAL_STATE,
    }
}

/// The exports of this module, by name.
pub fn export_addr(name: &str) -> Option<*mut std::ffi::c_void> {
    Some(match name {
        "cuCheckpointProcessGetRestoreThreadId" => cuCheckpointProcessGetRestoreThreadId as *mut std::ffi::c_void,
        "cuCheckpointProcessGetState" => cuCheckpointProcessGetState as *mut std::ffi::c_void,
        "cuCheckpointProcessLock" => cuCheckpointProcessLock as *mut std::ffi::c_void,
        "cuCheckpointProcessCheckpoint" => cuCheckpointProcessCheckpoint as *mut std::ffi::c_void,
        "cuCheckpointProcessRestore" => cuCheckpointProcessRestore as *mut std::ffi::c_void,
        "cuCheckpointProcessUnlock" => cuCheckpointProcessUnlock as *mut std::ffi::c_void,
        _ => return None,
    })
}
