//! The ledger's layout: constants, the `#[repr(C)]` header and slots (mirrored in
//! `include/gpuslice.h`), geometry, and the plain helpers of a slot (names, reset).

use super::sched::DeviceSched;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::*};

/// "GPUSLDGR" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GPUSLDGR");
/// Bumped whenever any offset, size or meaning below changes.
pub const LAYOUT_VERSION: u32 = 7;
/// Group and process slots each fill one page, so that each can be mapped from its own
/// group's memory (see `regions`).
pub const PAGE: usize = 4096;
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
    /// The inode of the shared device memory (`regions`), so that a restarted controller
    /// recognises it among the descriptors of live processes; 0 when none.
    pub devices_inode: AtomicU64,
    /// Where the controller's index of group memory begins (`GroupIndex`, then `ProcessIndex`).
    pub index_offset: AtomicU64,
}

/// The controller's record of a group's memory, in the root-only ledger file only: which
/// memfds hold its counters and its published settings (inodes), for a restart.
#[repr(C)]
pub struct GroupIndex {
    pub counters_inode: AtomicU64,
    pub settings_inode: AtomicU64,
}

/// The controller's record of which group's memory holds a process slot: the group's index
/// plus one, 0 when the slot is unassigned.
#[repr(C)]
pub struct ProcessIndex {
    pub group_plus_one: AtomicU64,
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

/// A group's figures on one device.
#[repr(C)]
pub struct GroupDevice {
    pub limit: AtomicU64,
    pub used: AtomicU64,
    /// Percent of the device's time, 1..=99; 0 when not throttled. The *guarantee* (issue 18):
    /// the least the group gets whenever it has work.
    pub share: AtomicU32,
    // --- issue 18 (guarantee, cap, lending): written by the controller (settings page) ---
    /// The most the group may get, percent: 0 = the share is also the cap (nothing is lent to
    /// it: the meaning before issue 18, and what a zeroed page says); 100 = no cap; a value
    /// below the share counts as the share. Was `_pad` (layout unchanged).
    pub cap: AtomicU32,
    // --- end of issue 18's fields ---
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
    /// What pinned the group (`Origin` as u32), in the controller's published settings and the
    /// ledger file's copy of them: a restarted controller unpins a config group the new config
    /// no longer names, and keeps one a live `set --create` made. Was `_reserved[0]`'s low half,
    /// always zero, which reads as `Origin::Unrecorded` (layout unchanged).
    pub origin: AtomicU32,
    pub _origin_pad: AtomicU32,
    /// Who may join the group (`Owner::word`): any uid, or only the uid from whose process's
    /// environment it was made. On the published settings page (read-only to members) and the
    /// ledger file's copy of it, which a restarted controller reads it back from; never taken
    /// from the members' writable copy (the controller does not mirror it there). Was
    /// `_reserved[0]`, always zero, which reads as `Owner::Unrecorded` (layout unchanged).
    pub owner: AtomicU64,
    /// A config group's section of the config file as the controller last applied it
    /// (`config_section_hash`; 0: none recorded), on the published settings page and the ledger
    /// file's copy: a restarted controller applies the section again only when it changed, so
    /// an edited config file takes effect at a restart while live edits survive one that
    /// changed nothing. Was `_reserved[0]`, always zero (layout unchanged).
    pub config_hash: AtomicU64,
    pub _reserved: [AtomicU64; 1],
    pub devices: [GroupDevice; MAX_DEVICES],
    /// To the end of the page.
    pub _page: [AtomicU64; (PAGE - 128 - 64 * MAX_DEVICES) / 8],
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
    /// Layout 5's `penalty`: the controller's charge now lives where no member can write it
    /// (`MemberSettings::penalty`). Unused.
    pub _was_penalty: AtomicU64,
    /// Wall time this process waited for its turn on the device among throttled processes
    /// (ns; part of `throttled_ns`).
    pub turn_wait_ns: AtomicU64,
    /// Room for later per-process figures without another layout change.
    pub _reserved: [AtomicU64; 7],
}

#[repr(C)]
pub struct ProcessSlot {
    pub state: AtomicU32,
    /// The pid as the controller sees it (`SO_PEERCRED`, translated into its namespace).
    pub pid: AtomicU32,
    pub group: AtomicU32,
    /// Layout 5's `priority`: a process's own priority now lives where no member can write it
    /// (`MemberSettings::priority`). Unused.
    pub _was_priority: AtomicU32,
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
    /// The token the process names itself by in device state (see `Turn`): drawn by the
    /// controller at registration and written here before the slot is handed out, for the
    /// process to take as its own (a controller from before branch turntoken left 0, and the
    /// process wrote its own random one). The controller keeps its own copy (`ProcessRecord::
    /// token`) and frees a turn the process still holds when it goes by that copy, never by
    /// this word, which the process (and its group) may rewrite.
    pub token: AtomicU64,
    // --- Issue 22 (branch i22vmm): the suspend agent's answers, written by the process. ---
    /// The agent's acknowledgement of the group's `MemberSettings::suspend` request:
    /// `generation << 4 | SUSPEND_*` (0: never asked, or no agent). A futex word: the agent
    /// `FUTEX_WAKE`s it after each change, the controller waits on it.
    pub suspend_ack: AtomicU32,
    /// Why the last request failed (`SUSPEND_ERR_*` | the CUDA code << 16), with `SUSPEND_FAILED`.
    pub suspend_error: AtomicU32,
    /// Device bytes the last suspension moved to host memory (and the resume back).
    pub suspend_bytes: AtomicU64,
    /// How long the last suspension or resume took, in ms.
    pub suspend_ms: AtomicU32,
    /// What the agent can do (`CAP_*`): a claim, checked against NVML before it counts.
    pub suspend_caps: AtomicU32,
    /// Device bytes the agent expects its process to keep on the device while suspended (its
    /// contexts, modules, and memory that is not VMM-backed: what it charged and did not move),
    /// written with each "suspended" answer. A claim: the controller compares NVML with it.
    pub suspend_keep: AtomicU64,
    // --- end of issue 22's fields (they were `_reserved[0..3]`) ---
    pub devices: [ProcessDevice; MAX_DEVICES],
    // --- Issue 22 (branch i22fix): per-member requests and the agent's time split. ---
    /// The controller's request to this process's agent: `generation << 1 | wanted` (1
    /// suspended, 0 running); 0 = never asked. Written by the controller before it rings the
    /// group's `MemberSettings::suspend`, so that a request reaches only the members it names
    /// (a member the driver's checkpoint suspends must not be suspended by its agent too). In
    /// the tenant's writable slot: a process can only ask its own agent, i.e. suspend itself.
    pub suspend_request: AtomicU32,
    /// 1 while this process's agent holds it suspended (gate closed, memory on the host), 0
    /// otherwise: written by the agent. The controller asks back every member that says 1.
    pub suspend_held: AtomicU32,
    /// Allocations the last suspension or resume moved.
    pub suspend_ranges: AtomicU32,
    /// How long, in ms, the agent's gate may wait for the process's calls in flight at the
    /// suspension this slot's `suspend_request` asks for (branch lockwait; was padding): written
    /// by the controller before that request, so that the suspension policy bounds a candidate
    /// by its request's wait. 0 = the agent's own 10 s; more than that is read as 10 s. In the
    /// tenant's writable slot: a process can only shorten its own agent's wait, i.e. refuse its
    /// own suspension, which it could anyway.
    pub suspend_gate_ms: AtomicU32,
    /// The last suspension's and resume's time split, in µs, by `PHASE_*`.
    pub suspend_phase_us: [AtomicU32; PHASES],
    /// To the end of the page.
    pub _page: [AtomicU64; (PAGE - 128 - 128 * MAX_DEVICES - 16 - 4 * PHASES) / 8],
}

// ---- Issue 13 (branch i13c): per-process settings only the controller writes. ----
// A process's own priority and the cross-check's penalty used to sit in its writable process
// slot, restored by the controller each tick: between ticks a member could raise its priority
// or clear its penalty. They now live on the second page of the group's settings memfd, which
// members map read-only like the first (`regions::SettingsPage`).

/// Process slots whose own priority a settings page can hold (one byte each): the ceiling on a
/// ledger's `max_procs` (the controller refuses a larger geometry).
pub const MEMBER_PRIORITIES: usize = PAGE - 8 * MAX_DEVICES - 8;

/// `MemberSettings::marks`: set once `gpuslice set --suspendable` decided the two below (a
/// restarted controller takes them over the config file's, as it keeps other live edits).
pub const MARK_EDITED: u32 = 1;
/// The suspension policy may suspend the group (issue 22).
pub const MARK_SUSPENDABLE: u32 = 2;
/// ... even while it exports memory.
pub const MARK_ALLOW_EXPORTS: u32 = 4;

/// The group's memory is served VMM-backed and suspended by the members' own agents where they
/// can (`suspend_path = "shim"` or `"auto"`); without it the driver's checkpoint is used.
pub const MARK_SHIM_PATH: u32 = 8;
/// With `MARK_SHIM_PATH`: `suspend_path = "auto"` (each member by the shim where it can).
pub const MARK_PATH_AUTO: u32 = 16;

// `ProcessSlot::suspend_ack`'s state (its low 4 bits).
pub const SUSPEND_SUSPENDING: u32 = 1;
pub const SUSPEND_SUSPENDED: u32 = 2;
pub const SUSPEND_RESUMING: u32 = 3;
pub const SUSPEND_RUNNING: u32 = 4;
pub const SUSPEND_FAILED: u32 = 5;
// `ProcessSlot::suspend_error`'s reason (low 16 bits; the CUDA code in the high 16).
/// Resume found no room on the device: nothing kept, still suspended; the controller retries.
pub const SUSPEND_ERR_NO_ROOM: u32 = 1;
/// The gate could not close (calls in flight past the timeout): still running.
pub const SUSPEND_ERR_BUSY: u32 = 2;
/// A driver call failed (its code in the high 16 bits).
pub const SUSPEND_ERR_DRIVER: u32 = 3;
/// The process was handed a driver entry point that does not pass the gate (`CAP_FAST` lost):
/// its calls could reach released memory, so the agent refuses; it runs on.
pub const SUSPEND_ERR_HOLE: u32 = 4;
// `ProcessSlot::suspend_caps`.
/// The process runs a suspend agent (a member of a group marked for the shim path).
pub const CAP_AGENT: u32 = 1;
/// Every entry point passes the gate (`sys::gate::fast_suspendable`).
pub const CAP_FAST: u32 = 2;
/// It holds device memory that is not VMM-backed by the shim (the agent cannot move it).
pub const CAP_OTHER_MEMORY: u32 = 4;

// `ProcessSlot::suspend_phase_us`: where an agent's suspension and resume spent their time.
/// Suspension: closing the gate (waiting for calls in flight to leave the driver).
pub const PHASE_GATE: usize = 0;
/// Suspension: `cuCtxSynchronize` of every context (work already queued on the device).
pub const PHASE_SYNC: usize = 1;
/// Suspension: `cuMemHostAlloc` of the host copies (pinning), while earlier copies run.
pub const PHASE_PIN: usize = 2;
/// Suspension: issuing the device-to-host copies and waiting for them, less `PHASE_PIN`.
pub const PHASE_COPY_OUT: usize = 3;
/// Suspension: `cuMemUnmap` + `cuMemRelease` of the physical memory.
pub const PHASE_RELEASE: usize = 4;
/// Resume: `cuMemCreate` + `cuMemMap` + `cuMemSetAccess` at the recorded addresses.
pub const PHASE_MAP: usize = 5;
/// Resume: issuing the host-to-device copies and waiting for them.
pub const PHASE_COPY_IN: usize = 6;
/// Resume: freeing the host copies (`cuMemFreeHost`; for the ring's pageable copies, only
/// handing their `munmap` to a background thread).
pub const PHASE_HOST_FREE: usize = 7;
// Branch i22fast: the staging ring's phases (zero on the whole-range pinned path).
/// Suspension: pinning the staging ring (`cuMemHostAlloc`), only the first time (0 after).
pub const PHASE_RING: usize = 8;
/// Suspension: `mmap` + `madvise` of the pageable host copies.
pub const PHASE_HOST_ALLOC: usize = 9;
/// Suspension: the workers' memcpy from the ring into the pageable copies (first touch, so the
/// page faults too), averaged over the workers; inside `PHASE_COPY_OUT`'s wall time.
pub const PHASE_MEMCPY_OUT: usize = 10;
/// Resume: the workers' memcpy from the pageable copies into the ring, averaged over the
/// workers; inside `PHASE_COPY_IN`'s wall time.
pub const PHASE_MEMCPY_IN: usize = 11;
/// How many phases `ProcessSlot::suspend_phase_us` has room for.
pub const PHASES: usize = 12;
/// The phases' names, by index (logs and `ls --json`).
pub const PHASE_NAMES: [&str; PHASES] =
    ["gate", "sync", "pin", "copy_out", "release", "map", "copy_in", "host_free", "ring", "host_alloc", "memcpy_out", "memcpy_in"];
/// A suspension's phases, in the order logs print them.
pub const PHASES_OUT: [usize; 8] = [PHASE_GATE, PHASE_SYNC, PHASE_RING, PHASE_PIN, PHASE_HOST_ALLOC, PHASE_COPY_OUT, PHASE_MEMCPY_OUT, PHASE_RELEASE];
/// A resume's phases, in the order logs print them.
pub const PHASES_IN: [usize; 4] = [PHASE_MAP, PHASE_COPY_IN, PHASE_MEMCPY_IN, PHASE_HOST_FREE];

/// `MemberSettings::suspend`'s word for request `generation`.
pub const fn suspend_request(generation: u32, wanted: bool) -> u32 {
    generation << 1 | wanted as u32
}

/// `ProcessSlot::suspend_ack`'s word: the generation answered and its state.
pub const fn suspend_ack(generation: u32, state: u32) -> u32 {
    (generation << 4) | (state & 0xf)
}

/// The second page of a group's settings: what the controller decides per member.
#[repr(C)]
pub struct MemberSettings {
    /// Bytes the controller charges the group on each device on top of its members' reports:
    /// the sum of the cross-check's penalties of its members (the driver shows them holding
    /// more than they report). A limit check counts `used + penalty`.
    pub penalty: [AtomicU64; MAX_DEVICES],
    /// The group's suspension marks as last edited live (`MARK_*`; 0: never edited).
    pub marks: AtomicU32,
    /// The ring for the members' suspend agents (issue 22, the shim path): the controller's
    /// latest request, `generation << 1 | wanted` (1 suspended, 0 running); 0 = never asked. A
    /// futex word the agents sleep on: the controller writes each addressed member's own
    /// `ProcessSlot::suspend_request` first, then this word, and `FUTEX_WAKE`s it. Was
    /// `_marks_pad` (layout unchanged).
    pub suspend: AtomicU32,
    /// By process slot index: that process's own priority (`Priority` as u8), or
    /// `PRIORITY_INHERIT` for its group's.
    pub priority: [AtomicU8; MEMBER_PRIORITIES],
}

impl MemberSettings {
    /// Process slot `slot`'s own priority, or `group`'s (its published settings) when it has none.
    #[inline]
    pub fn priority_of(&self, slot: usize, group: &GroupSlot) -> Priority {
        let own = self.priority.get(slot).map_or(PRIORITY_INHERIT, |p| u32::from(p.load(Relaxed)));
        Priority::from_u32(own).unwrap_or_else(|| group.priority())
    }

