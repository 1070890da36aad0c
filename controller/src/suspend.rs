//! Suspending and resuming whole groups (issue 22), by two paths. The driver's checkpoint API:
//! every process of the group is locked, then checkpointed (its device memory moves to host
//! memory); resuming restores and unlocks them. The shim's own path (`suspend_path = "shim"` or
//! `"auto"`): the controller addresses the members' agents (`agents`) and waits for each one's
//! answer in its process slot; a member whose "suspended" NVML does not bear out is first
//! brought back by its agent, then checkpointed by the driver — the two paths never stack, and
//! a resume takes each member back by the path that suspended it. The group keeps its quota
//! and its `used` in the ledger (its memory still counts against its own quota) while the
//! device's free memory grows.
//!
//! The controller-side record (`Registry`) lives here, behind its own lock, taken only after the
//! state's (never the other way round), and never held across a driver call: a checkpoint of a
//! large process takes seconds, during which `ls` and registrations go on.

use crate::agents;
use crate::checkpoint::{Driver, ProcessState};
use crate::process::alive;
use crate::refusal::{Kind, Refusal};
use crate::state::lock_state;
use crate::state::{Peer, State};
use crate::suspend_driver::{checkpoint_all, checkpoint_within, restore_all, LockWait, LOCK_TIMEOUT};
use gpuslice_common::ledger::{CAP_AGENT, CAP_FAST, CAP_OTHER_MEMORY};
use gpuslice_common::protocol::{AgentRow, SuspensionRow};
use gpuslice_common::settings::SuspendPath;
use gpuslice_common::size::format_size;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long the watcher's lock of a member that started CUDA beside its suspended group waits
/// for its calls under way (`join_skipped`): short, tried again at the next look, so that such a
/// member cannot hold the watcher (and every group's resume) behind its kernels.
const JOIN_LOCK_TIMEOUT: Duration = Duration::from_millis(100);
/// `GPUSLICE_SUSPEND_HOST_LIMIT`: host memory that suspended tenants may hold at once.
pub const ENV_HOST_LIMIT: &str = "GPUSLICE_SUSPEND_HOST_LIMIT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    Suspending,
    Suspended,
    Resuming,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Suspending => "suspending",
            Phase::Suspended => "suspended",
            Phase::Resuming => "resuming",
            Phase::Failed => "failed",
        }
    }
}

/// One group's record.
#[derive(Debug, Clone)]
pub struct Record {
    pub phase: Phase,
    pub suspendable: bool,
    pub allow_exports: bool,
    /// The marks above were set with `gpuslice set` (kept in the ledger: they outlive a restart).
    pub edited: bool,
    /// pid → device bytes it had when suspended (its host copy).
    pub pids: BTreeMap<u32, u64>,
    /// Ledger device → bytes the group had there when suspended.
    pub device_bytes: BTreeMap<u32, u64>,
    pub bytes: u64,
    pub suspend_ms: Option<f64>,
    pub resume_ms: Option<f64>,
    pub automatic: bool,
    pub suspended_at: Option<Instant>,
    pub suspensions: u64,
    pub error: Option<String>,
    /// `suspend_path`: how its members are suspended.
    pub path: SuspendPath,
    /// pid → process slot: the members suspended by their own agents (the rest of `pids` by the
    /// driver).
    pub shim_pids: BTreeMap<u32, usize>,
    /// The path the last suspension took, and its rates (GB/s).
    pub last_path: Option<String>,
    pub suspend_gbps: Option<f64>,
    pub resume_gbps: Option<f64>,
    /// The path the last resume took.
    pub resume_path: Option<String>,
    /// pid → its agent's figures at the last suspension and resume (the shim's path).
    pub agents: BTreeMap<u32, AgentRow>,
    /// The last refusal or failure of a suspension (`refusal`): the policy passes the group over
    /// for a while after it. Forgotten at a suspension that succeeds and at an edit of the marks.
    pub refusal: Option<Refusal>,
    /// Suspensions refused or failed, since the controller started.
    pub refusals: u64,
    /// Of those, the ones that were a lock timing out (`Kind::Timeout`).
    pub timeouts: u64,
    /// pid → whether a failure to suspend it was logged: members left running at the
    /// suspension because the driver showed no CUDA state for them (`without_cuda`), until they
    /// have some (`join_skipped`).
    pub skipped: BTreeMap<u32, bool>,
}

impl Default for Record {
    fn default() -> Record {
        Record {
            phase: Phase::Running,
            suspendable: false,
            allow_exports: false,
            edited: false,
            pids: BTreeMap::new(),
            device_bytes: BTreeMap::new(),
            bytes: 0,
            suspend_ms: None,
            resume_ms: None,
            automatic: false,
            suspended_at: None,
            suspensions: 0,
            error: None,
            path: SuspendPath::Driver,
            shim_pids: BTreeMap::new(),
            last_path: None,
            suspend_gbps: None,
            resume_gbps: None,
            resume_path: None,
            agents: BTreeMap::new(),
            refusal: None,
            refusals: 0,
            timeouts: 0,
            skipped: BTreeMap::new(),
        }
    }
}

impl Record {
    fn host_bytes(&self) -> u64 {
        match self.phase {
            Phase::Suspended | Phase::Suspending | Phase::Resuming => self.pids.values().sum(),
            _ => 0,
        }
    }

    /// Records a refusal or failure of a suspension: `why` becomes the group's last error, and
    /// the policy passes the group over for a while, as long as its `kind` says
    /// (`refusal::Kind::pass_over`). Returns `why`.
    fn refuse(&mut self, pid: Option<u32>, why: String, kind: Kind) -> String {
        self.error = Some(why.clone());
        self.refusal = Some(Refusal { at_ns: crate::refusal::now_ns(), pid, why: why.clone(), kind });
        self.refusals += 1;
        if kind != Kind::Lasting {
            self.timeouts += 1;
        }
        why
    }

    /// How long the policy still passes the group over at `now_ns` (the policy's clock,
    /// `refusal::now_ns`), its registered processes being `members` (`None`: it is a
    /// candidate).
    pub fn passed_over(&self, now_ns: u64, members: &[u32]) -> Option<Duration> {
        self.refusal.as_ref()?.passed_over(now_ns, members)
    }

