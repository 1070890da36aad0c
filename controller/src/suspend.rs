//! Suspending and resuming whole groups with the driver's checkpoint API (issue 22): every
//! process of the group is locked, then checkpointed (its device memory moves to host memory);
//! resuming restores and unlocks them. The group keeps its quota and its `used` in the ledger
//! (its memory still counts against its own quota) while the device's free memory grows.
//!
//! The controller-side record (`Registry`) lives here, behind its own lock, taken only after the
//! state's (never the other way round), and never held across a driver call: a checkpoint of a
//! large process takes seconds, during which `ls` and registrations go on.

use crate::checkpoint::{Driver, ProcessState};
use crate::state::{Peer, State};
use gpuslice_common::protocol::SuspensionRow;
use gpuslice_common::size::format_size;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a lock waits for the target's CUDA calls under way (a long kernel, a sync).
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
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

    fn row(&self, group: &str) -> SuspensionRow {
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

pub fn lock_state(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
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
    pub device_bytes: BTreeMap<u32, u64>,
    pub exports: usize,
}

pub fn members(state: &State, group: &str) -> Result<Members, String> {
    let slot = state.find_group(group).ok_or_else(|| format!("no group named {group:?} (see `gpuslice ls`)"))?;
    let g = state.ledger.group(slot);
    let mut m = Members { pids: BTreeMap::new(), device_bytes: BTreeMap::new(), exports: 0 };
    for (&pslot, w) in state.watched.iter().filter(|(_, w)| w.group == slot) {
        let p = state.ledger.process(pslot);
        let bytes = p.devices.iter().map(|d| d.used.load(std::sync::atomic::Ordering::Relaxed)).sum();
        m.pids.insert(w.pid, bytes);
        m.exports += state.exports.held_by(pslot);
    }
    for (d, gd) in g.devices.iter().enumerate() {
        let used = gd.used.load(std::sync::atomic::Ordering::Relaxed);
        if used > 0 {
            m.device_bytes.insert(d as u32, used);
        }
    }
    Ok(m)
}

/// `gpuslice suspend --group G` (and the policy's suspensions).
pub fn suspend(state: &Mutex<State>, peer: Option<Peer>, group: &str, automatic: bool) -> Result<String, String> {
    let m = {
        let state = lock_state(state);
        if let Some(peer) = peer {
            may_edit(&state, peer)?;
        }
        members(&state, group)?
    };
    if m.pids.is_empty() {
        return Err(format!("group {group:?} has no running process to suspend"));
    }
    let bytes: u64 = m.pids.values().sum();
    {
        let mut r = registry();
        let held: u64 = r.groups.values().map(Record::host_bytes).sum();
        let rec = r.groups.entry(group.to_string()).or_default();
        if rec.phase == Phase::Failed {
            return Err(format!("group {group:?} failed at its last suspension or resume (the driver says so): its processes must be restarted"));
        }
        if rec.phase != Phase::Running {
            return Err(format!("group {group:?} is {} already", rec.phase.name()));
        }
        if m.exports > 0 && !rec.allow_exports {
            return Err(format!(
                "group {group:?} exports memory to other processes ({} exports recorded): suspending it would pull memory from under its importers; `gpuslice set --group {group} --suspendable true --allow-exports` allows it",
                m.exports
            ));
        }
        let limit = host_limit();
        if held.saturating_add(bytes) > limit {
            return Err(format!(
                "suspending group {group:?} would move {} to host memory; suspended tenants hold {} already, and {ENV_HOST_LIMIT} allows {}",
                format_size(bytes),
                format_size(held),
                format_size(limit)
            ));
        }
        rec.phase = Phase::Suspending;
        rec.pids = m.pids.clone();
        rec.device_bytes = m.device_bytes.clone();
        rec.bytes = bytes;
        rec.automatic = automatic;
        rec.error = None;
    }
    let (outcome, ms) = timed(|| driver().and_then(|d| checkpoint_all(&d, &m.pids)));
    let failed = outcome.is_err() && driver_says_failed(m.pids.keys().copied());
    update(group, |rec| match outcome {
        Ok(()) => {
            rec.phase = Phase::Suspended;
            rec.suspend_ms = Some(ms);
            rec.suspended_at = Some(Instant::now());
            rec.suspensions += 1;
            let message = format!("group {group:?} suspended: {} processes, {} moved to host memory in {ms:.0} ms", m.pids.len(), format_size(bytes));
            tracing::info!("{message}{}", if automatic { " (to make room for a higher-priority request)" } else { "" });
            Ok(message)
        }
        Err(e) if failed => {
            rec.phase = Phase::Failed;
            rec.error = Some(e.clone());
            tracing::error!("group {group:?}: suspension failed and the driver reports a process in its failed state: {e}");
            Err(format!("group {group:?} could not be suspended, and the driver reports a process of it failed: {e}"))
        }
        Err(e) => {
            rec.phase = Phase::Running;
            rec.pids.clear();
            rec.error = Some(e.clone());
            tracing::warn!("group {group:?}: suspension failed, its processes run on: {e}");
            Err(format!("group {group:?} could not be suspended (its processes run on): {e}"))
        }
    })
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

/// Locks every process, then checkpoints each; on any failure what was done is undone.
fn checkpoint_all(d: &Driver, pids: &BTreeMap<u32, u64>) -> Result<(), String> {
    let mut locked = Vec::new();
    let mut result = Ok(());
    for &pid in pids.keys() {
        match d.lock(pid, LOCK_TIMEOUT) {
            Ok(()) => locked.push(pid),
            Err(e) => {
                result = Err(e.to_string());
                break;
            }
        }
    }
    let mut checkpointed = Vec::new();
    if result.is_ok() {
        for &pid in &locked {
            match d.checkpoint(pid) {
                Ok(()) => checkpointed.push(pid),
                Err(e) => {
                    result = Err(e.to_string());
                    break;
                }
            }
        }
    }
    if result.is_err() {
        for &pid in &checkpointed {
            let _ = d.restore(pid);
        }
        for &pid in &locked {
            let _ = d.unlock(pid);
        }
    }
    result
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
    let (outcome, ms) = timed(|| checkpoint_all(&d, &BTreeMap::from([(pid, 0)])));
    outcome.map_err(|e| format!("group {group:?} is suspended, and this process could not be suspended with it: {e}"))?;
    let joined = update(group, |rec| {
        let suspended = rec.phase == Phase::Suspended;
        if suspended {
            rec.pids.insert(pid, 0);
        }
        suspended
    });
    if !joined {
        // Resumed meanwhile, without it: it runs with the others.
        let _ = restore_all(&d, &[pid]);
        return Ok(());
    }
    tracing::info!("pid {pid} joined group {group:?} while it is suspended: suspended with it ({ms:.0} ms); its first CUDA call waits for `gpuslice resume`");
    Ok(())
}

/// `gpuslice resume --group G` (and the policy's resumptions).
pub fn resume(state: &Mutex<State>, peer: Option<Peer>, group: &str) -> Result<String, String> {
    if let Some(peer) = peer {
        may_edit(&lock_state(state), peer)?;
    }
    let device_bytes = record(group).filter(|rec| rec.phase == Phase::Suspended).ok_or_else(|| format!("group {group:?} is not suspended"))?.device_bytes;
    crate::room::check_room(state, &device_bytes).map_err(|why| format!("group {group:?} stays suspended: {why}"))?;
    let pids: Vec<u32> = {
        let mut r = registry();
        let rec = r.groups.get_mut(group).filter(|rec| rec.phase == Phase::Suspended).ok_or_else(|| format!("group {group:?} is not suspended"))?;
        rec.pids.retain(|&pid, _| alive(pid));
        rec.phase = Phase::Resuming;
        rec.pids.keys().copied().collect()
    };
    let (outcome, ms) = timed(|| driver().and_then(|d| restore_all(&d, &pids)));
    let failed = outcome.is_err() && driver_says_failed(pids.iter().copied());
    update(group, |rec| match outcome {
        Ok(()) => {
            rec.phase = Phase::Running;
            rec.resume_ms = Some(ms);
            rec.automatic = false;
            rec.error = None;
            rec.pids.clear();
            let message = format!("group {group:?} resumed: {} processes, {} back on the device in {ms:.0} ms", pids.len(), format_size(rec.bytes));
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
            // Still checkpointed, nothing lost: it can be resumed once there is room.
            rec.phase = Phase::Suspended;
            rec.error = Some(e.clone());
            tracing::warn!("group {group:?}: resume failed, it stays suspended: {e}");
            Err(format!("group {group:?} stays suspended: {e}"))
        }
    })
}

/// Restores every process (all or none: one that does not fit sends the others back out), then
/// unlocks them.
fn restore_all(d: &Driver, pids: &[u32]) -> Result<(), String> {
    let mut restored = Vec::new();
    for &pid in pids {
        if let Err(e) = d.restore(pid) {
            for &back in &restored {
                let _ = d.checkpoint(back);
            }
            let why = if e.code == crate::checkpoint::OUT_OF_MEMORY { format!("{e}: the device lacks room for its memory") } else { e.to_string() };
            return Err(why);
        }
        restored.push(pid);
    }
    for &pid in pids {
        d.unlock(pid).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A process that exists and has not exited (a zombie's memory and host copy are gone already).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command's closing parenthesis.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
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
    update(group, |rec| {
        rec.suspendable = suspendable;
        rec.allow_exports = allow_exports;
        rec.edited = true;
    });
    // Into the ledger now (a group marked ahead gets them when it is made): a restarted
    // controller finds them there.
    if let Some(slot) = state.find_group(group) {
        state.publish_group(slot);
    }
    Ok(format!("group {group:?} {}suspendable{}", if suspendable { "" } else { "not " }, if allow_exports { " (even while it exports memory)" } else { "" }))
}

/// The marks `gpuslice set` gave group `group` (`ledger::MARK_*`), for its members page; `None`
/// when it has none (the config's marks or none: nothing to keep in the ledger).
pub fn edited_marks(group: &str) -> Option<u32> {
    use gpuslice_common::ledger::{MARK_ALLOW_EXPORTS, MARK_EDITED, MARK_SUSPENDABLE};
    let r = registry();
    let rec = r.groups.get(group).filter(|rec| rec.edited)?;
    Some(MARK_EDITED | if rec.suspendable { MARK_SUSPENDABLE } else { 0 } | if rec.allow_exports { MARK_ALLOW_EXPORTS } else { 0 })
}

/// At start, after the config's marks: the marks made with `gpuslice set` before a restart, as
/// the ledger kept them; they win over the config's, as other live edits do.
pub fn from_ledger(state: &Mutex<State>) {
    use gpuslice_common::ledger::{MARK_ALLOW_EXPORTS, MARK_EDITED, MARK_SUSPENDABLE};
    let state = lock_state(state);
    for (&slot, info) in &state.groups {
        let marks = state.published_marks(slot);
        if marks & MARK_EDITED == 0 {
            continue;
        }
        update(&info.name, |rec| {
            rec.suspendable = marks & MARK_SUSPENDABLE != 0;
            rec.allow_exports = marks & MARK_ALLOW_EXPORTS != 0;
            rec.edited = true;
        });
        tracing::info!(
            "group {:?}: {}suspendable as `gpuslice set` left it before the restart",
            info.name,
            if marks & MARK_SUSPENDABLE != 0 { "" } else { "not " }
        );
    }
}

/// Whether the group is marked suspendable (for the policy).
pub fn record(group: &str) -> Option<Record> {
    registry().groups.get(group).cloned()
}

/// The rows of `ls`: every group with a record.
pub fn rows() -> Vec<SuspensionRow> {
    let mut r = registry();
    forget_dead(&mut r);
    r.groups.iter().map(|(g, rec)| rec.row(g)).collect()
}

/// Processes that died while suspended: their host copy went with them (the driver frees it).
fn forget_dead(r: &mut Registry) {
    for (group, rec) in r.groups.iter_mut() {
        if rec.phase != Phase::Suspended && rec.phase != Phase::Failed {
            continue;
        }
        let before = rec.pids.len();
        rec.pids.retain(|&pid, _| alive(pid));
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
        rec.bytes = held.values().sum();
        rec.pids = held;
        rec.device_bytes = m.device_bytes;
        rec.automatic = false;
        rec.suspended_at = Some(Instant::now());
    }
}
