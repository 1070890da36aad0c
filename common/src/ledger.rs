//! The ledger: one fixed-layout, versioned memory region shared by the controller and every
//! shim, where limits are read and bytes and device time are counted with atomics.
//!
//! The layout is `#[repr(C)]` and mirrored field for field in `include/gpuslice.h`
//! (`gpuslice_ledger_header`, `gpuslice_group_slot`, `gpuslice_process_slot`, ...); a test
//! compiles the header and compares every offset. Geometry (how many devices, groups and
//! processes) is written in the header, and every map checks magic, layout version and size
//! before anything else is read.
//!
//! ```text
//! offset 0       Header           (4 KiB)
//! devices_offset DeviceSlot  × max_devices   (64 B each: which GPU a device index means)
//! groups_offset  GroupSlot   × max_groups    (limits, share, priority; the group's counters)
//! procs_offset   ProcessSlot × max_procs     (one per registered process; its own counters)
//! ```
//!
//! # Exact accounting across processes
//! A group's `used` is what the limit is checked against: an allocation reserves bytes with one
//! compare-and-swap on it, so processes allocating at the same instant can never overshoot. Each
//! process also counts what it holds in its own slot, so that the controller can take a dead
//! process's bytes back. The two counters are updated inside an *operation window* (the
//! process's `ops` word is odd while one is open). To return a dead process's bytes the
//! controller raises the group's `reconciling` flag, waits until no live member has a window
//! open, and sets the group's `used` to the sum of its live members' `used`: whatever the dead
//! process was doing when it was killed, the group's figure is exact afterwards. A process that
//! finds the flag raised waits (microseconds) before opening its window; if the flag stays up
//! (a controller killed mid-reconciliation) it goes ahead after `RECONCILE_PATIENCE_NS`.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// "GPUSLDGR" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GPUSLDGR");
/// Bumped whenever any offset, size or meaning below changes.
pub const LAYOUT_VERSION: u32 = 4;
/// Device indices per slot; devices beyond are passed through untracked.
pub const MAX_DEVICES: usize = 16;
pub const HEADER_SIZE: usize = 4096;
/// A limit that is not set.
pub const UNLIMITED: u64 = u64::MAX;
pub const NAME_BYTES: usize = 64;
pub const UUID_BYTES: usize = 48;
/// How long an allocation waits for a reconciliation before going ahead regardless.
pub const RECONCILE_PATIENCE_NS: u64 = 100_000_000;

/// Slot states.
pub const FREE: u32 = 0;
pub const LIVE: u32 = 1;
/// A device slot whose UUID is being written.
pub const CLAIMING: u32 = 2;

#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub layout_version: AtomicU32,
    pub header_size: AtomicU32,
    pub file_size: AtomicU64,
    pub max_devices: AtomicU32,
    pub max_groups: AtomicU32,
    pub max_procs: AtomicU32,
    pub device_slot_size: AtomicU32,
    pub group_slot_size: AtomicU32,
    pub proc_slot_size: AtomicU32,
    pub devices_offset: AtomicU64,
    pub groups_offset: AtomicU64,
    pub procs_offset: AtomicU64,
    /// The controller's pid in its own namespace; 0 when none has this ledger open.
    pub controller_pid: AtomicU32,
    pub _pad0: AtomicU32,
    /// CLOCK_MONOTONIC ns of the controller's latest tick (every 100 ms while it runs).
    pub controller_heartbeat_ns: AtomicU64,
    /// Incremented each time a controller starts on this ledger (adoption after a restart).
    pub controller_starts: AtomicU64,
    pub created_ns: AtomicU64,
    /// Processes registered since the ledger was created (a sequence, never decremented).
    pub registrations: AtomicU64,
}

/// Which GPU a device index means: claimed by UUID, so that processes with different
/// `CUDA_VISIBLE_DEVICES` agree on it; and the device's priority state.
#[repr(C)]
pub struct DeviceSlot {
    pub state: AtomicU32,
    pub _pad: AtomicU32,
    pub total_memory: AtomicU64,
    /// NUL-padded ASCII, "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".
    pub uuid: [AtomicU64; UUID_BYTES / 8],
    pub sched: DeviceSched,
}

/// High-priority processes a device tracks at once.
pub const MAX_HIGH: usize = 8;

/// Who has high-priority work on a device: what lower-priority launchers consult before they
/// launch (see the shim's `sched`); and whose turn it is among throttled processes (see the
/// shim's `board`). All leases are CLOCK_MONOTONIC ns.
#[repr(C)]
pub struct DeviceSched {
    /// Some high-priority process lives on this device until this time (renewed every 50 ms).
    pub high_alive_until: AtomicU64,
    /// Futex word: bumped each time a high-priority process's work on the device is done.
    pub wake: AtomicU32,
    pub _pad: AtomicU32,
    pub highs: [HighSlot; MAX_HIGH],
    pub turn: Turn,
}

pub use crate::turns::Turn;

/// One high-priority process on a device.
#[repr(C)]
pub struct HighSlot {
    /// A number the process drew at random (pids repeat across pid namespaces); 0 when free.
    pub owner: AtomicU64,
    /// Its pid as it sees itself, for a liveness check by processes of its namespace.
    pub pid: AtomicU32,
    /// Non-zero while it has work queued or running on the device.
    pub busy: AtomicU32,
    /// The slot is its until then; a dead process's slot lapses.
    pub alive_until: AtomicU64,
}

impl DeviceSched {
    /// True while some high-priority process lives on the device.
    #[inline]
    pub fn high_alive(&self, now: u64) -> bool {
        self.high_alive_until.load(Relaxed) > now
    }

    /// The busy slot of a live high-priority process, if any.
    pub fn busy_high(&self, now: u64) -> Option<&HighSlot> {
        self.highs.iter().find(|h| h.busy.load(SeqCst) != 0 && h.owner.load(Relaxed) != 0 && h.alive_until.load(Relaxed) > now)
    }