    /// The controller's extra charge on `device`.
    #[inline]
    pub fn penalty(&self, device: usize) -> u64 {
        self.penalty[device].load(Relaxed)
    }

    /// Sets process slot `slot`'s own priority (the controller only; out-of-range slots are
    /// never handed out, see `MEMBER_PRIORITIES`).
    pub fn set_priority(&self, slot: usize, priority: u32) {
        if let Some(p) = self.priority.get(slot) {
            p.store(Priority::from_u32(priority).map_or(PRIORITY_INHERIT as u8, |p| p as u8), Relaxed);
        }
    }
}
// ---- end of issue 13's block ----

// ---- Branch adopttrust: the controller's own record of each registered process. ----
// A process slot lives in its group's memory, which every member may write: its pid, uid,
// group, start time and cap there are the tenant's word. A restarted controller takes them
// from this record instead, kept where no member can reach it.

/// `ProcessRecord::magic` of a record the controller wrote ("GPUSPREC"). Its low half is not
/// `LIVE`, so a record never reads as a live slot where the file's page shows through.
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"GPUSPREC");
/// Bytes of `ProcessRecord::misbehaving`.
pub const RECORD_WHY_BYTES: usize = 128;

/// What the controller decided about the process in a slot it gave out: written by the
/// controller alone into the ledger file's own page under that slot, in the page's unused tail
/// (`ProcessSlot::_page`, at `RECORD_OFFSET`), with `pwrite`. While the slot is given out the
/// group's memory is mapped over that page in every view, and no process is handed the file
/// (root's, mode 0600), so no member can read or write it; the controller reads it back with
/// `pread` after a restart (`Ledger::process_record`). Not part of any view's slot, so not in
/// `gpuslice.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessRecord {
    /// `RECORD_MAGIC`; anything else: no record (a ledger from before the record, or a slot
    /// freed since).
    pub magic: u64,
    /// The group slot whose memory holds the slot, plus one: the same as `ProcessIndex`
    /// when the record is current.
    pub group_plus_one: u64,
    /// The pid as the controller sees it (`SO_PEERCRED`).
    pub pid: u32,
    /// The uid `SO_PEERCRED` gave at registration.
    pub uid: u32,
    /// /proc/PID/stat field 22 at registration: a restart keeps the process only if its pid
    /// still has this start time (0: it had none, and is never matched).
    pub start_time: u64,
    /// Bit `d`: the process was given ledger device `d`.
    pub devices: u64,
    /// Its own cap per device (`UNLIMITED`: none), as `gpuslice set --pid` set it.
    pub caps: [u64; MAX_DEVICES],
    /// The cross-check's charge per device (`crosscheck`).
    pub penalty: [u64; MAX_DEVICES],
    /// Why the controller found its slot rewritten (NUL-padded UTF-8; empty: never).
    pub misbehaving: [u8; RECORD_WHY_BYTES],
    /// The token the controller gave the process at registration (`ProcessSlot::token`): a
    /// restarted controller frees the turn it holds by this one. 0: none known (a record of a
    /// controller from before branch turntoken, whose tail here was never written; or a slot
    /// adopted without a record), and then no turn is freed for it early (its lease bounds it).
    /// Last, so that the fields before it sit where branch adopttrust's records have them.
    pub token: u64,
}

