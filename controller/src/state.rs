//! The controller's bookkeeping over the ledger: who is registered where, groups made and
//! freed, edits applied, dead processes' bytes taken back, and a restarted controller's
//! adoption of what the previous one left.
//!
//! Only the controller assigns or frees slots; shims only count inside theirs. Every change of
//! a group's membership ends with a reconciliation (`GroupSlot::reconcile`), which is what keeps
//! the group's figure exact whatever state a killed process left its slot in.

use gpuslice_common::ledger::{self, GroupSlot, Ledger, Origin, Owner, Priority, ProcessSlot, FREE, LIVE, MAX_DEVICES, PRIORITY_INHERIT, UNLIMITED};
use gpuslice_common::protocol::*;
use gpuslice_common::settings::{FileSettings, Settings};
use gpuslice_common::size::format_size;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::*;

/// The state behind its lock; a thread that panicked holding it leaves it as it was (every
/// change is made whole under the lock, so the state stays usable).
pub fn lock_state(state: &std::sync::Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

mod devices;
mod memory;
mod record;
mod token;

pub(crate) use devices::is_lost_device;

/// More bytes than any device has (1 PiB): a process slot that says so was written by hand.
const IMPLAUSIBLE_BYTES: u64 = 1 << 50;

/// No process takes a priority slot or a turn this far ahead (they renew every 50 ms, and a
/// turn's lease covers the work it queued).
const LEASE_HORIZON_NS: u64 = 60_000_000_000;

/// `GroupInfo::env_uid` of an unpinned group whose owner a restarted controller found no
/// trusted record of (`Owner::Unrecorded`: a ledger from a controller before the field, or a
/// group whose settings page and file copy were both lost, `memory::fail_closed`): no process
/// may join it, since any uid could be the wrong one. `(uid_t)-1` is no process's uid.
const OWNER_UNKNOWN: u32 = u32::MAX;

/// What `GroupInfo::env_uid` publishes as `GroupSlot::owner`.
pub(crate) fn owner_of(env_uid: Option<u32>) -> Owner {
    match env_uid {
        None => Owner::Open,
        Some(OWNER_UNKNOWN) => Owner::Unrecorded,
        Some(uid) => Owner::Uid(uid),
    }
}

/// How long a reconciliation waits for a live member's open operation.
const RECONCILE_PATIENCE_NS: u64 = 50_000_000;

/// Who is on the other end of a connection, as the kernel says (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
}

/// A registered process the controller watches. This, not the process's slot in shared
/// memory, says which group it is in, its pid and uid: a tenant can write its own slot, so the
/// controller never takes an index or an identity from there.
pub struct Watched {
    pub pid: u32,
    /// Readable when the process exits; `None` on kernels without pidfd_open (polled instead).
    pub pidfd: Option<OwnedFd>,
    pub start_time: Option<u64>,
    /// The ledger's device indices it was given: a device slot no live process uses is freed.
    pub devices: Vec<usize>,
    /// Its group's slot index.
    pub group: usize,
    pub uid: u32,
    /// Its own caps per device, as the controller last set them (restored when shared memory
    /// says otherwise).
    pub caps: [u64; MAX_DEVICES],
    /// Its own priority (`PRIORITY_INHERIT`: its group's), published read-only on its group's
    /// members page (`MemberSettings`), never read back from anything a member can write.
    pub priority: u32,
    /// The cross-check's extra charge per device (`crosscheck`), published summed over the
    /// group on the same page.
    pub penalty: [u64; MAX_DEVICES],
    /// Why its slot was found corrupt, once (reported once, then kept for the listing).
    pub misbehaving: Option<String>,
    /// The token the controller gave it at registration (`token`): the name it holds turns
    /// under, by which its turn is freed when it goes (never by its slot's copy, which any member
    /// of its group may rewrite). 0: not known (adopted without a record): nothing is freed
    /// early, its lease bounds it.
    pub token: u64,
}

/// A group as the controller knows it: the authority for its name and settings. The copy in
/// shared memory is what the shims read; the controller writes it and puts it back when it
/// finds it changed.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub name: String,
    /// Lives in the config file or was edited: kept when its last member leaves.
    pub pinned: bool,
    /// What pinned it (recorded in the ledger, so that a restart can tell a config group the
    /// new config dropped from one a live `set --create` made).
    pub origin: Origin,
    /// A config group's section of the config file as this or an earlier controller last applied
    /// it (`config_section_hash`; 0: none recorded). Published (read-only to members), so that a
    /// restart applies the section again only when the file changed.
    pub config_hash: u64,
    /// Made from the environment of a first member of this uid: only processes of that uid may
    /// join it (nobody can squat a name and pin another tenant's limits). Published as
    /// `GroupSlot::owner`, from where a restarted controller takes it back (`OWNER_UNKNOWN`
    /// when it could not: nobody may join).
    pub env_uid: Option<u32>,
    pub limits: [u64; MAX_DEVICES],
    pub shares: [u32; MAX_DEVICES],
    /// Issue 18: the caps over the shares (`GroupDevice::cap`).
    pub sm_caps: [u32; MAX_DEVICES],
    pub priority: u32,
}

/// How many table entries one uid may hold.
#[derive(Debug, Clone, Copy)]
pub struct UidLimits {
    pub processes: u32,
    pub groups: u32,
}

/// Achieved-share bookkeeping: the charged device time at the previous sample, keyed by
/// (group?, slot, device). A slot's entries go when the controller frees it (`forget`), so a
/// slot given to a new group or process starts from zero; never by the slot's `generation`,
/// which its members write (bumped, it blanked the row's figure or made it huge).
#[derive(Default)]
struct ShareSample {
    at_ns: u64,
    charged: HashMap<(bool, usize, usize), u64>,
    achieved: HashMap<(bool, usize, usize), f64>,
    /// Wall-clock time of the sample, for the metrics.
    taken: Option<std::time::SystemTime>,
}

impl ShareSample {
    /// The controller freed slot `slot` (a group's when `group`): its figures were its last
    /// occupant's.
    fn forget(&mut self, group: bool, slot: usize) {
        self.charged.retain(|&(g, s, _), _| (g, s) != (group, slot));
        self.achieved.retain(|&(g, s, _), _| (g, s) != (group, slot));
    }
}

pub struct State {
    pub ledger: Ledger,
    pub config: FileSettings,
    /// Where `config` was read from, for log lines (`None`: the controller started without one).
    pub config_path: Option<String>,
    /// Process slot → what watches it.
    pub watched: HashMap<usize, Watched>,
    /// Groups whose reconciliation could not finish yet (a member held an operation open).
    pending: Vec<usize>,
    /// The uid allowed to edit besides root: the controller's own (the socket's owner).
    pub owner_uid: u32,
    samples: ShareSample,
    /// Group slot → the group (the authority; see `GroupInfo`).
    pub groups: HashMap<usize, GroupInfo>,
    /// Device slot → its UUID (the authority for the device table; kept in the ledger file by
    /// `devices::save_device_record`, where a restart takes it from). A held slot's name
    /// (`devices::lost_device_name`) where a restart could not tell which GPU it is.
    devices: [Option<String>; MAX_DEVICES],
    /// Device slot → the total memory its first claimant reported (shown only; kept with the
    /// UUID so that the record is written from the controller's own table alone).
    device_totals: [u64; MAX_DEVICES],
    pub uid_limits: UidLimits,
    /// Device UUIDs this node has (NVML); `None`: every well-formed UUID is taken.
    pub node_devices: Option<Vec<String>>,
    /// Any uid may join a group made from another uid's environment (`serve --env-groups
    /// open`: pods whose containers run as several uids); by default only the uid that made it.
    pub env_groups_open: bool,
    /// Metric labels by group slot, from `LabelGroup`; dropped when the controller frees the
    /// slot (`free_group`), so labels never outlive their group. Not keyed by the slot's
    /// `generation`: its members write that, and bumping it hid their group's labels.
    labels: HashMap<usize, std::collections::BTreeMap<String, String>>,
    /// Exports made by registered processes (see `exports`).
    pub exports: crate::exports::table::Exports,
    /// Group slot → its memory and settings page (see `memory`).
    memory: HashMap<usize, memory::GroupMemory>,
    /// The device table's memory, shared by every registered process.
    devices_memory: Option<OwnedFd>,
    /// Issue 19: each managed GPU's line of the MPS table with its daemon, as `mps_devices`
    /// left it at the last tick (empty without `serve --mps`); listed as is.
    pub mps: Vec<gpuslice_common::protocol::MpsGpuRow>,
    /// The suspension marks to publish for a group (`ledger::MARK_*`; `None`: none yet). The
    /// suspensions' module keeps them and stands above the state, so `serve` hands its reader
    /// in (`suspend::marks_to_publish`); a state made without it publishes none.
    pub marks_of: fn(&str) -> Option<u32>,
}

impl State {
    pub fn new(ledger: Ledger, config: FileSettings) -> State {
        // SAFETY: geteuid has no preconditions.
        let owner_uid = unsafe { libc::geteuid() };
        let g = ledger.geometry();
        let uid_limits = UidLimits { processes: (g.max_procs / 2).max(1), groups: (g.max_groups / 2).max(1) };
        State {
            ledger,
            config,
            config_path: None,
            watched: HashMap::new(),
            pending: Vec::new(),
            owner_uid,
            samples: ShareSample::default(),
            groups: HashMap::new(),
            devices: Default::default(),
            device_totals: [0; MAX_DEVICES],
            uid_limits,
            node_devices: None,
            env_groups_open: false,
            labels: HashMap::new(),
            exports: Default::default(),
            memory: HashMap::new(),
            devices_memory: None,
            mps: Vec::new(),
            marks_of: |_| None,
        }
    }

    /// Records the group's settings as they are now in the ledger (after the controller wrote them).
    fn remember_group(&mut self, slot: usize) {
        let g = self.ledger.group(slot);
        if let Some(info) = self.groups.get_mut(&slot) {
            for d in 0..MAX_DEVICES {
                info.limits[d] = g.devices[d].limit.load(Relaxed);
                info.shares[d] = g.devices[d].share.load(Relaxed);
                info.sm_caps[d] = g.devices[d].cap.load(Relaxed);
            }
            info.priority = g.priority.load(Relaxed);
            g.pinned.store(info.pinned as u32, Relaxed);
            g.origin.store(info.origin as u32, Relaxed);
        }
    }

    /// Puts back every setting, name, membership count and device a tenant rewrote in shared
    /// memory since the last tick, and reports who did it; checks every process slot's figures.
    /// Called every tick.
    pub fn enforce(&mut self) {
        for (&slot, info) in &self.groups {
            let g = self.ledger.group(slot);
            let mut changed = Vec::new();
            for d in 0..MAX_DEVICES {
                if put(&g.devices[d].limit, info.limits[d]) {
                    changed.push(format!("device {d} limit"));
                }
                if g.devices[d].share.load(Relaxed) != info.shares[d] {
                    g.set_share(d, info.shares[d]);
                    changed.push(format!("device {d} share"));
                }
                if put(&g.devices[d].cap, info.sm_caps[d]) {
                    changed.push(format!("device {d} cap"));
                }
            }
            if put(&g.priority, info.priority) {
                changed.push("priority".into());
            }
            if put(&g.state, LIVE) || g.name() != info.name {
                g.set_name(&info.name);
                changed.push("name or state".into());
            }
            let throttled = info.shares.iter().any(|&s| s != 0) as u32;
            if put(&g.throttled, throttled) {
                changed.push("throttled flag".into());
            }
            if !changed.is_empty() {
                tracing::warn!(
                    "group {:?}: shared memory was rewritten by a tenant ({}); the controller's settings are restored",
                    info.name,
                    changed.join(", ")
                );
            }
        }
        let slots: Vec<usize> = self.watched.keys().copied().collect();
        for slot in slots {
            let p = self.ledger.process(slot);
            let w = &self.watched[&slot];
            let mut changed = Vec::new();
            for d in 0..MAX_DEVICES {
                if put(&p.devices[d].limit, w.caps[d]) {
                    changed.push(format!("device {d} cap"));
                }
            }
            if put(&p.group, w.group as u32) | put(&p.pid, w.pid) | put(&p.uid, w.uid) | put(&p.state, LIVE) {
                changed.push("identity (group, pid, uid or state)".into());
            }
            let corrupt = self.corrupt_figures(slot);
            let (pid, group) = (w.pid, w.group);
            if !changed.is_empty() || corrupt.is_some() {
                let why = corrupt.unwrap_or_else(|| format!("it rewrote its slot's {}", changed.join(", ")));
                let w = self.watched.get_mut(&slot).expect("listed above");
                let first = w.misbehaving.is_none();
                if first {
                    let name = self.groups.get(&group).map_or("?", |g| g.name.as_str());
                    tracing::warn!("pid {pid} in group {name:?} is misbehaving: {why}; the controller's values are restored");
                }
                w.misbehaving = Some(why);
                if first {
                    // Kept across a restart (`record`), as the rest of what the controller knows of it.
                    self.save_record(slot);
                }
            }
        }
        for (d, uuid) in self.devices.iter().enumerate() {
            let slot = self.ledger.device(d);
            match uuid {
                Some(u) if slot.state.load(Acquire) != LIVE || slot.uuid() != *u => {
                    tracing::warn!("device slot {d} was rewritten in shared memory by a tenant; restored ({u})");
                    ledger::write_text(&slot.uuid, u);
                    slot.state.store(LIVE, Release);
                }
                None if slot.state.load(Acquire) != FREE => {
                    tracing::warn!("free device slot {d} was written in shared memory by a tenant; cleared");
                    slot.release();
                }
                _ => {}
            }
        }
        let counts = self.member_counts();
        for &slot in self.groups.keys() {
            put(&self.ledger.group(slot).members, counts.get(&slot).copied().unwrap_or(0));
        }
        self.expire_forged_leases();
        self.publish();
    }

    /// The device memory is shared by every registered process (the priority slots and the turn
    /// among throttled processes): what bounds a forged entry there is its lease. A lease further
    /// ahead than any process takes is a forgery that would hold others back for good: lapsed.
    fn expire_forged_leases(&self) {
        // In the shims' clock: the simulated one under the integration tests (see lease_clock).
        let horizon = crate::lease_clock::now_ns().saturating_add(LEASE_HORIZON_NS);
        for d in 0..MAX_DEVICES {
            let s = &self.ledger.device(d).sched;
            let mut forged = false;
            for lease in std::iter::once(&s.high_alive_until).chain(s.highs.iter().map(|h| &h.alive_until)).chain(std::iter::once(&s.turn.lease_until)) {
                if lease.load(Relaxed) > horizon {
                    lease.store(0, Relaxed);
                    forged = true;
                }
            }
            if forged {
                s.wake.fetch_add(1, SeqCst);
                tracing::warn!("device slot {d}: a lease beyond any a process takes was written in shared memory by a tenant; lapsed");
            }
        }
    }

    /// Figures in a process's slot that no real process could have: more bytes on a device
    /// than any device has, or bytes on a device it was not given.
    fn corrupt_figures(&self, slot: usize) -> Option<String> {
        let w = self.watched.get(&slot)?;
        let p = self.ledger.process(slot);
        for d in 0..MAX_DEVICES {
            let used = p.devices[d].used.load(Relaxed);
            if used == 0 {
                continue;
            }
            if !w.devices.contains(&d) {
                return Some(format!("its slot says it holds {used} bytes on device slot {d}, which it was not given"));
            }
            // Not the device's own total: that came from the first claimant's word.
            if used > IMPLAUSIBLE_BYTES {
                return Some(format!("its slot says it holds {used} bytes on device slot {d}, more than any device has"));
            }
        }
        None
    }