    fn row(&self, group: &str, members: &[u32], now_ns: u64) -> SuspensionRow {
        SuspensionRow {
            group: group.to_string(),
            state: self.phase.name().to_string(),
            suspendable: self.suspendable,
            allow_exports: self.allow_exports,
            pids: self.pids.keys().copied().collect(),
            bytes: self.bytes,
            host_bytes: self.host_bytes(),
            suspend_ms: self.suspend_ms,
            resume_ms: self.resume_ms,
            automatic: self.automatic,
            suspensions: self.suspensions,
            error: self.error.clone(),
            suspend_path: self.path.as_str().to_string(),
            path: self.last_path.clone(),
            suspend_gbps: self.suspend_gbps,
            resume_gbps: self.resume_gbps,
            resume_path: self.resume_path.clone(),
            agents: self.agents.values().cloned().collect(),
            refusals: self.refusals,
            timeouts: self.timeouts,
            refused_by: self.refusal.as_ref().and_then(|r| r.pid),
            refusal_kind: self.refusal.as_ref().map(|r| r.kind.name().to_string()),
            passed_over_s: self.passed_over(now_ns, members).map(|d| d.as_secs_f64()),
            skipped: self.skipped.keys().copied().collect(),
        }
    }
}

#[derive(Default)]
pub struct Registry {
    pub groups: BTreeMap<String, Record>,
    driver: Option<Arc<Driver>>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

/// The driver, loaded at the first suspension (a controller that never suspends never loads it).
fn driver() -> Result<Arc<Driver>, String> {
    if let Some(d) = &registry().driver {
        return Ok(d.clone());
    }
    let d = Arc::new(Driver::load()?);
    registry().driver = Some(d.clone());
    Ok(d)
}

/// `gpuslice serve`'s flags for suspensions.
#[derive(clap::Args, Default)]
pub struct ServeFlags {
    /// Host memory that suspended groups may hold at once, e.g. 64GiB (default
    /// $GPUSLICE_SUSPEND_HOST_LIMIT, else half of the machine's memory); a suspension that would
    /// pass it is refused.
    #[arg(long, value_name = "SIZE")]
    suspend_host_limit: Option<String>,
}

/// The host limit the flags or the environment set (0: none set).
static HOST_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Applies `serve`'s flags; a size that does not parse stops the controller.
pub fn configure(flags: &ServeFlags) -> Result<(), String> {
    let (origin, text) = match &flags.suspend_host_limit {
        Some(t) => ("--suspend-host-limit", Some(t.clone())),
        None => (ENV_HOST_LIMIT, std::env::var(ENV_HOST_LIMIT).ok().filter(|v| !v.trim().is_empty())),
    };
    if let Some(text) = text {
        let bytes = gpuslice_common::size::parse_size(&text).map_err(|e| format!("{origin} {text:?}: {e}"))?;
        HOST_LIMIT.store(bytes.max(1), std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!("suspended groups may hold {} of host memory", format_size(host_limit()));
    Ok(())
}

/// Host bytes suspended tenants may hold at once (see `ServeFlags`).
pub fn host_limit() -> u64 {
    let set = HOST_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
    if set != 0 {
        return set;
    }
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64) / 2
}

fn may_edit(state: &State, peer: Peer) -> Result<(), String> {
    if peer.uid != 0 && peer.uid != state.owner_uid {
        return Err(format!(
            "permission denied: uid {} may not suspend or resume groups; only uid {} (the controller's) or root may",
            peer.uid, state.owner_uid
        ));
    }
    Ok(())
}

/// What the group is made of now, read under the state's lock.
pub struct Members {
    /// pid → its device bytes (all devices).
    pub pids: BTreeMap<u32, u64>,
    /// pid → (process slot, `suspend_caps`).
    pub slots: BTreeMap<u32, (usize, u32)>,
    /// The group's slot.
    pub group_slot: usize,
    pub device_bytes: BTreeMap<u32, u64>,
    /// pid → the other processes that imported one of its exports (members whose exports
    /// nobody else imported are absent: their word alone does not shield the group).
    pub exports: BTreeMap<u32, std::collections::BTreeSet<u32>>,
}

pub fn members(state: &State, group: &str) -> Result<Members, String> {
    let slot = state.find_group(group).ok_or_else(|| format!("no group named {group:?} (see `gpuslice ls`)"))?;
    let g = state.ledger.group(slot);
    let mut m = Members { pids: BTreeMap::new(), slots: BTreeMap::new(), group_slot: slot, device_bytes: BTreeMap::new(), exports: BTreeMap::new() };
    for (&pslot, w) in state.watched.iter().filter(|(_, w)| w.group == slot) {
        let p = state.ledger.process(pslot);
        let bytes = p.devices.iter().map(|d| d.used.load(std::sync::atomic::Ordering::Relaxed)).sum();
        m.pids.insert(w.pid, bytes);
        m.slots.insert(w.pid, (pslot, p.suspend_caps.load(std::sync::atomic::Ordering::Acquire)));
        let importers = state.importers_of(pslot);
        if !importers.is_empty() {
            m.exports.insert(w.pid, importers);
        }
    }
    for (d, gd) in g.devices.iter().enumerate() {
        let used = gd.used.load(std::sync::atomic::Ordering::Relaxed);
        if used > 0 {
            m.device_bytes.insert(d as u32, used);
        }
    }
    Ok(m)
}

/// `gpuslice suspend --group G` (and the policy's suspensions). `wait` bounds how long the
/// members' calls under way are waited for: the driver's locks and the agents' gates. A manual
/// suspension gives each `LOCK_TIMEOUT`; the policy bounds a candidate by its request's wait
/// (`room`). Whatever times out is undone: the group runs as before, and the refusal is
/// recorded (`Record::refuse`) like any other.
pub fn suspend(state: &Mutex<State>, peer: Option<Peer>, group: &str, automatic: bool, wait: LockWait) -> Result<String, String> {
    let mut m = {
        let state = lock_state(state);
        if let Some(peer) = peer {
            may_edit(&state, peer)?;
        }
        members(&state, group)?
    };
    if m.pids.is_empty() {
        return Err(format!("group {group:?} has no running process to suspend"));
    }
    // Members the driver shows without CUDA state hold nothing and cannot be locked: the group
    // is suspended without them (what they recorded, exports included, cannot be real memory).
    let skipped = without_cuda(state, m.pids.keys().copied());
    for pid in skipped.keys() {
        m.pids.remove(pid);
        m.slots.remove(pid);
        m.exports.remove(pid);
    }
    // Nor does an importer without CUDA state shield an export: it cannot have mapped anything.
    let importers: std::collections::BTreeSet<u32> = m.exports.values().flatten().copied().filter(|p| !skipped.contains_key(p)).collect();
    let hollow = without_cuda(state, importers.into_iter());
    m.exports.retain(|_, importers| {
        importers.retain(|p| !skipped.contains_key(p) && !hollow.contains_key(p));
        !importers.is_empty()
    });
    if m.pids.is_empty() {
        return Err(format!("group {group:?} has no process with CUDA state to suspend"));
    }
    let bytes: u64 = m.pids.values().sum();
    let path = {
        let mut r = registry();
        let held: u64 = r.groups.values().map(Record::host_bytes).sum();
        let rec = r.groups.entry(group.to_string()).or_default();
        if rec.phase == Phase::Failed {
            return Err(format!("group {group:?} failed at its last suspension or resume (the driver says so): its processes must be restarted"));
        }
        if rec.phase != Phase::Running {
            return Err(format!("group {group:?} is {} already", rec.phase.name()));
        }
        if let Some((&pid, importers)) = m.exports.iter().next().filter(|_| !rec.allow_exports) {
            let why = format!(
                "group {group:?} exports memory to other processes (pid {pid}: imported by pids {:?}{}): suspending it would pull memory from under its importers; `gpuslice set --group {group} --suspendable true --allow-exports` allows it",
                importers.iter().collect::<Vec<_>>(),
                if m.exports.len() > 1 { format!("; pids {:?} in all", m.exports.keys().collect::<Vec<_>>()) } else { String::new() }
            );
            return Err(rec.refuse(Some(pid), why, Kind::Lasting));
        }
        let limit = host_limit();
        if held.saturating_add(bytes) > limit {
            let why = format!(
                "suspending group {group:?} would move {} to host memory; suspended tenants hold {} already, and {ENV_HOST_LIMIT} allows {}",
                format_size(bytes),
                format_size(held),
                format_size(limit)
            );
            return Err(rec.refuse(None, why, Kind::Lasting));
        }
        rec.phase = Phase::Suspending;
        rec.pids = m.pids.clone();
        rec.device_bytes = m.device_bytes.clone();
        rec.bytes = bytes;
        rec.automatic = automatic;
        rec.error = None;
        rec.shim_pids.clear();
        rec.agents.clear();
        rec.skipped.clear();
        rec.path
    };
    let (shim, drivers) = match split(group, path, &m) {
        Ok(split) => split,
        Err((pid, e)) => {
            return Err(update(group, |rec| {
                rec.phase = Phase::Running;
                rec.pids.clear();
                rec.refuse(Some(pid), e, Kind::Lasting)
            }));
        }
    };
    // What the locks (and gates) of this attempt may wait in all: how long a timeout of theirs
    // passes the group over (`refusal::Kind::Timeout`).
    let bound = wait.at(Instant::now());
    let (outcome, ms) = timed(|| suspend_both(state, group, &m, &shim, &drivers, wait));
    let failed = outcome.is_err() && driver_says_failed(drivers.keys().copied());
    update(group, |rec| match outcome {
        Ok(done) => {
            let by_shim = done.by_shim;
            rec.phase = Phase::Suspended;
            rec.suspend_ms = Some(ms);
            rec.suspended_at = Some(Instant::now());
            rec.suspensions += 1;
            rec.last_path = Some(path_name(!by_shim.is_empty(), by_shim.len() < m.pids.len()));
            rec.suspend_gbps = rate(done.moved, ms);
            // What the host copies hold: the agents' figures for their members.
            for (pid, row) in &done.agents {
                rec.pids.insert(*pid, row.bytes);
            }
            rec.bytes = rec.pids.values().sum();
            rec.agents = done.agents;
            rec.shim_pids = by_shim;
            rec.refusal = None;
            rec.skipped = skipped.keys().map(|&pid| (pid, false)).collect();
            for (pid, why) in &skipped {
                tracing::info!(
                    "group {group:?}: pid {pid} has no CUDA state (the driver: {why}; NVML shows it holding nothing): nothing of it to suspend, it is left running, and suspended with its group if it starts CUDA before the resume"
                );
            }
            let message = format!(
                "group {group:?} suspended: {} processes, {} moved to host memory in {ms:.0} ms ({} path{}){}",
                m.pids.len(),
                format_size(done.moved),
                rec.last_path.as_deref().unwrap_or("driver"),
                rec.suspend_gbps.map(|g| format!(", {g:.2} GB/s")).unwrap_or_default(),
                if skipped.is_empty() { String::new() } else { format!("; pids {:?} left running (no CUDA state)", skipped.keys().collect::<Vec<_>>()) }
            );
            tracing::info!("{message}{}", if automatic { " (to make room for a higher-priority request)" } else { "" });
            Ok(message)
        }
        Err(f) if failed => {
            rec.phase = Phase::Failed;
            let why = rec.refuse(f.pid, f.why, Kind::Lasting);
            tracing::error!("group {group:?}: suspension failed and the driver reports a process in its failed state: {why}");
            Err(format!("group {group:?} could not be suspended, and the driver reports a process of it failed: {why}"))
        }
        Err(f) if !f.stuck.is_empty() || !f.left.is_empty() => {
            // Their agents suspended them and could not bring them back, or the driver's undo
            // could not put them back: recorded as suspended (by the path that holds each), so
            // that `resume` (and the policy, for its own suspensions) brings them back; never
            // "running".
            let stuck: Vec<u32> = f.stuck.keys().chain(&f.left).copied().collect();
            rec.phase = Phase::Suspended;
            rec.suspended_at = Some(Instant::now());
            rec.pids.retain(|pid, _| stuck.contains(pid));
            rec.bytes = rec.pids.values().sum();
            rec.last_path = Some(path_name(!f.stuck.is_empty(), !f.left.is_empty()));
            let kind = f.kind(bound);
            rec.shim_pids = f.stuck;
            let e = format!("{}; pids {stuck:?} stay suspended (they could not be brought back): `gpuslice resume --group {group}` retries", f.why);
            let e = rec.refuse(f.pid, e, kind);
            tracing::error!("group {group:?}: suspension failed: {e}");
            Err(format!("group {group:?} could not be suspended: {e}"))
        }
        Err(f) => {
            rec.phase = Phase::Running;
            rec.pids.clear();
            rec.agents.clear();
            let kind = f.kind(bound);
            let why = rec.refuse(f.pid, f.why, kind);
            tracing::warn!(
                "group {group:?}: suspension failed, its processes run on: {why} ({})",
                match kind {
                    Kind::Lasting => format!("a lasting refusal: passed over by the policy for {:.1} s", kind.pass_over().as_secs_f64()),
                    Kind::Timeout { .. } =>
                        format!("a timeout, not a lasting refusal: passed over by the policy for {:.1} s only", kind.pass_over().as_secs_f64()),
                }
            );
            Err(format!("group {group:?} could not be suspended (its processes run on): {why}"))
        }
    })
}

/// The processes (members, or importers of their exports) the driver shows without CUDA state, with its words: the checkpoint API has
/// nothing of them to lock, and they hold nothing on the device, so the group is suspended
/// without them. Both of the driver's answers are needed: its checkpoint state for the pid
/// (`INVALID_VALUE` / `NOT_INITIALIZED`: no CUDA state) and NVML's process lists, readable and
/// showing the pid holding nothing. Without either (no checkpoint API, no NVML) nobody is
/// skipped, and a suspension fails on such a member as before. Nothing a member writes enters.
fn without_cuda(state: &Mutex<State>, pids: impl Iterator<Item = u32>) -> BTreeMap<u32, String> {
    let Ok(d) = driver() else { return BTreeMap::new() };
    let none: BTreeMap<u32, String> = pids
        .filter_map(|pid| match d.state(pid) {
            Err(e) if e.no_cuda_state() => Some((pid, e.to_string())),
            _ => None,
        })
        .collect();
    if none.is_empty() {
        return none;
    }
    let Some(held) = crate::device_memory::held_by_pids(state) else { return BTreeMap::new() };
    none.into_iter().filter(|(pid, _)| held.get(pid).copied().unwrap_or(0) == 0).collect()
}

/// Members left running at their group's suspension for want of CUDA state (`without_cuda`)
/// that have CUDA state now: suspended with their group (locked and checkpointed, as a newcomer
/// to a suspended group is), so that no member of a suspended group runs CUDA beside it. The
/// policy's watcher calls it at every look; a lock that cannot be had now is tried again then.
pub fn join_skipped(state: &Mutex<State>) {
    let waiting: Vec<(String, Vec<u32>)> = registry()
        .groups
        .iter()
        .filter(|(_, rec)| rec.phase == Phase::Suspended && !rec.skipped.is_empty())
        .map(|(g, rec)| (g.clone(), rec.skipped.keys().copied().collect()))
        .collect();
    if waiting.is_empty() {
        return;
    }
    let Ok(d) = driver() else { return };
    for (group, pids) in waiting {
        for pid in pids {
            match d.state(pid) {
                Ok(ProcessState::Running) => {}
                _ if alive(pid) => continue, // still no CUDA state (or held by another caller)
                _ => {
                    update(&group, |rec| rec.skipped.remove(&pid));
                    continue;
                }
            }
            let bytes = crate::device_memory::held_by_pids(state).and_then(|h| h.get(&pid).copied()).unwrap_or(0);
            let (outcome, ms) = timed(|| checkpoint_all(&*d, &[pid], JOIN_LOCK_TIMEOUT));
            if let Err(f) = outcome {
                let first = update(&group, |rec| rec.skipped.get_mut(&pid).map(|warned| !std::mem::replace(warned, true)).unwrap_or(false));
                if first {
                    tracing::warn!("group {group:?} is suspended, and its pid {pid} has CUDA state now but could not be suspended with it yet (tried again at every look): {}", f.why);
                }
                continue;
            }
            let joined = update(&group, |rec| {
                rec.skipped.remove(&pid);
                let suspended = rec.phase == Phase::Suspended;
                if suspended {
                    rec.pids.insert(pid, bytes);
                    rec.bytes = rec.pids.values().sum();
                }
                suspended
            });
            if joined {
                tracing::info!("group {group:?}: pid {pid}, left running at its suspension for want of CUDA state, has CUDA state now: suspended with its group ({ms:.0} ms)");
            } else {
                // Resumed meanwhile, without it: it runs with the others.
                let _ = restore_all(&*d, &[pid]);
            }
        }
    }
}

/// Bytes over ms, in GB/s (1e9 bytes); `None` for nothing moved.
fn rate(bytes: u64, ms: f64) -> Option<f64> {
    (bytes > 0 && ms > 0.0).then(|| bytes as f64 / (ms / 1e3) / 1e9)
}

fn path_name(shim: bool, driver: bool) -> String {
    match (shim, driver) {
        (true, true) => "shim+driver",
        (true, false) => "shim",
        _ => "driver",
    }
    .to_string()
}

/// Which members go which way: (pid → slot for the shim's path, pid → bytes for the driver's).
/// `auto`: the shim's path for members whose agent runs, whose every entry point passes the
/// gate and whose memory is all VMM-backed; `shim`: every member must have an agent whose
/// every entry point passes the gate (what is not VMM-backed stays on the device, counted in
/// what the agent says it keeps).
#[allow(clippy::type_complexity)]
fn split(group: &str, path: SuspendPath, m: &Members) -> Result<(BTreeMap<u32, usize>, BTreeMap<u32, u64>), (u32, String)> {
    let mut shim = BTreeMap::new();
    let mut drivers = BTreeMap::new();
    for (&pid, &bytes) in &m.pids {
        let (slot, caps) = m.slots.get(&pid).copied().unwrap_or((usize::MAX, 0));
        let fast = caps & (CAP_AGENT | CAP_FAST) == CAP_AGENT | CAP_FAST && caps & CAP_OTHER_MEMORY == 0;
        match path {
            SuspendPath::Driver => {
                drivers.insert(pid, bytes);
            }
            SuspendPath::Shim if caps & CAP_AGENT == 0 => {
                return Err((
                    pid,
                    format!(
                        "group {group:?} is on the shim's suspend path, but pid {pid} runs no suspend agent (it allocated nothing since the group was put on that path, or its shim predates it); `gpuslice set --group {group} --suspendable true --suspend-path auto` lets the driver suspend such members"
                    ),
                ))
            }
            SuspendPath::Shim if caps & CAP_FAST == 0 => {
                return Err((
                    pid,
                    format!(
                        "group {group:?} is on the shim's suspend path, but pid {pid} was given a driver function that bypasses the suspend gate (its shim logged which): its agent cannot stop every call; `gpuslice set --group {group} --suspendable true --suspend-path auto` lets the driver suspend such members"
                    ),
                ))
            }
            SuspendPath::Shim => {
                shim.insert(pid, slot);
            }
            SuspendPath::Auto if fast => {
                shim.insert(pid, slot);
            }
            SuspendPath::Auto => {
                drivers.insert(pid, bytes);
            }
        }
    }
    Ok((shim, drivers))
}

/// A suspension that failed: why, the member that caused it (where one did), and the members
/// that stay suspended all the same: by their agents (`stuck`, they could not be brought back)
/// or by the driver (`left`, its undo could not put them back).
struct Failed {
    why: String,
    pid: Option<u32>,
    stuck: BTreeMap<u32, usize>,
    left: Vec<u32>,
    /// A lock (the driver's) or a gate (an agent's) timed out: what the controller received
    /// says so (`suspend_driver::Failed::timed_out`, `agents::Failure::timed_out`).
    timed_out: bool,
}

impl Failed {
    /// The refusal's kind, the attempt's locks having been given `bound` in all.
    fn kind(&self, bound: Duration) -> Kind {
        if self.timed_out {
            Kind::Timeout { waited: bound }
        } else {
            Kind::Lasting
        }
    }
}

impl From<agents::Failure> for Failed {
    fn from(f: agents::Failure) -> Failed {
        Failed { why: f.why, pid: f.pid, stuck: f.stuck, left: Vec::new(), timed_out: f.timed_out }
    }
}

/// A suspension done: who went by the shim's path, the bytes moved in all, and the agents' rows.
struct Suspended {
    by_shim: BTreeMap<u32, usize>,
    moved: u64,
    agents: BTreeMap<u32, AgentRow>,
}

/// The shim's members first (their agents), the check of their answers, then the driver's; on
/// any failure what was done is undone. A member whose answer NVML does not bear out is
/// brought back by its agent before the driver's checkpoint takes it (never both at once); one
/// that cannot be brought back stays with its agent's suspension (logged).
fn suspend_both(
    state: &Mutex<State>,
    group: &str,
    m: &Members,
    shim: &BTreeMap<u32, usize>,
    drivers: &BTreeMap<u32, u64>,
    wait: LockWait,
) -> Result<Suspended, Failed> {
    let mut drivers = drivers.clone();
    let mut by_shim = shim.clone();
    let mut moved = 0;
    let mut rows = BTreeMap::new();
    if !shim.is_empty() {
        let before = crate::device_memory::held_by_pids(state);
        // Every agent closes its gate at once: one bound for all of them, the driver's locks
        // after them taking what is left of it.
        let answers = agents::ask(state, m.group_slot, shim, true, wait.at(Instant::now())).map_err(Failed::from)?;
        let after = crate::device_memory::held_by_pids(state);
        let mut disbelieved = BTreeMap::new();
        for (&pid, &slot) in shim {
            let Some(answer) = answers.get(&pid) else { continue };
            let reported = m.pids.get(&pid).copied().unwrap_or(0);
            let verdict = agents::judge(answer, reported, before.as_ref(), after.as_ref(), pid);
            let nvml = match (verdict.nvml_after, verdict.allowed) {
                (Some(now), Some(allowed)) => format!("NVML shows it holding {} (allowed {})", format_size(now), format_size(allowed)),
                _ => "NVML cannot be read to check it".to_string(),
            };
            if verdict.believed {
                tracing::info!(
                    "group {group:?}: pid {pid}: suspended by its agent: {}; keeps {}, {nvml}",
                    agents::summary(answer, true),
                    format_size(answer.keep)
                );
                moved += answer.bytes;
                rows.insert(pid, agents::row(pid, answer, &verdict));
            } else {
                tracing::warn!(
                    "group {group:?}: pid {pid} says its agent suspended it ({} moved, {} kept), but {nvml}: its agent is asked back, then the driver's checkpoint suspends it",
                    format_size(answer.bytes),
                    format_size(answer.keep)
                );
                disbelieved.insert(pid, slot);
            }
        }
        let stuck = agents::bring_back(state, m.group_slot, &disbelieved);
        for &pid in disbelieved.keys() {
            if stuck.contains_key(&pid) {
                // Never the driver on top of the agent: it stays as its agent left it.
                tracing::error!("group {group:?}: pid {pid}: its agent could not bring it back; it stays suspended by its agent (no driver checkpoint on top)");
                if let Some(answer) = answers.get(&pid) {
                    moved += answer.bytes;
                    rows.insert(pid, agents::row(pid, answer, &agents::Verdict { nvml_after: None, allowed: None, believed: false }));
                }
            } else {
                by_shim.remove(&pid);
                drivers.insert(pid, m.pids.get(&pid).copied().unwrap_or(0));
            }
        }
    }
    if !drivers.is_empty() {
        let pids: Vec<u32> = drivers.keys().copied().collect();
        // A driver that cannot be loaded is no member's doing: no pid to name.
        let done = driver()
            .map_err(|why| (None, why, Vec::new(), false))
            .and_then(|d| checkpoint_within(&*d, &pids, wait).map_err(|f| (Some(f.pid), f.why, f.left, f.timed_out)));
        if let Err((pid, why, left, timed_out)) = done {
            let stuck = agents::bring_back(state, m.group_slot, &by_shim);
            return Err(Failed { why, pid, stuck, left, timed_out });
        }
        moved += drivers.values().sum::<u64>();
    }
    Ok(Suspended { by_shim, moved, agents: rows })
}

/// True when the driver reports one of `pids` in its failed state (an uncorrectable error
/// during a checkpoint or restore): shown as `failed`, not retried.
fn driver_says_failed(pids: impl IntoIterator<Item = u32>) -> bool {
    let Some(d) = registry().driver.clone() else { return false };
    pids.into_iter().any(|pid| d.state(pid) == Ok(ProcessState::Failed))
}

/// Runs a driver operation (no lock held: it may take seconds) and times it, in ms.
fn timed<T>(operation: impl FnOnce() -> T) -> (T, f64) {
    let started = Instant::now();
    let outcome = operation();
    (outcome, started.elapsed().as_secs_f64() * 1e3)
}

/// Changes the group's record under the registry's lock.
fn update<T>(group: &str, change: impl FnOnce(&mut Record) -> T) -> T {
    change(registry().groups.entry(group.to_string()).or_default())
}

/// A process that registered into group `group` (its answer not sent yet): while the group is
/// suspended it is suspended too (locked and checkpointed before it has its answer, so its
/// next CUDA call blocks until the group is resumed, and the resume brings it back with the
/// others). `Err` when that cannot be done, or the group is between states: the registration is
/// then refused, to be tried again (fail closed: it never runs beside its suspended group).
pub fn join_if_suspended(group: &str, pid: u32) -> Result<(), String> {
    match record(group).map(|rec| rec.phase) {
        Some(Phase::Suspended) => {}
        Some(Phase::Suspending | Phase::Resuming) => return Err(format!("group {group:?} is being suspended or resumed")),
        _ => return Ok(()),
    }
    let d = driver()?;
    let (outcome, ms) = timed(|| checkpoint_all(&*d, &[pid], LOCK_TIMEOUT));
    outcome.map_err(|f| format!("group {group:?} is suspended, and this process could not be suspended with it: {}", f.why))?;
    let joined = update(group, |rec| {
        let suspended = rec.phase == Phase::Suspended;
        if suspended {
            rec.pids.insert(pid, 0);
            // The same pid again (an exec'd program): suspended now, no longer left out.
            rec.skipped.remove(&pid);
        }
        suspended
    });
    if !joined {
        // Resumed meanwhile, without it: it runs with the others.
        let _ = restore_all(&*d, &[pid]);
        return Ok(());
    }
    tracing::info!("pid {pid} joined group {group:?} while it is suspended: suspended with it ({ms:.0} ms); its first CUDA call waits for `gpuslice resume`");
    Ok(())
}

/// `gpuslice resume --group G` (and the policy's resumptions). Each member comes back by the
/// path that suspended it: the driver's restore for those it checkpointed (first: a process
/// the driver holds cannot run its agent), then the agents — every member whose agent says it
/// holds it suspended, whatever the record says, so that no gate stays closed.
pub fn resume(state: &Mutex<State>, peer: Option<Peer>, group: &str) -> Result<String, String> {
    if let Some(peer) = peer {
        may_edit(&lock_state(state), peer)?;
    }
    let rec = record(group).filter(|rec| rec.phase == Phase::Suspended).ok_or_else(|| format!("group {group:?} is not suspended"))?;
    let driver_pids: Vec<u32> = rec.pids.keys().filter(|p| !rec.shim_pids.contains_key(p)).copied().collect();
    // The driver's restore cannot be retried once it ran out of memory (cuda-checkpoint#44):
    // it needs room first. The agents' resume fails cleanly and is retried instead.
    if !driver_pids.is_empty() {
        crate::device_memory::check_room(state, &rec.device_bytes).map_err(|why| format!("group {group:?} stays suspended: {why}"))?;
    }
    let (group_slot, holding) = {
        let state = lock_state(state);
        let holding = members(&state, group).map(|m| agents::holding(&state, m.slots.iter().map(|(&p, &(s, _))| (p, s)))).unwrap_or_default();
        (state.find_group(group), holding)
    };
    let (shim, drivers): (BTreeMap<u32, usize>, Vec<u32>) = {
        let mut r = registry();
        let rec = r.groups.get_mut(group).filter(|rec| rec.phase == Phase::Suspended).ok_or_else(|| format!("group {group:?} is not suspended"))?;
        rec.pids.retain(|&pid, _| alive(pid));
        rec.shim_pids.retain(|&pid, _| alive(pid));
        rec.phase = Phase::Resuming;
        let drivers = rec.pids.keys().filter(|p| !rec.shim_pids.contains_key(p)).copied().collect();
        let mut shim = rec.shim_pids.clone();
        for (pid, slot) in holding {
            if shim.insert(pid, slot).is_none() {
                tracing::warn!("group {group:?}: pid {pid}'s agent holds it suspended though the record does not say so: it is asked back too");
            }
        }
        (shim, drivers)
    };
    let pids = drivers.len() + shim.keys().filter(|p| !drivers.contains(p)).count();
    let path = path_name(!shim.is_empty(), !drivers.is_empty());
    let (outcome, ms) = timed(|| -> Result<BTreeMap<u32, agents::Answer>, String> {
        if !drivers.is_empty() {
            driver().and_then(|d| restore_all(&*d, &drivers))?;
        }
        if shim.is_empty() {
            return Ok(BTreeMap::new());
        }
        let slot = group_slot.ok_or_else(|| "its group slot is gone".to_string())?;
        agents::ask(state, slot, &shim, false, LOCK_TIMEOUT).map_err(|f| {
            // All or nothing: the members the driver restored go back out with the others.
            if !drivers.is_empty() {
                let again = driver().and_then(|d| checkpoint_all(&*d, &drivers, LOCK_TIMEOUT).map_err(|f| f.why));
                if let Err(e) = again {
                    tracing::error!("group {group:?}: the members the driver restored could not be checkpointed again: {e}");
                }
            }
            f.why
        })
    });
    let failed = outcome.is_err() && driver_says_failed(drivers.iter().copied());
    update(group, |rec| match outcome {
        Ok(answers) => {
            let mut moved = drivers.iter().map(|p| rec.pids.get(p).copied().unwrap_or(0)).sum::<u64>();
            for (pid, answer) in &answers {
                moved += answer.bytes;
                tracing::info!("group {group:?}: pid {pid}: resumed by its agent: {}", agents::summary(answer, false));
                if let Some(row) = rec.agents.get_mut(pid) {
                    agents::add_resume(row, answer);
                }
            }
            rec.phase = Phase::Running;
            rec.resume_ms = Some(ms);
            rec.resume_gbps = rate(moved, ms);
            rec.resume_path = Some(path.clone());
            rec.automatic = false;
            rec.error = None;
            rec.pids.clear();
            rec.shim_pids.clear();
            rec.skipped.clear();
            let message = format!(
                "group {group:?} resumed: {pids} processes, {} back on the device in {ms:.0} ms ({path} path{})",
                format_size(moved),
                rec.resume_gbps.map(|g| format!(", {g:.2} GB/s")).unwrap_or_default()
            );
            tracing::info!("{message}");
            Ok(message)
        }
        Err(e) if failed => {
            rec.phase = Phase::Failed;
            rec.error = Some(e.clone());
            tracing::error!("group {group:?}: resume failed and the driver reports a process in its failed state: {e}");
            Err(format!("group {group:?} could not be resumed, and the driver reports a process of it failed: {e}"))
        }
        Err(e) => {
            // Still suspended, nothing lost: it can be resumed once there is room.
            rec.phase = Phase::Suspended;
            rec.error = Some(e.clone());
            tracing::warn!("group {group:?}: resume failed, it stays suspended: {e}");
            Err(format!("group {group:?} stays suspended: {e}"))
        }
    })
}

/// `gpuslice set --suspendable`: the policy may (or may no longer) suspend the group.
pub fn set_suspendable(state: &Mutex<State>, peer: Peer, s: &gpuslice_common::protocol::Suspendable) -> Result<String, String> {
    let (group, suspendable, allow_exports) = (s.group.as_str(), s.suspendable, s.allow_exports);
    let state = lock_state(state);
    may_edit(&state, peer)?;
    if !s.ahead {
        state.find_group(group).ok_or_else(|| format!("no group named {group:?} (see `gpuslice ls`)"))?;
    }
    gpuslice_common::settings::check_group_name(group).map_err(|e| format!("group {group:?}: {e}"))?;
    let path = s.path.as_deref().map(str::parse::<SuspendPath>).transpose().map_err(|e| format!("--suspend-path: {e}"))?;
    update(group, |rec| {
        rec.suspendable = suspendable;
        rec.allow_exports = allow_exports;
        rec.edited = true;
        // A new decision about the group: the policy tries it again (its refusal may have been
        // what the edit answers, e.g. `--allow-exports`).
        rec.refusal = None;
        if let Some(path) = path {
            rec.path = path;
        }
    });
    // Into the ledger now (a group marked ahead gets them when it is made): a restarted
    // controller finds them there.
    if let Some(slot) = state.find_group(group) {
        state.publish_group(slot);
    }
    let path = record(group).map_or(SuspendPath::Driver, |r| r.path);
    let over_host = if suspendable { state.find_group(group).and_then(|slot| over_host_limit(state.memory_limit_total(slot))) } else { None };
    Ok(format!(
        "group {group:?} {}suspendable{}{}{}",
        if suspendable { "" } else { "not " },
        if allow_exports { " (even while it exports memory)" } else { "" },
        if suspendable { format!(", suspend path {}", path.as_str()) } else { String::new() },
        over_host.unwrap_or_default()
    ))
}

/// A note for `set --suspendable true` when the group may hold more on the GPUs (`limit`: its
/// memory limits summed) than suspended groups may hold in host memory: the policy would
/// refuse to suspend it once it holds more than the host limit, which an operator should hear
/// when marking it, not when a request waits.
fn over_host_limit(limit: Option<u64>) -> Option<String> {
    let (limit, host) = (limit?, host_limit());
    (limit > host).then(|| {
        format!(
            "; note: its memory limit ({}) is over the {} that suspended groups may hold in host memory ({ENV_HOST_LIMIT} or `serve --suspend-host-limit`): while it holds more than that, a suspension of it is refused",
            format_size(limit),
            format_size(host)
        )
    })
}

/// Set once `from_ledger` has read the marks a previous controller left: before that, no
/// marks are written (the config's would overwrite a live edit still to be read back).
static LEDGER_READ: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The marks for group `group`'s members page (`ledger::MARK_*`): those `gpuslice set` gave it
/// (with `MARK_EDITED`, kept over a restart), else the config file's; the members' shims read
/// `MARK_SUSPENDABLE | MARK_SHIM_PATH` to serve their memory VMM-backed. `None`: nothing to
/// write yet.
pub fn marks_to_publish(group: &str) -> Option<u32> {
    use gpuslice_common::ledger::{MARK_ALLOW_EXPORTS, MARK_EDITED, MARK_PATH_AUTO, MARK_SHIM_PATH, MARK_SUSPENDABLE};
    if !LEDGER_READ.load(std::sync::atomic::Ordering::Acquire) {
        return None;
    }
    let r = registry();
    let rec = r.groups.get(group)?;
    let path = match rec.path {
        SuspendPath::Driver => 0,
        SuspendPath::Shim => MARK_SHIM_PATH,
        SuspendPath::Auto => MARK_SHIM_PATH | MARK_PATH_AUTO,
    };
    Some(
        if rec.edited { MARK_EDITED } else { 0 }
            | if rec.suspendable { MARK_SUSPENDABLE } else { 0 }
            | if rec.allow_exports { MARK_ALLOW_EXPORTS } else { 0 }
            | path,
    )
}

/// At start, after the config's marks: the marks made with `gpuslice set` before a restart, as
/// the ledger kept them; they win over the config's, as other live edits do.
pub fn from_ledger(state: &Mutex<State>) {
    use gpuslice_common::ledger::{MARK_ALLOW_EXPORTS, MARK_EDITED, MARK_PATH_AUTO, MARK_SHIM_PATH, MARK_SUSPENDABLE};
    let state = lock_state(state);
    LEDGER_READ.store(true, std::sync::atomic::Ordering::Release);
    for (&slot, info) in &state.groups {
        let marks = state.published_marks(slot);
        if marks & MARK_EDITED == 0 {
            continue;
        }
        update(&info.name, |rec| {
            rec.suspendable = marks & MARK_SUSPENDABLE != 0;
            rec.allow_exports = marks & MARK_ALLOW_EXPORTS != 0;
            rec.path = match (marks & MARK_SHIM_PATH != 0, marks & MARK_PATH_AUTO != 0) {
                (false, _) => SuspendPath::Driver,
                (true, false) => SuspendPath::Shim,
                (true, true) => SuspendPath::Auto,
            };
            rec.edited = true;
        });
        tracing::info!(
            "group {:?}: {}suspendable as `gpuslice set` left it before the restart",
            info.name,
            if marks & MARK_SUSPENDABLE != 0 { "" } else { "not " }
        );
    }
}

/// Sets group `group`'s last refusal, as a failed suspension would (unit tests of the policy).
#[cfg(test)]
pub fn set_refusal_for_tests(group: &str, refusal: Option<Refusal>) {
    update(group, |rec| rec.refusal = refusal);
}

/// Whether the group is marked suspendable (for the policy).
pub fn record(group: &str) -> Option<Record> {
    registry().groups.get(group).cloned()
}

/// The rows of `ls`: every group with a record; `members` gives a group's registered pids.
pub fn rows(members: &dyn Fn(&str) -> Vec<u32>) -> Vec<SuspensionRow> {
    let mut r = registry();
    forget_dead(&mut r);
    let now = crate::refusal::now_ns();
    r.groups.iter().map(|(g, rec)| rec.row(g, &members(g), now)).collect()
}

/// The registered processes of group `group` (the controller's records).
pub fn member_pids(state: &State, group: &str) -> Vec<u32> {
    let Some(slot) = state.find_group(group) else { return Vec::new() };
    state.watched.values().filter(|w| w.group == slot).map(|w| w.pid).collect()
}

/// Processes that died while suspended: their host copy went with them (the driver frees it).
fn forget_dead(r: &mut Registry) {
    for (group, rec) in r.groups.iter_mut() {
        if rec.phase != Phase::Suspended && rec.phase != Phase::Failed {
            continue;
        }
        let before = rec.pids.len();
        rec.pids.retain(|&pid, _| alive(pid));
        rec.shim_pids.retain(|&pid, _| alive(pid));
        rec.skipped.retain(|&pid, _| alive(pid));
        if rec.pids.len() < before {
            tracing::info!("group {group:?}: {} suspended processes exited; their host copies are freed", before - rec.pids.len());
        }
        if rec.pids.is_empty() {
            rec.phase = Phase::Running;
            rec.automatic = false;
            rec.error = Some("its processes exited while suspended".into());
        }
    }
}

/// At start: the config file's `[groups.X] suspendable` / `allow_exports`.
pub fn from_config(state: &Mutex<State>) {
    let marked = lock_state(state).config.suspendable.clone();
    let mut r = registry();
    for (group, flags) in marked {
        let rec = r.groups.entry(group).or_default();
        rec.suspendable = flags.suspendable;
        rec.allow_exports = flags.allow_exports;
        rec.path = flags.path;
    }
}

/// At start: members whose agents hold them suspended (`suspend_held`, in their process slots,
/// which outlive the controller) were suspended by the shim's path of an earlier controller:
/// they are recorded so that `resume` asks them back.
fn adopt_shim(state: &Mutex<State>, groups: &[(String, Members)]) {
    let state = lock_state(state);
    for (group, m) in groups {
        let found = agents::holding(&state, m.slots.iter().map(|(&p, &(s, _))| (p, s)));
        if found.is_empty() {
            continue;
        }
        tracing::info!("group {group:?}: {} processes found suspended by their own agents (an earlier controller asked); `gpuslice resume --group {group}` brings them back", found.len());
        let mut r = registry();
        let rec = r.groups.entry(group.clone()).or_default();
        rec.phase = Phase::Suspended;
        rec.pids = found.keys().map(|p| (*p, m.pids.get(p).copied().unwrap_or(0))).collect();
        rec.bytes = rec.pids.values().sum();
        rec.shim_pids = found;
        rec.device_bytes = m.device_bytes.clone();
        rec.last_path = Some("shim".into());
        rec.automatic = false;
        rec.suspended_at = Some(Instant::now());
    }
}

/// At start: processes of the ledger the driver says are locked or checkpointed are suspended
/// groups of an earlier controller; they are recorded so that `resume` brings them back.
pub fn adopt(state: &Mutex<State>) {
    let groups: Vec<(String, Members)> = {
        let state = lock_state(state);
        if state.watched.is_empty() {
            return;
        }
        state.groups.values().filter_map(|g| Some((g.name.clone(), members(&state, &g.name).ok()?))).collect()
    };
    adopt_shim(state, &groups);
    let d = match driver() {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!("suspended processes not looked for: {e}");
            return;
        }
    };
    for (group, m) in groups {
        let states: BTreeMap<u32, ProcessState> = m.pids.keys().filter_map(|&pid| Some((pid, d.state(pid).ok()?))).collect();
        let failed = states.values().any(|s| *s == ProcessState::Failed);
        let held: BTreeMap<u32, u64> = m
            .pids
            .iter()
            .filter(|(pid, _)| matches!(states.get(pid), Some(ProcessState::Checkpointed | ProcessState::Locked | ProcessState::Failed)))
            .map(|(&p, &b)| (p, b))
            .collect();
        if held.is_empty() {
            continue;
        }
        // A lock without its checkpoint (the earlier controller died in between) is finished,
        // so that the group is in one state.
        for (&pid, state) in &states {
            if *state == ProcessState::Locked {
                let _ = d.checkpoint(pid);
            }
        }
        tracing::info!(
            "group {group:?}: {} processes found suspended by an earlier controller; `gpuslice resume --group {group}` brings them back",
            held.len()
        );
        let mut r = registry();
        let rec = r.groups.entry(group).or_default();
        rec.phase = if failed { Phase::Failed } else { Phase::Suspended };
        // Members the shim's path suspended (`adopt_shim`) stay beside the driver's.
        let held: BTreeMap<u32, u64> = held.into_iter().chain(rec.pids.iter().filter(|(p, _)| rec.shim_pids.contains_key(p)).map(|(&p, &b)| (p, b))).collect();
        rec.bytes = held.values().sum();
        rec.pids = held;
        rec.device_bytes = m.device_bytes;
        rec.automatic = false;
        rec.suspended_at = Some(Instant::now());
    }
}