/// Where a `ProcessRecord` sits in the ledger file's page under a process slot: the slot's
/// unused tail, so that a slot read where the file's page shows through is unchanged by it.
pub const RECORD_OFFSET: usize = std::mem::offset_of!(ProcessSlot, _page);

impl ProcessRecord {
    /// No record: what a cleared page holds.
    pub fn none() -> ProcessRecord {
        ProcessRecord {
            magic: 0,
            group_plus_one: 0,
            pid: 0,
            uid: 0,
            start_time: 0,
            devices: 0,
            caps: [0; MAX_DEVICES],
            penalty: [0; MAX_DEVICES],
            misbehaving: [0; RECORD_WHY_BYTES],
            token: 0,
        }
    }

    /// Sets `misbehaving` (truncated on a character boundary; `None` clears it).
    pub fn set_misbehaving(&mut self, why: Option<&str>) {
        self.misbehaving = [0; RECORD_WHY_BYTES];
        let why = why.unwrap_or("");
        let mut end = why.len().min(RECORD_WHY_BYTES - 1);
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        self.misbehaving[..end].copy_from_slice(&why.as_bytes()[..end]);
    }

    pub fn misbehaving(&self) -> Option<String> {
        let end = self.misbehaving.iter().position(|&b| b == 0).unwrap_or(RECORD_WHY_BYTES);
        (end > 0).then(|| String::from_utf8_lossy(&self.misbehaving[..end]).into_owned())
    }
}
// ---- end of branch adopttrust's block ----

