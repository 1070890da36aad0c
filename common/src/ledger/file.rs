//! A ledger's life as a file: created complete under a temporary name, adopted after a
//! restart, refused when it is someone else's, mapped from a descriptor with every header
//! field checked; and the accessors of a mapped ledger's slots.

use super::layout::*;
use super::monotonic_ns;
use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::*;

/// Why a ledger could not be used.
#[derive(Debug)]
pub enum LedgerError {
    Io {
        what: String,
        path: String,
        error: std::io::Error,
    },
    /// A gpuslice ledger that cannot be used as it is (another layout, damaged).
    Invalid {
        path: String,
        reason: String,
    },
    /// Not a gpuslice ledger at all (no magic, not a regular file, someone else's): never
    /// replaced, because it may be another program's file.
    Foreign {
        path: String,
        reason: String,
    },
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
    pub(super) base: *mut u8,
    pub(super) len: usize,
    pub(super) geometry: Geometry,
    /// The file behind the mapping, kept by the controller to map its own pages back over a
    /// slot that no group's memory holds any more (see `regions`).
    pub(super) backing: Option<OwnedFd>,
}

// SAFETY: every field reachable through the mapping is an atomic.
unsafe impl Send for Ledger {}
// SAFETY: as for Send: shared access goes through atomics only.
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

impl Ledger {
    /// Opens the ledger at `path` if it is valid, else creates a fresh one there (mode 0600;
    /// the controller hands it to shims as a file descriptor over the socket). Returns the
    /// ledger and whether it was adopted (an existing, valid file).
    ///
    /// What is at `path` decides: nothing → a new ledger; a valid ledger of this layout → it
    /// is adopted; a gpuslice ledger of another layout or a damaged one (it starts with the
    /// magic) or an empty file (nothing to lose; what a truncation leaves) → replaced, with a
    /// warning; anything else (another program's file, a zeroed file, a FIFO, a file of another
    /// user, a symbolic link) → refused and left alone.
    pub fn open_or_create(path: &str, geometry: Geometry) -> Result<(Ledger, bool), LedgerError> {
        let c = cstring(path)?;
        // SAFETY: plain open(2). O_NONBLOCK: a FIFO at the path must not hang the controller.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok((Ledger::create(path, geometry)?, false)),
                Some(libc::ELOOP) => Err(LedgerError::Foreign {
                    path: path.into(),
                    reason: "it is a symbolic link; refusing to follow it (the ledger must be a plain file)".into(),
                }),
                _ => Err(io("open", path)(e)),
            };
        }
        // SAFETY: we own the new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        check_owner(fd.as_fd(), path)?;
        if is_empty_regular_file(fd.as_fd()) {
            // Nothing to lose, and what a tenant leaves who truncated the ledger through the
            // descriptor it was handed (issue 13): start afresh rather than refuse to start
            // until an administrator removes it.
            tracing_free_warn(&format!("the ledger {path} is empty (truncated?); replacing it with a new one"));
            std::fs::remove_file(path).map_err(io("replace", path))?;
            return Ok((Ledger::create(path, geometry)?, false));
        }
        match Ledger::map_fd(fd.as_fd(), path) {
            Ok(mut l) => {
                l.backing = fd.try_clone().ok();
                // Only a file that is a gpuslice ledger has its mode put right: another program's
                // file is refused and left exactly as it was.
                restrict_mode(fd.as_fd(), path)?;
                Ok((l, true))
            }
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
            let mut ledger = Ledger { base, len: size, geometry, backing: None };
            ledger.initialise(geometry);
            ledger.backing = fd.try_clone().ok();
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
        let base = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if base == libc::MAP_FAILED {
            return Err(io("allocate", "(anonymous)")(std::io::Error::last_os_error()));
        }
        let ledger = Ledger { base: base.cast(), len: size, geometry, backing: None };
        ledger.initialise(geometry);
        Ok(ledger)
    }

    fn initialise(&self, g: Geometry) {
        self.initialise_header(g);
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
        self.header().magic.store(MAGIC, Release);
    }

    /// The header alone (a group's memory: its slots are written when they are given out, so
    /// that the pages nobody uses stay unallocated). The magic is the caller's to write.
    pub(super) fn initialise_header(&self, g: Geometry) {
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
        h.index_offset.store(g.index_offset() as u64, Relaxed);
        h.created_ns.store(monotonic_ns(), Relaxed);
    }

    /// Maps a ledger from a descriptor (the one the controller sends), checking it first.
    pub fn map_fd(fd: BorrowedFd<'_>, path: &str) -> Result<Ledger, LedgerError> {
        let invalid = |reason: String| LedgerError::Invalid { path: path.to_string(), reason };
        // SAFETY: `libc::stat` is plain old data, for which all zero bytes are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into the local `st`; a bad descriptor is an error return, not UB.
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
        let probe = Ledger { base, len: actual, geometry: Geometry { max_groups: 0, max_procs: 0 }, backing: None };
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
            ("index offset", h.index_offset.load(Relaxed), geometry.index_offset() as u64),
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
/// under every process that maps it.
fn check_owner(fd: BorrowedFd<'_>, path: &str) -> Result<(), LedgerError> {
    // SAFETY: `libc::stat` is plain old data, for which all zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the local `st`; a bad descriptor is an error return, not UB.
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
    Ok(())
}

fn is_empty_regular_file(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: `libc::stat` is plain old data, for which all zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the local `st`; a bad descriptor is an error return, not UB.
    unsafe { libc::fstat(fd.as_raw_fd(), &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0 }
}

/// Tightens a valid ledger's mode looser than 0600, with a warning.
fn restrict_mode(fd: BorrowedFd<'_>, path: &str) -> Result<(), LedgerError> {
    // SAFETY: `libc::stat` is plain old data, for which all zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the local `st`; a bad descriptor is an error return, not UB.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io("inspect", path)(std::io::Error::last_os_error()));
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

pub(super) fn map(fd: i32, len: usize) -> Result<*mut u8, std::io::Error> {
    // SAFETY: shared mapping of a descriptor we were given; len is its size.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if base == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(base.cast())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_foreign_file_is_refused_and_left_exactly_as_it_was() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, path) = temp_path("not-a-ledger");
        std::fs::write(&path, b"someone else's notes").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Ledger::open_or_create(&path, Geometry::default()).err().expect("refused");
        assert!(matches!(e, LedgerError::Foreign { .. }), "{e}");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644, "its mode is untouched");
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's notes");
    }
}