    fn member_counts(&self) -> HashMap<usize, u32> {
        let mut counts = HashMap::new();
        for w in self.watched.values() {
            *counts.entry(w.group).or_insert(0) += 1;
        }
        counts
    }

    /// Makes the config's groups exist (pinned: they stay when empty). Existing groups keep
    /// their figures: a restarted controller must not undo live edits.
    pub fn install_config_groups(&mut self) -> Result<(), String> {
        let groups: Vec<(String, Settings)> = self.config.groups.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        for (name, settings) in groups {
            let hash = config_section_hash(&settings);
            if let Some(slot) = self.find_group(&name) {
                self.reapply_config_group(slot, &settings, hash);
                continue;
            }
            let slot = self.new_group(&name, Some(Origin::Config), None).ok_or_else(|| format!("no free group slot for config group {name:?}"))?;
            if let Some(info) = self.groups.get_mut(&slot) {
                info.config_hash = hash;
            }
            self.edit_settings(slot, |g| apply_settings_all_devices(g, &settings));
            tracing::info!("group {name:?} from the config file: {}", self.describe_group(slot));
        }
        Ok(())
    }

    /// At a restart: config section `settings` (hashed `hash`) names group `slot`, which the
    /// ledger already holds. The ledger's values stay (live edits survive a restart) unless the
    /// section changed since a controller last applied it: then the operator edited the file,
    /// and its values apply now. A group the config did not make (a member's environment, a
    /// live `set --create`) that the config now names becomes the config's, with its values: a
    /// configured group, kept when empty and open to every uid, as `set` makes one.
    fn reapply_config_group(&mut self, slot: usize, settings: &Settings, hash: u64) {
        let Some(info) = self.groups.get(&slot) else { return };
        if gpuslice_common::settings::is_solo_group(&info.name) {
            return;
        }
        let name = info.name.clone();
        let config = self.config_path.clone().unwrap_or_else(|| "the config".to_string());
        let why = match (info.origin, info.config_hash) {
            (Origin::Config, recorded) if recorded == hash => return,
            // Kept by a controller that recorded no section: whether the file changed is not
            // known, so the ledger's values stay (as before sections were recorded).
            (Origin::Config, 0) => {
                if let Some(info) = self.groups.get_mut(&slot) {
                    info.config_hash = hash;
                }
                return;
            }
            (Origin::Config, _) => format!("its section of {config} changed since the controller last applied it"),
            _ => format!(
                "{config} names it now (it was made by {})",
                if info.origin == Origin::Live { "`gpuslice set --create`" } else { "a process's environment" }
            ),
        };
        let before = self.describe_group(slot);
        if let Some(info) = self.groups.get_mut(&slot) {
            info.pinned = true;
            info.origin = Origin::Config;
            info.env_uid = None;
            info.config_hash = hash;
        }
        // On the published page, over the controller's values (`edit_settings`): a key the
        // section leaves out keeps the controller's value, never what a member wrote into its
        // writable copy while no controller ran to put it back.
        self.edit_settings(slot, |g| apply_settings_all_devices(g, settings));
        let after = self.describe_group(slot);
        tracing::info!("group {name:?}: {why}: the file's values apply ({before} -> {after})");
    }

    /// After a restart: takes the groups, devices and processes the previous controller left
    /// in the ledger, checking every index and name (a tenant may have written anything
    /// there); keeps the processes still alive, takes back the bytes of those gone, and
    /// reconciles every group.
    pub fn adopt(&mut self) {
        let geometry = self.ledger.geometry();
        // Which GPU each slot is: the controller's record, not the shared table (`devices`).
        self.adopt_devices();
        // Config groups the new config no longer names: unpinned below.
        let mut dropped = Vec::new();
        for i in 0..geometry.max_groups as usize {
            let g = self.ledger.group(i);
            // The settings the previous controller published (read-only to members; rebuilt from
            // the ledger file's copy if no member held them: `init_memory`), or the ledger file's
            // own page where nobody held the group's memory: never the members' writable copy,
            // which `g` is when its memory was found. That says whether the slot holds a group
            // too: a member that wrote FREE into its copy had its group skipped, and itself and
            // the other members released, unwatched and their bytes counted nowhere.
            let published = self.published(i);
            if published.unwrap_or(g).state.load(Acquire) != LIVE {
                if published.is_some() {
                    // Memory made, settings never published (killed in between): no name to go by.
                    tracing::warn!("group slot {i}: its memory was found, but its settings were never published; freed");
                    g.reset();
                    g.state.store(FREE, Release);
                    self.forget_group_memory(i);
                }
                continue;
            }
            let name = published.map_or_else(|| g.name(), |p| p.name());
            let valid = gpuslice_common::settings::check_group_name(&name).is_ok() || gpuslice_common::settings::is_solo_group(&name);
            if !valid || self.find_group(&name).is_some() {
                tracing::warn!("group slot {i} held {:?}, not a valid or distinct group name; freed", truncated(&name));
                g.reset();
                g.state.store(FREE, Release);
                self.forget_group_memory(i);
                continue;
            }
            let saved = published.unwrap_or(g);
            let (mut pinned, mut origin) = (saved.pinned.load(Relaxed) != 0, Origin::from_u32(saved.origin.load(Relaxed)));
            // Who may join, as the previous controller published it (never the members' copy).
            let owner = Owner::from_word(saved.owner.load(Relaxed));
            let config_hash = saved.config_hash.load(Relaxed);
            let named = self.config.groups.contains_key(&name);
            if pinned && origin == Origin::Unrecorded && named {
                // Pinned before origins were recorded: the config names it, so count it as the
                // config's (one it no longer names is kept, as then).
                origin = Origin::Config;
            }
            if origin == Origin::Config && pinned != named {
                // A config group is pinned while the config names it. Dropped from it: it goes
                // like a group its members made, its limits kept for whoever still runs in it
                // (logged once they are counted). Named again before they all left: pinned again.
                pinned = named;
                if named {
                    tracing::info!("group {name:?} is in the config again: pinned");
                } else {
                    dropped.push(i);
                }
            }
            let env_uid = match owner {
                Owner::Uid(uid) => Some(uid),
                Owner::Open => None,
                // Configured groups were open to all before owners were recorded.
                Owner::Unrecorded if pinned => None,
                Owner::Unrecorded => {
                    tracing::warn!(
                        "group {name:?}: made from a process's environment, but which uid made it was not recorded (a controller from before owners were recorded, or its settings page was not found); no process may join it until its members have exited (`gpuslice set --group {name}` opens it to all)"
                    );
                    Some(OWNER_UNKNOWN)
                }
            };
            self.groups.insert(
                i,
                GroupInfo {
                    name,
                    pinned,
                    origin,
                    config_hash,
                    env_uid,
                    limits: [UNLIMITED; MAX_DEVICES],
                    shares: [0; MAX_DEVICES],
                    sm_caps: [0; MAX_DEVICES],
                    priority: 0,
                },
            );
            if !self.remember_published(i) {
                self.remember_group(i);
            }
            if pinned && !self.has_settings(i) {
                // Found only as the ledger file's copy: nobody held its memory. Without new
                // memory no member could register in it (and one that tried made a new group
                // of that name without its limits, before the file kept the copy).
                match self.renew_group_memory(i) {
                    Ok(()) => {
                        tracing::info!("group {:?}: no live process held its memory; made anew from the settings the ledger file kept", self.groups[&i].name)
                    }
                    Err(e) => tracing::error!("group {:?}: no live process held its memory, and new memory could not be made: {e}", self.groups[&i].name),
                }
            }
        }
        let mut kept = 0;
        let mut gone = 0;
        let mut dead = Vec::new();
        let mut kept_pids = std::collections::HashSet::new();
        for i in 0..geometry.max_procs as usize {
            // Who is in the slot, from the controller's record and the kernel, never from the
            // slot itself (`record`): a member may have written anything there.
            match self.find_member(i) {
                record::Found::Nobody => self.unmap_member(i),
                record::Found::Stray(why) => {
                    let p = self.ledger.process(i);
                    tracing::warn!("process slot {i} (pid {} by its own word) {why}; freed", p.pid.load(Relaxed));
                    p.reset();
                    p.state.store(FREE, Release);
                    self.unmap_member(i);
                    gone += 1;
                }
                record::Found::Member { watched, gone: why } => {
                    // A pid in two slots (only a slot without a record can say so): the first kept.
                    let why = why.or_else(|| (!kept_pids.insert(watched.pid)).then(|| "is named by another slot too (not adopted)".to_string()));
                    self.watched.insert(i, *watched);
                    match why {
                        None => {
                            // Recorded now if it was not (a ledger from before the record).
                            self.save_record(i);
                            kept += 1;
                        }
                        Some(why) => dead.push((i, why)),
                    }
                }
            }
        }
        // Said before the dead are released: a group they leave empty goes with the last.
        let dead_slots: Vec<usize> = dead.iter().map(|&(i, _)| i).collect();
        for i in dropped {
            self.unpin_dropped(i, &dead_slots);
        }
        // Released once every live member is known, so that a group is not freed as empty
        // (and its figure not recomputed) before its living members are counted in it.
        for (i, why) in dead {
            self.release(i, &why);
            gone += 1;
        }
        // Slots whose GPU is not known: held for the running processes that use them, or freed.
        self.settle_lost_devices();
        let groups: Vec<usize> = self.groups.keys().copied().collect();
        for i in groups {
            if !self.reconcile(i) {
                self.pending.push(i);
            }
            // A group left empty while no controller ran goes, unless pinned.
            if !self.groups[&i].pinned && self.members(i).is_empty() {
                self.free_group(i);
            }
        }
        tracing::info!("adopted the existing ledger: {kept} processes still running, {gone} gone since (their memory returned)");
    }

    /// After a restart: config group `i`, which the new config no longer names, was adopted
    /// unpinned. Says so. Its limits stay for its members; `adopt` frees it now if it has none
    /// (taking its copy out of the ledger file), `release` when its last one exits; until then
    /// the file's copy says it is unpinned (the next `publish`), so a later restart that finds
    /// no member holding its memory does not bring it back, and one that finds its memory but
    /// not its settings page still has its settings. `dead`: process slots adopted but gone,
    /// not counted as running.
    fn unpin_dropped(&self, i: usize, dead: &[usize]) {
        let Some(name) = self.groups.get(&i).map(|g| g.name.as_str()) else { return };
        let config = self.config_path.as_deref().unwrap_or("the config (the controller started without a config file)");
        let fate = match self.members(i).iter().filter(|m| !dead.contains(m)).count() {
            0 => "no process runs in it, so it goes now".to_string(),
            1 => "it goes when its 1 running process exits".to_string(),
            n => format!("it goes when its {n} running processes exit"),
        };
        tracing::info!("group {name:?} is no longer in {config}: unpinned; {fate}");
    }

    pub fn find_group(&self, name: &str) -> Option<usize> {
        self.groups.iter().find(|(_, g)| g.name == name).map(|(&i, _)| i)
    }

    /// A new group in a free slot; `pinned`: what pins it (`None`: it goes with its last member).
    fn new_group(&mut self, name: &str, pinned: Option<Origin>, env_uid: Option<u32>) -> Option<usize> {
        let i = (0..self.ledger.geometry().max_groups as usize).find(|i| !self.groups.contains_key(i))?;
        self.forget_group_memory(i);
        if let Err(e) = self.make_group_memory(i) {
            tracing::error!("group {name:?}: {e}");
            return None;
        }
        let g = self.ledger.group(i);
        g.reset();
        g.set_name(name);
        g.state.store(LIVE, Release);
        self.groups.insert(
            i,
            GroupInfo {
                name: name.to_string(),
                pinned: pinned.is_some(),
                origin: pinned.unwrap_or_default(),
                config_hash: 0,
                env_uid,
                limits: [UNLIMITED; MAX_DEVICES],
                shares: [0; MAX_DEVICES],
                sm_caps: [0; MAX_DEVICES],
                priority: 0,
            },
        );
        self.remember_group(i);
        Some(i)
    }

    fn free_group(&mut self, slot: usize) {
        self.groups.remove(&slot);
        self.labels.remove(&slot);
        self.samples.forget(true, slot);
        let g = self.ledger.group(slot);
        g.state.store(FREE, Release);
        g.reset();
        self.forget_group_memory(slot);
        // The file's copy (`save_settings`) would bring a pinned group back at a restart, and
        // give a later group in this slot settings that are not its own.
        if let Err(e) = self.ledger.clear_group_page(slot) {
            tracing::error!("group slot {slot}: cannot clear its copy in the ledger file: {e}");
        }
        self.pending.retain(|&p| p != slot);
    }

    fn members(&self, group: usize) -> Vec<usize> {
        let mut m: Vec<usize> = self.watched.iter().filter(|(_, w)| w.group == group).map(|(&i, _)| i).collect();
        m.sort_unstable();
        m
    }

    /// Sets the group's used figures to the sum of its live members'.
    fn reconcile(&self, group: usize) -> bool {
        self.reconcile_within(group, RECONCILE_PATIENCE_NS)
    }

    fn reconcile_within(&self, group: usize, patience_ns: u64) -> bool {
        let members = self.members(group);
        let live: Vec<&ProcessSlot> = members.iter().map(|&i| self.ledger.process(i)).collect();
        self.ledger.group(group).reconcile(&live, patience_ns)
    }