// ---- Branch devuuid: the controller's seal over its record of the device table. ----
// The device table (which GPU each device index means) lives in the device memory that every
// registered process maps writable. A restarted controller takes it from its own record
// instead: the ledger file's own pages under the device table, written from the controller's
// table alone (`Ledger::save_device_table`), and this seal, which says that they are such a
// record and which controller start wrote them.

/// `DeviceRecordSeal::magic` once a controller wrote the ledger file's device pages as its record
/// ("GPUSDREC").
pub const DEVICE_RECORD_MAGIC: u64 = u64::from_le_bytes(*b"GPUSDREC");

/// Where `DeviceRecordSeal` sits in the ledger file's header page: past `Header` (asserted in
/// the tests), in bytes no controller before this branch wrote (zero, so no seal). No view maps
/// anything over the header page and no process but the controller is handed the file, so no
/// tenant reaches it; not in `gpuslice.h`, which describes no byte past `Header`.
pub const DEVICE_SEAL_OFFSET: usize = HEADER_SIZE / 2;

/// Says that the ledger file's own pages under the device table hold the controller's record,
/// and by which controller start. A controller from before this branch copied the shared
/// table there (every member's bytes) and never wrote this; one that ran between two that
/// did breaks the chain of starts (`Ledger::count_controller_start`), so what it left there is
/// not taken for the record either.
#[repr(C)]
pub struct DeviceRecordSeal {
    /// `DEVICE_RECORD_MAGIC`; 0: no record (never written, or the last write failed).
    pub magic: AtomicU64,
    /// `Header::controller_starts` of the controller start the record is valid for: the one that
    /// wrote it, carried over to the next start by `count_controller_start` when nothing else
    /// started in between.
    pub starts: AtomicU64,
}
// ---- end of branch devuuid's block ----

