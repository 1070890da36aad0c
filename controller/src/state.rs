//! The controller's bookkeeping over the ledger: who is registered where, groups made and
//! freed, edits applied, dead processes' bytes taken back, and a restarted controller's
//! adoption of what the previous one left.
//!
//! Only the controller assigns or frees slots; shims only count inside theirs. Every change of
//! a group's membership ends with a reconciliation (`GroupSlot::reconcile`), which is what keeps
//! the group's figure exact whatever state a killed process left its slot in.

use gpuslice_common::ledger::{self, GroupSlot, Ledger, Priority, ProcessSlot, FREE, LIVE, MAX_DEVICES, PRIORITY_INHERIT, UNLIMITED};
use gpuslice_common::protocol::*;
use gpuslice_common::settings::{FileSettings, Settings};
use gpuslice_common::size::format_size;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::*;

/// How long a reconciliation waits for a live member's open operation.
const RECONCILE_PATIENCE_NS: u64 = 50_000_000;

/// Who is on the other end of a connection, as the kernel says (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
}

/// A registered process the controller watches.
pub struct Watched {
    pub pid: u32,
    /// Readable when the process exits; `None` on kernels without pidfd_open (polled instead).
    pub pidfd: Option<OwnedFd>,
    pub start_time: Option<u64>,
    /// The ledger's device indices it was given: a device slot no live process uses is freed.
    pub devices: Vec<usize>,
}

/// Achieved-share bookkeeping: the charged device time at the previous sample.
#[derive(Default)]
struct ShareSample {
    at_ns: u64,
    charged: HashMap<(bool, usize, u64, usize), u64>,
    achieved: HashMap<(bool, usize, u64, usize), f64>,
    /// Wall-clock time of the sample, for the metrics.
    taken: Option<std::time::SystemTime>,
}

pub struct State {
    pub ledger: Ledger,
    pub config: FileSettings,
    /// Process slot → what watches it.
    pub watched: HashMap<usize, Watched>,
    /// Groups whose reconciliation could not finish yet (a member held an operation open).
    pending: Vec<usize>,
    /// The uid allowed to edit besides root: the controller's own (the socket's owner).
    pub owner_uid: u32,
    samples: ShareSample,
}

impl State {
    pub fn new(ledger: Ledger, config: FileSettings) -> State {
        // SAFETY: geteuid has no preconditions.
        let owner_uid = unsafe { libc::geteuid() };
        State { ledger, config, watched: HashMap::new(), pending: Vec::new(), owner_uid, samples: ShareSample::default() }
    }

    /// Makes the config's groups exist (pinned: they stay when empty). Existing groups keep
    /// their figures: a restarted controller must not undo live edits.
    pub fn install_config_groups(&mut self) -> Result<(), String> {
        let groups: Vec<(String, Settings)> = self.config.groups.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        for (name, settings) in groups {
            if self.find_group(&name).is_some() {
                continue;
            }
            let slot = self.new_group(&name).ok_or_else(|| format!("no free group slot for config group {name:?}"))?;
            let g = self.ledger.group(slot);
            apply_settings_all_devices(g, &settings);
            g.pinned.store(1, Relaxed);
            tracing::info!("group {name:?} from the config file: {}", describe_group(&self.ledger, g));
        }
        Ok(())
    }

    /// After a restart: keeps the processes still alive, takes back the bytes of those gone,
    /// and reconciles every group.
    pub fn adopt(&mut self) {
        let mut kept = 0;
        let mut gone = 0;
        for i in 0..self.ledger.geometry().max_procs as usize {
            let p = self.ledger.process(i);
            if p.state.load(Acquire) != LIVE {
                continue;
            }
            let pid = p.pid.load(Relaxed);
            let recorded = p.start_time.load(Relaxed);
            let now = ledger::process_start_time(pid);
            if now.is_some() && (recorded == 0 || now == Some(recorded)) {
                // Which devices it maps died with the previous controller: all of them, to be safe.
                let devices = (0..MAX_DEVICES).filter(|&d| self.ledger.device(d).state.load(Acquire) == LIVE).collect();
                self.watched.insert(i, Watched { pid, pidfd: pidfd_open(pid), start_time: now, devices });
                kept += 1;
            } else {
                self.release(i, "exited while no controller ran");
                gone += 1;
            }
        }
        for (i, g) in self.ledger.groups() {
            if g.state.load(Acquire) == LIVE && !self.reconcile(i) {
                self.pending.push(i);
            }
        }
        tracing::info!("adopted the existing ledger: {kept} processes still running, {gone} gone since (their memory returned)");
    }

