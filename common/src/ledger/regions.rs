//! Where the ledger's pages come from, so that a tenant reaches only its own group: each group's
//! counters and its members' process slots live in a sealed memfd of their own, its settings in
//! another that the controller publishes and hands out read-only, and the device table (with
//! the cross-group turn state) in one shared sealed memfd. The controller maps each over the
//! matching pages of its own view (the root-only ledger file), so one `Ledger` still indexes
//! everything; a shim maps its group's memfd and the device memfd, and sees zeros where other
//! groups are. A restarted controller finds the memfds again among live processes' descriptors
//! by the inodes it recorded in its file.

use super::file::{map, Ledger, LedgerError};
use super::layout::*;
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::*;

/// Neither shrunk (SIGBUS for every mapper) nor grown, and no seal added later (a tenant could
/// otherwise seal writes and stop its group's accounting, the controller's included).
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
const NAME_PREFIX: &str = "gpuslice-";

/// A sealed memfd of `size` bytes, mode 0600 (a reopen through `/proc/PID/fd` by another uid
/// is refused).
pub fn sealed_memfd(name: &str, size: usize) -> io::Result<OwnedFd> {
    let c = CString::new(format!("{NAME_PREFIX}{name}")).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own the new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate, fchmod and fcntl on our own descriptor.
    let ok = unsafe {
        libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) == 0
            && libc::fchmod(fd.as_raw_fd(), 0o600) == 0
            && libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The inode behind a descriptor.
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: `libc::stat` is plain old data, for which all zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the local `st`; a bad descriptor is an error return, not UB.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

/// A second, read-only open of the same memory: a shim given it can map it only for reading
/// (`mmap` with `PROT_WRITE` and `mprotect` to it are refused), cannot truncate it or add a
/// seal, and cannot reopen it for writing (mode 0600, another uid).
pub fn read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    reopen(&format!("/proc/self/fd/{}", fd.as_raw_fd()), libc::O_RDONLY)
}

fn reopen(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own the new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One device slot as the controller's record holds it (`Ledger::device_record`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDevice {
    pub uuid: String,
    pub total_memory: u64,
}

/// The memfds a restarted controller (or a root test reading the books) found again.
#[derive(Default)]
pub struct Reclaimed {
    pub devices: Option<OwnedFd>,
    /// Group slot → its counters memory.
    pub counters: HashMap<usize, OwnedFd>,
    /// Group slot → its settings page (opened read-write).
    pub settings: HashMap<usize, OwnedFd>,
}