    /// The slot of the high-priority process `owner` (pid `pid`), claiming a free or lapsed one.
    pub fn claim_high(&self, owner: u64, pid: u32, now: u64, lease_ns: u64) -> Option<&HighSlot> {
        if let Some(h) = self.highs.iter().find(|h| h.owner.load(Acquire) == owner) {
            h.alive_until.store(now + lease_ns, Release);
            return Some(h);
        }
        for h in &self.highs {
            let held = h.owner.load(Acquire);
            let lapsed = held != 0 && h.alive_until.load(Acquire) <= now;
            if (held == 0 || lapsed) && h.owner.compare_exchange(held, owner, AcqRel, Relaxed).is_ok() {
                h.pid.store(pid, Relaxed);
                h.busy.store(0, SeqCst);
                h.alive_until.store(now + lease_ns, Release);
                return Some(h);
            }
        }
        None
    }

    /// Gives a slot up (its process left high priority, exited, or died): not busy, free, and
    /// the waiters woken.
    pub fn release_high(&self, slot: &HighSlot, owner: u64) {
        if slot.owner.load(Acquire) != owner {
            return;
        }
        slot.busy.store(0, SeqCst);
        slot.alive_until.store(0, Release);
        let _ = slot.owner.compare_exchange(owner, 0, AcqRel, Relaxed);
        // The last high-priority process gone: the others stop bounding their queues now, not
        // when the lease would have run out. (A neighbour renewing at this instant is seen again
        // at its next renewal, 50 ms on.)
        let now = monotonic_ns();
        if !self.highs.iter().any(|h| h.owner.load(Acquire) != 0 && h.alive_until.load(Acquire) > now) {
            self.high_alive_until.store(0, Release);
        }
        self.wake.fetch_add(1, SeqCst);
    }

    /// Renews a high-priority process's lease on its slot and the device's.
    pub fn renew(&self, slot: &HighSlot, now: u64, lease_ns: u64) {
        slot.alive_until.store(now + lease_ns, Release);
        self.high_alive_until.fetch_max(now + lease_ns, AcqRel);
    }
}

/// A group's figures on one device.
#[repr(C)]
pub struct GroupDevice {
    pub limit: AtomicU64,
    pub used: AtomicU64,
    /// Percent of the device's time, 1..=99; 0 when not throttled.
    pub share: AtomicU32,
    pub _pad: AtomicU32,
    /// The group's token bucket (GCRA): when its tokens are back to zero, CLOCK_MONOTONIC ns.
    pub debt_until: AtomicU64,
    /// Device time charged to the group's launches (ns, after settlement).
    pub charged_ns: AtomicU64,
    /// Wall time the group's launches waited for tokens or a turn (ns).
    pub throttled_ns: AtomicU64,
    /// Allocations refused over a limit.
    pub refusals: AtomicU64,
    pub peak_used: AtomicU64,
}

#[repr(C)]
pub struct GroupSlot {
    pub state: AtomicU32,
    /// `Priority` as u32.
    pub priority: AtomicU32,
    pub members: AtomicU32,
    /// Non-zero while the controller recomputes `used` (see the module docs): the low 32 bits
    /// of CLOCK_MONOTONIC in ms when it started, with the lowest bit set, so that a flag left
    /// up by a controller killed mid-way is recognised as stale.
    pub reconciling: AtomicU32,
    /// Non-zero when any device of the group has a share: the one load an unthrottled launch pays.
    pub throttled: AtomicU32,
    /// 1 when the group lives in the config file or was edited (kept when its last member leaves).
    pub pinned: AtomicU32,
    /// Incremented each time the slot is given to a new group.
    pub generation: AtomicU64,
    pub name: [AtomicU64; NAME_BYTES / 8],
    pub _reserved: [AtomicU64; 4],
    pub devices: [GroupDevice; MAX_DEVICES],
}

/// A process's figures on one device.
#[repr(C)]
pub struct ProcessDevice {
    /// Bytes this process holds: its allocations plus `overhead`.
    pub used: AtomicU64,
    /// Memory the driver holds for it outside any allocation (context reserve, modules).
    pub overhead: AtomicU64,
    /// A cap on this process alone, inside its group's limit.
    pub limit: AtomicU64,
    pub charged_ns: AtomicU64,
    pub throttled_ns: AtomicU64,
    pub refusals: AtomicU64,
    pub peak_used: AtomicU64,
    /// Wall time this process waited for its turn on the device among throttled processes
    /// (ns; part of `throttled_ns`).
    pub turn_wait_ns: AtomicU64,
}

#[repr(C)]
pub struct ProcessSlot {
    pub state: AtomicU32,
    /// The pid as the controller sees it (`SO_PEERCRED`, translated into its namespace).
    pub pid: AtomicU32,
    pub group: AtomicU32,
    /// `Priority` as u32; `PRIORITY_INHERIT` takes the group's.
    pub priority: AtomicU32,
    /// Odd while the process has an accounting operation open (see the module docs).
    pub ops: AtomicU64,
    /// Start time of the pid (clock ticks after boot, /proc/PID/stat field 22): a reused pid
    /// is a different process.
    pub start_time: AtomicU64,
    /// CLOCK_MONOTONIC ns of the process's latest accounting or launch activity (coarse).
    pub heartbeat_ns: AtomicU64,
    pub uid: AtomicU32,
    /// The pid as the process sees itself (differs inside a container's pid namespace).
    pub own_pid: AtomicU32,
    pub generation: AtomicU64,
    pub name: [AtomicU64; 32 / 8],
    /// The token the process names itself by in device state (see `Turn`), written by the
    /// process once registered: the controller clears a turn it still holds when it goes.
    pub token: AtomicU64,
    pub _reserved: [AtomicU64; 4],
    pub devices: [ProcessDevice; MAX_DEVICES],
}

/// Scheduling class of a process or group (issue 5 gives it teeth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low = 1,
    #[default]
    Normal = 2,
    High = 3,
}

/// A process slot's `priority` when the process has none of its own.
pub const PRIORITY_INHERIT: u32 = 0;