    /// Registers the process at `peer`.
    pub fn register(&mut self, peer: Peer, r: Registration) -> Result<Assignment, String> {
        if r.protocol != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {} is not this controller's ({PROTOCOL_VERSION}); shim and controller must come from the same release",
                r.protocol
            ));
        }
        if let Some(name) = &r.group {
            gpuslice_common::settings::check_group_name(name).map_err(|e| format!("GPUSLICE_GROUP={name:?}: {e}"))?;
        }
        if peer.pid == 0 {
            // SO_PEERCRED says 0 for a process whose pid namespace the controller cannot see:
            // it could be neither told apart from others nor watched for its exit.
            return Err("the controller cannot see this process's pid (another pid namespace): run the controller in the host's pid namespace (Kubernetes: hostPID: true); the process runs alone on its own limits".into());
        }
        // The same pid again: an exec'd program (the old image's memory is gone with it).
        let stale: Vec<usize> = self.watched.iter().filter(|(_, w)| w.pid == peer.pid).map(|(&i, _)| i).collect();
        for slot in stale {
            self.release(slot, "registered again (exec)");
        }
        let slot = (0..self.ledger.geometry().max_procs as usize)
            .find(|i| !self.watched.contains_key(i))
            .ok_or_else(|| format!("the ledger is full ({} processes){RETRY_LATER}", self.ledger.geometry().max_procs))?;
        let held = self.watched.values().filter(|w| w.uid == peer.uid).count() as u32;
        if held >= self.uid_limits.processes {
            return Err(format!(
                "uid {} already has {held} registered processes, the most one uid may hold (--max-processes-per-uid {}){RETRY_LATER}",
                peer.uid, self.uid_limits.processes
            ));
        }

        let mut notes = Vec::new();
        let devices = self.claim_devices(peer, &r.devices, &mut notes);
        let solo = r.group.is_none();
        let group_name = r.group.clone().unwrap_or_else(|| gpuslice_common::settings::solo_group_name(peer.pid));
        let group = match self.find_group(&group_name) {
            Some(g) => {
                let info = &self.groups[&g];
                if let Some(owner) = info.env_uid.filter(|&o| o != peer.uid && !self.env_groups_open) {
                    if owner == OWNER_UNKNOWN {
                        return Err(format!(
                            "group {group_name:?} was made from the environment of a process before the controller restarted, and which uid made it was not recorded; no process may join it until its members have exited (an administrator makes it open to all by configuring it: the config file or `gpuslice set --group {group_name}`; or runs the controller with --env-groups open)"
                        ));
                    }
                    return Err(format!(
                        "group {group_name:?} was made from the environment of a process of uid {owner}; only that uid's processes may join it (an administrator makes it open to all by configuring it: the config file or `gpuslice set --group {group_name}`; or runs the controller with --env-groups open)"
                    ));
                }
                notes.extend(self.ignored_env_limits(g, &r, &devices));
                g
            }
            None => {
                if self.groups.len() >= self.ledger.geometry().max_groups as usize {
                    return Err(format!("the ledger is full ({} groups){RETRY_LATER}", self.ledger.geometry().max_groups));
                }
                let made = self.groups.values().filter(|g| g.env_uid == Some(peer.uid)).count() as u32;
                if made >= self.uid_limits.groups {
                    return Err(format!(
                        "uid {} already has {made} groups made from its processes' environment, the most one uid may make (--max-groups-per-uid {}); use a configured group{RETRY_LATER}",
                        peer.uid, self.uid_limits.groups
                    ));
                }
                let g = self
                    .new_group(&group_name, None, Some(peer.uid))
                    .ok_or_else(|| format!("the ledger is full ({} groups){RETRY_LATER}", self.ledger.geometry().max_groups))?;
                let slot = self.ledger.group(g);
                // A new group takes its first member's environment, else the config's defaults,
                // on every device: the devices its first member did not see get the tightest
                // limit and share its environment gave (the config's defaults when it gave none),
                // so that a later member that sees them is not unlimited there.
                let env_limit = r.devices.iter().filter_map(|c| c.memory_limit).min();
                let env_share = r.devices.iter().filter_map(|c| c.sm_share).filter(|&s| s > 0 && s < 100).min();
                let default_limit = env_limit.or_else(|| self.config.settings.memory_limit.all().map(|l| l.value));
                let default_share = env_share.or_else(|| self.config.settings.sm_share.all().map(|s| s.value));
                // Issue 18: the cap goes with the share it came with (the environment's, else the config's).
                let env_cap = r.devices.iter().map(|c| c.sm_max).filter(|&c| c != 0).min();
                let default_cap = if env_share.is_some() { env_cap.unwrap_or(0) } else { self.config.settings.sm_max.all().map_or(0, |c| c.value) };
                for d in 0..MAX_DEVICES {
                    slot.set_limits(d, default_limit, default_share);
                    slot.set_cap(d, default_cap);
                }
                for claim in &r.devices {
                    let Some(&(_, index)) = devices.iter().find(|(o, _)| *o == claim.ordinal) else { continue };
                    let index = index as usize;
                    let limit = claim.memory_limit.or_else(|| self.config.settings.memory_limit(claim.ordinal).map(|l| l.value)).or(default_limit);
                    let share = claim.sm_share.or_else(|| self.config.settings.sm_share(claim.ordinal)).or(default_share);
                    slot.set_limits(index, limit, share);
                    let cap = if claim.sm_share.is_some() { claim.sm_max } else { self.config.settings.sm_max(claim.ordinal) };
                    slot.set_cap(index, if share.is_some() && cap == 0 { default_cap } else { cap });
                }
                let priority = (if solo { r.priority } else { None }).or(self.config.settings.priority.as_ref().map(|p| p.value));
                slot.priority.store(priority.unwrap_or_default() as u32, Relaxed);
                self.remember_group(g);
                g
            }
        };
        self.map_member(slot, group)?;
        let process = self.ledger.process(slot);
        process.reset();
        process.pid.store(peer.pid, Relaxed);
        process.own_pid.store(r.own_pid, Relaxed);
        process.uid.store(peer.uid, Relaxed);
        process.group.store(group as u32, Relaxed);
        let own_priority = if solo { PRIORITY_INHERIT } else { r.priority.map_or(PRIORITY_INHERIT, |p| p as u32) };
        let start_time = ledger::process_start_time(peer.pid);
        process.start_time.store(start_time.unwrap_or(0), Relaxed);
        process.heartbeat_ns.store(ledger::monotonic_ns(), Relaxed);
        // The name is the client's word: shown in logs and listings, so no control characters.
        let name: String = r.name.chars().map(|c| if c.is_control() { '?' } else { c }).take(31).collect();
        ledger::write_text(&process.name, &name);
        // The name it takes turns under, the controller's pick (`token`): in its slot for it to
        // read once handed the memory, and kept in `Watched` and the record for its release.
        let token = self.new_token();
        process.token.store(token, Relaxed);
        process.state.store(LIVE, Release);
        self.ledger.header().registrations.fetch_add(1, Relaxed);
        let indices = devices.iter().map(|&(_, i)| i as usize).collect();
        let w = Watched {
            pid: peer.pid,
            pidfd: pidfd_open(peer.pid),
            start_time,
            devices: indices,
            group,
            uid: peer.uid,
            caps: [UNLIMITED; MAX_DEVICES],
            priority: own_priority,
            penalty: [0; MAX_DEVICES],
            misbehaving: None,
            token,
        };
        self.watched.insert(slot, w);
        // Where a restarted controller takes its identity from (`record`), not its slot.
        self.save_record(slot);
        let members = self.members(group).len() as u32;
        self.ledger.group(group).members.store(members, Relaxed);
        tracing::info!("registered pid {} ({}) uid {} in group {group_name:?}: {}", peer.pid, name, peer.uid, self.describe_group(group));
        // Before the process has the page: it must never read settings not yet published.
        self.publish_group(group);
        Ok(Assignment { group: group as u32, group_name, slot: slot as u32, devices, notes })
    }

    /// Takes a process out: its bytes leave its group's figures, its slot is freed, and a
    /// group it leaves empty is freed unless pinned.
    pub fn release(&mut self, slot: usize, why: &str) {
        let Some(w) = self.watched.remove(&slot) else { return };
        self.exports.forget(slot);
        self.samples.forget(false, slot);
        let (group, pid) = (w.group, w.pid);
        let p = self.ledger.process(slot);
        let held: u64 = p.devices.iter().map(|d| d.used.load(Relaxed)).fold(0, u64::saturating_add);
        // A turn it held is free now, not when its lease runs out: by the controller's token.
        self.free_turns(&w, why);
        // Out of the member list first (done above), so that the reconciliation leaves its bytes out.
        p.state.store(FREE, Release);
        if self.groups.contains_key(&group) {
            if !self.reconcile(group) {
                self.pending.push(group);
            }
            let name = self.groups[&group].name.clone();
            let left = self.members(group).len() as u32;
            self.ledger.group(group).members.store(left, Relaxed);
            if left == 0 && !self.groups[&group].pinned {
                self.free_group(group);
            }
            tracing::info!("pid {pid} {why}: {} returned to group {name:?}", format_size(held));
        }
        self.ledger.process(slot).reset();
        self.unmap_member(slot);
        self.free_lost_devices();
    }

    /// Device indices for the devices a registration names. A claim that is not a GPU UUID,
    /// or names an ordinal or UUID twice, is not tracked (and the process is told why), so
    /// that a garbled registration cannot fill the device table with things that are not GPUs.
    fn claim_devices(&mut self, peer: Peer, claims: &[DeviceClaim], notes: &mut Vec<String>) -> Vec<(u32, u32)> {
        let mut devices: Vec<(u32, u32)> = Vec::new();
        let mut full = Vec::new();
        for d in claims {
            if !is_gpu_uuid(&d.uuid) {
                notes.push(format!("device {}: {:?} is not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx); not tracked", d.ordinal, truncated(&d.uuid)));
                continue;
            }
            if let Some(node) = &self.node_devices {
                if !crate::serve::devices::on_node(node, &d.uuid) {
                    notes.push(format!("device {}: {} is not a device of this node (NVML lists {} here); not tracked", d.ordinal, d.uuid, node.len()));
                    continue;
                }
            }
            if devices.iter().any(|&(o, _)| o == d.ordinal) {
                notes.push(format!("device {} is named twice; the second claim is not tracked", d.ordinal));
                continue;
            }
            let claimed = self.claim_device(&d.uuid, d.total_memory).or_else(|| {
                let keep: Vec<usize> = devices.iter().map(|&(_, i)| i as usize).collect();
                self.free_unused_device(&keep)?;
                self.claim_device(&d.uuid, d.total_memory)
            });
            match claimed {
                Some(index) if devices.iter().any(|&(_, i)| i as usize == index) => {
                    notes.push(format!("device {} ({}) is the same GPU as another ordinal; not tracked twice", d.ordinal, d.uuid));
                }
                Some(index) => devices.push((d.ordinal, index as u32)),
                None => full.push(d.ordinal),
            }
        }
        if !full.is_empty() {
            let message = format!("devices {full:?} not tracked: the ledger knows {MAX_DEVICES} devices already");
            tracing::warn!("pid {}: {message}", peer.pid);
            notes.push(message);
        }
        devices
    }

    /// With the device table full, frees one device slot that no registered process uses
    /// (nor `keep`), with every group's counters there: so a garbled or hostile registration's
    /// claims last only as long as its process. Slots stay claimed otherwise, so that `ls`
    /// keeps showing a GPU after its last process left.
    fn free_unused_device(&mut self, keep: &[usize]) -> Option<()> {
        let used: std::collections::HashSet<usize> = self.watched.values().flat_map(|w| w.devices.iter().copied()).chain(keep.iter().copied()).collect();
        let d = (0..MAX_DEVICES).find(|d| !used.contains(d) && self.devices[*d].is_some())?;
        // The controller's name for it, not the shared table's (a member's to write).
        tracing::info!("device {d} ({}) is used by no registered process: its slot goes to a new device", self.devices[d].as_deref().unwrap_or("?"));
        self.free_device_slot(d);
        Some(())
    }

    /// The device slot for `uuid`, claiming a free one if it is new (the controller alone
    /// writes the device table).
    fn claim_device(&mut self, uuid: &str, total_memory: u64) -> Option<usize> {
        if let Some(d) = self.devices.iter().position(|u| u.as_deref() == Some(uuid)) {
            return Some(d);
        }
        let d = self.devices.iter().position(Option::is_none)?;
        let slot = self.ledger.device(d);
        slot.release();
        slot.state.store(ledger::CLAIMING, Release);
        ledger::write_text(&slot.uuid, uuid);
        slot.total_memory.store(total_memory, Relaxed);
        slot.state.store(LIVE, Release);
        self.devices[d] = Some(uuid.to_string());
        self.device_totals[d] = total_memory;
        Some(d)
    }

    /// Retries reconciliations that could not finish earlier. Briefly: a member that keeps an
    /// operation open on purpose must not make every tick wait.
    pub fn retry_pending(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_unstable();
        pending.dedup();
        for group in pending {
            if !self.groups.contains_key(&group) {
                continue;
            }
            if !self.reconcile_within(group, 2_000_000) {
                self.pending.push(group);
            }
        }
    }

    /// For kernels without pidfds: processes that are gone.
    pub fn poll_without_pidfd(&mut self) {
        let gone: Vec<usize> =
            self.watched.iter().filter(|(_, w)| w.pidfd.is_none() && ledger::process_start_time(w.pid) != w.start_time).map(|(&s, _)| s).collect();
        for slot in gone {
            self.release(slot, "exited");
        }
    }

    /// Applies an edit from `peer`.
    pub fn edit(&mut self, peer: Peer, e: Edit) -> Result<String, String> {
        self.may_edit(peer)?;
        if let Some(sm) = e.sm {
            gpuslice_common::settings::parse_share(&sm.to_string()).map_err(|r| format!("--sm {sm}: {r}"))?;
        }
        if let Some(cap) = e.sm_max {
            gpuslice_common::settings::parse_cap(&cap.to_string()).map_err(|r| format!("--sm-max {cap}: {r}"))?;
            if let Some(sm) = e.sm.filter(|&sm| cap < sm) {
                return Err(format!("--sm-max {cap} is below --sm {sm}: the cap must be at least the guarantee"));
            }
        }
        if let Some(Limit::Bytes(0)) = e.memory {
            return Err("--memory 0: a limit of zero bytes would refuse everything; give a size, or `unlimited`".into());
        }
        let devices: Vec<usize> = match e.device {
            // The controller's table, not the shared one (a member could make it say free).
            Some(d) if (d as usize) < MAX_DEVICES && self.devices[d as usize].is_some() => vec![d as usize],
            Some(d) => return Err(self.no_such_device(d)),
            None => (0..MAX_DEVICES).collect(),
        };
        match &e.target {
            Target::Group(name) => {
                let (slot, made) = match self.find_group(name) {
                    Some(g) => (g, false),
                    None if !e.create => return Err(format!("{}; `gpuslice set --create --group {name} ...` makes it", self.no_such_group(name))),
                    None => {
                        gpuslice_common::settings::check_group_name(name).map_err(|r| format!("group {name:?}: {r}"))?;
                        (self.new_group(name, Some(Origin::Live), None).ok_or("the ledger has no free group slot")?, true)
                    }
                };
                if !gpuslice_common::settings::is_solo_group(name) {
                    // Configured now: kept when empty, and open to every uid.
                    let info = self.groups.get_mut(&slot).expect("found or made above");
                    if !info.pinned {
                        // Pinned by this edit (a config group edited live stays the config's).
                        info.origin = Origin::Live;
                    }
                    info.pinned = true;
                    info.env_uid = None;
                }
                self.edit_settings(slot, |g| apply_edit_to_group(g, &e, &devices));
                let what = if made { "created" } else { "now" };
                let message = format!("group {name:?} {what}: {}", self.describe_group(slot));
                tracing::info!("uid {} (pid {}): {message}", peer.uid, peer.pid);
                Ok(message)
            }
            Target::Pid(pid) => {
                let (slot, group) = self
                    .watched
                    .iter()
                    .find(|(_, w)| w.pid == *pid)
                    .map(|(&s, w)| (s, w.group))
                    .ok_or_else(|| format!("no registered process has pid {pid} (see `gpuslice ls`)"))?;
                let p = self.ledger.process(slot);
                let g = self.ledger.group(group);
                let name = self.groups.get(&group).map_or_else(|| g.name(), |i| i.name.clone());
                let message = if gpuslice_common::settings::is_solo_group(&name) {
                    self.edit_settings(group, |g| apply_edit_to_group(g, &e, &devices));
                    format!("pid {pid} now: {}", self.describe_group(group))
                } else {
                    if e.sm.is_some() || e.sm_max.is_some() {
                        return Err(format!("pid {pid} is in group {name:?}, whose members share one SM share: use `gpuslice set --group {name} --sm ...`"));
                    }
                    if let Some(w) = self.watched.get_mut(&slot) {
                        // The controller's own values first: the slot's copy is the process's to write.
                        if let Some(m) = e.memory {
                            for &d in &devices {
                                w.caps[d] = limit_bytes(m);
                                p.devices[d].limit.store(w.caps[d], Relaxed);
                            }
                        }
                        if let Some(pr) = e.priority {
                            w.priority = pr as u32;
                        }
                    }
                    let cap = e.memory.map(|m| match m {
                        Limit::Bytes(b) => format!("own cap {}", format_size(b)),
                        Limit::Unlimited => "no own cap".into(),
                    });
                    self.save_record(slot);
                    self.publish_group(group);
                    let pri = e.priority.map(|p| format!("priority {p}"));
                    format!("pid {pid} in group {name:?} now: {}", [cap, pri].into_iter().flatten().collect::<Vec<_>>().join(", "))
                };
                tracing::info!("uid {} (pid {}): {message}", peer.uid, peer.pid);
                Ok(message)
            }
        }
    }

    /// Removes an empty group (`gpuslice rm --group`): refused while it has members, and for
    /// a process's own group. Its slot is freed in the ledger, so it does not come back when
    /// the controller restarts (unless the config file names it).
    pub fn remove_group(&mut self, peer: Peer, name: &str) -> Result<String, String> {
        self.may_edit(peer)?;
        let slot = self.find_group(name).ok_or_else(|| self.no_such_group(name))?;
        let members: Vec<u32> = self.members(slot).iter().map(|p| self.watched[p].pid).collect();
        if gpuslice_common::settings::is_solo_group(name) {
            return Err(format!("group {name:?} is the own group of a process alone; it goes when the process exits"));
        }
        if !members.is_empty() {
            let pids = members.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            return Err(format!("group {name:?} has {} member(s) (pid {pids}); remove it once they have exited", members.len()));
        }
        self.free_group(slot);
        let mut message = format!("group {name:?} removed");
        if self.config.groups.contains_key(name) {
            message.push_str("; the config file names it, so it comes back when the controller restarts (remove [groups.");
            message.push_str(name);
            message.push_str("] there too)");
        }
        tracing::info!("uid {} (pid {}): {message}", peer.uid, peer.pid);
        Ok(message)
    }

    fn may_edit(&self, peer: Peer) -> Result<(), String> {
        if peer.uid != 0 && peer.uid != self.owner_uid {
            return Err(format!(
                "permission denied: uid {} may read but not change limits; only uid {} (the controller's) or root may",
                peer.uid, self.owner_uid
            ));
        }
        Ok(())
    }

    /// "no group "x"", with the existing groups whose names are close (a typo's likely target).
    fn no_such_group(&self, name: &str) -> String {
        // From the controller's own list: names in shared memory are the tenants' to write.
        let mut close: Vec<(f64, String)> = self
            .groups
            .values()
            .map(|g| g.name.clone())
            .filter(|n| !gpuslice_common::settings::is_solo_group(n))
            .map(|n| (strsim::jaro_winkler(name, &n), n))
            .filter(|(score, _)| *score >= 0.8)
            .collect();
        close.sort_by(|a, b| b.0.total_cmp(&a.0));
        match close.len() {
            0 => format!("no group {name:?}"),
            _ => format!("no group {name:?} (did you mean {}?)", close.iter().take(3).map(|(_, n)| format!("{n:?}")).collect::<Vec<_>>().join(" or ")),
        }
    }

    /// Why `--device d` names nothing: the devices the ledger knows.
    fn no_such_device(&self, d: u32) -> String {
        let known: Vec<String> = (0..MAX_DEVICES).filter(|&i| self.devices[i].is_some()).map(|i| i.to_string()).collect();
        if known.is_empty() {
            format!("device {d}: the ledger knows no device yet (none has registered); leave out --device to set every device")
        } else {
            format!("device {d} is not in the ledger, which knows device(s) {} (see `gpuslice status`)", known.join(", "))
        }
    }

    /// Sets the metric labels of group `l.group` (socket owner or root only).
    pub fn label_group(&mut self, peer: Peer, l: GroupLabels) -> Result<String, String> {
        if peer.uid != 0 && peer.uid != self.owner_uid {
            return Err(format!(
                "permission denied: uid {} may not label group {:?}; only uid {} (the controller's) or root may",
                peer.uid, l.group, self.owner_uid
            ));
        }
        l.check().map_err(|e| format!("group {:?}: {e}", l.group))?;
        let slot = self.find_group(&l.group).ok_or_else(|| format!("no group is named {:?}", l.group))?;
        let message = format!("group {:?} labelled {:?}", l.group, l.labels);
        self.labels.insert(slot, l.labels);
        Ok(message)
    }

    /// Samples charged device time for the achieved shares `ls` reports; called about once a second.
    pub fn sample_shares(&mut self) {
        let now = ledger::monotonic_ns();
        let elapsed = now.saturating_sub(self.samples.at_ns);
        let mut charged = HashMap::new();
        for &i in self.groups.keys() {
            for (d, gd) in self.ledger.group(i).devices.iter().enumerate() {
                charged.insert((true, i, d), gd.charged_ns.load(Relaxed));
            }
        }
        for &i in self.watched.keys() {
            for (d, pd) in self.ledger.process(i).devices.iter().enumerate() {
                charged.insert((false, i, d), pd.charged_ns.load(Relaxed));
            }
        }
        let mut achieved = HashMap::new();
        if self.samples.at_ns != 0 && elapsed > 0 {
            for (key, &now_charged) in &charged {
                // A key the previous sample lacks is a slot given out since (a freed slot's
                // entries are forgotten): it started from zero then. Waiting for a second sample would hide a short
                // job's share entirely.
                let before = self.samples.charged.get(key).copied().unwrap_or(0);
                if now_charged > 0 {
                    achieved.insert(*key, now_charged.saturating_sub(before) as f64 / elapsed as f64 * 100.0);
                }
            }
        }
        self.samples = ShareSample { at_ns: now, charged, achieved, taken: Some(std::time::SystemTime::now()) };
    }

    /// The devices the controller claimed, by ledger device slot, with their UUIDs: its own
    /// table, not the device table's copy (which every member maps writable). Not the slots
    /// held for processes whose GPU a restart could not tell (`devices::lost_device_name`):
    /// there is no UUID to ask NVML about.
    pub fn claimed_devices(&self) -> impl Iterator<Item = (usize, &str)> {
        self.devices.iter().enumerate().filter_map(|(d, u)| Some((d, u.as_deref().filter(|u| !is_lost_device(u))?)))
    }

    /// When `sample_shares` last ran.
    pub fn last_sample(&self) -> Option<std::time::SystemTime> {
        self.samples.taken
    }

    /// The cross-check's charge on group `i` on device `d`: its members' penalties.
    pub fn group_penalty(&self, i: usize, d: usize) -> u64 {
        self.watched.values().filter(|w| w.group == i).map(|w| w.penalty[d]).fold(0, u64::saturating_add)
    }

    /// Processes, groups, devices and MPS as the controller holds them; `serve` adds the
    /// cross-check's findings and the suspensions (their modules stand above the state).
    pub fn listing(&self) -> Listing {
        let uuid = |d: usize| self.devices[d].clone().unwrap_or_default();
        let claimed: Vec<usize> = (0..MAX_DEVICES).filter(|&d| self.devices[d].is_some()).collect();
        let mut listing = Listing::default();
        let mut group_slots: Vec<usize> = self.groups.keys().copied().collect();
        group_slots.sort_unstable();
        for i in group_slots {
            let (g, info) = (self.ledger.group(i), &self.groups[&i]);
            let members = self.members(i).iter().map(|p| self.watched[p].pid).collect();
            let devices = claimed
                .iter()
                .map(|&d| {
                    let gd = &g.devices[d];
                    // Settings as the controller holds and publishes them (what the shims enforce),
                    // never the members' writable copy, which they may set to anything until the
                    // next tick puts it back. The figures below are the members' own counters.
                    let share = info.shares[d];
                    GroupDeviceRow {
                        device: d as u32,
                        uuid: uuid(d),
                        // With the cross-check's charge, as every limit check counts it.
                        used: gd.used.load(Relaxed).saturating_add(self.group_penalty(i, d)),
                        limit: some_limit(info.limits[d]),
                        peak: gd.peak_used.load(Relaxed),
                        share: (share != 0).then_some(share),
                        cap: Some(info.sm_caps[d]).filter(|&c| share != 0 && c > share),
                        achieved_share: self.samples.achieved.get(&(true, i, d)).copied(),
                        charged_ns: gd.charged_ns.load(Relaxed),
                        throttled_ns: gd.throttled_ns.load(Relaxed),
                        refusals: gd.refusals.load(Relaxed),
                    }
                })
                .collect();
            let priority = Priority::from_u32(info.priority).unwrap_or_default();
            let labels = self.labels.get(&i).cloned().unwrap_or_default();
            listing.groups.push(GroupRow { name: info.name.clone(), labels, slot: i as u32, members, priority, devices });
        }
        let mut process_slots: Vec<usize> = self.watched.keys().copied().collect();
        process_slots.sort_unstable();
        for i in process_slots {
            let (p, w) = (self.ledger.process(i), &self.watched[&i]);
            let devices = claimed
                .iter()
                .map(|&d| {
                    let pd = &p.devices[d];
                    ProcessDeviceRow {
                        device: d as u32,
                        uuid: uuid(d),
                        used: pd.used.load(Relaxed),
                        overhead: pd.overhead.load(Relaxed),
                        // The controller's cap, not the slot's copy (the process's to write).
                        limit: some_limit(w.caps[d]),
                        peak: pd.peak_used.load(Relaxed),
                        achieved_share: self.samples.achieved.get(&(false, i, d)).copied(),
                        charged_ns: pd.charged_ns.load(Relaxed),
                        throttled_ns: pd.throttled_ns.load(Relaxed),
                        refusals: pd.refusals.load(Relaxed),
                        turn_wait_ns: pd.turn_wait_ns.load(Relaxed),
                    }
                })
                .collect();
            listing.processes.push(ProcessRow {
                pid: w.pid,
                own_pid: p.own_pid.load(Relaxed),
                uid: w.uid,
                group: self.groups.get(&w.group).map_or_else(String::new, |i| i.name.clone()),
                name: p.name(),
                priority: Priority::from_u32(w.priority)
                    .unwrap_or_else(|| self.groups.get(&w.group).and_then(|i| Priority::from_u32(i.priority)).unwrap_or_default()),
                devices,
            });
        }
        listing.mps = self.mps.clone();
        listing
    }

    /// One line: group `slot`'s settings as the controller holds them (`GroupInfo`, what it
    /// publishes and the shims enforce), on the devices it claimed, with what its members hold
    /// (their counters). Never the members' writable copy of the settings, nor the device table
    /// they map: this line is what an operator reads in the log and in `set`'s answer.
    fn describe_group(&self, slot: usize) -> String {
        let Some(info) = self.groups.get(&slot) else { return "no such group".into() };
        let g = self.ledger.group(slot);
        let limit_text = |l: u64| some_limit(l).map_or("no memory limit".to_string(), |l| format!("memory {}", format_size(l)));
        let mut parts = Vec::new();
        for (d, _) in self.claimed_devices() {
            let share = info.shares[d];
            let share = if share == 0 { String::new() } else { format!(", SM {share}%{}", cap_text(share, info.sm_caps[d])) };
            parts.push(format!("device {d}: {}{share} (using {})", limit_text(info.limits[d]), format_size(g.devices[d].used.load(Relaxed))));
        }
        if parts.is_empty() {
            parts.push(limit_text(info.limits[0]));
            if info.shares[0] != 0 {
                parts.push(format!("SM {}%", info.shares[0]));
            }
        }
        format!("{}; priority {}", parts.join("; "), Priority::from_u32(info.priority).unwrap_or_default())
    }

    /// The most group `slot` may hold on the GPUs together: the sum of its memory limits on the
    /// devices this controller claimed (device 0's when it claimed none, as `describe_group`
    /// reads them); `None` when it has no such group or no limit on one of them.
    pub fn memory_limit_total(&self, slot: usize) -> Option<u64> {
        let info = self.groups.get(&slot)?;
        let mut devices: Vec<usize> = self.claimed_devices().map(|(d, _)| d).collect();
        if devices.is_empty() {
            devices.push(0);
        }
        devices.into_iter().try_fold(0u64, |sum, d| some_limit(info.limits[d]).map(|l| sum.saturating_add(l)))
    }

    /// Notes for a member whose environment asked for other limits than its group `group` has
    /// (the controller's, as `describe_group` takes them).
    fn ignored_env_limits(&self, group: usize, r: &Registration, devices: &[(u32, u32)]) -> Vec<String> {
        let Some(info) = self.groups.get(&group) else { return Vec::new() };
        let mut notes = Vec::new();
        for claim in &r.devices {
            let Some(&(_, index)) = devices.iter().find(|(o, _)| *o == claim.ordinal) else { continue };
            let have = info.limits[index as usize];
            if let Some(want) = claim.memory_limit {
                if want != have {
                    let have = some_limit(have).map_or("no limit".to_string(), format_size);
                    notes.push(format!(
                        "the environment's memory limit {} for device {} is not used: group {:?} already has {have} (change it with `gpuslice set --group`)",
                        format_size(want),
                        claim.ordinal,
                        info.name
                    ));
                }
            }
        }
        notes
    }

    pub fn counts(&self) -> (u32, u32) {
        let procs = self.watched.len();
        let groups = self.groups.len();
        (procs as u32, groups as u32)
    }

    pub fn devices(&self) -> Vec<String> {
        self.devices.iter().flatten().cloned().collect()
    }

    /// The ledger's index of the device `uuid` names, once a registered process claimed it.
    pub fn device_index(&self, uuid: &str) -> Option<u32> {
        self.devices.iter().position(|d| d.as_deref().is_some_and(|u| crate::serve::devices::same_device(u, uuid))).map(|i| i as u32)
    }

    /// Each device some registered process uses, by UUID, with the uids of those processes
    /// (issue 19: a GPU's MPS mode is held while they do, and MPS serves one uid at a time).
    pub fn device_users(&self) -> Vec<(String, Vec<u32>)> {
        let mut users: std::collections::BTreeMap<usize, std::collections::BTreeSet<u32>> = Default::default();
        for w in self.watched.values() {
            for &d in &w.devices {
                users.entry(d).or_default().insert(w.uid);
            }
        }
        users.into_iter().filter_map(|(d, uids)| Some((self.devices.get(d).cloned().flatten()?, uids.into_iter().collect()))).collect()
    }
}