/// Scheduling class of a process or group (issue 5 gives it teeth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low = 1,
    #[default]
    Normal = 2,
    High = 3,
}

/// What pinned a group (`GroupSlot::origin`): the config file, or a live edit (`gpuslice set
/// --create`, or a `set` that pinned a group its first member made). A later live edit of a
/// config group leaves it a config group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// Unpinned, or pinned by a controller from before the field: kept at a restart, as then.
    #[default]
    Unrecorded = 0,
    Config = 1,
    Live = 2,
}

impl Origin {
    /// Unknown values (a tenant's writable copy may hold anything) read as `Unrecorded`.
    pub fn from_u32(v: u32) -> Origin {
        match v {
            1 => Origin::Config,
            2 => Origin::Live,
            _ => Origin::Unrecorded,
        }
    }
}

/// Who may join a group (`GroupSlot::owner`). Uid 0 is a uid like any other, so the word says
/// which case it is in its high half and holds the uid in its low half: 0 (never written)
/// reads as `Unrecorded`, not as root's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Owner {
    /// Not recorded: a ledger from before the field, or a group whose settings page and the
    /// ledger file's copy of it were both lost at a restart. A restarted controller opens such
    /// a group to nobody unless it is pinned.
    #[default]
    Unrecorded,
    /// Any uid may join (a configured or edited group).
    Open,
    /// Made from the environment of a process of this uid: only its processes may join.
    Uid(u32),
}