impl Ledger {
    /// Maps `len` bytes of `fd` at `offset` over the same offset of this view (the ledger
    /// file's own pages when `fd` is `None`).
    fn overlay(&self, offset: usize, len: usize, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let raw = match fd {
            Some(fd) => fd.as_raw_fd(),
            None => self.backing.as_ref().ok_or_else(|| io::Error::other("this ledger view has no file behind it"))?.as_raw_fd(),
        };
        if !offset.is_multiple_of(PAGE) || offset + len > self.len {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: replaces pages inside our own mapping (checked above) with a shared mapping of
        // the same length; the range stays mapped throughout, so references into it stay valid.
        let p = unsafe {
            libc::mmap(self.base.add(offset).cast(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_FIXED, raw, offset as libc::off_t)
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// New memory for group `group`: its counters and its members' slots, with a copy of the
    /// header (what a shim's `map_fd` checks). Pages nobody writes stay unallocated.
    pub fn new_group_memory(&self, group: usize) -> io::Result<OwnedFd> {
        let size = self.geometry.file_size();
        let fd = sealed_memfd(&format!("group-{group}"), size)?;
        let base = map(fd.as_raw_fd(), size)?;
        let copy = Ledger { base, len: size, geometry: self.geometry, backing: None };
        copy.initialise_header(self.geometry);
        copy.header().magic.store(MAGIC, Release);
        Ok(fd)
    }

    /// New device memory (the device table and its turn state, shared by every group), starting
    /// from the ledger file's own pages under the device table (`save_device_table`: the
    /// controller's record): after a restart that found no live process holding the old one,
    /// the devices keep their indices. What it starts from is only a first guess: `adopt` takes
    /// the device table from the record (`device_record`) and checks it against this.
    pub fn new_device_memory(&self) -> io::Result<OwnedFd> {
        let g = self.geometry;
        let fd = sealed_memfd("devices", g.groups_offset())?;
        if let Some(file) = &self.backing {
            let mut saved = vec![0u8; g.groups_offset() - g.devices_offset()];
            // SAFETY: a local buffer of its length, read into and then written from.
            unsafe {
                if pread_exact(file, g.devices_offset(), saved.as_mut_ptr(), saved.len()).is_ok() {
                    let _ = pwrite_all(&fd, g.devices_offset(), saved.as_ptr(), saved.len());
                }
            }
        }
        Ok(fd)
    }

    /// Writes the controller's record of the device table into the ledger file's own pages
    /// under it (hidden by the device memory in every view; the file is the controller's, never
    /// handed out): `known[d]` is the UUID and total memory the controller holds for device
    /// slot `d` (`None`: free), in `DeviceSlot`s with every turn and priority word zero. Built
    /// from the caller's table only, never from the device memory, which every registered
    /// process writes. Then seals it for this controller start (`DeviceRecordSeal`); a failed
    /// write unseals it, so that a restart does not take a record that missed a change. The
    /// controller calls it every tick and after every request (`publish`).
    pub fn save_device_table(&self, known: &[Option<(&str, u64)>]) -> io::Result<()> {
        let Some(file) = &self.backing else { return Ok(()) };
        let g = self.geometry;
        let mut table = vec![0u8; g.groups_offset() - g.devices_offset()];
        for (d, known) in known.iter().enumerate().take(MAX_DEVICES) {
            let Some((uuid, total)) = known else { continue };
            let at = d * size_of::<DeviceSlot>();
            table[at + std::mem::offset_of!(DeviceSlot, state)..][..4].copy_from_slice(&LIVE.to_le_bytes());
            table[at + std::mem::offset_of!(DeviceSlot, total_memory)..][..8].copy_from_slice(&total.to_le_bytes());
            // NUL-padded as `write_text` does; UUIDs are ASCII, so a byte cut is a character cut.
            let text = &uuid.as_bytes()[..uuid.len().min(UUID_BYTES - 1)];
            table[at + std::mem::offset_of!(DeviceSlot, uuid)..][..text.len()].copy_from_slice(text);
        }
        let seal = self.device_seal();
        // SAFETY: `table` is a local buffer of its length; pwrite only reads it.
        match unsafe { pwrite_all(file, g.devices_offset(), table.as_ptr(), table.len()) } {
            Ok(()) => {
                seal.starts.store(self.header().controller_starts.load(Relaxed), Relaxed);
                seal.magic.store(DEVICE_RECORD_MAGIC, Release);
                Ok(())
            }
            Err(e) => {
                seal.magic.store(0, Release);
                Err(e)
            }
        }
    }

    /// The controller's record of the device table (`save_device_table`), by device slot, read
    /// from the ledger file past the device memory that hides it in this view; `Err` (why) when
    /// there is none to take: never sealed (a ledger from a controller before the record, whose
    /// copy there is the shared table's bytes), sealed for another controller start than this one
    /// (a controller that kept no record ran in between), or unreadable.
    pub fn device_record(&self) -> Result<Vec<Option<KnownDevice>>, String> {
        let file = self.backing.as_ref().ok_or("this ledger view has no file behind it")?;
        let seal = self.device_seal();
        if seal.magic.load(Acquire) != DEVICE_RECORD_MAGIC {
            return Err("the ledger file holds no record of the device table by the controller (a controller from before the record kept only a copy of the shared table, which every registered process writes)".into());
        }
        let (by, now) = (seal.starts.load(Relaxed), self.header().controller_starts.load(Relaxed));
        if by != now {
            return Err(format!(
                "the controller's record of the device table in the ledger file is from controller start {by}, and a controller that kept no record ran since (this is start {now})"
            ));
        }
        let g = self.geometry;
        let mut table = vec![0u8; g.groups_offset() - g.devices_offset()];
        // SAFETY: a local buffer of its length; any bytes are valid `u8`s.
        unsafe { pread_exact(file, g.devices_offset(), table.as_mut_ptr(), table.len()) }
            .map_err(|e| format!("the controller's record of the device table cannot be read from the ledger file ({e})"))?;
        let word = |at: usize, n: usize| table[at..at + n].iter().rev().fold(0u64, |w, &b| w << 8 | u64::from(b));
        Ok((0..MAX_DEVICES)
            .map(|d| {
                let at = d * size_of::<DeviceSlot>();
                if word(at + std::mem::offset_of!(DeviceSlot, state), 4) != u64::from(LIVE) {
                    return None;
                }
                let uuid = &table[at + std::mem::offset_of!(DeviceSlot, uuid)..][..UUID_BYTES];
                let end = uuid.iter().position(|&b| b == 0).unwrap_or(UUID_BYTES);
                Some(KnownDevice {
                    uuid: String::from_utf8_lossy(&uuid[..end]).into_owned(),
                    total_memory: word(at + std::mem::offset_of!(DeviceSlot, total_memory), 8),
                })
            })
            .collect())
    }

    /// A controller starts on this ledger: counts the start (`Header::controller_starts`) and
    /// returns its number. The device record sealed for the previous start is sealed for this
    /// one too (nothing else ran in between, so it still holds only what a controller wrote); a
    /// start of a controller from before this branch counts without carrying it, which breaks
    /// the chain, since that controller copies the shared table over the record each tick.
    /// Carried at once rather than at the first write, so that a start that fails before it
    /// writes anything (a bad flag) does not cost the next one its record.
    pub fn count_controller_start(&self) -> u64 {
        let starts = self.header().controller_starts.fetch_add(1, AcqRel).wrapping_add(1);
        let seal = self.device_seal();
        if seal.magic.load(Acquire) == DEVICE_RECORD_MAGIC && seal.starts.load(Relaxed).wrapping_add(1) == starts {
            seal.starts.store(starts, Relaxed);
        }
        starts
    }

    fn device_seal(&self) -> &DeviceRecordSeal {
        assert!(self.len >= HEADER_SIZE && size_of::<Header>() <= DEVICE_SEAL_OFFSET);
        // SAFETY: inside the header page (checked above; `layout`'s tests check the offset and
        // size), 8-aligned, atomics only. No view maps anything over the header page.
        unsafe { &*(self.base.add(DEVICE_SEAL_OFFSET) as *const DeviceRecordSeal) }
    }

    /// Copies group slot `group`'s settings as the controller published them (`published`, a
    /// `GroupSlot` page) into the ledger file's own page under that slot, which the group's
    /// memory hides while it lives: a restart that finds no live process holding that memory
    /// (nobody has registered in the group yet, or its members all exited while no controller
    /// ran) still finds the group there, as `new_device_memory` finds the device table; and one
    /// that finds the memory but not the settings page takes the settings from here, never from
    /// the members' writable copy. The controller keeps every group's copy (one pwrite each).
    pub fn save_group_page(&self, group: usize, published: &GroupSlot) -> io::Result<()> {
        self.write_group_page(group, (published as *const GroupSlot).cast())
    }

    /// Empties the ledger file's own page under group slot `group` (the group is gone: a restart
    /// must not bring it back).
    pub fn clear_group_page(&self, group: usize) -> io::Result<()> {
        let zeros = vec![0u8; size_of::<GroupSlot>()];
        self.write_group_page(group, zeros.as_ptr())
    }

    /// The ledger file's own page under group slot `group` (`save_group_page`'s copy, or zeros),
    /// read past the group's memory that hides it in this view: after a restart, the settings
    /// of a group whose settings page no live process held, from where no member writes.
    pub fn saved_group_page(&self, group: usize) -> io::Result<Box<GroupSlot>> {
        let file = self.backing.as_ref().ok_or_else(|| io::Error::other("this ledger view has no file behind it"))?;
        assert!(group < self.geometry.max_groups as usize);
        let layout = std::alloc::Layout::new::<GroupSlot>();
        // SAFETY: `GroupSlot` is atomics only, for which all zero bytes are valid, and not zero-sized.
        let page = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<GroupSlot>();
        if page.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `page` is ours alone (nothing refers to it yet), `layout.size()` bytes long, and
        // came from the global allocator with `GroupSlot`'s layout, as `Box` frees it.
        let (read, page) = unsafe { (pread_exact(file, self.geometry.groups_offset() + group * PAGE, page.cast(), layout.size()), Box::from_raw(page)) };
        read.map(|()| page)
    }

    /// Writes the controller's record of the process in slot `slot` into the ledger file's own
    /// page under that slot (`ProcessRecord`: hidden from every view by the group's memory,
    /// never handed to a process). The controller only; not on any hot path.
    pub fn save_process_record(&self, slot: usize, record: &ProcessRecord) -> io::Result<()> {
        let Some(file) = &self.backing else { return Ok(()) };
        let offset = self.record_offset(slot);
        // SAFETY: `record` is `size_of::<ProcessRecord>()` readable bytes; pwrite only reads them,
        // into the file at an offset inside it (checked by `record_offset`).
        unsafe { pwrite_all(file, offset, (record as *const ProcessRecord).cast(), size_of::<ProcessRecord>()) }
    }

    /// Empties the record under process slot `slot` (the slot is nobody's).
    pub fn clear_process_record(&self, slot: usize) -> io::Result<()> {
        self.save_process_record(slot, &ProcessRecord::none())
    }

    /// The controller's record of the process in slot `slot` (`save_process_record`'s, or
    /// `ProcessRecord::none()` where none was written), read from the ledger file past the
    /// group's memory that hides it in this view.
    pub fn process_record(&self, slot: usize) -> io::Result<ProcessRecord> {
        let file = self.backing.as_ref().ok_or_else(|| io::Error::other("this ledger view has no file behind it"))?;
        let offset = self.record_offset(slot);
        let mut record = ProcessRecord::none();
        // SAFETY: pread into a local `ProcessRecord` of its size; every byte pattern is a valid
        // `ProcessRecord` (integers and a byte array only).
        unsafe { pread_exact(file, offset, (&mut record as *mut ProcessRecord).cast(), size_of::<ProcessRecord>()) }?;
        Ok(record)
    }

    fn record_offset(&self, slot: usize) -> usize {
        assert!(slot < self.geometry.max_procs as usize);
        let offset = self.geometry.procs_offset() + slot * PAGE + RECORD_OFFSET;
        assert!(offset + size_of::<ProcessRecord>() <= self.len);
        offset
    }

    fn write_group_page(&self, group: usize, from: *const u8) -> io::Result<()> {
        let Some(file) = &self.backing else { return Ok(()) };
        assert!(group < self.geometry.max_groups as usize);
        let (len, offset) = (size_of::<GroupSlot>(), self.geometry.groups_offset() + group * PAGE);
        // SAFETY: `from` points to `len` readable bytes (a `GroupSlot` or a buffer of its size);
        // pwrite only reads them, into the file at an offset inside it.
        unsafe { pwrite_all(file, offset, from, len) }
    }

    /// Maps the device memory over this view's device table.
    pub fn map_device_memory(&self, devices: BorrowedFd<'_>) -> io::Result<()> {
        let g = self.geometry;
        self.overlay(g.devices_offset(), g.groups_offset() - g.devices_offset(), Some(devices))
    }

    /// Maps group `group`'s page from its memory (`None`: back to the ledger file's own page).
    pub fn map_group_page(&self, group: usize, counters: Option<BorrowedFd<'_>>) -> io::Result<()> {
        assert!(group < self.geometry.max_groups as usize);
        self.overlay(self.geometry.groups_offset() + group * PAGE, PAGE, counters)
    }

    /// Maps process slot `slot` from its group's memory (`None`: back to the file's own page).
    pub fn map_process_page(&self, slot: usize, counters: Option<BorrowedFd<'_>>) -> io::Result<()> {
        assert!(slot < self.geometry.max_procs as usize);
        self.overlay(self.geometry.procs_offset() + slot * PAGE, PAGE, counters)
    }

    fn index_at<T>(&self, offset: usize) -> &T {
        assert!(offset + size_of::<T>() <= self.len);
        // SAFETY: in range (checked), 8-aligned (the index starts on a page), atomics only.
        unsafe { &*(self.base.add(offset) as *const T) }
    }

    /// The controller's record of group `group`'s memory (in the ledger file only).
    pub fn group_index(&self, group: usize) -> &GroupIndex {
        assert!(group < self.geometry.max_groups as usize);
        self.index_at(self.geometry.index_offset() + group * size_of::<GroupIndex>())
    }

    /// The controller's record of whose memory holds process slot `slot`.
    pub fn process_index(&self, slot: usize) -> &ProcessIndex {
        assert!(slot < self.geometry.max_procs as usize);
        let groups = self.geometry.max_groups as usize * size_of::<GroupIndex>();
        self.index_at(self.geometry.index_offset() + groups + slot * size_of::<ProcessIndex>())
    }

    /// A shim's view: its group's memory, with the shared device memory over the device table.
    pub fn map_group_view(counters: BorrowedFd<'_>, devices: BorrowedFd<'_>) -> Result<Ledger, LedgerError> {
        let ledger = Ledger::map_fd(counters, "(the group's memory)")?;
        ledger.map_device_memory(devices).map_err(|error| LedgerError::Io {
            what: "map the device memory of".into(),
            path: "(the controller's)".into(),
            error,
        })?;
        Ok(ledger)
    }

    /// Finds the memfds this ledger's index names among the descriptors of every process this
    /// one may look into (by inode: a name proves nothing), and maps them into this view: the
    /// device table, each group's page and each member's slot. What is not found stays the
    /// file's own page (zeros: no group there).
    pub fn reclaim(&self) -> Reclaimed {
        let mut wanted: HashMap<u64, (char, usize)> = HashMap::new();
        let devices_inode = self.header().devices_inode.load(Relaxed);
        if devices_inode != 0 {
            wanted.insert(devices_inode, ('d', 0));
        }
        for g in 0..self.geometry.max_groups as usize {
            let index = self.group_index(g);
            for (kind, inode) in [('c', index.counters_inode.load(Relaxed)), ('s', index.settings_inode.load(Relaxed))] {
                if inode != 0 {
                    wanted.insert(inode, (kind, g));
                }
            }
        }
        let mut found = Reclaimed::default();
        if !wanted.is_empty() {
            find_memfds(&mut wanted, &mut found);
        }
        if let Some(d) = &found.devices {
            let _ = self.map_device_memory(std::os::fd::AsFd::as_fd(d));
        }
        for (&g, fd) in &found.counters {
            let _ = self.map_group_page(g, Some(std::os::fd::AsFd::as_fd(fd)));
        }
        for slot in 0..self.geometry.max_procs as usize {
            let owner = self.process_index(slot).group_plus_one.load(Relaxed);
            if let Some(fd) = owner.checked_sub(1).and_then(|g| found.counters.get(&(g as usize))) {
                let _ = self.map_process_page(slot, Some(std::os::fd::AsFd::as_fd(fd)));
            }
        }
        found
    }
}

/// Reads exactly `len` bytes of `fd` at `offset` into `to`; a short read is an error (the ledger
/// file's copies are whole pages or nothing).
///
/// # Safety
/// `to` is valid for writes of `len` bytes, and any bytes are a valid value of what it points to.
unsafe fn pread_exact(fd: &OwnedFd, offset: usize, to: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller's promise on `to`; pread writes at most `len` bytes there.
    let n = unsafe { libc::pread(fd.as_raw_fd(), to.cast(), len, offset as libc::off_t) };
    match n {
        n if n == len as isize => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
    }
}

/// Writes exactly `len` bytes from `from` into `fd` at `offset`; a short write is an error.
///
/// # Safety
/// `from` is valid for reads of `len` bytes.
unsafe fn pwrite_all(fd: &OwnedFd, offset: usize, from: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller's promise on `from`; pwrite only reads `len` bytes there.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), from.cast(), len, offset as libc::off_t) };
    match n {
        n if n == len as isize => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::from(io::ErrorKind::WriteZero)),
    }
}

/// Whether process `pid` holds the memfd of ours with inode `inode`, open or mapped (the kernel's
/// word that it was handed that group's memory: a restarted controller's check of a process
/// slot it has no record of). Mappings are seen only with CAP_SYS_ADMIN, as in `reclaim`.
pub fn holds_memory(pid: u32, inode: u64) -> bool {
    inode != 0
        && memfd_paths(&std::path::Path::new("/proc").join(pid.to_string()))
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| made_by_us(&m) && std::os::unix::fs::MetadataExt::ino(&m) == inode))
}

/// Whether a memfd found in another process was made by this controller's uid: an inode
/// number is unique only while its memfd lives, so one a tenant made (owned by the tenant's
/// uid) that got a number the ledger recorded for memory long gone must not pass for ours.
fn made_by_us(meta: &std::fs::Metadata) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    std::os::unix::fs::MetadataExt::uid(meta) == unsafe { libc::geteuid() }
}