impl Priority {
    pub fn from_u32(v: u32) -> Option<Priority> {
        match v {
            1 => Some(Priority::Low),
            2 => Some(Priority::Normal),
            3 => Some(Priority::High),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Priority, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            _ => Err(format!("{s:?} is not a priority; use high, normal or low")),
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many slots of each kind a ledger has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub max_groups: u32,
    pub max_procs: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry { max_groups: 256, max_procs: 1024 }
    }
}

impl Geometry {
    fn devices_offset(&self) -> usize {
        HEADER_SIZE
    }
    fn groups_offset(&self) -> usize {
        round_up(self.devices_offset() + MAX_DEVICES * size_of::<DeviceSlot>(), 4096)
    }
    fn procs_offset(&self) -> usize {
        round_up(self.groups_offset() + self.max_groups as usize * size_of::<GroupSlot>(), 4096)
    }
    pub fn file_size(&self) -> usize {
        round_up(self.procs_offset() + self.max_procs as usize * size_of::<ProcessSlot>(), 4096)
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Why a ledger could not be used.
#[derive(Debug)]
pub enum LedgerError {
    Io { what: String, path: String, error: std::io::Error },
    /// A gpuslice ledger that cannot be used as it is (another layout, damaged).
    Invalid { path: String, reason: String },
    /// Not a gpuslice ledger at all (no magic, not a regular file, someone else's): never
    /// replaced, because it may be another program's file.
    Foreign { path: String, reason: String },
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerError::Io { what, path, error } => write!(f, "cannot {what} the ledger {path}: {error}"),
            LedgerError::Invalid { path, reason } => write!(f, "the ledger {path} is not usable: {reason}"),
            LedgerError::Foreign { path, reason } => write!(f, "refusing the ledger {path}: {reason}"),
        }
    }
}

impl std::error::Error for LedgerError {}

/// A mapped ledger. The mapping lives as long as this value; the shim leaks it on purpose.
pub struct Ledger {
    base: *mut u8,
    len: usize,
    geometry: Geometry,
}

// SAFETY: every field reachable through the mapping is an atomic.
unsafe impl Send for Ledger {}
unsafe impl Sync for Ledger {}

impl Drop for Ledger {
    fn drop(&mut self) {
        // SAFETY: base/len came from mmap.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn io(what: &str, path: &str) -> impl FnOnce(std::io::Error) -> LedgerError {
    let (what, path) = (what.to_string(), path.to_string());
    move |error| LedgerError::Io { what, path, error }
}

fn cstring(path: &str) -> Result<CString, LedgerError> {
    CString::new(path).map_err(|_| LedgerError::Invalid { path: path.to_string(), reason: "the path contains a NUL byte".into() })
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO: no system call). Shared by all processes of a host.
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Ledger {
    /// Opens the ledger at `path` if it is valid, else creates a fresh one there (mode 0600;
    /// the controller hands it to shims as a file descriptor over the socket). Returns the
    /// ledger and whether it was adopted (an existing, valid file).
    ///
    /// What is at `path` decides: nothing → a new ledger; a valid ledger of this layout → it
    /// is adopted; a gpuslice ledger of another layout or a damaged one (it starts with the
    /// magic) → replaced, with a warning; anything else (another program's file, an empty or
    /// zeroed file, a FIFO, a file of another user, a symbolic link) → refused and left alone.
    pub fn open_or_create(path: &str, geometry: Geometry) -> Result<(Ledger, bool), LedgerError> {
        let c = cstring(path)?;
        // SAFETY: plain open(2). O_NONBLOCK: a FIFO at the path must not hang the controller.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok((Ledger::create(path, geometry)?, false)),
                Some(libc::ELOOP) => Err(LedgerError::Foreign { path: path.into(), reason: "it is a symbolic link; refusing to follow it (the ledger must be a plain file)".into() }),
                _ => Err(io("open", path)(e)),
            };
        }
        // SAFETY: we own the new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        check_owner(fd.as_fd(), path)?;
        match Ledger::map_fd(fd.as_fd(), path) {
            Ok(l) => Ok((l, true)),
            Err(LedgerError::Invalid { reason, .. }) => {
                // Ours (it has the magic), but an older layout or damaged: start afresh rather
                // than misread it. Processes still mapping the old file keep their mapping.
                tracing_free_warn(&format!("the ledger {path} is not usable ({reason}); replacing it with a new one"));
                std::fs::remove_file(path).map_err(io("replace", path))?;
                Ok((Ledger::create(path, geometry)?, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a fresh ledger file at `path`, failing if anything is there. The file is built
    /// under a temporary name and linked into place complete, so a file at `path` always
    /// starts with the magic: a crash mid-creation leaves no half-made ledger to be mistaken
    /// for someone else's file.
    pub fn create(path: &str, geometry: Geometry) -> Result<Ledger, LedgerError> {
        let c = cstring(path)?;
        let temp = format!("{path}.new-{}-{}", std::process::id(), monotonic_ns());
        let t = cstring(&temp)?;
        // SAFETY: plain open(2).
        let fd = unsafe { libc::open(t.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW, 0o600) };
        if fd < 0 {
            return Err(io("create", path)(std::io::Error::last_os_error()));
        }
        // SAFETY: we own the new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let built = (|| {
            let size = geometry.file_size();
            // SAFETY: ftruncate on our descriptor.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
                return Err(io("size", path)(std::io::Error::last_os_error()));
            }
            let base = map(fd.as_raw_fd(), size).map_err(io("map", path))?;
            let ledger = Ledger { base, len: size, geometry };
            ledger.initialise(geometry);
            // SAFETY: link(2) between two C strings; fails with EEXIST rather than replace.
            if unsafe { libc::link(t.as_ptr(), c.as_ptr()) } != 0 {
                return Err(io("create", path)(std::io::Error::last_os_error()));
            }
            Ok(ledger)
        })();
        // SAFETY: unlink(2) of the temporary name (the ledger, if made, keeps its own link).
        unsafe { libc::unlink(t.as_ptr()) };
        built
    }

    /// The pid of another controller that still serves this ledger: one whose pid is recorded,
    /// exists, and whose heartbeat (every 100 ms) moves within `watch`. A controller that was
    /// killed leaves its pid behind; a clean stop clears it.
    pub fn live_controller(&self, watch: std::time::Duration) -> Option<u32> {
        let h = self.header();
        let pid = h.controller_pid.load(Acquire);
        if pid == 0 || pid == std::process::id() {
            return None;
        }
        // SAFETY: kill(2) with signal 0 only checks for existence.
        if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return None;
        }
        // The pid exists (or belongs to someone else now): only a moving heartbeat says it is
        // a controller at work.
        let before = h.controller_heartbeat_ns.load(Acquire);
        let end = std::time::Instant::now() + watch;
        while std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(10));
            if h.controller_heartbeat_ns.load(Acquire) != before {
                return Some(pid);
            }
        }
        None
    }

    /// A private ledger for a process running without a controller: the same code paths, one
    /// group and one process.
    pub fn anonymous() -> Result<Ledger, LedgerError> {
        let geometry = Geometry { max_groups: 1, max_procs: 1 };
        let size = geometry.file_size();
        // SAFETY: anonymous private mapping.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(io("allocate", "(anonymous)")(std::io::Error::last_os_error()));
        }
        let ledger = Ledger { base: base.cast(), len: size, geometry };
        ledger.initialise(geometry);
        Ok(ledger)
    }

    fn initialise(&self, g: Geometry) {
        let h = self.header();
        h.layout_version.store(LAYOUT_VERSION, Relaxed);
        h.header_size.store(HEADER_SIZE as u32, Relaxed);
        h.file_size.store(g.file_size() as u64, Relaxed);
        h.max_devices.store(MAX_DEVICES as u32, Relaxed);
        h.max_groups.store(g.max_groups, Relaxed);
        h.max_procs.store(g.max_procs, Relaxed);
        h.device_slot_size.store(size_of::<DeviceSlot>() as u32, Relaxed);
        h.group_slot_size.store(size_of::<GroupSlot>() as u32, Relaxed);
        h.proc_slot_size.store(size_of::<ProcessSlot>() as u32, Relaxed);
        h.devices_offset.store(g.devices_offset() as u64, Relaxed);
        h.groups_offset.store(g.groups_offset() as u64, Relaxed);
        h.procs_offset.store(g.procs_offset() as u64, Relaxed);
        h.created_ns.store(monotonic_ns(), Relaxed);
        for i in 0..g.max_groups as usize {
            let group = self.group(i);
            for d in &group.devices {
                d.limit.store(UNLIMITED, Relaxed);
            }
        }
        for i in 0..g.max_procs as usize {
            for d in &self.process(i).devices {
                d.limit.store(UNLIMITED, Relaxed);
            }
        }
        // Last: a reader that sees the magic sees everything above.
        h.magic.store(MAGIC, Release);
    }

    /// Maps a ledger from a descriptor (the one the controller sends), checking it first.
    pub fn map_fd(fd: BorrowedFd<'_>, path: &str) -> Result<Ledger, LedgerError> {
        let invalid = |reason: String| LedgerError::Invalid { path: path.to_string(), reason };
        // SAFETY: fstat into a local.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io("inspect", path)(std::io::Error::last_os_error()));
        }
        let foreign = |reason: String| LedgerError::Foreign { path: path.to_string(), reason };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(foreign("it is not a regular file, so not a gpuslice ledger".into()));
        }
        let actual = st.st_size as usize;
        let mut first = [0u8; 8];
        // SAFETY: pread(2) into a local buffer of its length.
        let got = unsafe { libc::pread(fd.as_raw_fd(), first.as_mut_ptr().cast(), first.len(), 0) };
        let magic = u64::from_le_bytes(first);
        if got != first.len() as isize || magic != MAGIC {
            let what = if actual == 0 {
                "it is empty, not a gpuslice ledger".to_string()
            } else if got == first.len() as isize {
                format!("it is not a gpuslice ledger ({actual} bytes beginning with {magic:#018x}, not the magic {MAGIC:#018x})")
            } else {
                format!("it is not a gpuslice ledger ({actual} bytes, too short for the magic)")
            };
            return Err(foreign(what));
        }
        if actual < HEADER_SIZE {
            return Err(invalid(format!("it is {actual} bytes, shorter than its {HEADER_SIZE}-byte header")));
        }
        let base = map(fd.as_raw_fd(), actual).map_err(io("map", path))?;
        let probe = Ledger { base, len: actual, geometry: Geometry { max_groups: 0, max_procs: 0 } };
        let h = probe.header();
        let version = h.layout_version.load(Relaxed);
        if version != LAYOUT_VERSION {
            return Err(invalid(format!("layout version {version}, this build reads version {LAYOUT_VERSION}")));
        }
        let geometry = Geometry { max_groups: h.max_groups.load(Relaxed), max_procs: h.max_procs.load(Relaxed) };
        let expected = [
            ("header size", h.header_size.load(Relaxed) as u64, HEADER_SIZE as u64),
            ("device count", h.max_devices.load(Relaxed) as u64, MAX_DEVICES as u64),
            ("device slot size", h.device_slot_size.load(Relaxed) as u64, size_of::<DeviceSlot>() as u64),
            ("group slot size", h.group_slot_size.load(Relaxed) as u64, size_of::<GroupSlot>() as u64),
            ("process slot size", h.proc_slot_size.load(Relaxed) as u64, size_of::<ProcessSlot>() as u64),
            ("devices offset", h.devices_offset.load(Relaxed), geometry.devices_offset() as u64),
            ("groups offset", h.groups_offset.load(Relaxed), geometry.groups_offset() as u64),
            ("processes offset", h.procs_offset.load(Relaxed), geometry.procs_offset() as u64),
            ("recorded size", h.file_size.load(Relaxed), geometry.file_size() as u64),
            ("file size", actual as u64, geometry.file_size() as u64),
        ];
        for (what, got, want) in expected {
            if got != want {
                return Err(invalid(format!("{what} is {got}, expected {want} for {} groups and {} processes", geometry.max_groups, geometry.max_procs)));
            }
        }
        if geometry.max_groups == 0 || geometry.max_procs == 0 || geometry.max_groups > 1 << 16 || geometry.max_procs > 1 << 20 {
            return Err(invalid(format!("implausible geometry: {} groups, {} processes", geometry.max_groups, geometry.max_procs)));
        }
        let mut ledger = probe;
        ledger.geometry = geometry;
        Ok(ledger)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page aligned.
        unsafe { &*(self.base as *const Header) }
    }

    fn at<T>(&self, offset: usize, index: usize) -> &T {
        let at = offset + index * size_of::<T>();
        assert!(at + size_of::<T>() <= self.len, "ledger slot out of range");
        // SAFETY: in range (checked), aligned (offsets are page multiples, sizes multiples of 8),
        // and every field is an atomic.
        unsafe { &*(self.base.add(at) as *const T) }
    }

    pub fn device(&self, index: usize) -> &DeviceSlot {
        assert!(index < MAX_DEVICES);
        self.at(self.geometry.devices_offset(), index)
    }

    pub fn group(&self, index: usize) -> &GroupSlot {
        assert!(index < self.geometry.max_groups as usize);
        self.at(self.geometry.groups_offset(), index)
    }

    pub fn process(&self, index: usize) -> &ProcessSlot {
        assert!(index < self.geometry.max_procs as usize);
        self.at(self.geometry.procs_offset(), index)
    }

    pub fn groups(&self) -> impl Iterator<Item = (usize, &GroupSlot)> {
        (0..self.geometry.max_groups as usize).map(|i| (i, self.group(i)))
    }

    pub fn processes(&self) -> impl Iterator<Item = (usize, &ProcessSlot)> {
        (0..self.geometry.max_procs as usize).map(|i| (i, self.process(i)))
    }

    /// The device index for `uuid`, claiming a free slot for it if it is new.
    pub fn claim_device(&self, uuid: &str, total_memory: u64) -> Option<usize> {
        for _round in 0..1000 {
            for i in 0..MAX_DEVICES {
                let slot = self.device(i);
                match slot.state.load(Acquire) {
                    LIVE if slot.uuid() == uuid => return Some(i),
                    FREE if slot.state.compare_exchange(FREE, CLAIMING, AcqRel, Relaxed).is_ok() => {
                        write_text(&slot.uuid, uuid);
                        slot.total_memory.store(total_memory, Relaxed);
                        slot.state.store(LIVE, Release);
                        return Some(i);
                    }
                    CLAIMING => {
                        std::thread::yield_now();
                        break; // Look again from the start: it may be ours.
                    }
                    _ => {}
                }
                if i == MAX_DEVICES - 1 {
                    return None;
                }
            }
        }
        None
    }

    /// The device index already claimed for `uuid`.
    pub fn find_device(&self, uuid: &str) -> Option<usize> {
        (0..MAX_DEVICES).find(|&i| self.device(i).state.load(Acquire) == LIVE && self.device(i).uuid() == uuid)
    }
}

