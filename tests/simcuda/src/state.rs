//! Shared state of the simulated device(s): a small file mapped `MAP_SHARED` by every process
//! (and by both `libcuda.so.1` and `libnvidia-ml.so.1` doubles), so that several processes see
//! one device. Fixed `#[repr(C)]` layout, atomics only.
//!
//! Used by tests/simcuda (as `mod state`) and by tests/simnvml (through `#[path]`).

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const MAGIC: u64 = 0x3154_5344_4d49_5353; // "SSIMDST1" little endian, arbitrary
pub const LAYOUT_VERSION: u32 = 3;
pub const MAX_DEVICES: usize = 16;
pub const MAX_PROCS: usize = 128;

pub const DEFAULT_DEVICES: u32 = 2;
pub const DEFAULT_MEM: u64 = 16 << 30;

/// pid value marking a slot that is being reclaimed.
const RECLAIMING: u32 = u32::MAX;

#[repr(C)]
pub struct ProcSlot {
    /// 0 = free, RECLAIMING = being reclaimed, else the owner's pid.
    pub pid: AtomicU32,
    /// The program image that charged it (see `image_token`): after an `exec` the pid is the
    /// same, but the old image's memory died with it, as the real driver's does.
    pub image: AtomicU32,
    /// Bytes charged to this process on this device.
    pub used: AtomicU64,
    /// End of the last kernel this process queued on this device (the launching process's
    /// clock, as `DeviceState::busy_until_ns`): NVML's per-process utilization samples.
    pub busy_until_ns: AtomicU64,
}

#[repr(C)]
pub struct DeviceState {
    pub total: AtomicU64,
    /// Sum of all slots' `used` (kept separately so that charging is one CAS).
    pub used: AtomicU64,
    /// End of the last kernel queued on the device, CLOCK_MONOTONIC ns.
    pub busy_until_ns: AtomicU64,
    /// Under `SIMCUDA_SWITCH_NS`: the process whose kernel was queued last (whose context the
    /// device holds), and the lock that makes reading it and the timeline one step.
    ran_last: AtomicU64,
    timeline_lock: AtomicU64,
    _pad: [u64; 3],
    pub procs: [ProcSlot; MAX_PROCS],
}

#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub ndev: AtomicU32,
    pub size: AtomicU64,
    _pad: [u64; 5],
}

#[repr(C)]
pub struct Shared {
    pub header: Header,
    pub devices: [DeviceState; MAX_DEVICES],
    /// Allocations exported to other processes (legacy IPC, VMM shareable handles): see
    /// simcuda's `sharing`.
    pub exports: [ExportSlot; MAX_EXPORTS],
}

pub const MAX_EXPORTS: usize = 64;
pub const MAX_IMPORTERS: usize = 8;

/// One exported allocation. Its bytes stay charged to the exporter's slot until the exporter
/// has freed it and no live process holds an import of it (the driver's refcount).
#[repr(C)]
pub struct ExportSlot {
    /// 0 = free, else the export's id (never 0).
    pub id: AtomicU64,
    pub owner_pid: AtomicU32,
    /// The physical device (the state file's index).
    pub dev: AtomicU32,
    pub size: AtomicU64,
    /// 1 while the exporter still holds its allocation, 0 once it freed it (its slot still
    /// carries the bytes for the importers), 2 once the exporter is gone with imports open (the
    /// export itself carries the bytes in the device's `used`).
    pub owner_holds: AtomicU32,
    /// Pids of the processes holding an import (one entry per import; 0 = free).
    pub importers: [AtomicU32; MAX_IMPORTERS],
}

pub const SHARED_SIZE: usize = std::mem::size_of::<Shared>();

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the local `ts`; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleep until CLOCK_MONOTONIC reaches `t` (ns).
pub fn sleep_until_ns(t: u64) {
    loop {
        let now = now_ns();
        if now >= t {
            return;
        }
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

pub fn state_path() -> String {
    if let Ok(p) = std::env::var("SIMCUDA_STATE") {
        if !p.is_empty() {
            return p;
        }
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if std::path::Path::new("/dev/shm").is_dir() {
        format!("/dev/shm/simcuda-{uid}")
    } else {
        format!("{}/simcuda-{uid}", std::env::temp_dir().display())
    }
}

/// Parse a byte count: plain number or with a binary K/M/G/T suffix.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suf) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match suf.to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub fn env_bytes(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => match parse_bytes(&v) {
            Some(n) => n,
            None => {
                eprintln!("simcuda: ignoring bad {name}={v:?}, using {default}");
                default
            }
        },
        Err(_) => default,
    }
}