/// The memfds of ours process directory `proc` (`/proc/PID`) holds: its descriptors
/// (`fd/N`) and, for one that closed them, its mappings (`map_files/RANGE`, which needs
/// CAP_SYS_ADMIN to open or stat).
fn memfd_paths(proc: &std::path::Path) -> Vec<std::path::PathBuf> {
    let ours = format!("/memfd:{NAME_PREFIX}");
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Ok(fds) = std::fs::read_dir(proc.join("fd")) {
        candidates.extend(fds.flatten().map(|fd| fd.path()).filter(|p| std::fs::read_link(p).is_ok_and(|t| t.to_string_lossy().starts_with(&ours))));
    }
    if let Ok(maps) = std::fs::read_to_string(proc.join("maps")) {
        let ranges = maps.lines().filter(|l| l.contains(&ours)).filter_map(|l| l.split_whitespace().next());
        candidates.extend(ranges.map(|range| proc.join("map_files").join(range)));
    }
    candidates
}

/// Walks every process's descriptors (`/proc/PID/fd`) and, for a process that closed them,
/// its mappings (`/proc/PID/map_files`, which needs CAP_SYS_ADMIN) for memfds of ours whose
/// inode is wanted, opening each once.
fn find_memfds(wanted: &mut HashMap<u64, (char, usize)>, found: &mut Reclaimed) {
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for entry in procs.flatten() {
        if wanted.is_empty() {
            return;
        }
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for path in memfd_paths(&entry.path()) {
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            if !made_by_us(&meta) {
                continue;
            }
            let ino = std::os::unix::fs::MetadataExt::ino(&meta);
            let Some((kind, group)) = wanted.get(&ino).copied() else { continue };
            let Ok(opened) = reopen(&path.to_string_lossy(), libc::O_RDWR) else { continue };
            wanted.remove(&ino);
            match kind {
                'd' => found.devices = Some(opened),
                'c' => drop(found.counters.insert(group, opened)),
                _ => drop(found.settings.insert(group, opened)),
            }
        }
    }
}