/// Refuses a ledger file that belongs to another user: its owner could rewrite or truncate it
/// under every process that maps it. A mode looser than 0600 is tightened, with a warning.
fn check_owner(fd: BorrowedFd<'_>, path: &str) -> Result<(), LedgerError> {
    // SAFETY: fstat into a local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io("inspect", path)(std::io::Error::last_os_error()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if st.st_uid != me {
        return Err(LedgerError::Foreign {
            path: path.into(),
            reason: format!("it belongs to uid {}, not to this controller's uid {me}; refusing to use or replace it", st.st_uid),
        });
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o077 != 0 {
        tracing_free_warn(&format!("the ledger {path} had mode {:o}; setting it back to 600", st.st_mode & 0o777));
        // SAFETY: fchmod(2) on our descriptor.
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
            return Err(io("restrict the mode of", path)(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The ledger lives in common, which has no logger of its own: this goes to stderr only for the
/// controller (the only caller of `open_or_create`).
fn tracing_free_warn(message: &str) {
    eprintln!("gpuslice: warning: {message}");
}

fn map(fd: i32, len: usize) -> Result<*mut u8, std::io::Error> {
    // SAFETY: shared mapping of a descriptor we were given; len is its size.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if base == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(base.cast())
    }
}

/// Writes `text` NUL-padded into atomic words (truncated to fit, on a character boundary).
pub fn write_text(words: &[AtomicU64], text: &str) {
    let cap = words.len() * 8 - 1;
    let mut end = text.len().min(cap);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut bytes = vec![0u8; words.len() * 8];
    bytes[..end].copy_from_slice(&text.as_bytes()[..end]);
    for (w, chunk) in words.iter().zip(bytes.chunks(8)) {
        w.store(u64::from_le_bytes(chunk.try_into().unwrap()), Relaxed);
    }
}

/// Reads NUL-padded text from atomic words; invalid UTF-8 is replaced, never trusted.
pub fn read_text(words: &[AtomicU64]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.load(Relaxed).to_le_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl DeviceSlot {
    pub fn uuid(&self) -> String {
        read_text(&self.uuid)
    }

    /// Frees the slot for another GPU (the controller, once no registered process uses it).
    pub fn release(&self) {
        self.state.store(CLAIMING, Release);
        write_text(&self.uuid, "");
        self.total_memory.store(0, Relaxed);
        let s = &self.sched;
        s.high_alive_until.store(0, Relaxed);
        for h in &s.highs {
            h.owner.store(0, Relaxed);
            h.pid.store(0, Relaxed);
            h.busy.store(0, Relaxed);
            h.alive_until.store(0, Relaxed);
        }
        s.wake.fetch_add(1, SeqCst);
        self.state.store(FREE, Release);
    }
}

impl GroupDevice {
    /// Zeroes the figures counted on a device (its limit and share stay: they are settings).
    pub fn clear_counters(&self) {
        for c in [&self.used, &self.debt_until, &self.charged_ns, &self.throttled_ns, &self.refusals, &self.peak_used] {
            c.store(0, Relaxed);
        }
    }
}

impl GroupSlot {
    pub fn name(&self) -> String {
        read_text(&self.name)
    }

    pub fn set_name(&self, name: &str) {
        write_text(&self.name, name)
    }

    pub fn priority(&self) -> Priority {
        Priority::from_u32(self.priority.load(Relaxed)).unwrap_or_default()
    }

    /// Sets the share of device `device` (0 or ≥ 100: not throttled), keeping `throttled` true
    /// exactly when some device has a share.
    pub fn set_share(&self, device: usize, share: u32) {
        let share = if share >= 100 { 0 } else { share };
        self.devices[device].share.store(share, Relaxed);
        let any = self.devices.iter().any(|d| d.share.load(Relaxed) != 0);
        self.throttled.store(any as u32, Release);
    }

    /// Clears every figure for a new occupant (the controller, before it marks the slot LIVE).
    pub fn reset(&self) {
        self.priority.store(Priority::Normal as u32, Relaxed);
        self.members.store(0, Relaxed);
        self.reconciling.store(0, Relaxed);
        self.throttled.store(0, Relaxed);
        self.pinned.store(0, Relaxed);
        write_text(&self.name, "");
        for d in &self.devices {
            d.limit.store(UNLIMITED, Relaxed);
            for c in [&d.used, &d.debt_until, &d.charged_ns, &d.throttled_ns, &d.refusals, &d.peak_used] {
                c.store(0, Relaxed);
            }
            d.share.store(0, Relaxed);
        }
        self.generation.fetch_add(1, Release);
    }

    /// Recomputes `used` on every device as the sum over `live` members, with no member's
    /// operation half done (see the module docs). False when a member kept an operation open
    /// for longer than `patience_ns` (stopped by a debugger, say): nothing was changed; retry.
    pub fn reconcile(&self, live: &[&ProcessSlot], patience_ns: u64) -> bool {
        self.reconciling.store(reconcile_stamp(), SeqCst);
        let start = monotonic_ns();
        for p in live {
            while p.ops.load(SeqCst) % 2 == 1 {
                if monotonic_ns() - start > patience_ns {
                    self.reconciling.store(0, SeqCst);
                    return false;
                }
                std::thread::yield_now();
            }
        }
        for (d, gd) in self.devices.iter().enumerate() {
            let sum: u64 = live.iter().map(|p| p.devices[d].used.load(SeqCst)).fold(0, u64::saturating_add);
            gd.used.store(sum, SeqCst);
        }
        self.reconciling.store(0, SeqCst);
        true
    }
}

/// The value a reconciliation raises its flag with: when it started, in ms, never zero.
fn reconcile_stamp() -> u32 {
    ((monotonic_ns() / 1_000_000) as u32) | 1
}

/// True when a reconciliation flag has been up longer than any live controller keeps it.
fn stale(flag: u32) -> bool {
    let age_ms = reconcile_stamp().wrapping_sub(flag) as u64;
    age_ms * 1_000_000 > RECONCILE_PATIENCE_NS
}

/// Which limit refused an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Group,
    Process,
}

/// An allocation refused: which limit, and the figures for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub scope: Scope,
    pub used: u64,
    pub limit: u64,
}

impl ProcessSlot {
    pub fn name(&self) -> String {
        read_text(&self.name)
    }

    /// The process's own priority, or its group's when it has none.
    pub fn priority_or(&self, group: &GroupSlot) -> Priority {
        Priority::from_u32(self.priority.load(Relaxed)).unwrap_or_else(|| group.priority())
    }

    pub fn reset(&self) {
        for w in [&self.ops, &self.start_time, &self.heartbeat_ns, &self.token] {
            w.store(0, Relaxed);
        }
        for w in [&self.pid, &self.group, &self.priority, &self.uid, &self.own_pid] {
            w.store(0, Relaxed);
        }
        write_text(&self.name, "");
        for d in &self.devices {
            d.limit.store(UNLIMITED, Relaxed);
            for c in [&d.used, &d.overhead, &d.charged_ns, &d.throttled_ns, &d.refusals, &d.peak_used] {
                c.store(0, Relaxed);
            }
        }
        self.generation.fetch_add(1, Release);
    }

    /// Opens an operation window, waiting while the group is being reconciled.
    #[inline]
    fn begin(&self, group: &GroupSlot) {
        self.ops.fetch_add(1, SeqCst);
        if group.reconciling.load(SeqCst) == 0 {
            return;
        }
        self.wait_reconciled(group);
    }

    #[cold]
    fn wait_reconciled(&self, group: &GroupSlot) {
        loop {
            self.ops.fetch_add(1, SeqCst); // Close: let the controller finish.
            loop {
                let flag = group.reconciling.load(SeqCst);
                if flag == 0 {
                    break;
                }
                if stale(flag) {
                    // A controller died mid-way (a live one gives up well before): take the
                    // flag down for everyone; its successor reconciles again.
                    let _ = group.reconciling.compare_exchange(flag, 0, SeqCst, Relaxed);
                    break;
                }
                std::thread::yield_now();
            }
            self.ops.fetch_add(1, SeqCst);
            if group.reconciling.load(SeqCst) == 0 {
                return;
            }
        }
    }

    #[inline]
    fn end(&self) {
        self.ops.fetch_add(1, SeqCst);
    }

    /// Reserves `bytes` on `device` if that keeps both this process's cap and the group's
    /// limit; zero bytes always succeed, so that the driver answers a zero-size request.
    #[inline]
    pub fn try_charge(&self, group: &GroupSlot, device: usize, bytes: u64) -> Result<(), Refusal> {
        let (pd, gd) = (&self.devices[device], &group.devices[device]);
        self.begin(group);
        let mine = pd.used.load(Relaxed);
        let cap = pd.limit.load(Relaxed);
        if bytes != 0 && mine.saturating_add(bytes) > cap {
            self.end();
            return Err(self.refused(group, device, Refusal { scope: Scope::Process, used: mine, limit: cap }));
        }
        let limit = gd.limit.load(Relaxed);
        let mut used = gd.used.load(Relaxed);
        loop {
            let next = used.saturating_add(bytes);
            if bytes != 0 && next > limit {
                self.end();
                return Err(self.refused(group, device, Refusal { scope: Scope::Group, used, limit }));
            }
            match gd.used.compare_exchange_weak(used, next, SeqCst, Relaxed) {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        let mine = pd.used.fetch_add(bytes, SeqCst) + bytes;
        self.end();
        raise_peak(&pd.peak_used, mine);
        raise_peak(&gd.peak_used, used.saturating_add(bytes));
        Ok(())
    }

    #[cold]
    fn refused(&self, group: &GroupSlot, device: usize, r: Refusal) -> Refusal {
        self.devices[device].refusals.fetch_add(1, Relaxed);
        group.devices[device].refusals.fetch_add(1, Relaxed);
        r
    }

    /// Adds bytes the process already holds, limit or not.
    pub fn charge(&self, group: &GroupSlot, device: usize, bytes: u64) {
        let (pd, gd) = (&self.devices[device], &group.devices[device]);
        self.begin(group);
        let total = gd.used.fetch_add(bytes, SeqCst) + bytes;
        let mine = pd.used.fetch_add(bytes, SeqCst) + bytes;
        self.end();
        raise_peak(&pd.peak_used, mine);
        raise_peak(&gd.peak_used, total);
    }

    /// Returns bytes; never below zero.
    #[inline]
    pub fn uncharge(&self, group: &GroupSlot, device: usize, bytes: u64) {
        let (pd, gd) = (&self.devices[device], &group.devices[device]);
        self.begin(group);
        // Only what this process holds can be given back: the group keeps other members' bytes.
        let mut given = 0;
        let _ = pd.used.fetch_update(SeqCst, Relaxed, |u| {
            given = u.min(bytes);
            Some(u - given)
        });
        let _ = gd.used.fetch_update(SeqCst, Relaxed, |u| Some(u.saturating_sub(given)));
        self.end();
    }

    /// Replaces the overhead estimate on `device`, moving `used` by the difference.
    pub fn set_overhead(&self, group: &GroupSlot, device: usize, bytes: u64) {
        let old = self.devices[device].overhead.swap(bytes, AcqRel);
        if bytes >= old {
            self.charge(group, device, bytes - old);
        } else {
            self.uncharge(group, device, old - bytes);
        }
    }

    pub fn add_overhead(&self, group: &GroupSlot, device: usize, bytes: u64) {
        self.devices[device].overhead.fetch_add(bytes, AcqRel);
        self.charge(group, device, bytes);
    }

    pub fn remove_overhead(&self, group: &GroupSlot, device: usize, bytes: u64) {
        let _ = self.devices[device].overhead.fetch_update(AcqRel, Relaxed, |o| Some(o.saturating_sub(bytes)));
        self.uncharge(group, device, bytes);
    }
}

/// Raises a peak figure; a plain load when it is not a new peak, so that processes of a group
/// allocating below their peak do not all write the group's cache line.
#[inline]
fn raise_peak(peak: &AtomicU64, value: u64) {
    if value > peak.load(Relaxed) {
        peak.fetch_max(value, Relaxed);
    }
}

/// The start time of `pid` (field 22 of /proc/PID/stat), to tell a process from a later one
/// that reused its pid. `None` when the process does not exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_gone_process_turn_is_cleared_only_by_its_own_token() {
        let ledger = Ledger::anonymous().unwrap();
        let turn = &ledger.device(0).sched.turn;
        assert!(!turn.clear_holder(7), "nobody holds it");
        turn.holder.store(7, Relaxed);
        turn.holder_pid.store(1234, Relaxed);
        turn.head.store(1 << 32, Relaxed); // ticket 0, claimed
        assert!(!turn.clear_holder(8), "another process's turn is left alone");
        assert!(!turn.clear_holder(0), "a process that never wrote its token clears nothing");
        assert_eq!(turn.holder.load(Relaxed), 7);
        assert!(turn.clear_holder(7));
        assert_eq!((turn.holder.load(Relaxed), turn.holder_pid.load(Relaxed)), (0, 0));
    }

    #[test]
    fn layout_sizes_are_what_the_header_says() {
        assert_eq!(size_of::<DeviceSlot>(), 64 + size_of::<DeviceSched>());
        assert_eq!(size_of::<GroupDevice>(), 64);
        assert_eq!(size_of::<ProcessDevice>(), 64);
        assert_eq!(size_of::<GroupSlot>(), 128 + 64 * MAX_DEVICES);
        assert_eq!(size_of::<ProcessSlot>(), 128 + 64 * MAX_DEVICES);
        assert!(size_of::<Header>() <= HEADER_SIZE);
        assert_eq!(size_of::<Turn>(), 56);
    }

    fn temp_path(name: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name).to_str().unwrap().to_string();
        (dir, path)
    }

    #[test]
    fn create_then_adopt_then_refuse_foreign_files() {
        let (_dir, path) = temp_path("ledger");
        let geometry = Geometry { max_groups: 4, max_procs: 8 };
        let (ledger, adopted) = Ledger::open_or_create(&path, geometry).unwrap();
        assert!(!adopted);
        ledger.group(2).devices[1].used.store(77, Relaxed);
        drop(ledger);
        let (ledger, adopted) = Ledger::open_or_create(&path, Geometry::default()).unwrap();
        assert!(adopted);
        assert_eq!(ledger.geometry(), geometry, "the file's own geometry wins");
        assert_eq!(ledger.group(2).devices[1].used.load(Relaxed), 77);
        let mode = std::fs::metadata(&path).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);

        let valid = std::fs::read(&path).unwrap();
        for (what, bytes, ours) in [
            ("zeroed", vec![0u8; 8192], false),
            ("empty", vec![], false),
            ("seven bytes", valid[..7].to_vec(), false),
            ("truncated", valid[..100].to_vec(), true),
            ("cut short", valid[..valid.len() - 4096].to_vec(), true),
            ("foreign", b"hello, this is some other program's file".repeat(200), false),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            use std::os::fd::AsFd;
            let e = Ledger::map_fd(f.as_fd(), &path).err().unwrap_or_else(|| panic!("{what} accepted"));
            if ours {
                assert!(matches!(e, LedgerError::Invalid { .. }), "{what}: {e}");
            } else {
                assert!(matches!(e, LedgerError::Foreign { .. }), "{what}: {e}");
                assert!(e.to_string().contains("not a gpuslice ledger"), "{what}: {e}");
            }
        }
        let mut wrong_version = {
            let (_d, p) = temp_path("v");
            Ledger::create(&p, geometry).unwrap();
            std::fs::read(&p).unwrap()
        };
        wrong_version[8] = 99;
        std::fs::write(&path, &wrong_version).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        use std::os::fd::AsFd;
        let e = Ledger::map_fd(f.as_fd(), &path).err().unwrap();
        assert!(e.to_string().contains("layout version 99"), "{e}");
    }

    #[test]
    fn devices_are_claimed_once_by_uuid() {
        let l = Ledger::anonymous().unwrap();
        let a = l.claim_device("GPU-aaaa", 10).unwrap();
        let b = l.claim_device("GPU-bbbb", 10).unwrap();
        assert_ne!(a, b);
        assert_eq!(l.claim_device("GPU-aaaa", 10), Some(a));
        assert_eq!(l.find_device("GPU-bbbb"), Some(b));
        assert_eq!(l.device(a).uuid(), "GPU-aaaa");
    }

    #[test]
    fn text_fields_truncate_on_character_boundaries() {
        let words: [AtomicU64; 4] = Default::default();
        write_text(&words, "abc");
        assert_eq!(read_text(&words), "abc");
        write_text(&words, &"é".repeat(40));
        let back = read_text(&words);
        assert!(back.len() <= 31 && back.chars().all(|c| c == 'é'), "{back}");
    }

    fn group_with_members(limit: u64, members: usize) -> (Ledger, Vec<usize>) {
        let (_d, path) = temp_path("l");
        let l = Ledger::create(&path, Geometry { max_groups: 2, max_procs: 16 }).unwrap();
        l.group(0).devices[0].limit.store(limit, Relaxed);
        (l, (0..members).collect())
    }

    #[test]
    fn group_limit_holds_exactly_across_racing_members() {
        let (l, members) = group_with_members(1_000_000, 8);
        let l = Arc::new(l);
        let granted: u64 = members
            .iter()
            .map(|&m| {
                let l = l.clone();
                std::thread::spawn(move || (0..20_000).filter(|_| l.process(m).try_charge(l.group(0), 0, 13).is_ok()).count() as u64 * 13)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        let used = l.group(0).devices[0].used.load(Relaxed);
        assert_eq!(granted, used);
        assert!(used <= 1_000_000 && used > 1_000_000 - 13);
        let by_members: u64 = members.iter().map(|&m| l.process(m).devices[0].used.load(Relaxed)).sum();
        assert_eq!(by_members, used);
    }

    #[test]
    fn a_process_cap_inside_the_group() {
        let (l, _) = group_with_members(1000, 2);
        l.process(0).devices[0].limit.store(300, Relaxed);
        l.process(0).try_charge(l.group(0), 0, 300).unwrap();
        let r = l.process(0).try_charge(l.group(0), 0, 1).unwrap_err();
        assert_eq!(r, Refusal { scope: Scope::Process, used: 300, limit: 300 });
        l.process(1).try_charge(l.group(0), 0, 700).unwrap();
        let r = l.process(1).try_charge(l.group(0), 0, 1).unwrap_err();
        assert_eq!(r.scope, Scope::Group);
        assert_eq!(l.group(0).devices[0].refusals.load(Relaxed), 2);
        // Freeing more than one holds gives back only what it holds.
        l.process(0).uncharge(l.group(0), 0, 1000);
        assert_eq!(l.group(0).devices[0].used.load(Relaxed), 700);
    }

    #[test]
    fn reconciliation_drops_a_dead_member_while_others_allocate() {
        let (l, _) = group_with_members(UNLIMITED, 3);
        let l = Arc::new(l);
        // Member 2 "dies" in the middle of an operation: its window stays open, its bytes half
        // counted (the group has them, its own slot does not).
        l.process(2).try_charge(l.group(0), 0, 5000).unwrap();
        l.process(2).ops.fetch_add(1, SeqCst);
        l.group(0).devices[0].used.fetch_add(123, SeqCst);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|m| {
                let (l, stop) = (l.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Relaxed) {
                        l.process(m).try_charge(l.group(0), 0, 10).unwrap();
                        if n % 2 == 1 {
                            l.process(m).uncharge(l.group(0), 0, 10);
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let live = [l.process(0), l.process(1)];
        assert!(l.group(0).reconcile(&live, 1_000_000_000));
        stop.store(true, Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let members: u64 = live.iter().map(|p| p.devices[0].used.load(Relaxed)).sum();
        assert_eq!(l.group(0).devices[0].used.load(Relaxed), members, "exact after reconciliation");
    }

    #[test]
    fn a_flag_left_by_a_dead_controller_is_taken_down_once() {
        let (l, _) = group_with_members(UNLIMITED, 1);
        // Raised 10 s ago and never lowered.
        l.group(0).reconciling.store(reconcile_stamp().wrapping_sub(10_000) | 1, SeqCst);
        let start = monotonic_ns();
        l.process(0).try_charge(l.group(0), 0, 10).unwrap();
        assert_eq!(l.group(0).reconciling.load(Relaxed), 0);
        for _ in 0..100 {
            l.process(0).try_charge(l.group(0), 0, 10).unwrap();
        }
        assert!(monotonic_ns() - start < 50_000_000, "no operation waited");
        assert_eq!(l.group(0).devices[0].used.load(Relaxed), 1010);
    }

    #[test]
    fn reconciliation_gives_up_on_a_member_stuck_mid_operation() {
        let (l, _) = group_with_members(UNLIMITED, 1);
        l.process(0).ops.fetch_add(1, SeqCst);
        assert!(!l.group(0).reconcile(&[l.process(0)], 5_000_000));
        assert_eq!(l.group(0).reconciling.load(Relaxed), 0);
    }

    #[test]
    fn start_time_of_this_process() {
        assert!(process_start_time(std::process::id()).is_some());
        assert_eq!(process_start_time(u32::MAX - 1), None);
    }
}