    pub fn find_group(&self, name: &str) -> Option<usize> {
        self.ledger.groups().find(|(_, g)| g.state.load(Acquire) == LIVE && g.name() == name).map(|(i, _)| i)
    }

    fn new_group(&self, name: &str) -> Option<usize> {
        let (i, g) = self.ledger.groups().find(|(_, g)| g.state.load(Acquire) == FREE)?;
        g.reset();
        g.set_name(name);
        g.state.store(LIVE, Release);
        Some(i)
    }

    fn members(&self, group: usize) -> Vec<usize> {
        self.ledger
            .processes()
            .filter(|(_, p)| p.state.load(Acquire) == LIVE && p.group.load(Relaxed) as usize == group)
            .map(|(i, _)| i)
            .collect()
    }

    /// Sets the group's used figures to the sum of its live members'.
    fn reconcile(&self, group: usize) -> bool {
        let members = self.members(group);
        let live: Vec<&ProcessSlot> = members.iter().map(|&i| self.ledger.process(i)).collect();
        self.ledger.group(group).reconcile(&live, RECONCILE_PATIENCE_NS)
    }

    /// Registers the process at `peer`.
    pub fn register(&mut self, peer: Peer, r: Registration) -> Result<Assignment, String> {
        if r.protocol != PROTOCOL_VERSION {
            return Err(format!("protocol version {} is not this controller's ({PROTOCOL_VERSION}); shim and controller must come from the same release", r.protocol));
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
        let stale: Vec<usize> = self.ledger.processes().filter(|(_, p)| p.state.load(Acquire) == LIVE && p.pid.load(Relaxed) == peer.pid).map(|(i, _)| i).collect();
        for slot in stale {
            self.release(slot, "registered again (exec)");
        }
        let (slot, process) = self
            .ledger
            .processes()
            .find(|(_, p)| p.state.load(Acquire) == FREE)
            .ok_or_else(|| format!("the ledger is full ({} processes); the process runs alone on its own limits", self.ledger.geometry().max_procs))?;

        let mut notes = Vec::new();
        let devices = self.claim_devices(peer, &r.devices, &mut notes);
        let solo = r.group.is_none();
        let group_name = r.group.clone().unwrap_or_else(|| format!("pid-{}", peer.pid));
        let group = match self.find_group(&group_name) {
            Some(g) => {
                notes.extend(ignored_env_limits(self.ledger.group(g), &r, &devices));
                g
            }
            None => {
                let g = self.new_group(&group_name).ok_or_else(|| format!("the ledger is full ({} groups); the process runs alone on its own limits", self.ledger.geometry().max_groups))?;
                let slot = self.ledger.group(g);
                // A new group takes its first member's environment, else the config's defaults.
                for claim in &r.devices {
                    let Some(&(_, index)) = devices.iter().find(|(o, _)| *o == claim.ordinal) else { continue };
                    let index = index as usize;
                    let limit = claim.memory_limit.or_else(|| self.config.settings.memory_limit(claim.ordinal).map(|l| l.value));
                    slot.devices[index].limit.store(limit.unwrap_or(UNLIMITED), Relaxed);
                    let share = claim.sm_share.or_else(|| self.config.settings.sm_share(claim.ordinal));
                    slot.set_share(index, share.unwrap_or(0));
                }
                let priority = (if solo { r.priority } else { None }).or(self.config.settings.priority.as_ref().map(|p| p.value));
                slot.priority.store(priority.unwrap_or_default() as u32, Relaxed);
                g
            }
        };
        process.reset();
        process.pid.store(peer.pid, Relaxed);
        process.own_pid.store(r.own_pid, Relaxed);
        process.uid.store(peer.uid, Relaxed);
        process.group.store(group as u32, Relaxed);
        let own_priority = if solo { PRIORITY_INHERIT } else { r.priority.map_or(PRIORITY_INHERIT, |p| p as u32) };
        process.priority.store(own_priority, Relaxed);
        let start_time = ledger::process_start_time(peer.pid);
        process.start_time.store(start_time.unwrap_or(0), Relaxed);
        process.heartbeat_ns.store(ledger::monotonic_ns(), Relaxed);
        // The name is the client's word: shown in logs and listings, so no control characters.
        let name: String = r.name.chars().map(|c| if c.is_control() { '?' } else { c }).take(31).collect();
        ledger::write_text(&process.name, &name);
        self.ledger.group(group).members.fetch_add(1, AcqRel);
        process.state.store(LIVE, Release);
        self.ledger.header().registrations.fetch_add(1, Relaxed);
        let indices = devices.iter().map(|&(_, i)| i as usize).collect();
        self.watched.insert(slot, Watched { pid: peer.pid, pidfd: pidfd_open(peer.pid), start_time, devices: indices });
        tracing::info!(
            "registered pid {} ({}) uid {} in group {group_name:?}: {}",
            peer.pid,
            name,
            peer.uid,
            describe_group(&self.ledger, self.ledger.group(group))
        );
        Ok(Assignment { group: group as u32, group_name, slot: slot as u32, devices, notes })
    }

    /// Takes a process out: its bytes leave its group's figures, its slot is freed, and a
    /// group it leaves empty is freed unless pinned.
    pub fn release(&mut self, slot: usize, why: &str) {
        self.watched.remove(&slot);
        let p = self.ledger.process(slot);
        if p.state.load(Acquire) != LIVE {
            return;
        }
        let group = p.group.load(Relaxed) as usize;
        let pid = p.pid.load(Relaxed);
        let held: u64 = p.devices.iter().map(|d| d.used.load(Relaxed)).sum();
        // A turn it held is free now, not when its lease runs out.
        let token = p.token.load(Acquire);
        for d in 0..ledger::MAX_DEVICES {
            if self.ledger.device(d).sched.turn.clear_holder(token) {
                tracing::debug!("pid {pid} {why}: its turn on device {d} is free");
            }
        }
        // Out of the member list first, so that the reconciliation leaves its bytes out.
        p.state.store(FREE, Release);
        if group < self.ledger.geometry().max_groups as usize {
            let g = self.ledger.group(group);
            if !self.reconcile(group) {
                self.pending.push(group);
            }
            let name = g.name();
            let left = g.members.fetch_sub(1, AcqRel).saturating_sub(1);
            if left == 0 && g.pinned.load(Relaxed) == 0 && self.members(group).is_empty() {
                g.state.store(FREE, Release);
                g.reset();
            }
            tracing::info!("pid {pid} {why}: {} returned to group {name:?}", format_size(held));
        }
        p.reset();
    }

    /// Device indices for the devices a registration names. A claim that is not a GPU UUID,
    /// or names an ordinal or UUID twice, is not tracked (and the process is told why), so
    /// that a garbled registration cannot fill the device table with things that are not GPUs.
    fn claim_devices(&self, peer: Peer, claims: &[DeviceClaim], notes: &mut Vec<String>) -> Vec<(u32, u32)> {
        let mut devices: Vec<(u32, u32)> = Vec::new();
        let mut full = Vec::new();
        for d in claims {
            if !is_gpu_uuid(&d.uuid) {
                notes.push(format!("device {}: {:?} is not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx); not tracked", d.ordinal, truncated(&d.uuid)));
                continue;
            }
            if devices.iter().any(|&(o, _)| o == d.ordinal) {
                notes.push(format!("device {} is named twice; the second claim is not tracked", d.ordinal));
                continue;
            }
            let claimed = self.ledger.claim_device(&d.uuid, d.total_memory).or_else(|| {
                let keep: Vec<usize> = devices.iter().map(|&(_, i)| i as usize).collect();
                self.free_unused_device(&keep)?;
                self.ledger.claim_device(&d.uuid, d.total_memory)
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
    fn free_unused_device(&self, keep: &[usize]) -> Option<()> {
        let used: std::collections::HashSet<usize> = self.watched.values().flat_map(|w| w.devices.iter().copied()).chain(keep.iter().copied()).collect();
        let d = (0..MAX_DEVICES).find(|d| !used.contains(d) && self.ledger.device(*d).state.load(Acquire) == LIVE)?;
        let slot = self.ledger.device(d);
        tracing::info!("device {d} ({}) is used by no registered process: its slot goes to a new device", slot.uuid());
        slot.release();
        for (_, g) in self.ledger.groups() {
            g.devices[d].clear_counters();
        }
        Some(())
    }

    /// Retries reconciliations that could not finish earlier.
    pub fn retry_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for group in pending {
            if !self.reconcile(group) {
                self.pending.push(group);
            }
        }
    }

    /// For kernels without pidfds: processes that are gone.
    pub fn poll_without_pidfd(&mut self) {
        let gone: Vec<usize> = self
            .watched
            .iter()
            .filter(|(_, w)| w.pidfd.is_none() && ledger::process_start_time(w.pid) != w.start_time)
            .map(|(&s, _)| s)
            .collect();
        for slot in gone {
            self.release(slot, "exited");
        }
    }

    /// Applies an edit from `peer`.
    pub fn edit(&mut self, peer: Peer, e: Edit) -> Result<String, String> {
        if peer.uid != 0 && peer.uid != self.owner_uid {
            return Err(format!(
                "permission denied: uid {} may read but not change limits; only uid {} (the controller's) or root may",
                peer.uid, self.owner_uid
            ));
        }
        if let Some(sm) = e.sm {
            gpuslice_common::settings::parse_share(&sm.to_string()).map_err(|r| format!("--sm {sm}: {r}"))?;
        }
        if let Some(Limit::Bytes(0)) = e.memory {
            return Err("--memory 0: a limit of zero bytes would refuse everything; give a size, or `unlimited`".into());
        }
        let devices: Vec<usize> = match e.device {
            Some(d) if (d as usize) < MAX_DEVICES => vec![d as usize],
            Some(d) => return Err(format!("device {d}: the ledger has devices 0-{}", MAX_DEVICES - 1)),
            None => (0..MAX_DEVICES).collect(),
        };
        match &e.target {
            Target::Group(name) => {
                let (slot, made) = match self.find_group(name) {
                    Some(g) => (g, false),
                    None => {
                        gpuslice_common::settings::check_group_name(name).map_err(|r| format!("group {name:?}: {r}"))?;
                        (self.new_group(name).ok_or("the ledger has no free group slot")?, true)
                    }
                };
                let g = self.ledger.group(slot);
                apply_edit_to_group(g, &e, &devices);
                if !name.starts_with("pid-") {
                    g.pinned.store(1, Relaxed);
                }
                let what = if made { "created" } else { "now" };
                let message = format!("group {name:?} {what}: {}", describe_group(&self.ledger, g));
                tracing::info!("uid {} (pid {}): {message}", peer.uid, peer.pid);
                Ok(message)
            }
            Target::Pid(pid) => {
                let (_, p) = self
                    .ledger
                    .processes()
                    .find(|(_, p)| p.state.load(Acquire) == LIVE && p.pid.load(Relaxed) == *pid)
                    .ok_or_else(|| format!("no registered process has pid {pid} (see `gpuslice ls`)"))?;
                let g = self.ledger.group(p.group.load(Relaxed) as usize);
                let name = g.name();
                let message = if name.starts_with("pid-") {
                    apply_edit_to_group(g, &e, &devices);
                    format!("pid {pid} now: {}", describe_group(&self.ledger, g))
                } else {
                    if e.sm.is_some() {
                        return Err(format!("pid {pid} is in group {name:?}, whose members share one SM share: use `gpuslice set --group {name} --sm ...`"));
                    }
                    if let Some(m) = e.memory {
                        for &d in &devices {
                            p.devices[d].limit.store(limit_bytes(m), Relaxed);
                        }
                    }
                    if let Some(pr) = e.priority {
                        p.priority.store(pr as u32, Relaxed);
                    }
                    let cap = e.memory.map(|m| match m {
                        Limit::Bytes(b) => format!("own cap {}", format_size(b)),
                        Limit::Unlimited => "no own cap".into(),
                    });
                    let pri = e.priority.map(|p| format!("priority {p}"));
                    format!("pid {pid} in group {name:?} now: {}", [cap, pri].into_iter().flatten().collect::<Vec<_>>().join(", "))
                };
                tracing::info!("uid {} (pid {}): {message}", peer.uid, peer.pid);
                Ok(message)
            }
        }
    }

    /// Samples charged device time for the achieved shares `ls` reports; called about once a second.
    pub fn sample_shares(&mut self) {
        let now = ledger::monotonic_ns();
        let elapsed = now.saturating_sub(self.samples.at_ns);
        let mut charged = HashMap::new();
        for (i, g) in self.ledger.groups().filter(|(_, g)| g.state.load(Acquire) == LIVE) {
            let generation = g.generation.load(Relaxed);
            for (d, gd) in g.devices.iter().enumerate() {
                charged.insert((true, i, generation, d), gd.charged_ns.load(Relaxed));
            }
        }
        for (i, p) in self.ledger.processes().filter(|(_, p)| p.state.load(Acquire) == LIVE) {
            let generation = p.generation.load(Relaxed);
            for (d, pd) in p.devices.iter().enumerate() {
                charged.insert((false, i, generation, d), pd.charged_ns.load(Relaxed));
            }
        }
        let mut achieved = HashMap::new();
        if self.samples.at_ns != 0 && elapsed > 0 {
            for (key, &now_charged) in &charged {
                // A key the previous sample lacks is a slot made (reset, new generation) since:
                // it started from zero then. Waiting for a second sample would hide a short
                // job's share entirely.
                let before = self.samples.charged.get(key).copied().unwrap_or(0);
                if now_charged > 0 {
                    achieved.insert(*key, now_charged.saturating_sub(before) as f64 / elapsed as f64 * 100.0);
                }
            }
        }
        self.samples = ShareSample { at_ns: now, charged, achieved, taken: Some(std::time::SystemTime::now()) };
    }

    /// When `sample_shares` last ran.
    pub fn last_sample(&self) -> Option<std::time::SystemTime> {
        self.samples.taken
    }

    pub fn listing(&self) -> Listing {
        let uuid = |d: usize| self.ledger.device(d).uuid();
        let claimed: Vec<usize> = (0..MAX_DEVICES).filter(|&d| self.ledger.device(d).state.load(Acquire) == LIVE).collect();
        let mut listing = Listing::default();
        for (i, g) in self.ledger.groups().filter(|(_, g)| g.state.load(Acquire) == LIVE) {
            let generation = g.generation.load(Relaxed);
            let members = self.members(i).iter().map(|&p| self.ledger.process(p).pid.load(Relaxed)).collect();
            let devices = claimed
                .iter()
                .map(|&d| {
                    let gd = &g.devices[d];
                    let share = gd.share.load(Relaxed);
                    GroupDeviceRow {
                        device: d as u32,
                        uuid: uuid(d),
                        used: gd.used.load(Relaxed),
                        limit: some_limit(gd.limit.load(Relaxed)),
                        peak: gd.peak_used.load(Relaxed),
                        share: (share != 0).then_some(share),
                        achieved_share: self.samples.achieved.get(&(true, i, generation, d)).copied(),
                        charged_ns: gd.charged_ns.load(Relaxed),
                        throttled_ns: gd.throttled_ns.load(Relaxed),
                        refusals: gd.refusals.load(Relaxed),
                    }
                })
                .collect();
            listing.groups.push(GroupRow { name: g.name(), slot: i as u32, members, priority: g.priority(), devices });
        }
        for (i, p) in self.ledger.processes().filter(|(_, p)| p.state.load(Acquire) == LIVE) {
            let generation = p.generation.load(Relaxed);
            let g = self.ledger.group(p.group.load(Relaxed) as usize);
            let devices = claimed
                .iter()
                .map(|&d| {
                    let pd = &p.devices[d];
                    ProcessDeviceRow {
                        device: d as u32,
                        uuid: uuid(d),
                        used: pd.used.load(Relaxed),
                        overhead: pd.overhead.load(Relaxed),
                        limit: some_limit(pd.limit.load(Relaxed)),
                        peak: pd.peak_used.load(Relaxed),
                        achieved_share: self.samples.achieved.get(&(false, i, generation, d)).copied(),
                        charged_ns: pd.charged_ns.load(Relaxed),
                        throttled_ns: pd.throttled_ns.load(Relaxed),
                        refusals: pd.refusals.load(Relaxed),
                        turn_wait_ns: pd.turn_wait_ns.load(Relaxed),
                    }
                })
                .collect();
            listing.processes.push(ProcessRow {
                pid: p.pid.load(Relaxed),
                own_pid: p.own_pid.load(Relaxed),
                uid: p.uid.load(Relaxed),
                group: g.name(),
                name: p.name(),
                priority: p.priority_or(g),
                devices,
            });
        }
        listing
    }

    pub fn counts(&self) -> (u32, u32) {
        let procs = self.ledger.processes().filter(|(_, p)| p.state.load(Acquire) == LIVE).count();
        let groups = self.ledger.groups().filter(|(_, g)| g.state.load(Acquire) == LIVE).count();
        (procs as u32, groups as u32)
    }

    pub fn devices(&self) -> Vec<String> {
        (0..MAX_DEVICES).filter(|&d| self.ledger.device(d).state.load(Acquire) == LIVE).map(|d| self.ledger.device(d).uuid()).collect()
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
        }
    }
    if let Some(p) = e.priority {
        g.priority.store(p as u32, Relaxed);
    }
}

/// Config settings for a group, on every device index (the config's per-device keys name CUDA
/// ordinals of a process; a group spans processes, so only the all-device values apply).
fn apply_settings_all_devices(g: &GroupSlot, s: &Settings) {
    for d in 0..MAX_DEVICES {
        if let Some(l) = s.memory_limit.all() {
            g.devices[d].limit.store(l.value, Relaxed);
        }
        if let Some(share) = s.sm_share.all() {
            g.set_share(d, share.value);
        }
    }
    g.priority.store(s.priority.as_ref().map_or(Priority::Normal, |p| p.value) as u32, Relaxed);
}

/// Notes for a member whose environment asked for other limits than its group has.
fn ignored_env_limits(g: &GroupSlot, r: &Registration, devices: &[(u32, u32)]) -> Vec<String> {
    let mut notes = Vec::new();
    for claim in &r.devices {
        let Some(&(_, index)) = devices.iter().find(|(o, _)| *o == claim.ordinal) else { continue };
        let have = g.devices[index as usize].limit.load(Relaxed);
        if let Some(want) = claim.memory_limit {
            if want != have {
                let have = some_limit(have).map_or("no limit".to_string(), format_size);
                notes.push(format!(
                    "the environment's memory limit {} for device {} is not used: group {:?} already has {have} (change it with `gpuslice set --group`)",
                    format_size(want),
                    claim.ordinal,
                    g.name()
                ));
            }
        }
    }
    notes
}

/// One line: a group's limits.
pub fn describe_group(ledger: &Ledger, g: &GroupSlot) -> String {
    let mut parts = Vec::new();
    for d in (0..MAX_DEVICES).filter(|&d| ledger.device(d).state.load(Acquire) == LIVE) {
        let gd = &g.devices[d];
        let limit = some_limit(gd.limit.load(Relaxed)).map_or("no memory limit".to_string(), |l| format!("memory {}", format_size(l)));
        let share = gd.share.load(Relaxed);
        let share = if share == 0 { String::new() } else { format!(", SM {share}%") };
        parts.push(format!("device {d}: {limit}{share} (using {})", format_size(gd.used.load(Relaxed))));
    }
    let limit0 = some_limit(g.devices[0].limit.load(Relaxed));
    if parts.is_empty() {
        parts.push(limit0.map_or("no memory limit".to_string(), |l| format!("memory {}", format_size(l))));
        let share = g.devices[0].share.load(Relaxed);
        if share != 0 {
            parts.push(format!("SM {share}%"));
        }
    }
    format!("{}; priority {}", parts.join("; "), g.priority())
}

/// A descriptor that becomes readable when `pid` exits (Linux ≥ 5.3).
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) with flags 0; the result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
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
        let (ledger, _) = Ledger::open_or_create(&path, ledger::Geometry { max_groups: 8, max_procs: 8 }).unwrap();
        let config = FileSettings::parse("test.toml", config).unwrap();
        let mut s = State::new(ledger, config);
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
            devices: vec![DeviceClaim { ordinal: 0, uuid: "GPU-00000000-0000-0000-0000-000000000001".into(), total_memory: 1 << 40, memory_limit: limit, sm_share: Some(30) }],
        }
    }

    fn me() -> Peer {
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
        let edit = Edit { target: Target::Group("g".into()), memory: Some(Limit::Bytes(2 << 30)), sm: Some(50), priority: Some(Priority::High), device: None };
        let e = s.edit(stranger, edit.clone()).unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
        let slot = s.find_group("g").unwrap();
        assert_eq!(s.ledger.group(slot).devices[0].limit.load(Relaxed), 1 << 30, "unchanged");
        s.edit(me(), edit).unwrap();
        let g = s.ledger.group(slot);
        assert_eq!(g.devices[3].limit.load(Relaxed), 2 << 30);
        assert_eq!(g.devices[3].share.load(Relaxed), 50);
        assert_eq!(g.priority(), Priority::High);
        let e = s.edit(me(), Edit { target: Target::Pid(999_999_999), memory: None, sm: Some(10), priority: None, device: None }).unwrap_err();
        assert!(e.contains("no registered process"), "{e}");
        assert!(s.edit(me(), Edit { target: Target::Group("g".into()), memory: Some(Limit::Bytes(0)), sm: None, priority: None, device: None }).is_err());
    }

    #[test]
    fn garbled_device_claims_are_not_tracked_and_slots_no_process_uses_are_freed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir, "");
        let claim = |ordinal: u32, uuid: &str| DeviceClaim { ordinal, uuid: uuid.into(), total_memory: 1 << 30, memory_limit: None, sm_share: None };
        let mut r = registration(None, None);
        r.devices = vec![claim(0, "ordinal-0"), claim(1, "GPU-zz"), claim(2, &"x".repeat(5000)), claim(3, "GPU-00000000-0000-0000-0000-00000000000a"), claim(3, "GPU-00000000-0000-0000-0000-00000000000b")];
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

    #[test]
    fn a_restarted_controller_drops_the_dead_and_keeps_the_living() {
        let dir = tempfile::tempdir().unwrap();
        let (dead_slot, live_slot, group) = {
            let mut s = state(&dir, "");
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let dead_pid = child.id();
            let dead = s.register(Peer { pid: dead_pid, uid: 0 }, registration(Some("team"), None)).unwrap();
            let live = s.register(me(), registration(Some("team"), None)).unwrap();
            let g = s.ledger.group(dead.group as usize);
            s.ledger.process(dead.slot as usize).try_charge(g, 0, 700).unwrap();
            s.ledger.process(live.slot as usize).try_charge(g, 0, 300).unwrap();
            child.wait().unwrap();
            // The controller "dies" here: no release for the child.
            (dead.slot as usize, live.slot as usize, dead.group as usize)
        };
        let mut s = state(&dir, "");
        assert_eq!(s.ledger.group(group).devices[0].used.load(Relaxed), 1000);
        s.adopt();
        assert_eq!(s.ledger.group(group).devices[0].used.load(Relaxed), 300);
        assert_eq!(s.ledger.process(dead_slot).state.load(Relaxed), FREE);
        assert_eq!(s.ledger.process(live_slot).state.load(Relaxed), LIVE);
        assert!(s.watched.contains_key(&live_slot));
    }
}