/// A group's published settings: one page holding a `GroupSlot` whose settings (limits,
/// shares, the throttled flag, priority, name, state) the controller writes and shims read
/// through a read-only mapping (its counters are unused), then one page of `MemberSettings`
/// (each member's own priority, the group's penalty), read-only to members the same way.
pub struct SettingsPage {
    base: *mut u8,
}

/// The size of a settings memfd: the group's page, then its members' page.
pub const SETTINGS_SIZE: usize = 2 * PAGE;

// SAFETY: every field reachable through the mapping is an atomic.
unsafe impl Send for SettingsPage {}
// SAFETY: as for Send: shared access goes through atomics only.
unsafe impl Sync for SettingsPage {}

impl Drop for SettingsPage {
    fn drop(&mut self) {
        // SAFETY: base came from mmap of SETTINGS_SIZE bytes.
        unsafe { libc::munmap(self.base.cast(), SETTINGS_SIZE) };
    }
}

impl SettingsPage {
    /// A new page for group `group`, mapped read-write, and its descriptor.
    pub fn create(group: usize) -> io::Result<(SettingsPage, OwnedFd)> {
        let fd = sealed_memfd(&format!("settings-{group}"), SETTINGS_SIZE)?;
        let page = SettingsPage::map(std::os::fd::AsFd::as_fd(&fd), true)?;
        let slot = page.slot();
        for d in &slot.devices {
            d.limit.store(UNLIMITED, Relaxed);
        }
        Ok((page, fd))
    }