/// `GroupSlot::owner` of an `Owner::Open` group.
pub const OWNER_OPEN: u64 = 1 << 32;
/// `GroupSlot::owner` of an `Owner::Uid(uid)` group, or'ed with the uid.
pub const OWNER_UID: u64 = 2 << 32;

impl Owner {
    pub fn word(self) -> u64 {
        match self {
            Owner::Unrecorded => 0,
            Owner::Open => OWNER_OPEN,
            Owner::Uid(uid) => OWNER_UID | u64::from(uid),
        }
    }

    /// Values no controller writes read as `Unrecorded` (which closes an unpinned group).
    pub fn from_word(v: u64) -> Owner {
        match (v >> 32, v as u32) {
            (1, 0) => Owner::Open,
            (2, uid) => Owner::Uid(uid),
            _ => Owner::Unrecorded,
        }
    }
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
    pub(crate) fn devices_offset(&self) -> usize {
        HEADER_SIZE
    }
    pub(crate) fn groups_offset(&self) -> usize {
        round_up(self.devices_offset() + MAX_DEVICES * size_of::<DeviceSlot>(), 4096)
    }
    pub(crate) fn procs_offset(&self) -> usize {
        round_up(self.groups_offset() + self.max_groups as usize * size_of::<GroupSlot>(), 4096)
    }
    pub fn index_offset(&self) -> usize {
        round_up(self.procs_offset() + self.max_procs as usize * size_of::<ProcessSlot>(), 4096)
    }
    pub fn file_size(&self) -> usize {
        let index = self.max_groups as usize * size_of::<GroupIndex>() + self.max_procs as usize * size_of::<ProcessIndex>();
        round_up(self.index_offset() + index, 4096)
    }
    /// Where the group pages end (what a group's counters memory maps besides its slots).
    pub fn slots_end(&self) -> usize {
        self.index_offset()
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
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
        s.host_bound.store(0, Relaxed);
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
    /// Zeroes the figures counted on a device (its limit and share stay: they are settings). The
    /// one list of a group's counters (`GroupSlot::reset` clears them with it).
    pub fn clear_counters(&self) {
        for c in [&self.used, &self.debt_until, &self.charged_ns, &self.throttled_ns, &self.refusals, &self.peak_used] {
            c.store(0, Relaxed);
        }
    }
}

impl ProcessDevice {
    /// Zeroes the figures counted on a device (its limit stays: it is a setting). The one list
    /// of a process's counters (`ProcessSlot::reset` clears them with it).
    pub fn clear_counters(&self) {
        for c in [&self.used, &self.overhead, &self.charged_ns, &self.throttled_ns, &self.refusals, &self.peak_used, &self._was_penalty, &self.turn_wait_ns] {
            c.store(0, Relaxed);
        }
    }
}

impl GroupSlot {
    /// Device `device`'s memory limit (`None`: unlimited) and SM share (`None`: none) as the
    /// settings resolved them: the one way limits from settings reach a group (a process
    /// alone's private ledger in the shim, a new group in the controller).
    pub fn set_limits(&self, device: usize, memory: Option<u64>, share: Option<u32>) {
        self.devices[device].limit.store(memory.unwrap_or(UNLIMITED), Relaxed);
        self.set_share(device, share.unwrap_or(0));
    }

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