static SHARED: OnceLock<Result<&'static Shared, String>> = OnceLock::new();

/// The shared state if this process has already mapped it.
pub fn opened() -> Option<&'static Shared> {
    match SHARED.get() {
        Some(Ok(s)) => Some(s),
        _ => None,
    }
}

/// The mapped shared state (created and initialised on first use).
pub fn shared() -> Result<&'static Shared, String> {
    SHARED.get_or_init(open_shared).clone()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_default()
}

fn open_shared() -> Result<&'static Shared, String> {
    let path = state_path();
    let cpath = cstr(&path);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Try to be the creator.
        // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
        let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC, 0o600) };
        if fd >= 0 {
            // SAFETY: `fd` is the descriptor just opened; a failure is an error return.
            let r = unsafe { libc::ftruncate(fd, SHARED_SIZE as libc::off_t) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: `fd` is ours (opened above) and closed once, on this path only.
                unsafe { libc::close(fd) };
                return Err(format!("simcuda: ftruncate {path}: {e}"));
            }
            let sh = map(fd, &path)?;
            let ndev = (env_bytes("SIMCUDA_DEVICES", DEFAULT_DEVICES as u64) as u32).clamp(1, MAX_DEVICES as u32);
            let mem = env_bytes("SIMCUDA_MEM", DEFAULT_MEM);
            for d in 0..MAX_DEVICES {
                sh.devices[d].total.store(if (d as u32) < ndev { mem } else { 0 }, Ordering::Relaxed);
            }
            sh.header.ndev.store(ndev, Ordering::Relaxed);
            sh.header.size.store(SHARED_SIZE as u64, Ordering::Relaxed);
            sh.header.version.store(LAYOUT_VERSION, Ordering::Relaxed);
            sh.header.magic.store(MAGIC, Ordering::Release);
            return Ok(sh);
        }
        if errno() != libc::EEXIST {
            return Err(format!("simcuda: create {path}: {}", std::io::Error::last_os_error()));
        }
        // Someone else created it: open and wait for the magic.
        // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
        let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            if errno() == libc::ENOENT && Instant::now() < deadline {
                continue; // removed in between; try to create again
            }
            return Err(format!("simcuda: open {path}: {}", std::io::Error::last_os_error()));
        }
        loop {
            // SAFETY: `libc::stat` is plain old data, for which all zero bytes are a valid value.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat writes into the local `st`; `fd` is the descriptor opened above.
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: `fd` is ours (opened above) and closed once, on this path only.
                unsafe { libc::close(fd) };
                return Err(format!("simcuda: fstat {path}: {e}"));
            }
            if st.st_size as usize >= SHARED_SIZE {
                break;
            }
            if Instant::now() > deadline {
                // SAFETY: `fd` is ours (opened above) and closed once, on this path only.
                unsafe { libc::close(fd) };
                return Err(format!("simcuda: state file {path} has size {} < {SHARED_SIZE} (stale? delete it)", st.st_size));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let sh = map(fd, &path)?;
        while sh.header.magic.load(Ordering::Acquire) != MAGIC {
            if Instant::now() > deadline {
                return Err(format!("simcuda: state file {path} never initialised (stale? delete it)"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let v = sh.header.version.load(Ordering::Relaxed);
        if v != LAYOUT_VERSION {
            return Err(format!("simcuda: state file {path} has layout version {v}, expected {LAYOUT_VERSION} (delete it)"));
        }
        return Ok(sh);
    }
}

fn map(fd: i32, path: &str) -> Result<&'static Shared, String> {
    // SAFETY: a new shared mapping of `fd` at an address the kernel picks; nothing else is touched.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), SHARED_SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    let e = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours and no longer needed: the mapping keeps the file.
    unsafe { libc::close(fd) };
    if p == libc::MAP_FAILED {
        return Err(format!("simcuda: mmap {path}: {e}"));
    }
    // SAFETY: the mapping is SHARED_SIZE bytes, page-aligned and never unmapped; `Shared` is `repr(C)` atomics and padding, valid for any bytes (a fresh file's zeros included).
    Ok(unsafe { &*(p as *const Shared) })
}

pub const ORPHANED: u32 = 2;

impl Shared {
    /// Process `pid` is going (exit or reclaimed after a kill): its exports that live processes
    /// still import on device `dev` leave its slot and are carried by the export itself, as the
    /// real driver keeps such memory until the last importer lets go.
    pub fn orphan_exports(&self, pid: u32, dev: &DeviceState, slot: &ProcSlot) {
        for e in &self.exports {
            let id = e.id.load(Ordering::Acquire);
            if id == 0
                || id == u64::MAX
                || e.owner_pid.load(Ordering::Acquire) != pid
                || !std::ptr::eq(&self.devices[e.dev.load(Ordering::Acquire) as usize % MAX_DEVICES], dev)
            {
                continue;
            }
            let importers = e.importers.iter().filter(|p| pid_alive_nonzero(p.load(Ordering::Acquire))).count();
            let held = e.owner_holds.load(Ordering::Acquire);
            if importers == 0 || held == ORPHANED || e.owner_holds.compare_exchange(held, ORPHANED, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            let size = e.size.load(Ordering::Acquire);
            let mut cur = slot.used.load(Ordering::Acquire);
            while let Err(v) = slot.used.compare_exchange_weak(cur, cur.saturating_sub(size), Ordering::AcqRel, Ordering::Relaxed) {
                cur = v;
            }
        }
    }

    /// Frees every export that nobody holds any more: the exporter has freed it (or is gone)
    /// and no live process holds an import. Its bytes leave the exporter's slot, or the device's
    /// `used` where the export carried them itself, then.
    pub fn settle_exports(&self) {
        for s in &self.exports {
            let id = s.id.load(Ordering::Acquire);
            if id == 0 || id == u64::MAX {
                continue;
            }
            let owner = s.owner_pid.load(Ordering::Acquire);
            let owner_alive = pid_alive_nonzero(owner);
            let holds = s.owner_holds.load(Ordering::Acquire);
            let importers = s.importers.iter().filter(|p| pid_alive_nonzero(p.load(Ordering::Acquire))).count();
            if (holds == 1 && owner_alive) || importers > 0 {
                continue;
            }
            if s.id.compare_exchange(id, u64::MAX, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                let (dev, size) = (&self.devices[s.dev.load(Ordering::Acquire) as usize % MAX_DEVICES], s.size.load(Ordering::Acquire));
                if holds == ORPHANED {
                    dev.used.fetch_sub(size, Ordering::AcqRel);
                } else if owner_alive {
                    dev.uncharge_pid(owner, size);
                }
                s.id.store(0, Ordering::Release);
            }
        }
    }

    pub fn ndev(&self) -> u32 {
        self.header.ndev.load(Ordering::Relaxed)
    }

    pub fn dev(&self, d: usize) -> &DeviceState {
        &self.devices[d]
    }
}

/// A pid that is set and names a live process.
pub fn pid_alive_nonzero(pid: u32) -> bool {
    pid != 0 && pid != RECLAIMING && pid_alive(pid)
}

pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid == RECLAIMING {
        return true;
    }
    // SAFETY: signal 0 only checks that `pid` exists; nothing is delivered.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || errno() != libc::ESRCH
}

fn my_pid() -> u32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() as u32 }
}