    /// Maps a settings page; `writable` only for the controller (a read-only descriptor cannot
    /// be mapped so).
    pub fn map(fd: BorrowedFd<'_>, writable: bool) -> io::Result<SettingsPage> {
        // SAFETY: `libc::stat` is plain old data, for which all zero bytes are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into the local `st`; a bad descriptor is an error return, not UB.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if st.st_size as usize != SETTINGS_SIZE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a settings page of {} bytes, not {SETTINGS_SIZE}", st.st_size)));
        }
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a shared mapping of the whole of a descriptor of that size.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), SETTINGS_SIZE, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SettingsPage { base: base.cast() })
    }

    pub fn slot(&self) -> &GroupSlot {
        // SAFETY: one page, page aligned, the size of a GroupSlot; atomics only (a read-only
        // mapping is only ever loaded from by the shim).
        unsafe { &*(self.base as *const GroupSlot) }
    }

    /// The members' page: their own priorities and the group's penalty.
    pub fn members(&self) -> &MemberSettings {
        // SAFETY: the second page of the mapping, page aligned, the size of a MemberSettings
        // (asserted in `layout`'s tests); atomics only.
        unsafe { &*(self.base.add(PAGE) as *const MemberSettings) }
    }

    /// The pages for the shim, leaked: hooks hold references to them for the process's life.
    pub fn leak(self) -> (&'static GroupSlot, &'static MemberSettings) {
        let page: &'static SettingsPage = Box::leak(Box::new(self));
        (page.slot(), page.members())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A fresh ledger file in a temporary directory: (the directory, the path, the ledger).
    fn temp_ledger(geometry: Geometry) -> (tempfile::TempDir, String, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger").to_str().unwrap().to_string();
        let ledger = Ledger::create(&path, geometry).unwrap();
        (dir, path, ledger)
    }

    /// A memfd of ours that another uid owns (a tenant's, whose inode number the kernel reused
    /// for one the ledger recorded) is not taken for ours, by `holds_memory` nor `find_memfds`.
    /// Needs root to give the memfd to another uid; skipped otherwise.
    #[test]
    fn a_memfd_another_uid_owns_is_not_ours_whatever_its_inode() {
        let (_page, fd) = SettingsPage::create(0).unwrap();
        let ino = inode(fd.as_fd()).unwrap();
        let me = std::process::id();
        assert!(holds_memory(me, ino), "our own memfd, held by this process");
        let mut wanted = HashMap::from([(ino, ('s', 0usize))]);
        let mut found = Reclaimed::default();
        find_memfds(&mut wanted, &mut found);
        assert!(found.settings.contains_key(&0), "found while ours");
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped the other-uid half: needs root to chown a memfd");
            return;
        }
        // SAFETY: fchown on our own descriptor.
        assert_eq!(unsafe { libc::fchown(fd.as_raw_fd(), 65534, 65534) }, 0, "{}", io::Error::last_os_error());
        assert!(!holds_memory(me, ino), "another uid's memfd with the recorded inode");
        let mut wanted = HashMap::from([(ino, ('s', 0usize))]);
        let mut found = Reclaimed::default();
        find_memfds(&mut wanted, &mut found);
        assert!(found.settings.is_empty() && wanted.contains_key(&ino), "not taken for ours");
    }

    #[test]
    fn a_read_only_settings_page_cannot_be_written_truncated_or_reopened_for_writing() {
        let (page, fd) = SettingsPage::create(0).unwrap();
        page.slot().devices[0].limit.store(123, Relaxed);
        page.members().set_priority(7, Priority::High as u32);
        page.members().penalty[0].store(5, Relaxed);
        let ro = read_only(fd.as_fd()).unwrap();
        let seen = SettingsPage::map(ro.as_fd(), false).unwrap();
        assert_eq!(seen.slot().devices[0].limit.load(Relaxed), 123);
        assert_eq!((seen.members().priority_of(7, seen.slot()), seen.members().priority_of(8, seen.slot())), (Priority::High, Priority::Normal));
        assert_eq!(seen.members().penalty(0), 5);
        assert!(SettingsPage::map(ro.as_fd(), true).is_err(), "a writable mapping of the read-only descriptor");
        // SAFETY: the attacks a tenant would try on its own descriptor and mapping.
        unsafe {
            assert_ne!(libc::mprotect(seen.base.cast(), SETTINGS_SIZE, libc::PROT_READ | libc::PROT_WRITE), 0, "mprotect to writable");
            assert_ne!(libc::mprotect(seen.base.add(PAGE).cast(), PAGE, libc::PROT_READ | libc::PROT_WRITE), 0, "mprotect of the members' page");
            assert_ne!(libc::ftruncate(ro.as_raw_fd(), 0), 0, "ftruncate");
            assert_ne!(libc::fcntl(ro.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE), 0, "a seal");
            assert_ne!(libc::ftruncate(fd.as_raw_fd(), 0), 0, "the sealed page shrunk");
        }
        assert_eq!(page.slot().devices[0].limit.load(Relaxed), 123);
        assert_eq!(page.members().penalty(0), 5);
    }

    #[test]
    fn group_memory_is_sealed_against_truncation_and_growth() {
        let (_dir, _, ledger) = temp_ledger(Geometry { max_groups: 2, max_procs: 2 });
        let fd = ledger.new_group_memory(1).unwrap();
        let size = Geometry { max_groups: 2, max_procs: 2 }.file_size() as libc::off_t;
        // SAFETY: truncating and growing our own descriptor: both must fail.
        unsafe {
            assert_ne!(libc::ftruncate(fd.as_raw_fd(), 0), 0);
            assert_ne!(libc::ftruncate(fd.as_raw_fd(), size * 2), 0);
            assert_ne!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE), 0);
        }
        ledger.map_group_page(1, Some(fd.as_fd())).unwrap();
        ledger.group(1).devices[0].used.store(77, Relaxed);
        let view = Ledger::map_group_view(fd.as_fd(), ledger.new_device_memory().unwrap().as_fd()).unwrap();
        assert_eq!(view.group(1).devices[0].used.load(Relaxed), 77, "the shim's view shares the controller's page");
        assert_eq!(view.group(0).devices[0].used.load(Relaxed), 0);
        ledger.map_group_page(1, None).unwrap();
        assert_eq!(ledger.group(1).devices[0].used.load(Relaxed), 0, "the file's own page is back");
    }

    #[test]
    fn a_second_view_finds_the_memory_again_by_inode() {
        let geometry = Geometry { max_groups: 4, max_procs: 4 };
        let (_dir, file, first) = temp_ledger(geometry);
        let devices = first.new_device_memory().unwrap();
        first.map_device_memory(devices.as_fd()).unwrap();
        first.header().devices_inode.store(inode(devices.as_fd()).unwrap(), Relaxed);
        let counters = first.new_group_memory(2).unwrap();
        first.map_group_page(2, Some(counters.as_fd())).unwrap();
        first.group_index(2).counters_inode.store(inode(counters.as_fd()).unwrap(), Relaxed);
        first.map_process_page(3, Some(counters.as_fd())).unwrap();
        first.process_index(3).group_plus_one.store(3, Relaxed);
        first.group(2).devices[1].used.store(5, Relaxed);
        first.process(3).devices[1].used.store(5, Relaxed);
        first.device(0).total_memory.store(9, Relaxed);
        // A restarted controller: the same file, the memory held by a live process (this one).
        let (second, adopted) = Ledger::open_or_create(&file, geometry).unwrap();
        assert!(adopted);
        assert_eq!(second.group(2).devices[1].used.load(Relaxed), 0, "not mapped yet");
        let found = second.reclaim();
        assert!(found.devices.is_some() && found.counters.contains_key(&2), "found the memory");
        assert_eq!(second.group(2).devices[1].used.load(Relaxed), 5);
        assert_eq!(second.process(3).devices[1].used.load(Relaxed), 5);
        assert_eq!(second.device(0).total_memory.load(Relaxed), 9);
    }

    /// The controller's record of a process lives in the ledger file under the slot, where the
    /// group's memory hides it: a member's view of the slot (its whole page, written end to end)
    /// neither shows nor changes it, a second view of the file (a restarted controller) reads
    /// it back, and where the file's own page shows through the slot still reads as free.
    #[test]
    fn a_process_record_is_out_of_every_members_reach() {
        let geometry = Geometry { max_groups: 2, max_procs: 2 };
        let (_dir, file, first) = temp_ledger(geometry);
        let counters = first.new_group_memory(1).unwrap();
        first.map_process_page(1, Some(counters.as_fd())).unwrap();
        let mut record = ProcessRecord::none();
        record.magic = RECORD_MAGIC;
        record.pid = 4242;
        record.caps[0] = 256 << 20;
        first.save_process_record(1, &record).unwrap();
        let view = Ledger::map_group_view(counters.as_fd(), first.new_device_memory().unwrap().as_fd()).unwrap();
        let slot = view.process(1);
        for w in &slot._page {
            assert_eq!(w.load(Relaxed), 0, "a member's page holds none of it");
            w.store(u64::MAX, Relaxed);
        }
        slot.pid.store(1, Relaxed);
        let (second, _) = Ledger::open_or_create(&file, geometry).unwrap();
        assert_eq!(second.process_record(1).unwrap(), record, "read back past the group's memory");
        assert_eq!(first.process_record(1).unwrap(), record);
        assert_ne!(second.process(1).state.load(Relaxed), LIVE, "the file's own page is not a live slot");
        second.clear_process_record(1).unwrap();
        assert_eq!(first.process_record(1).unwrap(), ProcessRecord::none());
    }

    /// The ledger file's device pages are the controller's record of the device table: written
    /// from the table it is given, never from the shared device memory (a member's UUID and turn
    /// words there do not reach the file, nor new device memory made from it); taken by the next
    /// controller start, and not after a start that kept no record (a controller from before
    /// the record, which only counts its start and copies the shared table over the record).
    #[test]
    fn the_device_record_is_the_controllers_table_and_holds_for_an_unbroken_chain_of_starts() {
        let geometry = Geometry { max_groups: 2, max_procs: 2 };
        let (_dir, file, first) = temp_ledger(geometry);
        assert!(first.device_record().unwrap_err().contains("no record"), "never written");
        first.count_controller_start();
        let devices = first.new_device_memory().unwrap();
        first.map_device_memory(devices.as_fd()).unwrap();
        // A member's writes into the shared table.
        write_text(&first.device(0).uuid, "GPU-b");
        first.device(0).state.store(LIVE, Relaxed);
        first.device(0).sched.turn.holder.store(7, Relaxed);
        first.save_device_table(&[Some(("GPU-a", 9)), None]).unwrap();
        let want = |uuid: &str, total| Some(KnownDevice { uuid: uuid.into(), total_memory: total });
        let record = first.device_record().unwrap();
        assert_eq!((record.len(), &record[0], record[1..].iter().all(Option::is_none)), (MAX_DEVICES, &want("GPU-a", 9), true));
        // A restart: the same file, the next start.
        let (second, _) = Ledger::open_or_create(&file, geometry).unwrap();
        second.count_controller_start();
        assert_eq!(second.device_record().unwrap()[0], want("GPU-a", 9), "carried over to the next start");
        second.map_device_memory(second.new_device_memory().unwrap().as_fd()).unwrap();
        assert_eq!((second.device(0).uuid(), second.device(0).sched.turn.holder.load(Relaxed)), ("GPU-a".to_string(), 0), "new memory from the record only");
        // A controller that keeps no record starts and goes: the chain is broken.
        second.header().controller_starts.fetch_add(1, AcqRel);
        let (third, _) = Ledger::open_or_create(&file, geometry).unwrap();
        third.count_controller_start();
        assert!(third.device_record().unwrap_err().contains("ran since"), "{:?}", third.device_record());
        third.save_device_table(&[None, Some(("GPU-c", 1))]).unwrap();
        assert_eq!(third.device_record().unwrap()[..2], [None, want("GPU-c", 1)], "written again: taken again");
    }

    #[test]
    fn memory_mapped_but_no_longer_open_is_found_through_the_mappings() {
        let geometry = Geometry { max_groups: 2, max_procs: 2 };
        let (_dir, file, first) = temp_ledger(geometry);
        let view = {
            let counters = first.new_group_memory(1).unwrap();
            first.group_index(1).counters_inode.store(inode(counters.as_fd()).unwrap(), Relaxed);
            Ledger::map_group_view(counters.as_fd(), first.new_device_memory().unwrap().as_fd()).unwrap()
            // The descriptors close here; the mapping stays (a program that closed every descriptor).
        };
        view.group(1).devices[0].used.store(42, Relaxed);
        drop(first);
        let (second, _) = Ledger::open_or_create(&file, geometry).unwrap();
        assert!(second.reclaim().counters.contains_key(&1));
        assert_eq!(second.group(1).devices[0].used.load(Relaxed), 42);
    }

    /// The allocation hot path before and after the split, in one run: `try_charge` with the
    /// limit in the group's own (file-backed) slot, as in layout 4, against `try_charge_under`
    /// on a group's memfd with the limit in a read-only settings page. Plain loads and one
    /// compare-and-swap either way: no system call, no lock.
    #[test]
    #[ignore = "a micro-benchmark: cargo test -p gpuslice-common --lib hot_path -- --ignored --nocapture"]
    fn hot_path_before_and_after_the_split() {
        const N: u32 = 2_000_000;
        let (_dir, _, ledger) = temp_ledger(Geometry { max_groups: 4, max_procs: 4 });
        let time = |charge: &dyn Fn() -> bool| {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let start = std::time::Instant::now();
                for _ in 0..N {
                    assert!(charge());
                }
                best = best.min(start.elapsed().as_nanos() as f64 / f64::from(N));
            }
            best
        };
        let (group, process) = (ledger.group(0), ledger.process(0));
        group.devices[0].limit.store(1 << 40, Relaxed);
        let before = time(&|| {
            let ok = process.try_charge(group, 0, 4096).is_ok();
            process.uncharge(group, 0, 4096);
            ok
        });
        let counters = ledger.new_group_memory(1).unwrap();
        ledger.map_group_page(1, Some(counters.as_fd())).unwrap();
        ledger.map_process_page(1, Some(counters.as_fd())).unwrap();
        let view = Ledger::map_group_view(counters.as_fd(), ledger.new_device_memory().unwrap().as_fd()).unwrap();
        let (page, fd) = SettingsPage::create(1).unwrap();
        page.slot().devices[0].limit.store(1 << 40, Relaxed);
        let settings = SettingsPage::map(read_only(fd.as_fd()).unwrap().as_fd(), false).unwrap();
        let (group, process, limits, members) = (view.group(1), view.process(1), settings.slot(), settings.members());
        process.reset(); // As the controller gives a slot out: no cap of its own.
        let after = time(&|| {
            let ok = process.try_charge_under(group, limits, members.penalty(0), 0, 4096).is_ok();
            process.uncharge(group, 0, 4096);
            ok
        });
        println!("try_charge + uncharge, best of 5 x {N}: layout 4 (file, limit in the group slot) {before:.1} ns; layout 6 (memfd, limit and penalty from the read-only settings pages) {after:.1} ns");
    }
}