    /// Sets the cap of device `device` (issue 18; see `GroupDevice::cap`: 0 = the share).
    pub fn set_cap(&self, device: usize, cap: u32) {
        self.devices[device].cap.store(cap.min(100), Relaxed);
    }

    /// Clears every figure for a new occupant (the controller, before it marks the slot LIVE).
    pub fn reset(&self) {
        self.priority.store(Priority::Normal as u32, Relaxed);
        self.members.store(0, Relaxed);
        self.reconciling.store(0, Relaxed);
        self.throttled.store(0, Relaxed);
        self.pinned.store(0, Relaxed);
        self.origin.store(0, Relaxed);
        self.owner.store(0, Relaxed);
        write_text(&self.name, "");
        for d in &self.devices {
            d.limit.store(UNLIMITED, Relaxed);
            d.clear_counters();
            d.share.store(0, Relaxed);
            d.cap.store(0, Relaxed);
        }
        self.generation.fetch_add(1, Release);
    }
}

impl ProcessSlot {
    pub fn name(&self) -> String {
        read_text(&self.name)
    }

    pub fn reset(&self) {
        for w in [&self.ops, &self.start_time, &self.heartbeat_ns, &self.token, &self.suspend_bytes, &self.suspend_keep] {
            w.store(0, Relaxed);
        }
        for w in [
            &self.pid,
            &self.group,
            &self._was_priority,
            &self.uid,
            &self.own_pid,
            &self.suspend_ack,
            &self.suspend_error,
            &self.suspend_ms,
            &self.suspend_caps,
            &self.suspend_request,
            &self.suspend_held,
            &self.suspend_ranges,
        ] {
            w.store(0, Relaxed);
        }
        for w in &self.suspend_phase_us {
            w.store(0, Relaxed);
        }
        write_text(&self.name, "");
        for d in &self.devices {
            d.limit.store(UNLIMITED, Relaxed);
            d.clear_counters();
        }
        self.generation.fetch_add(1, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes_are_what_the_header_says() {
        assert_eq!(size_of::<DeviceSlot>(), 64 + size_of::<DeviceSched>());
        assert_eq!(size_of::<GroupDevice>(), 64);
        assert_eq!(size_of::<ProcessDevice>(), 128);
        assert_eq!(size_of::<GroupSlot>(), PAGE);
        assert_eq!(size_of::<ProcessSlot>(), PAGE);
        assert_eq!(size_of::<MemberSettings>(), PAGE);
        assert!(size_of::<Header>() <= HEADER_SIZE);
        assert_eq!(size_of::<super::super::Turn>(), 56);
        assert_eq!(std::mem::offset_of!(GroupSlot, owner), 104, "the old `_reserved[0]`: no offset moved");
        assert_eq!(std::mem::offset_of!(GroupSlot, devices), 128);
        assert!(RECORD_OFFSET + size_of::<ProcessRecord>() <= PAGE, "a record fits in the slot's unused tail");
        assert_eq!(RECORD_OFFSET % 8, 0);
        assert_ne!(RECORD_MAGIC as u32, LIVE, "a record never reads as a live slot");
        assert!(
            size_of::<Header>() <= DEVICE_SEAL_OFFSET && DEVICE_SEAL_OFFSET + size_of::<DeviceRecordSeal>() <= HEADER_SIZE,
            "the seal is in the header page, past the header"
        );
        assert_eq!(DEVICE_SEAL_OFFSET % 8, 0);
    }

    #[test]
    fn a_records_reason_round_trips_and_truncates_on_a_character_boundary() {
        let mut r = ProcessRecord::none();
        assert_eq!(r.misbehaving(), None);
        r.set_misbehaving(Some("it rewrote its slot's device 0 cap"));
        assert_eq!(r.misbehaving().as_deref(), Some("it rewrote its slot's device 0 cap"));
        r.set_misbehaving(Some(&"é".repeat(100)));
        let back = r.misbehaving().unwrap();
        assert!(back.len() < RECORD_WHY_BYTES && back.chars().all(|c| c == 'é'), "{back}");
        r.set_misbehaving(None);
        assert_eq!(r.misbehaving(), None);
    }

    /// Root owns a group as any uid does: a zero word is "unrecorded", not uid 0; a word no
    /// controller writes is unrecorded too (it closes an unpinned group, never opens it).
    #[test]
    fn a_group_owner_round_trips_and_zero_is_not_root() {
        for owner in [Owner::Open, Owner::Uid(0), Owner::Uid(1000), Owner::Uid(u32::MAX), Owner::Unrecorded] {
            assert_eq!(Owner::from_word(owner.word()), owner);
        }
        assert_eq!(Owner::from_word(0), Owner::Unrecorded);
        assert_ne!(Owner::Uid(0).word(), 0);
        for junk in [1, OWNER_OPEN | 5, 3 << 32, u64::MAX] {
            assert_eq!(Owner::from_word(junk), Owner::Unrecorded, "{junk:#x}");
        }
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
}