/// Per-device cache of this process's slot: (pid << 32) | (index + 1).
static SLOT_CACHE: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
static CLAIM_LOCK: Mutex<()> = Mutex::new(());

/// Held across `fork()` (see simcuda's fork handlers), so that a child never starts with it
/// taken by a thread that did not follow it.
pub fn claim_lock() -> std::sync::MutexGuard<'static, ()> {
    CLAIM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A number for this program image, drawn once per load of the library: a process that
/// `exec`s keeps its pid but gets a new image, whose slot starts empty.
fn image_token() -> u32 {
    static TOKEN: OnceLock<u32> = OnceLock::new();
    *TOKEN.get_or_init(|| {
        let mut b = [0u8; 4];
        // SAFETY: getrandom writes at most 4 bytes into the local 4-byte `b`.
        let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
        let r = if got == 4 { u32::from_ne_bytes(b) } else { (now_ns() as u32) ^ (&TOKEN as *const _ as usize as u32) };
        r.max(1)
    })
}

impl DeviceState {
    /// Return the bytes of slots whose process no longer exists.
    pub fn reclaim_dead(&self) {
        let me = my_pid();
        for s in self.procs.iter() {
            let p = s.pid.load(Ordering::Acquire);
            if p == 0 || p == RECLAIMING || p == me || pid_alive(p) {
                continue;
            }
            if s.pid.compare_exchange(p, RECLAIMING, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                if let Some(sh) = opened() {
                    sh.orphan_exports(p, self, s);
                }
                let u = s.used.swap(0, Ordering::AcqRel);
                self.used.fetch_sub(u, Ordering::AcqRel);
                s.pid.store(0, Ordering::Release);
            }
        }
    }