/// Puts `want` back into a shared word if a tenant changed it; true when it had. A plain load
/// first: the controller does not dirty the cache lines the shims' hot paths read every tick.
fn put<T: Copy + PartialEq, A: SharedWord<T>>(word: &A, want: T) -> bool {
    if word.get() == want {
        return false;
    }
    word.set(want);
    true
}

trait SharedWord<T> {
    fn get(&self) -> T;
    fn set(&self, v: T);
}

impl SharedWord<u64> for std::sync::atomic::AtomicU64 {
    fn get(&self) -> u64 {
        self.load(Relaxed)
    }
    fn set(&self, v: u64) {
        self.store(v, Relaxed)
    }
}

impl SharedWord<u32> for std::sync::atomic::AtomicU32 {
    fn get(&self) -> u32 {
        self.load(Relaxed)
    }
    fn set(&self, v: u32) {
        self.store(v, Relaxed)
    }
}

/// "GPU-" or "MIG-" and a UUID in 8-4-4-4-12 hexadecimal digits, as the driver names devices.
fn is_gpu_uuid(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("GPU-").or_else(|| text.strip_prefix("MIG-")) else { return false };
    let groups: Vec<&str> = rest.split('-').collect();
    groups.len() == 5 && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// At most 80 characters of client text, for a message.
fn truncated(text: &str) -> String {
    text.chars().take(80).collect()
}

fn some_limit(l: u64) -> Option<u64> {
    (l != UNLIMITED).then_some(l)
}

fn limit_bytes(l: Limit) -> u64 {
    match l {
        Limit::Bytes(b) => b,
        Limit::Unlimited => UNLIMITED,
    }
}

fn apply_edit_to_group(g: &GroupSlot, e: &Edit, devices: &[usize]) {
    for &d in devices {
        if let Some(m) = e.memory {
            g.devices[d].limit.store(limit_bytes(m), Relaxed);
        }
        if let Some(sm) = e.sm {
            g.set_share(d, sm);
            // Issue 18: `--sm` alone is the guarantee and the cap, as it always was.
            g.set_cap(d, e.sm_max.unwrap_or(0));
        } else if let Some(cap) = e.sm_max {
            g.set_cap(d, cap);
        }
    }
    if let Some(p) = e.priority {
        g.priority.store(p as u32, Relaxed);
    }
}

/// A fingerprint of what `apply_settings_all_devices` takes from a config section (FNV-1a over
/// the values, never 0): equal sections give equal hashes in every controller of this layout.
fn config_section_hash(s: &Settings) -> u64 {
    let text = format!(
        "memory={:?};share={:?};max={:?};priority={:?}",
        s.memory_limit.all().map(|v| v.value),
        s.sm_share.all().map(|v| v.value),
        s.sm_max.all().map(|v| v.value),
        s.priority.as_ref().map(|p| p.value as u32),
    );
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    hash.max(1)
}

/// Config settings for a group, on every device index. The config's per-device keys name CUDA
/// ordinals of one process and a group spans processes, so a group's section has none: a file
/// with them is refused when it is loaded (`FileSettings::for_controller`).
fn apply_settings_all_devices(g: &GroupSlot, s: &Settings) {
    for d in 0..MAX_DEVICES {
        if let Some(l) = s.memory_limit.all() {
            g.devices[d].limit.store(l.value, Relaxed);
        }
        if let Some(share) = s.sm_share.all() {
            g.set_share(d, share.value);
        }
        g.set_cap(d, s.sm_max.all().map_or(0, |c| c.value));
    }
    g.priority.store(s.priority.as_ref().map_or(Priority::Normal, |p| p.value) as u32, Relaxed);
}

/// Issue 18: what a cap adds to a share's description (nothing when the share is the cap).
fn cap_text(share: u32, cap: u32) -> String {
    match cap {
        c if c <= share => String::new(),
        c if c >= 100 => " (no cap: borrows idle time)".into(),
        c => format!(" (up to {c}%)"),
    }
}

/// A descriptor that becomes readable when `pid` exits (Linux ≥ 5.3).
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) with flags 0; the result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative result is a descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn raw(fd: &Option<OwnedFd>) -> Option<RawFd> {
    fd.as_ref().map(|f| f.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(dir: &tempfile::TempDir, config: &str) -> State {
        let path = dir.path().join("ledger").to_str().unwrap().to_string();
        let (ledger, adopted) = Ledger::open_or_create(&path, ledger::Geometry { max_groups: 8, max_procs: 8 }).unwrap();
        // As `serve` counts each start (the device record is carried from one to the next).
        ledger.count_controller_start();
        let config = FileSettings::parse("test.toml", config).unwrap();
        let mut s = State::new(ledger, config);
        s.init_memory(adopted).unwrap();
        s.install_config_groups().unwrap();
        s
    }

    fn registration(group: Option<&str>, limit: Option<u64>) -> Registration {
        Registration {
            protocol: PROTOCOL_VERSION,
            group: group.map(String::from),
            priority: None,
            name: "test".into(),
            own_pid: 1,
            devices: vec![DeviceClaim {
                ordinal: 0,
                uuid: "GPU-00000000-0000-0000-0000-000000000001".into(),
                total_memory: 1 << 40,
                memory_limit: limit,
                sm_share: Some(30),
                sm_max: 0,
            }],
        }
    }

    fn me() -> Peer {
        // SAFETY: geteuid has no preconditions and cannot fail.
        Peer { pid: std::process::id(), uid: unsafe { libc::geteuid() } }
    }

    #[test]
    fn a_process_whose_pid_the_controller_cannot_see_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "");
        let e = s.register(Peer { pid: 0, uid: me().uid }, registration(None, None)).unwrap_err();
        assert!(e.contains("pid namespace") && e.contains("hostPID"), "{e}");
        assert_eq!(s.ledger.processes().filter(|(_, p)| p.state.load(Acquire) == LIVE).count(), 0);
    }

    #[test]
    fn a_group_member_leaving_returns_exactly_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.pair]\nmemory_limit = \"1000\"\n");
        // Two "processes": this test's pid and its parent's (both alive for the test's length).
        let parent = std::os::unix::process::parent_id();
        let a = s.register(me(), registration(Some("pair"), Some(5000))).unwrap();
        let b = s.register(Peer { pid: parent, uid: me().uid }, registration(Some("pair"), None)).unwrap();
        assert_eq!(a.group, b.group);
        assert!(a.notes.iter().any(|n| n.contains("not used")), "{:?}", a.notes);
        let g = s.ledger.group(a.group as usize);
        let (pa, pb) = (s.ledger.process(a.slot as usize), s.ledger.process(b.slot as usize));
        let d = a.devices[0].1 as usize;
        pa.try_charge(g, d, 600).unwrap();
        assert!(pb.try_charge(g, d, 401).is_err(), "the group limit binds across members");
        pb.try_charge(g, d, 400).unwrap();
        s.release(a.slot as usize, "killed");
        let g = s.ledger.group(a.group as usize);
        assert_eq!(g.devices[d].used.load(Relaxed), 400);
        assert_eq!(g.members.load(Relaxed), 1);
        s.release(b.slot as usize, "exited");
        assert_eq!(s.find_group("pair"), Some(a.group as usize), "config groups stay when empty");
        assert_eq!(s.ledger.group(a.group as usize).devices[d].used.load(Relaxed), 0);
    }

    #[test]
    fn a_process_alone_gets_its_environment_and_is_freed_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "");
        let a = s.register(me(), registration(None, Some(4096))).unwrap();
        assert_eq!(a.group_name, format!("pid-{}", std::process::id()));
        let g = s.ledger.group(a.group as usize);
        assert_eq!(g.devices[0].limit.load(Relaxed), 4096);
        assert_eq!(g.devices[0].share.load(Relaxed), 30);
        assert_eq!(g.throttled.load(Relaxed), 1);
        s.release(a.slot as usize, "exited");
        assert_eq!(s.find_group(&a.group_name), None);
    }

    #[test]
    fn edits_need_the_owner_or_root_and_apply_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.g]\nmemory_limit = \"1GiB\"\n");
        let stranger = Peer { pid: 1, uid: s.owner_uid.wrapping_add(4242).max(1) };
        let edit = Edit {
            target: Target::Group("g".into()),
            memory: Some(Limit::Bytes(2 << 30)),
            sm: Some(50),
            sm_max: None,
            priority: Some(Priority::High),
            device: None,
            create: false,
        };
        let e = s.edit(stranger, edit.clone()).unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
        let slot = s.find_group("g").unwrap();
        assert_eq!(s.ledger.group(slot).devices[0].limit.load(Relaxed), 1 << 30, "unchanged");
        s.edit(me(), edit).unwrap();
        let g = s.ledger.group(slot);
        assert_eq!(g.devices[3].limit.load(Relaxed), 2 << 30);
        assert_eq!(g.devices[3].share.load(Relaxed), 50);
        assert_eq!(g.priority(), Priority::High);
        let e = s
            .edit(me(), Edit { target: Target::Pid(999_999_999), memory: None, sm: Some(10), sm_max: None, priority: None, device: None, create: false })
            .unwrap_err();
        assert!(e.contains("no registered process"), "{e}");
        assert!(s
            .edit(
                me(),
                Edit { target: Target::Group("g".into()), memory: Some(Limit::Bytes(0)), sm: None, sm_max: None, priority: None, device: None, create: false }
            )
            .is_err());
    }

    #[test]
    fn garbled_device_claims_are_not_tracked_and_slots_no_process_uses_are_freed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "");
        let claim = |ordinal: u32, uuid: &str| DeviceClaim { ordinal, uuid: uuid.into(), total_memory: 1 << 30, memory_limit: None, sm_share: None, sm_max: 0 };
        let mut r = registration(None, None);
        r.devices = vec![
            claim(0, "ordinal-0"),
            claim(1, "GPU-zz"),
            claim(2, &"x".repeat(5000)),
            claim(3, "GPU-00000000-0000-0000-0000-00000000000a"),
            claim(3, "GPU-00000000-0000-0000-0000-00000000000b"),
        ];
        let a = s.register(me(), r).unwrap();
        assert_eq!(a.devices.len(), 1, "only the one well-formed claim: {:?}", a.devices);
        assert_eq!(a.notes.len(), 4, "{:?}", a.notes);
        assert!(a.notes.iter().all(|n| n.len() < 200), "client text is cut short in notes: {:?}", a.notes);
        // Sixteen made-up GPUs from one process fill the table while it lives...
        let mut r = registration(None, None);
        r.devices = (0..20).map(|i| claim(i, &format!("GPU-00000000-0000-0000-0000-{i:012x}"))).collect();
        let parent = Peer { pid: std::os::unix::process::parent_id(), uid: me().uid };
        let b = s.register(parent, r).unwrap();
        assert_eq!(s.devices().len(), MAX_DEVICES);
        assert!(b.notes.iter().any(|n| n.contains("not tracked: the ledger knows")), "{:?}", b.notes);
        // ...and once it is gone a new device takes one of its slots, never one in use.
        s.release(b.slot as usize, "exited");
        assert_eq!(s.devices().len(), MAX_DEVICES, "slots stay claimed while nobody needs them");
        let mut r = registration(None, None);
        r.devices = vec![claim(0, "GPU-11111111-1111-1111-1111-111111111111")];
        let c = s.register(parent, r).unwrap();
        assert_eq!(c.devices.len(), 1, "a real device gets a slot again: {:?}", c.notes);
        let devices = s.devices();
        assert_eq!(devices.len(), MAX_DEVICES);
        assert!(devices.contains(&"GPU-11111111-1111-1111-1111-111111111111".to_string()), "{devices:?}");
        assert!(devices.contains(&"GPU-00000000-0000-0000-0000-00000000000a".to_string()), "the slot of a device in use stays: {devices:?}");
    }

    fn group_edit(name: &str, create: bool) -> Edit {
        Edit { target: Target::Group(name.into()), memory: Some(Limit::Bytes(1 << 30)), sm: None, sm_max: None, priority: None, device: None, create }
    }

    #[test]
    fn a_group_is_made_by_set_only_when_asked_and_a_typo_names_the_close_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.inference]\nmemory_limit = \"1GiB\"\n");
        let e = s.edit(me(), group_edit("inferense", false)).unwrap_err();
        assert!(e.contains("no group \"inferense\"") && e.contains("did you mean \"inference\"") && e.contains("--create"), "{e}");
        assert_eq!(s.find_group("inferense"), None, "a refused edit makes nothing");
        let made = s.edit(me(), group_edit("batch", true)).unwrap();
        assert!(made.contains("\"batch\" created"), "{made}");
        let again = s.edit(me(), group_edit("batch", false)).unwrap();
        assert!(again.contains("\"batch\" now"), "{again}");
    }

    #[test]
    fn an_edit_for_a_device_the_ledger_does_not_know_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.g]\n");
        let mut edit = group_edit("g", false);
        edit.device = Some(0);
        let e = s.edit(me(), edit.clone()).unwrap_err();
        assert!(e.contains("knows no device yet"), "{e}");
        s.register(me(), registration(Some("g"), None)).unwrap();
        s.edit(me(), edit.clone()).unwrap();
        edit.device = Some(7);
        let e = s.edit(me(), edit).unwrap_err();
        assert!(e.contains("device 7 is not in the ledger") && e.contains("device(s) 0"), "{e}");
        assert_eq!(s.ledger.group(s.find_group("g").unwrap()).devices[7].limit.load(Relaxed), UNLIMITED, "nothing changed on device 7");
    }

    /// `--device N` is checked against the controller's table, not the shared one, which any
    /// member writes: a slot a member marked free is still edited, one it marked live is not.
    #[test]
    fn an_edit_names_devices_by_the_controllers_table_not_the_shared_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.g]\n");
        s.register(me(), registration(Some("g"), None)).unwrap();
        s.ledger.device(0).state.store(FREE, Relaxed);
        s.ledger.device(7).state.store(LIVE, Relaxed);
        let mut edit = group_edit("g", false);
        edit.device = Some(0);
        s.edit(me(), edit.clone()).expect("slot 0 is the controller's");
        edit.device = Some(7);
        let e = s.edit(me(), edit).unwrap_err();
        assert!(e.contains("device 7 is not in the ledger") && e.contains("device(s) 0 "), "{e}");
    }

    #[test]
    fn an_empty_group_is_removed_for_good_and_one_with_members_is_not() {
        let dir = tempfile::tempdir().unwrap();
        // What the registered process holds (its group's memory) outlives the controller.
        let _held = {
            let mut s = state(&dir, "");
            s.edit(me(), group_edit("typo", true)).unwrap();
            s.edit(me(), group_edit("busy", true)).unwrap();
            let busy = s.register(me(), registration(Some("busy"), None)).unwrap();
            let e = s.remove_group(me(), "busy").unwrap_err();
            assert!(e.contains("1 member") && e.contains(&std::process::id().to_string()), "{e}");
            let stranger = Peer { pid: 1, uid: s.owner_uid.wrapping_add(4242).max(1) };
            assert!(s.remove_group(stranger, "typo").unwrap_err().contains("permission denied"));
            assert!(s.remove_group(me(), "typ").unwrap_err().contains("did you mean \"typo\""));
            s.remove_group(me(), "typo").unwrap();
            assert_eq!(s.find_group("typo"), None);
            s.descriptors_for(busy.group as usize).unwrap()
        };
        // A restarted controller on the same ledger does not bring it back.
        let mut s = state(&dir, "");
        s.adopt();
        assert_eq!(s.find_group("typo"), None);
        assert!(s.find_group("busy").is_some());
    }

    #[test]
    fn a_group_from_the_environment_is_its_uids_unless_open_or_configured() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "");
        let parent = std::os::unix::process::parent_id();
        let a = s.register(Peer { pid: parent, uid: 1000 }, registration(Some("team"), Some(1 << 30))).unwrap();
        let g = s.ledger.group(a.group as usize);
        assert!((0..MAX_DEVICES).all(|d| g.devices[d].limit.load(Relaxed) == 1 << 30), "the environment's limit on every device");
        let e = s.register(Peer { pid: std::process::id(), uid: 2000 }, registration(Some("team"), None)).unwrap_err();
        assert!(e.contains("uid 1000") && !is_retry_later(&e), "{e}");
        s.env_groups_open = true;
        let b = s.register(Peer { pid: std::process::id(), uid: 2000 }, registration(Some("team"), None)).unwrap();
        assert_eq!(a.group, b.group);
        s.release(b.slot as usize, "exited");
        s.env_groups_open = false;
        s.edit(
            me(),
            Edit {
                target: Target::Group("team".into()),
                memory: Some(Limit::Bytes(2 << 30)),
                sm: None,
                sm_max: None,
                priority: None,
                device: None,
                create: false,
            },
        )
        .unwrap();
        s.register(Peer { pid: std::process::id(), uid: 2000 }, registration(Some("team"), None)).expect("configured: open to all");
    }

    #[test]
    fn a_restarted_controller_drops_the_dead_and_keeps_the_living() {
        let dir = tempfile::tempdir().unwrap();
        let (dead_slot, live_slot, group, _held) = {
            let mut s = state(&dir, "");
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let dead_pid = child.id();
            let dead = s.register(Peer { pid: dead_pid, uid: 0 }, registration(Some("team"), None)).unwrap();
            let live = s.register(me(), registration(Some("team"), None)).unwrap();
            let g = s.ledger.group(dead.group as usize);
            s.ledger.process(dead.slot as usize).try_charge(g, 0, 700).unwrap();
            s.ledger.process(live.slot as usize).try_charge(g, 0, 300).unwrap();
            child.wait().unwrap();
            // A member rewrites its group's writable copy of the limit between two ticks.
            g.devices[0].limit.store(12345, Relaxed);
            // The controller "dies" here: no release for the child; the live one keeps its
            // group's memory.
            (dead.slot as usize, live.slot as usize, dead.group as usize, s.descriptors_for(live.group as usize).unwrap())
        };
        let mut s = state(&dir, "");
        assert_eq!(s.ledger.group(group).devices[0].used.load(Relaxed), 1000);
        s.adopt();
        assert_eq!(s.ledger.group(group).devices[0].used.load(Relaxed), 300);
        assert_eq!(s.ledger.process(dead_slot).state.load(Relaxed), FREE);
        assert_eq!(s.ledger.process(live_slot).state.load(Relaxed), LIVE);
        assert!(s.watched.contains_key(&live_slot));
        assert_eq!(s.groups[&group].limits[0], UNLIMITED, "the limit comes from the published page, not the members' copy");
    }

    /// A group made with `set --create` that nobody has joined yet lives only in the controller's
    /// memory and the ledger file's copy: a restart keeps it, with its limit, and members can join
    /// it afterwards; a removed one stays removed.
    #[test]
    fn a_pinned_group_without_members_survives_a_restart_with_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = state(&dir, "");
            s.edit(me(), group_edit("ha", true)).unwrap();
            s.edit(me(), group_edit("gone", true)).unwrap();
            s.publish();
            s.remove_group(me(), "gone").unwrap();
            s.publish();
            // The controller dies here: nothing else holds the groups' memory.
        }
        let mut s = state(&dir, "");
        s.adopt();
        assert_eq!(s.find_group("gone"), None, "a removed group is not brought back");
        let ha = s.find_group("ha").expect("the pinned group survives the restart");
        assert!(s.groups[&ha].pinned);
        assert_eq!(s.groups[&ha].limits[0], 1 << 30, "with its limit");
        let member = s.register(me(), registration(Some("ha"), None)).unwrap();
        assert_eq!(member.group as usize, ha, "a member joins it, not a new group of that name");
        assert_eq!(s.ledger.group(ha).devices[0].limit.load(Relaxed), 1 << 30, "and is held to its limit");
    }

    /// A controller restarted on `dir`'s ledger with `config`, in `serve`'s order (adopt, then
    /// the config's groups), publishing once as its first request would.
    fn restarted(dir: &tempfile::TempDir, config: &str) -> State {
        let path = dir.path().join("ledger").to_str().unwrap().to_string();
        let (ledger, adopted) = Ledger::open_or_create(&path, ledger::Geometry { max_groups: 8, max_procs: 8 }).unwrap();
        assert!(adopted);
        ledger.count_controller_start();
        let mut s = State::new(ledger, FileSettings::parse("test.toml", config).unwrap());
        s.config_path = Some("test.toml".into());
        s.init_memory(true).unwrap();
        s.adopt();
        s.install_config_groups().unwrap();
        s.publish();
        s
    }

    /// A config group the new config no longer names is unpinned at a restart: gone at once
    /// without members, kept (with its limit) until its last member exits otherwise. A group a
    /// live `set --create` made, and a config group the new config still names, stay pinned.
    #[test]
    fn a_config_group_the_new_config_drops_is_unpinned_at_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let old = "[groups.gone]\nmemory_limit = \"1GiB\"\n[groups.busy]\nmemory_limit = \"1GiB\"\n[groups.kept]\nmemory_limit = \"1GiB\"\n";
        let new = "[groups.kept]\nmemory_limit = \"1GiB\"\n";
        let _held = {
            let mut s = state(&dir, old);
            s.edit(me(), group_edit("live", true)).unwrap();
            let busy = s.register(me(), registration(Some("busy"), None)).unwrap();
            s.publish();
            s.descriptors_for(busy.group as usize).unwrap()
        };
        let mut s = restarted(&dir, new);
        assert_eq!(s.find_group("gone"), None, "dropped from the config, no members: gone");
        let busy = s.find_group("busy").expect("dropped from the config, one member: kept for it");
        assert!(!s.groups[&busy].pinned);
        assert_eq!(s.ledger.group(busy).devices[0].limit.load(Relaxed), 1 << 30, "its member is still held to its limit");
        for (name, origin) in [("kept", Origin::Config), ("live", Origin::Live)] {
            let g = s.find_group(name).unwrap_or_else(|| panic!("{name} survives the restart"));
            assert!(s.groups[&g].pinned && s.groups[&g].origin == origin, "{name}: {:?}", s.groups[&g]);
            assert_eq!(s.groups[&g].limits[0], 1 << 30, "{name} keeps its limit");
        }
        let member = *s.members(busy).first().expect("its member was adopted");
        s.release(member, "exited");
        assert_eq!(s.find_group("busy"), None, "gone with its last member");
        drop(s);
        let s = restarted(&dir, new);
        let mut names: Vec<&str> = s.groups.values().map(|g| g.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["kept", "live"], "nothing dropped comes back at the next restart");
    }

    /// A restart applies a config section again only when the file changed: a live edit
    /// survives a restart on the same file, an edited section wins over it at the next, and a
    /// live edit made after that survives again. A `set --create` group the new file names takes
    /// the file's values and becomes the config's.
    #[test]
    fn a_restart_applies_a_config_section_only_when_the_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = "[groups.inference]\nmemory_limit = \"1GiB\"\n";
        let v2 = "[groups.inference]\nmemory_limit = \"2GiB\"\n[groups.batch]\nmemory_limit = \"5GiB\"\n";
        let edit_to = |s: &mut State, name: &str, bytes: u64| {
            let mut e = group_edit(name, false);
            e.memory = Some(Limit::Bytes(bytes));
            s.edit(me(), e).unwrap();
            s.publish();
        };
        {
            let mut s = state(&dir, v1);
            edit_to(&mut s, "inference", 3 << 30);
            s.edit(me(), group_edit("batch", true)).unwrap();
            s.publish();
        }
        let limit = |s: &State, name: &str| s.groups[&s.find_group(name).unwrap_or_else(|| panic!("{name} is there"))].limits[0];
        let s = restarted(&dir, v1);
        assert_eq!(limit(&s, "inference"), 3 << 30, "the same file: the live edit survives");
        assert_eq!(limit(&s, "batch"), 1 << 30);
        drop(s);
        let mut s = restarted(&dir, v2);
        assert_eq!(limit(&s, "inference"), 2 << 30, "an edited section applies at the restart");
        let batch = &s.groups[&s.find_group("batch").unwrap()];
        assert_eq!((batch.limits[0], batch.origin, batch.pinned), (5 << 30, Origin::Config, true), "named by the file now: its values, its group");
        edit_to(&mut s, "inference", 4 << 30);
        drop(s);
        let s = restarted(&dir, v2);
        assert_eq!(limit(&s, "inference"), 4 << 30, "the file unchanged since: the later live edit survives");
        assert_eq!(limit(&s, "batch"), 5 << 30);
    }

    /// A group a member's environment made (closed to other uids) that a new config names becomes
    /// the config's at the restart: the file's limit, open to every uid, kept when empty.
    #[test]
    fn a_group_from_the_environment_that_the_config_names_becomes_the_configs() {
        let dir = tempfile::tempdir().unwrap();
        let _held = {
            let mut s = state(&dir, "");
            let member = s.register(me(), registration(Some("team"), Some(1 << 30))).unwrap();
            s.publish();
            let team = s.find_group("team").unwrap();
            assert!(s.groups[&team].env_uid.is_some() && !s.groups[&team].pinned);
            s.descriptors_for(member.group as usize).unwrap()
        };
        let s = restarted(&dir, "[groups.team]\nmemory_limit = \"2GiB\"\n");
        let team = &s.groups[&s.find_group("team").unwrap()];
        assert_eq!((team.limits[0], team.origin, team.pinned, team.env_uid), (2 << 30, Origin::Config, true, None), "{team:?}");
    }

    /// A ledger written before origins were recorded (origin 0): a pinned group the config names
    /// is taken as the config's from then on; one it does not name is kept, as before.
    #[test]
    fn a_pinned_group_of_unrecorded_origin_is_kept_and_the_configs_own_learn_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = state(&dir, "[groups.named]\n");
            s.edit(me(), group_edit("old", true)).unwrap();
            for info in s.groups.values_mut() {
                info.origin = Origin::Unrecorded;
            }
            s.publish();
        }
        let s = restarted(&dir, "[groups.named]\n");
        let (named, old) = (s.find_group("named").unwrap(), s.find_group("old").unwrap());
        assert_eq!((s.groups[&named].origin, s.groups[&old].origin), (Origin::Config, Origin::Unrecorded));
        assert!(s.groups[&old].pinned);
        drop(s);
        let s = restarted(&dir, "");
        assert_eq!(s.find_group("named"), None, "recorded as the config's at the first restart, dropped at the second");
        assert!(s.find_group("old").is_some_and(|g| s.groups[&g].pinned), "unrecorded: kept");
    }

    /// A config group unpinned at a restart (the new config dropped it) while a member still
    /// ran is pinned again by a later restart whose config names it again: it then outlives
    /// that member, as the config's groups do.
    #[test]
    fn a_dropped_config_group_named_again_before_its_member_left_is_pinned_again() {
        let dir = tempfile::tempdir().unwrap();
        let config = "[groups.busy]\nmemory_limit = \"1GiB\"\n";
        let _held = {
            let mut s = state(&dir, config);
            let busy = s.register(me(), registration(Some("busy"), None)).unwrap();
            s.publish();
            s.descriptors_for(busy.group as usize).unwrap()
        };
        let s = restarted(&dir, "");
        assert!(s.find_group("busy").is_some_and(|g| !s.groups[&g].pinned), "dropped: unpinned, kept for its member");
        drop(s);
        let mut s = restarted(&dir, config);
        let busy = s.find_group("busy").expect("still there");
        assert!(s.groups[&busy].pinned && s.groups[&busy].origin == Origin::Config, "{:?}", s.groups[&busy]);
        let member = *s.members(busy).first().expect("its member was adopted");
        s.release(member, "exited");
        assert_eq!(s.find_group("busy"), Some(busy), "the config's again: it outlives its member");
        assert_eq!(s.ledger.group(busy).devices[0].limit.load(Relaxed), 1 << 30);
    }

    /// A group made from the environment of uid 1000's process is still that uid's after a
    /// restart (`GroupSlot::owner` on the published page): another uid is refused in the same
    /// words as before it, uid 1000's processes join, and it still counts against uid 1000's
    /// groups. Root's (uid 0) comes back as root's, not as "no owner". A `set` still opens it to
    /// every uid, which the next restart keeps; an unpinned one still goes with its last member.
    #[test]
    fn a_group_from_the_environment_stays_its_uids_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let parent = std::os::unix::process::parent_id();
        let stranger = Peer { pid: 1, uid: 2000 };
        let (refused, _held) = {
            let mut s = state(&dir, "");
            let team = s.register(Peer { pid: parent, uid: 1000 }, registration(Some("team"), Some(1 << 30))).unwrap();
            let root = s.register(Peer { pid: std::process::id(), uid: 0 }, registration(Some("rootteam"), None)).unwrap();
            s.publish();
            let refused = s.register(stranger, registration(Some("team"), None)).unwrap_err();
            assert!(refused.contains("of uid 1000;"), "{refused}");
            (refused, [team.group, root.group].map(|g| s.descriptors_for(g as usize).unwrap()))
        };
        let mut s = restarted(&dir, "");
        let team = s.find_group("team").expect("kept for its member");
        assert_eq!(s.groups[&team].env_uid, Some(1000), "{:?}", s.groups[&team]);
        assert_eq!(s.register(stranger, registration(Some("team"), None)).unwrap_err(), refused, "refused as before the restart");
        let e = s.register(stranger, registration(Some("rootteam"), None)).unwrap_err();
        assert!(e.contains("of uid 0;"), "root's group is root's: {e}");
        s.uid_limits.groups = 1;
        let e = s.register(Peer { pid: 1, uid: 1000 }, registration(Some("other"), None)).unwrap_err();
        assert!(e.contains("uid 1000 already has 1 groups"), "still counted as uid 1000's: {e}");
        let joined = s.register(Peer { pid: 1, uid: 1000 }, registration(Some("team"), None)).expect("its owner's processes join");
        assert_eq!(joined.group as usize, team);
        assert_eq!(s.ledger.group(team).devices[0].limit.load(Relaxed), 1 << 30, "held to its limit");
        let root = s.find_group("rootteam").unwrap();
        let member = *s.members(root).first().expect("its member was adopted");
        s.release(member, "exited");
        assert_eq!(s.find_group("rootteam"), None, "unpinned: gone with its last member");
        s.release(joined.slot as usize, "exited");
        s.edit(me(), group_edit("team", false)).unwrap();
        assert!(s.groups[&team].pinned && s.groups[&team].env_uid.is_none(), "{:?}", s.groups[&team]);
        s.publish();
        drop(s);
        let mut s = restarted(&dir, "");
        let team = s.find_group("team").unwrap();
        assert!(s.groups[&team].pinned && s.groups[&team].env_uid.is_none(), "configured: open after a restart too: {:?}", s.groups[&team]);
        let other = s.register(stranger, registration(Some("team"), None)).expect("configured: open to all");
        assert_eq!(other.group as usize, team);
    }

    /// A restart that finds a group's memory but not its settings page (its members closed it)
    /// takes neither what pins the group nor who may join it from the members' writable copy,
    /// where a member can write a pin and "open to all": each group's settings, its owner
    /// included, come from the ledger file's copy, so unpinned `team` stays uid 1000's (and
    /// unpinned), and pinned `ha` keeps its 1 GiB.
    #[test]
    fn a_group_whose_settings_page_was_lost_is_opened_by_nothing_its_members_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let parent = std::os::unix::process::parent_id();
        let _held = {
            let mut s = state(&dir, "");
            s.edit(me(), group_edit("ha", true)).unwrap();
            let team = s.register(Peer { pid: parent, uid: 1000 }, registration(Some("team"), Some(1 << 30))).unwrap();
            let ha = s.register(Peer { pid: std::process::id(), uid: 1000 }, registration(Some("ha"), None)).unwrap();
            s.publish();
            for g in [team.group, ha.group] {
                let copy = s.ledger.group(g as usize);
                copy.pinned.store(1, Relaxed);
                copy.origin.store(Origin::Live as u32, Relaxed);
                copy.owner.store(Owner::Open.word(), Relaxed);
                copy.devices[0].limit.store(UNLIMITED, Relaxed);
            }
            // Their members keep the group's memory and the device memory, not the settings page.
            [team.group, ha.group].map(|g| s.descriptors_for(g as usize).unwrap().into_iter().take(2).collect::<Vec<_>>())
        };
        let mut s = restarted(&dir, "");
        let team = s.find_group("team").expect("kept for its member");
        assert!(!s.groups[&team].pinned && s.groups[&team].env_uid == Some(1000), "{:?}", s.groups[&team]);
        assert_eq!(s.groups[&team].limits[0], 1 << 30, "{:?}", s.groups[&team]);
        let e = s.register(Peer { pid: 1, uid: 2000 }, registration(Some("team"), None)).unwrap_err();
        assert!(e.contains("of uid 1000;"), "{e}");
        let joined = s.register(Peer { pid: 1, uid: 1000 }, registration(Some("team"), None)).expect("its own uid may join");
        assert_eq!(joined.group as usize, team);
        let ha = s.find_group("ha").expect("pinned");
        assert!(s.groups[&ha].pinned && s.groups[&ha].origin == Origin::Live && s.groups[&ha].env_uid.is_none(), "{:?}", s.groups[&ha]);
        assert_eq!(s.groups[&ha].limits[0], 1 << 30, "from the ledger file's copy, not the members' rewritten one");
    }

    /// Unpinned group `team` (uid 1000's member, 1 GiB and a 30 % share from its environment)
    /// made before `set --create` group `victim` (1 GiB), so in a lower slot; the controller
    /// publishes; then `team`'s member writes `rewrite` into its group's writable copy and keeps
    /// only the group's memory (not the settings page) through a restart. `forget_copy`: the
    /// ledger file's copy of `team`'s settings is cleared too, as a controller that kept only
    /// pinned groups' copies left it. Returns the restarted state, `team`'s slot, `victim`'s,
    /// `team`'s settings before, and the descriptors its member holds.
    fn lost_page_rewritten(dir: &tempfile::TempDir, rewrite: impl Fn(&GroupSlot), forget_copy: bool) -> (State, usize, usize, GroupInfo, Vec<OwnedFd>) {
        let parent = std::os::unix::process::parent_id();
        let (team, victim, before, held) = {
            let mut s = state(dir, "");
            let team = s.register(Peer { pid: parent, uid: 1000 }, registration(Some("team"), Some(1 << 30))).unwrap().group as usize;
            s.edit(me(), group_edit("victim", true)).unwrap();
            let victim = s.find_group("victim").unwrap();
            assert!(team < victim, "the rewritten group comes first in adopt's order");
            s.publish();
            rewrite(s.ledger.group(team));
            if forget_copy {
                s.ledger.clear_group_page(team).unwrap();
            }
            let before = s.groups[&team].clone();
            (team, victim, before, s.descriptors_for(team).unwrap().into_iter().take(2).collect())
        };
        (restarted(dir, ""), team, victim, before, held)
    }

    /// Everything the members' writable copy holds that decided a group before: its limit
    /// lifted, its share and cap off, high priority, pinned and open to all, and the name of
    /// another group (whose later slot `adopt` freed as "not distinct").
    fn raise_and_rename(copy: &GroupSlot) {
        copy.devices[0].limit.store(UNLIMITED, Relaxed);
        copy.set_share(0, 0);
        copy.set_cap(0, 100);
        copy.priority.store(Priority::High as u32, Relaxed);
        copy.pinned.store(1, Relaxed);
        copy.owner.store(Owner::Open.word(), Relaxed);
        copy.set_name("victim");
    }

    /// A member that hides its group's settings page and writes a higher limit and share, high
    /// priority and another group's name into its writable copy gets none of it at a restart:
    /// `team` keeps the controller's settings (from the ledger file's copy) and its name, stays
    /// uid 1000's, and `victim` is still `victim`, with its 1 GiB.
    #[test]
    fn a_group_whose_settings_page_was_lost_keeps_the_controllers_limits_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, team, victim, before, _held) = lost_page_rewritten(&dir, raise_and_rename, false);
        assert_eq!(s.find_group("team"), Some(team), "its own name, not the one its members wrote: {:?}", s.groups);
        assert_eq!(s.find_group("victim"), Some(victim), "the other group keeps its name and slot: {:?}", s.groups);
        let info = &s.groups[&team];
        assert_eq!((info.limits, info.shares, info.sm_caps, info.priority), (before.limits, before.shares, before.sm_caps, before.priority), "{info:?}");
        assert_eq!((info.limits[0], info.shares[0], info.priority), (1 << 30, 30, Priority::Normal as u32), "{info:?}");
        assert!(!info.pinned && info.env_uid == Some(1000), "{info:?}");
        let page = s.published(team).unwrap();
        assert_eq!((page.name(), page.devices[0].limit.load(Relaxed), page.devices[0].share.load(Relaxed)), ("team".to_string(), 1 << 30, 30));
        assert_eq!(s.members(team).len(), 1, "its member is adopted");
        assert!(s.groups[&victim].pinned && s.groups[&victim].limits[0] == 1 << 30, "{:?}", s.groups[&victim]);
        let e = s.register(Peer { pid: 1, uid: 2000 }, registration(Some("team"), None)).unwrap_err();
        assert!(e.contains("of uid 1000;"), "{e}");
        let v = s.register(Peer { pid: 1, uid: 2000 }, registration(Some("victim"), None)).expect("configured: open to all");
        assert_eq!(v.group as usize, victim);
        // The first tick puts the controller's values back into the writable copy, and says so.
        s.enforce();
        let copy = s.ledger.group(team);
        assert_eq!((copy.name(), copy.devices[0].limit.load(Relaxed), copy.devices[0].share.load(Relaxed)), ("team".to_string(), 1 << 30, 30));
    }

    /// A member that writes FREE into its group's writable copy before a restart (with its page
    /// hidden, or not) does not make the restarted controller skip the group and release its
    /// members, unwatched and counted nowhere: whether the slot holds a group is the published
    /// page's word (or the file's copy).
    #[test]
    fn a_group_whose_members_wrote_it_free_is_still_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let (s, team, _, _, _held) = lost_page_rewritten(&dir, |copy| copy.state.store(FREE, Release), false);
        assert_eq!(s.find_group("team"), Some(team), "{:?}", s.groups);
        assert_eq!(s.members(team).len(), 1, "its member is adopted, not released");
        assert_eq!(s.groups[&team].limits[0], 1 << 30);
    }

    /// Neither the settings page nor the ledger file's copy (a ledger from a controller that
    /// kept only pinned groups' copies): the group fails closed. It keeps its member, whose
    /// bytes stay counted, but takes nothing from the writable copy: no memory beyond what it
    /// holds, a 1 % share, low priority, a name nobody can ask for, closed to every uid; the
    /// name its members wrote stays `victim`'s, and a new `team` is a new group. It goes with
    /// its last member.
    #[test]
    fn a_group_whose_settings_and_their_copy_were_both_lost_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, team, victim, _, _held) = lost_page_rewritten(&dir, raise_and_rename, true);
        assert_eq!(s.find_group("victim"), Some(victim), "the other group keeps its name and slot: {:?}", s.groups);
        assert!(s.groups[&victim].pinned && s.groups[&victim].limits[0] == 1 << 30, "{:?}", s.groups[&victim]);
        let lost = gpuslice_common::settings::lost_group_name(team);
        assert_eq!(s.find_group(&lost), Some(team), "{:?}", s.groups);
        let info = &s.groups[&team];
        assert_eq!(
            (info.limits, info.shares, info.sm_caps, info.priority),
            ([0; MAX_DEVICES], [1; MAX_DEVICES], [0; MAX_DEVICES], Priority::Low as u32),
            "{info:?}"
        );
        assert!(!info.pinned && info.env_uid == Some(OWNER_UNKNOWN), "{info:?}");
        assert_eq!(s.ledger.group(team).devices[0].limit.load(Relaxed), 0, "the writable copy follows");
        let members = s.members(team);
        assert_eq!(members.len(), 1, "its member is adopted: its bytes stay counted");
        let again = s.register(Peer { pid: 1, uid: 1000 }, registration(Some("team"), Some(1 << 30))).expect("a new group");
        assert_ne!(again.group as usize, team);
        s.release(members[0], "exited");
        assert_eq!(s.find_group(&lost), None, "gone with its last member");
    }

    /// A member that rewrites its own slot before a restart (the group index of config group
    /// `victim`, uid 0, another pid with start time 0, its cap lifted, 900 MiB used) is taken
    /// back as the controller recorded it: in its own group, as its own pid and uid, with its
    /// cap and the cross-check's charge, and flagged; `victim` is charged nothing, and the
    /// other pid is not watched. Its 900 MiB stay its own group's (a member's report is its
    /// word, as before a restart).
    #[test]
    fn a_member_that_rewrote_its_slot_is_adopted_as_the_controller_recorded_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = "[groups.victim]\nmemory_limit = \"1GiB\"\n";
        let (mine, parent) = (std::process::id(), std::os::unix::process::parent_id());
        let (slot, team, victim, _held) = {
            let mut s = state(&dir, config);
            let victim = s.find_group("victim").unwrap();
            let a = s.register(Peer { pid: mine, uid: 1000 }, registration(Some("team"), None)).unwrap();
            let slot = a.slot as usize;
            let cap =
                Edit { target: Target::Pid(mine), memory: Some(Limit::Bytes(256 << 20)), sm: None, sm_max: None, priority: None, device: None, create: false };
            s.edit(me(), cap).unwrap();
            // The cross-check charged it (`crosscheck::finish`).
            s.watched.get_mut(&slot).unwrap().penalty[0] = 5 << 20;
            s.save_record(slot);
            s.publish();
            let p = s.ledger.process(slot);
            p.group.store(victim as u32, Relaxed);
            p.uid.store(0, Relaxed);
            p.pid.store(parent, Relaxed);
            p.start_time.store(0, Relaxed);
            p.devices[0].limit.store(UNLIMITED, Relaxed);
            p.devices[0].used.store(900 << 20, Relaxed);
            (slot, a.group as usize, victim, s.descriptors_for(a.group as usize).unwrap())
        };
        let mut s = restarted(&dir, config);
        let w = s.watched.get(&slot).expect("adopted");
        assert_eq!((w.group, w.pid, w.uid), (team, mine, 1000), "its recorded group, pid and uid");
        assert_eq!(w.caps[0], 256 << 20, "its cap, not the lifted one");
        assert_eq!(w.penalty[0], 5 << 20, "the cross-check's charge");
        assert!(!s.watched.values().any(|w| w.pid == parent), "the pid it wrote is not watched");
        assert_eq!(s.ledger.group(victim).devices[0].used.load(Relaxed), 0, "victim is charged nothing");
        assert_eq!(s.ledger.group(team).devices[0].used.load(Relaxed), 900 << 20, "its own group is");
        assert_eq!(s.group_penalty(team, 0), 5 << 20);
        assert_eq!(s.group_penalty(victim, 0), 0);
        s.uid_limits.processes = 1;
        let e = s.register(Peer { pid: parent, uid: 1000 }, registration(Some("team"), None)).unwrap_err();
        assert!(e.contains("uid 1000 already has 1 registered processes"), "counted as uid 1000's: {e}");
        s.enforce();
        let p = s.ledger.process(slot);
        assert_eq!((p.group.load(Relaxed) as usize, p.pid.load(Relaxed), p.uid.load(Relaxed)), (team, mine, 1000), "the slot is put back");
        assert_eq!(p.devices[0].limit.load(Relaxed), 256 << 20, "its cap too");
        let why = s.watched[&slot].misbehaving.clone().expect("flagged");
        drop(s);
        let s = restarted(&dir, config);
        assert_eq!(s.watched[&slot].misbehaving.as_deref(), Some(why.as_str()), "the flag is kept across a restart");
    }

    /// A slot the controller has no record of (a ledger from a controller before the record)
    /// is checked against the kernel: a pid that does not hold its group's memory, or whose
    /// start time is not the slot's, is not adopted, and its bytes leave its group (the one
    /// whose memory holds the slot, not the one it names); the uid is the kernel's.
    #[test]
    fn a_slot_without_a_record_is_checked_against_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let config = "[groups.victim]\nmemory_limit = \"1GiB\"\n";
        let (me, parent) = (std::process::id(), std::os::unix::process::parent_id());
        let (kept, stranger, forged, team, victim, _held) = {
            let mut s = state(&dir, config);
            let victim = s.find_group("victim").unwrap();
            let kept = s.register(Peer { pid: me, uid: 1000 }, registration(Some("team"), None)).unwrap();
            // The parent is alive but was never handed the group's memory.
            let stranger = s.register(Peer { pid: parent, uid: 1000 }, registration(Some("team"), None)).unwrap();
            let forged = s.register(Peer { pid: 1, uid: 1000 }, registration(Some("team"), None)).unwrap();
            let team = kept.group as usize;
            let g = s.ledger.group(team);
            for (a, bytes) in [(&kept, 300), (&stranger, 200), (&forged, 100)] {
                s.ledger.process(a.slot as usize).try_charge(g, 0, bytes).unwrap();
                s.ledger.clear_process_record(a.slot as usize).unwrap();
            }
            // Another pid (this one's, which holds the memory) with start time 0, and another group.
            let p = s.ledger.process(forged.slot as usize);
            p.pid.store(me, Relaxed);
            p.start_time.store(0, Relaxed);
            p.group.store(victim as u32, Relaxed);
            let slots = [kept.slot, stranger.slot, forged.slot].map(|s| s as usize);
            (slots[0], slots[1], slots[2], team, victim, s.descriptors_for(team).unwrap())
        };
        let s = restarted(&dir, config);
        let w = s.watched.get(&kept).expect("this process holds its group's memory");
        assert_eq!((w.group, w.pid), (team, me));
        // SAFETY: geteuid has no preconditions.
        assert_eq!(w.uid, unsafe { libc::geteuid() }, "the kernel's uid");
        assert!(!s.watched.contains_key(&stranger), "it does not hold the group's memory");
        assert!(!s.watched.contains_key(&forged), "start time 0, and the pid is taken");
        assert_eq!(s.ledger.group(team).devices[0].used.load(Relaxed), 300);
        assert_eq!(s.ledger.group(victim).devices[0].used.load(Relaxed), 0);
        let record = s.ledger.process_record(kept).unwrap();
        assert_eq!((record.magic, record.pid, record.group_plus_one), (ledger::RECORD_MAGIC, me, team as u64 + 1), "recorded from now on");
        assert_eq!(s.ledger.process_record(stranger).unwrap(), ledger::ProcessRecord::none(), "freed slots keep no record");
    }

    /// The process in `slot` taking the turn on device `d` as its shim takes it: under the token
    /// in its slot (the controller's pick), with a lease of 10 s. The ticket it holds it under.
    fn take_turn(s: &State, slot: usize, d: usize) -> u32 {
        let token = s.ledger.process(slot).token.load(Acquire);
        let lease = ledger::monotonic_ns() + 10_000_000_000;
        let turn = &s.ledger.device(d).sched.turn;
        let taken = turn.take(token, 0, lease, 0, &gpuslice_common::turns::Monotonic, |_| u64::MAX);
        let ticket = taken.ticket.expect("a free turn is taken at once");
        assert!(turn.held_by(token, ticket));
        ticket
    }

    /// Branch turntoken: a member that writes another process's turn token into its own slot
    /// and exits does not make the controller free that process's turn; the controller frees
    /// the turn of the process it releases by the token it gave it, whatever that process's
    /// slot says by then.
    #[test]
    fn a_release_frees_only_the_turn_of_the_process_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "");
        let (mine, parent) = (std::process::id(), std::os::unix::process::parent_id());
        let a = s.register(Peer { pid: mine, uid: 1000 }, registration(Some("victims"), None)).unwrap();
        let b = s.register(Peer { pid: parent, uid: 1001 }, registration(Some("team"), None)).unwrap();
        let (sa, sb) = (a.slot as usize, b.slot as usize);
        let (ta, tb) = (s.ledger.process(sa).token.load(Acquire), s.ledger.process(sb).token.load(Acquire));
        assert!(ta != 0 && tb != 0 && ta != tb, "the controller gave each its own token: {ta:#x} {tb:#x}");
        assert_eq!((s.watched[&sa].token, s.watched[&sb].token), (ta, tb), "and keeps a copy");
        let d = a.devices[0].1 as usize;
        let ticket = take_turn(&s, sa, d);
        let turn = &s.ledger.device(d).sched.turn;
        // B reads the holder's token from the device table (every member maps it), writes it
        // into its own slot and exits.
        s.ledger.process(sb).token.store(turn.holder.load(Acquire), Relaxed);
        s.release(sb, "exited");
        let turn = &s.ledger.device(d).sched.turn;
        assert!(turn.held_by(ta, ticket), "A still holds its turn after B's release");
        // A rewrote its own slot's word: its release frees its turn all the same.
        s.ledger.process(sa).token.store(tb, Relaxed);
        s.release(sa, "exited");
        let turn = &s.ledger.device(d).sched.turn;
        assert!(!turn.held_by(ta, ticket), "A's own release frees its turn");
        assert_eq!(turn.holder.load(Acquire), 0);
    }

    /// The same across a controller restart: the token comes back from the controller's record
    /// (the ledger file), not from the slot, for the process that forged its slot and for the
    /// holder whose slot was rewritten.
    #[test]
    fn a_restarted_controller_frees_turns_by_the_tokens_it_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (mine, parent) = (std::process::id(), std::os::unix::process::parent_id());
        let (sa, sb, ta, d, ticket, _held) = {
            let mut s = state(&dir, "");
            let a = s.register(Peer { pid: mine, uid: 1000 }, registration(Some("victims"), None)).unwrap();
            let b = s.register(Peer { pid: parent, uid: 1001 }, registration(Some("team"), None)).unwrap();
            let (sa, sb) = (a.slot as usize, b.slot as usize);
            let d = a.devices[0].1 as usize;
            let ticket = take_turn(&s, sa, d);
            let ta = s.ledger.process(sa).token.load(Acquire);
            let tb = s.ledger.process(sb).token.load(Acquire);
            // Both slots rewritten before the controller dies: B names A's token, A names B's.
            s.ledger.process(sb).token.store(ta, Relaxed);
            s.ledger.process(sa).token.store(tb, Relaxed);
            let held = [s.descriptors_for(a.group as usize).unwrap(), s.descriptors_for(b.group as usize).unwrap()];
            (sa, sb, ta, d, ticket, held)
        };
        let mut s = restarted(&dir, "");
        assert_eq!(s.watched[&sa].token, ta, "A's token is the recorded one");
        assert_ne!(s.watched[&sb].token, ta, "B's is not the one it wrote");
        s.release(sb, "exited");
        assert!(s.ledger.device(d).sched.turn.held_by(ta, ticket), "A still holds its turn after B's release");
        s.release(sa, "exited");
        assert!(!s.ledger.device(d).sched.turn.held_by(ta, ticket), "A's own release frees its turn");
        assert_eq!(s.ledger.process_record(sa).unwrap(), ledger::ProcessRecord::none(), "released slots keep no record");
    }

    /// A member's lies in its group's writable copy, as a tenant writes them between two ticks.
    fn lie_in_copy(s: &State, group: usize) {
        let g = s.ledger.group(group);
        for d in 0..MAX_DEVICES {
            g.devices[d].limit.store(UNLIMITED, Relaxed);
            g.set_share(d, 0);
            g.set_cap(d, 100);
        }
        g.priority.store(Priority::High as u32, Relaxed);
        g.set_name("victim");
    }

    /// Branch lsview: `ls` (and the metrics and `top` made from its rows), the register log line,
    /// `set`'s answer and the notes a member is given show a group's settings as the controller
    /// holds them, not what a member wrote into its group's writable copy since the last tick.
    #[test]
    fn operator_views_take_a_groups_settings_from_the_controller_not_the_members_copy() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.team]\nmemory_limit = \"1GiB\"\nsm_share = 30\nsm_max = 60\npriority = \"low\"\n");
        let a = s.register(me(), registration(Some("team"), None)).unwrap();
        let team = a.group as usize;
        let d = a.devices[0].1 as usize;
        lie_in_copy(&s, team);
        let l = s.listing();
        let row = l.groups.iter().find(|g| g.slot as usize == team).expect("team is listed");
        assert_eq!((row.name.as_str(), row.priority), ("team", Priority::Low), "{row:?}");
        let dev = row.devices.iter().find(|r| r.device as usize == d).expect("its device");
        assert_eq!((dev.limit, dev.share, dev.cap), (Some(1 << 30), Some(30), Some(60)), "{dev:?}");
        let line = s.describe_group(team);
        assert!(line.contains(&format!("device {d}: memory 1.00 GiB, SM 30% (up to 60%)")) && line.ends_with("priority low"), "{line}");
        // A second member whose environment asks for another limit is told the group's.
        let parent = std::os::unix::process::parent_id();
        let b = s.register(Peer { pid: parent, uid: me().uid }, registration(Some("team"), Some(5000))).unwrap();
        assert!(b.notes.iter().any(|n| n.contains("group \"team\" already has 1.00 GiB")), "{:?}", b.notes);
        // `set`'s answer: the edit's value and the controller's others.
        lie_in_copy(&s, team);
        let mut e = group_edit("team", false);
        e.memory = Some(Limit::Bytes(2 << 30));
        let answer = s.edit(me(), e).unwrap();
        assert!(answer.contains("memory 2.00 GiB, SM 30% (up to 60%)") && answer.ends_with("priority low"), "{answer}");
    }

    /// Branch lsview: a member that bumps its slot's and its group slot's `generation` (its to
    /// write) neither blanks its rows' achieved shares nor drops its group's metric labels; a
    /// slot the controller frees takes its labels and samples with it.
    #[test]
    fn rewritten_generations_blank_no_achieved_share_nor_label() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.team]\nsm_share = 30\n");
        let a = s.register(me(), registration(Some("team"), None)).unwrap();
        let (team, slot, d) = (a.group as usize, a.slot as usize, a.devices[0].1 as usize);
        let labels: std::collections::BTreeMap<String, String> = [("claim_name".to_string(), "trainer".to_string())].into();
        s.label_group(me(), GroupLabels { group: "team".into(), labels: labels.clone() }).unwrap();
        s.sample_shares();
        s.ledger.group(team).devices[d].charged_ns.store(5_000_000, Relaxed);
        s.ledger.process(slot).devices[d].charged_ns.store(5_000_000, Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(2));
        s.sample_shares();
        let (g, p) = (s.ledger.group(team), s.ledger.process(slot));
        g.generation.fetch_add(1, Relaxed);
        p.generation.fetch_add(1, Relaxed);
        let l = s.listing();
        let row = l.groups.iter().find(|r| r.slot as usize == team).unwrap();
        assert_eq!(row.labels, labels, "the labels stay");
        assert!(row.devices.iter().find(|r| r.device as usize == d).unwrap().achieved_share.is_some(), "{row:?}");
        let prow = l.processes.iter().find(|r| r.pid == std::process::id()).unwrap();
        assert!(prow.devices.iter().find(|r| r.device as usize == d).unwrap().achieved_share.is_some(), "{prow:?}");
        // Freed by the controller: its samples and labels go with the slot.
        s.release(slot, "exited");
        assert!(!s.samples.charged.keys().chain(s.samples.achieved.keys()).any(|&(grp, i, _)| !grp && i == slot));
        s.remove_group(me(), "team").unwrap();
        assert!(!s.labels.contains_key(&team) && !s.samples.charged.keys().any(|&(grp, i, _)| grp && i == team));
    }

    /// Branch lsview: a config section that changed across a restart applies over the
    /// controller's values; a key it leaves out keeps the controller's value, not what a member
    /// wrote into its group's writable copy while no controller ran to put it back.
    #[test]
    fn a_changed_config_section_keeps_the_controllers_values_for_the_keys_it_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let _held = {
            let mut s = state(&dir, "[groups.team]\nmemory_limit = \"1GiB\"\nsm_share = 30\n");
            let a = s.register(me(), registration(Some("team"), None)).unwrap();
            s.publish();
            // The controller dies; a member writes its copy before the next one starts.
            lie_in_copy(&s, a.group as usize);
            s.descriptors_for(a.group as usize).unwrap()
        };
        let s = restarted(&dir, "[groups.team]\npriority = \"high\"\n");
        let team = s.find_group("team").expect("team is adopted");
        let info = &s.groups[&team];
        assert_eq!((info.limits[0], info.shares[0], info.priority), (1 << 30, 30, Priority::High as u32), "{info:?}");
        let page = s.published(team).unwrap();
        assert_eq!((page.devices[0].limit.load(Relaxed), page.devices[0].share.load(Relaxed)), (1 << 30, 30), "and published so");
    }

    /// Branch lsview: which devices `set --device` may name, and the list its refusal gives,
    /// come from the controller's device table, not the copy every member maps writable (a
    /// member that marked a claimed slot FREE refused the operator's edit until the next tick;
    /// one that marked a free slot LIVE had it listed and edited).
    #[test]
    fn an_edit_for_a_device_goes_by_the_controllers_device_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "[groups.g]\n");
        let a = s.register(me(), registration(Some("g"), None)).unwrap();
        let d = a.devices[0].1 as usize;
        s.ledger.device(d).state.store(FREE, Release);
        s.ledger.device(5).state.store(LIVE, Release);
        let mut edit = group_edit("g", false);
        edit.device = Some(d as u32);
        s.edit(me(), edit.clone()).expect("a device the controller claimed");
        edit.device = Some(5);
        let e = s.edit(me(), edit).unwrap_err();
        assert!(e.contains(&format!("device 5 is not in the ledger, which knows device(s) {d} ")), "{e}");
    }

    const GPU_A: &str = "GPU-aaaaaaaa-0000-0000-0000-000000000000";
    const GPU_B: &str = "GPU-bbbbbbbb-0000-0000-0000-000000000000";

    /// A registration claiming `uuids` as CUDA ordinals 0, 1, ... (1 TiB each).
    fn on_gpus(group: &str, uuids: &[&str]) -> Registration {
        let mut r = registration(Some(group), None);
        r.devices = uuids
            .iter()
            .enumerate()
            .map(|(i, u)| DeviceClaim { ordinal: i as u32, uuid: u.to_string(), total_memory: 1 << 40, memory_limit: None, sm_share: None, sm_max: 0 })
            .collect();
        r
    }

    /// A member of `team` on GPU A (slot 0) and GPU B (slot 1), 300 bytes on A; `victim`
    /// pinned with 1 GiB, 256 MiB on slot 1 (GPU B); published. Then the member swaps the two
    /// UUIDs in the shared device table and writes a GPU of its own into a free slot, and a
    /// request publishes before the controller dies (what went into the ledger file used to be
    /// the shared table as it was then). `meddle` runs last, on the dying controller's state.
    /// Returns the member's slot, `victim`'s, and the descriptors the member keeps.
    fn swapped_before_a_restart(dir: &tempfile::TempDir, meddle: impl FnOnce(&State)) -> (usize, usize, Vec<OwnedFd>) {
        let mut s = state(dir, "");
        let member = s.register(Peer { pid: std::process::id(), uid: 1000 }, on_gpus("team", &[GPU_A, GPU_B])).unwrap();
        assert_eq!(member.devices, vec![(0, 0), (1, 1)]);
        s.edit(me(), group_edit("victim", true)).unwrap();
        let mut one = group_edit("victim", false);
        (one.memory, one.device) = (Some(Limit::Bytes(256 << 20)), Some(1));
        s.edit(me(), one).unwrap();
        let victim = s.find_group("victim").unwrap();
        let team = member.group as usize;
        s.ledger.process(member.slot as usize).try_charge(s.ledger.group(team), 0, 300).unwrap();
        s.publish();
        let table = |d: usize| s.ledger.device(d);
        ledger::write_text(&table(0).uuid, GPU_B);
        ledger::write_text(&table(1).uuid, GPU_A);
        ledger::write_text(&table(2).uuid, "GPU-eeeeeeee-0000-0000-0000-000000000000");
        table(2).state.store(LIVE, Release);
        s.publish();
        meddle(&s);
        (member.slot as usize, victim, s.descriptors_for(team).unwrap())
    }

    /// The device table a restarted controller uses is its own record, not the shared table a
    /// member rewrote: GPU A is slot 0 and GPU B slot 1 again (in the shared table too), the
    /// slot the member filled is free; a new process on GPU B alone is counted on slot 1 and
    /// held to `victim`'s 256 MiB there, one on GPU A on slot 0 with its 1 GiB. The ledger
    /// file's copy never held the swap.
    #[test]
    fn a_restarted_controller_takes_the_device_table_from_its_record_not_the_shared_one() {
        let dir = tempfile::tempdir().unwrap();
        let (member, victim, _held) = swapped_before_a_restart(&dir, |s| {
            let record = s.ledger.device_record().expect("sealed by the publishes");
            let uuids: Vec<Option<&str>> = record.iter().take(3).map(|k| k.as_ref().map(|k| k.uuid.as_str())).collect();
            assert_eq!(uuids, vec![Some(GPU_A), Some(GPU_B), None], "the file holds the controller's table, not the shared one");
            assert_eq!(record[0].as_ref().unwrap().total_memory, 1 << 40);
        });
        let mut s = restarted(&dir, "");
        let claimed: Vec<(usize, &str)> = s.claimed_devices().collect();
        assert_eq!(claimed, vec![(0, GPU_A), (1, GPU_B)], "the record's, not the swapped ones");
        assert_eq!((s.ledger.device(0).uuid(), s.ledger.device(1).uuid()), (GPU_A.to_string(), GPU_B.to_string()), "the shared table is put back");
        assert_eq!(s.ledger.device(2).state.load(Acquire), FREE, "a GPU the member wrote into a free slot is not taken");
        assert_eq!(s.watched[&member].devices, vec![0, 1]);
        let parent = std::os::unix::process::parent_id();
        let on_b = s.register(Peer { pid: parent, uid: 0 }, on_gpus("victim", &[GPU_B])).unwrap();
        assert_eq!(on_b.devices, vec![(0, 1)], "GPU B is slot 1: counted there");
        assert_eq!(s.published(victim).unwrap().devices[1].limit.load(Relaxed), 256 << 20, "held to GPU B's limit");
        let on_a = s.register(Peer { pid: 1, uid: 0 }, on_gpus("victim", &[GPU_A])).unwrap();
        assert_eq!(on_a.devices, vec![(0, 0)], "GPU A is slot 0");
        assert_eq!(s.published(victim).unwrap().devices[0].limit.load(Relaxed), 1 << 30);
    }

    /// No record to take (a controller that kept none ran since the last one that did, as one
    /// from before the record would: it only counts its start): the slots fail closed. The two
    /// the member uses are held for it under names no registration can claim, not asked about
    /// by NVML, the member held to what it has there (300 bytes on slot 0, nothing on slot 1);
    /// a new process on GPU B gets a slot of its own; the held slots are freed when the member
    /// exits, and the next restart takes the table from the record again.
    #[test]
    fn without_a_record_the_device_slots_in_use_are_held_for_their_processes() {
        let dir = tempfile::tempdir().unwrap();
        let (member, _, held) = swapped_before_a_restart(&dir, |s| {
            s.ledger.header().controller_starts.fetch_add(1, AcqRel);
        });
        let mut s = restarted(&dir, "");
        assert_eq!(s.claimed_devices().count(), 0, "no slot's GPU is known");
        assert_eq!(s.devices(), vec![devices::lost_device_name(0), devices::lost_device_name(1)], "held for the member; the free one freed");
        assert_eq!(s.ledger.device(0).uuid(), devices::lost_device_name(0), "not the UUID the member wrote");
        let w = &s.watched[&member];
        assert_eq!((w.devices.clone(), w.caps[0], w.caps[1]), (vec![0, 1], 300, 0), "held to what it has there");
        assert_eq!(s.ledger.process(member).devices[0].limit.load(Relaxed), 300);
        assert_eq!(s.ledger.process_record(member).unwrap().caps[0], 300, "kept across another restart");
        let parent = std::os::unix::process::parent_id();
        let on_b = s.register(Peer { pid: parent, uid: 0 }, on_gpus("victim", &[GPU_B])).unwrap();
        assert_eq!(on_b.devices, vec![(0, 2)], "a slot of its own, not one held");
        s.release(member, "exited");
        assert_eq!(s.devices(), vec![GPU_B.to_string()], "the held slots go with their last process");
        assert_eq!(s.ledger.device(0).state.load(Acquire), FREE);
        s.publish(); // As `serve` does after each request (a registration's answer waits for it).
        drop((s, held));
        let s = restarted(&dir, "");
        assert_eq!(s.claimed_devices().collect::<Vec<_>>(), vec![(2, GPU_B)], "the record again");
    }
}