    fn find_slot(&self, pid: u32) -> Option<usize> {
        self.procs.iter().position(|s| s.pid.load(Ordering::Acquire) == pid)
    }

    /// This process's slot on this device (claimed if needed).
    pub fn my_slot(&self, dev: usize) -> Option<&ProcSlot> {
        let me = my_pid();
        let c = SLOT_CACHE[dev].load(Ordering::Relaxed);
        if c >> 32 == me as u64 && c & 0xffff_ffff != 0 {
            let s = &self.procs[(c & 0xffff_ffff) as usize - 1];
            if s.pid.load(Ordering::Relaxed) == me {
                return Some(s);
            }
        }
        let _g = CLAIM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let image = image_token();
        let idx = match self.find_slot(me) {
            Some(i) => {
                self.take_over(i, image);
                i
            }
            None => {
                self.reclaim_dead();
                let mut found = None;
                for (i, s) in self.procs.iter().enumerate() {
                    if s.pid.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                        s.used.store(0, Ordering::Release);
                        s.busy_until_ns.store(0, Ordering::Release);
                        s.image.store(image, Ordering::Release);
                        found = Some(i);
                        break;
                    }
                }
                found?
            }
        };
        SLOT_CACHE[dev].store(((me as u64) << 32) | (idx as u64 + 1), Ordering::Relaxed);
        Some(&self.procs[idx])
    }

    /// Makes slot `i` (this pid's) this image's: what an earlier image charged there (before an
    /// `exec`, or a process that had this pid before) is gone, as the real driver's memory is.
    fn take_over(&self, i: usize, image: u32) {
        let s = &self.procs[i];
        if s.image.swap(image, Ordering::AcqRel) != image {
            s.busy_until_ns.store(0, Ordering::Release);
            let u = s.used.swap(0, Ordering::AcqRel);
            self.used.fetch_sub(u, Ordering::AcqRel);
        }
    }

    /// At `cuInit`: memory this pid's earlier image held is released now, before anything is
    /// measured (NVML's per-process figure would otherwise still show it).
    pub fn forget_earlier_image(&self) {
        let _g = CLAIM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.find_slot(my_pid()) {
            self.take_over(i, image_token());
        }
    }

    /// Bytes used by all processes (after reclaiming dead ones).
    pub fn used_now(&self) -> u64 {
        self.reclaim_dead();
        if let Some(sh) = opened() {
            sh.settle_exports();
        }
        self.used.load(Ordering::Acquire)
    }

    pub fn free_now(&self) -> u64 {
        let t = self.total.load(Ordering::Relaxed);
        t.saturating_sub(self.used_now())
    }

    /// Charge `bytes` to this process; false if the device does not have them free.
    pub fn charge(&self, dev: usize, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        let Some(slot) = self.my_slot(dev) else {
            eprintln!("simcuda: process table of device {dev} is full ({MAX_PROCS} processes)");
            return false;
        };
        let total = self.total.load(Ordering::Relaxed);
        let mut reclaimed = false;
        loop {
            let cur = self.used.load(Ordering::Acquire);
            let new = cur.saturating_add(bytes);
            if new > total {
                if !reclaimed {
                    reclaimed = true;
                    self.reclaim_dead();
                    continue;
                }
                return false;
            }
            if self.used.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                break;
            }
        }
        slot.used.fetch_add(bytes, Ordering::AcqRel);
        true
    }

    pub fn uncharge(&self, dev: usize, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if let Some(slot) = self.my_slot(dev) {
            self.take_from(&slot.used, bytes);
        }
    }

    /// Takes `bytes` off a process slot's `used` and the device's, never below zero whatever the
    /// caller does.
    fn take_from(&self, slot_used: &AtomicU64, bytes: u64) {
        let mut cur = slot_used.load(Ordering::Acquire);
        loop {
            let take = cur.min(bytes);
            match slot_used.compare_exchange_weak(cur, cur - take, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.used.fetch_sub(take, Ordering::AcqRel);
                    return;
                }
                Err(v) => cur = v,
            }
        }
    }

    /// Takes `bytes` off the slot of process `pid` (another process's, for an export its
    /// importers kept alive); nothing if that process is gone (its slot was reclaimed).
    pub fn uncharge_pid(&self, pid: u32, bytes: u64) {
        let Some(i) = self.find_slot(pid) else { return };
        self.take_from(&self.procs[i].used, bytes);
    }

    /// Release this process's slot (at exit).
    pub fn release_self(&self) {
        let me = my_pid();
        for s in self.procs.iter() {
            if s.pid.load(Ordering::Acquire) == me {
                if let Some(sh) = opened() {
                    sh.orphan_exports(me, self, s);
                }
                let u = s.used.swap(0, Ordering::AcqRel);
                self.used.fetch_sub(u, Ordering::AcqRel);
                s.pid.store(0, Ordering::Release);
            }
        }
    }

    /// Records that this process has work on the device until `end` (ns): in its slot, if it has
    /// one (a process that launches holds a context, so it has; none is claimed for this, so the
    /// process lists stay as they were).
    pub fn note_busy(&self, dev: usize, end: u64) {
        let me = my_pid();
        let c = SLOT_CACHE[dev].load(Ordering::Relaxed);
        let cached = (c >> 32 == me as u64 && c & 0xffff_ffff != 0).then(|| &self.procs[(c & 0xffff_ffff) as usize - 1]);
        let Some(slot) = cached.filter(|s| s.pid.load(Ordering::Relaxed) == me).or_else(|| self.find_slot(me).map(|i| &self.procs[i])) else { return };
        slot.busy_until_ns.fetch_max(end, Ordering::AcqRel);
    }

    /// (pid, end of its last kernel) of live processes holding a slot on this device.
    pub fn busy_until(&self) -> Vec<(u32, u64)> {
        self.reclaim_dead();
        self.procs
            .iter()
            .filter_map(|s| {
                let p = s.pid.load(Ordering::Acquire);
                (p != 0 && p != RECLAIMING).then(|| (p, s.busy_until_ns.load(Ordering::Acquire)))
            })
            .collect()
    }

    /// (pid, used) of live processes holding a slot on this device.
    pub fn processes(&self) -> Vec<(u32, u64)> {
        self.reclaim_dead();
        let mut v = Vec::new();
        for s in self.procs.iter() {
            let p = s.pid.load(Ordering::Acquire);
            if p != 0 && p != RECLAIMING {
                v.push((p, s.used.load(Ordering::Acquire)));
            }
        }
        v
    }

    /// Reserve `[start, start + dur)` on the device timeline, starting no earlier than
    /// `earliest`; returns (start, end). Kernels of all processes serialise. Under
    /// `SIMCUDA_SWITCH_NS` a kernel of another process than the last one's starts that much
    /// later: the time-sliced GPU's switch between contexts, which it pays even when the device
    /// was idle in between (measured on the H100: ~0.13 ms, `tests/gpu/preswitch.sh`).
    pub fn reserve_time(&self, earliest: u64, dur: u64) -> (u64, u64) {
        let switch = switch_ns();
        if switch > 0 {
            return self.reserve_time_switching(earliest, dur, switch);
        }
        let mut b = self.busy_until_ns.load(Ordering::Acquire);
        loop {
            let start = earliest.max(b);
            let end = start + dur;
            if end <= b {
                return (start, end);
            }
            match self.busy_until_ns.compare_exchange_weak(b, end, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return (start, end),
                Err(v) => b = v,
            }
        }
    }

    /// `reserve_time` with a switch of `switch` ns before a kernel of another process: the
    /// timeline and who ran last change together, under a lock word of the shared page (held
    /// for a few instructions; taken over after a second, from a process that died holding it).
    fn reserve_time_switching(&self, earliest: u64, dur: u64, switch: u64) -> (u64, u64) {
        let me = u64::from(my_pid());
        let since = std::time::Instant::now();
        while self.timeline_lock.compare_exchange_weak(0, me, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            if since.elapsed() > std::time::Duration::from_secs(1) {
                self.timeline_lock.store(me, Ordering::Release);
                break;
            }
            std::thread::yield_now();
        }
        let b = self.busy_until_ns.load(Ordering::Acquire);
        let last = self.ran_last.swap(me, Ordering::AcqRel);
        let start = earliest.max(b) + if last != 0 && last != me { switch } else { 0 };
        let end = start + dur;
        self.busy_until_ns.store(b.max(end), Ordering::Release);
        self.timeline_lock.store(0, Ordering::Release);
        (start, end)
    }
}

/// `SIMCUDA_SWITCH_NS`: what a kernel waits when the device last ran another process's (0, the
/// default: no switch, as before).
fn switch_ns() -> u64 {
    static V: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("SIMCUDA_SWITCH_NS").ok().and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Deterministic 16-byte UUID of simulated device `d` (shared by the CUDA and NVML doubles).
/// Bytes 8..14 come from the state file's path, so that each simulated machine (each test) has
/// devices of its own identity, as real GPUs do: per-device files keyed by UUID never collide.
pub fn device_uuid(d: u32) -> [u8; 16] {
    let mut u = [0x5e, 0x1c, 0xc0, 0xda, 0x9a, 0x3b, 0x4c, 0x11, 0x8e, 0x2f, 0x60, 0x00, 0x00, 0x00, 0x00, 0x00];
    let machine = state_path().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    u[8..14].copy_from_slice(&machine.to_le_bytes()[..6]);
    u[15] = d as u8;
    u[14] = (d >> 8) as u8;
    // Devices also differ early, as real GPUs do, so that a unique UUID prefix exists.
    u[7] = 0x11u8.wrapping_add(d as u8);
    u
}

/// `SIMCUDA_MIG=1,...`: these physical devices are in MIG mode, each with one MIG instance that
/// holds the whole device (its memory, its processes). CUDA knows the device by the instance's
/// UUID (`cuDeviceGetUuid_v2`, `CUDA_VISIBLE_DEVICES=MIG-...`), as the driver does for a MIG
/// device; NVML lists the GPU by index (MIG mode on) and the instance by its own handle
/// (`nvmlDeviceGetHandleByUUID("MIG-...")`, `nvmlDeviceGetMigDeviceHandleByIndex`).
pub fn mig_mode(d: u32) -> bool {
    std::env::var("SIMCUDA_MIG").is_ok_and(|v| v.split(',').any(|e| e.trim().parse() == Ok(d)))
}

/// The 16-byte UUID of device `d`'s MIG instance: the GPU's with other first bytes.
pub fn mig_uuid(d: u32) -> [u8; 16] {
    let mut u = device_uuid(d);
    u[0] = 0x61;
    u[1] = 0x9e;
    u
}

/// "MIG-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as NVML prints a MIG instance's UUID.
pub fn mig_uuid_string(u: &[u8; 16]) -> String {
    format!("MIG-{}", &uuid_string(u)[4..])
}

/// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" form of a 16-byte UUID, as NVML prints it.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("GPU-{}-{}-{}-{}-{}", h[0..4].concat(), h[4..6].concat(), h[6..8].concat(), h[8..10].concat(), h[10..16].concat())
}

pub const DEVICE_NAME: &str = "gpuslice simulated GPU (sm_90, 132 SMs)";
