//! Trust the measurement, not the tenant: once a second the controller compares what each
//! registered process reports (its ledger slot's `used`) with what the driver says it holds
//! (NVML's per-process memory, `nvmlDeviceGetComputeRunningProcesses`). A process whose report
//! is below NVML's figure by more than `TOLERANCE`, at two checks in a row, is charged the
//! difference: its `penalty` in the controller's own records (`Watched`), published summed over
//! the group on the group's members page (`MemberSettings::penalty`, read-only to members), which
//! every limit check counts as used, so the group is refused beyond its limit on NVML's figure. It
//! is listed in `ls`, `ls --json` (`underreporting`) and the metrics, and logged. This also
//! catches memory no hook sees (a path the shim does not interpose, a tenant writing its slot).
//!
//! The tolerance: the shim's report already includes the context's reserve and loaded modules
//! (both measured), so an honest process differs from NVML only by what the driver takes lazily
//! after those measurements (kernel code of lazily loaded modules, a few MiB; the driver's
//! page rounding of many small allocations) and by reads not taken at one instant. 64 MiB covers
//! that with room, and is small next to any quota worth setting. The report is read before and
//! after the NVML query and the larger taken, so an allocation or free racing the check cannot
//! make an honest process look short.

use crate::state::State;
use gpuslice_common::ledger::Ledger;
use gpuslice_common::protocol::UnderReportRow;
use gpuslice_common::size::format_size;
use nvml_wrapper::Nvml;
use std::collections::HashMap;
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

/// How far below NVML's figure a report may be.
pub const TOLERANCE: u64 = 64 << 20;
/// Consecutive checks a shortfall must be seen at before it is charged.
const CONFIRMATIONS: u32 = 2;
const EVERY: Duration = Duration::from_secs(1);

/// The cross-check's state between ticks (lives in the controller's main loop).
pub struct CrossCheck {
    nvml: Option<Nvml>,
    tried: bool,
    last: Option<Instant>,
    /// (process slot, its token, device) → checks in a row it has been short.
    short: HashMap<(usize, u64, usize), u32>,
}

impl Default for CrossCheck {
    fn default() -> Self {
        CrossCheck::new()
    }
}

impl CrossCheck {
    pub fn new() -> CrossCheck {
        CrossCheck { nvml: None, tried: false, last: None, short: HashMap::new() }
    }

    /// First step of a check, under the state's lock: `None` unless one is due; else the
    /// devices to ask NVML about and every watched process's report now. Who is checked on
    /// which GPU is the controller's own word (`Watched`, `State::claimed_devices`), never the slots'
    /// or the device table's (members write them: a member that kept writing FREE or a new
    /// generation into its slot, or another GPU's UUID into the device table, was skipped or
    /// judged against the wrong GPU's figures between the tick that put them back and this).
    pub fn begin(&mut self, state: &State) -> Option<Plan> {
        if self.last.is_some_and(|t| t.elapsed() < EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        if !self.tried {
            self.tried = true;
            match Nvml::init() {
                Ok(n) => self.nvml = Some(n),
                Err(e) => tracing::warn!("NVML is not available ({e}): processes' reports are not cross-checked against the driver"),
            }
        }
        self.nvml.as_ref()?;
        let ledger = &state.ledger;
        let procs: Vec<(usize, u64)> = state.watched.iter().map(|(&i, w)| (i, w.token)).collect();
        let devices: Vec<(usize, String)> = state.claimed_devices().map(|(d, u)| (d, u.to_string())).collect();
        let before = procs.iter().flat_map(|&(i, _)| devices.iter().map(move |&(d, _)| ((i, d), ledger.process(i).devices[d].used.load(SeqCst)))).collect();
        Some(Plan { procs, devices, before })
    }

    /// Second step, without the lock (NVML can take milliseconds): what the driver says each
    /// pid holds, per ledger device.
    pub fn measure(&self, plan: &Plan) -> HashMap<usize, HashMap<u32, u64>> {
        let mut held = HashMap::new();
        let Some(nvml) = &self.nvml else { return held };
        for (d, uuid) in &plan.devices {
            let Ok(device) = nvml.device_by_uuid(uuid.as_str()) else { continue };
            let Some(by_pid) = crate::activity::memory_by_pid(&device) else { continue };
            held.insert(*d, by_pid);
        }
        held
    }

    /// Last step, under the lock again: charges or lifts each process's penalty, and publishes
    /// the groups whose penalty changed.
    pub fn finish(&mut self, state: &mut State, plan: Plan, held: HashMap<usize, HashMap<u32, u64>>) {
        let mut seen = HashMap::new();
        let mut changed = Vec::new();
        for &(i, token) in &plan.procs {
            let p = state.ledger.process(i);
            // Released (and perhaps reused) meanwhile: the controller's token names one
            // registration (`State::new_token`), the slot's generation is the member's to write.
            let Some(w) = state.watched.get(&i).filter(|w| w.token == token) else { continue };
            let (pid, group) = (w.pid, w.group);
            let name = state.groups.get(&group).map_or_else(String::new, |g| g.name.clone());
            for &(d, _) in &plan.devices {
                // A device NVML could not be asked about keeps its penalty as it was.
                let Some(by_pid) = held.get(&d) else { continue };
                let report = plan.before[&(i, d)].max(p.devices[d].used.load(SeqCst));
                let measured = by_pid.get(&pid).copied().unwrap_or(0);
                let key = (i, token, d);
                let old = state.watched[&i].penalty[d];
                let new = if measured > report.saturating_add(TOLERANCE) {
                    let n = self.short.get(&key).copied().unwrap_or(0) + 1;
                    seen.insert(key, n);
                    if n < CONFIRMATIONS {
                        continue;
                    }
                    let charge = measured - report;
                    if old == 0 {
                        tracing::warn!(
                            "pid {pid} (group {name:?}) reports {} on device {d} but the driver shows it holding {}: charging its group the driver's figure (+{})",
                            format_size(report),
                            format_size(measured),
                            format_size(charge)
                        );
                    }
                    charge
                } else {
                    if old != 0 {
                        tracing::info!(
                            "pid {pid}: its report on device {d} agrees with the driver again ({}); the extra charge is lifted",
                            format_size(measured)
                        );
                    }
                    0
                };
                if new != old {
                    if let Some(w) = state.watched.get_mut(&i) {
                        w.penalty[d] = new;
                    }
                    // A restart keeps the charge (the controller's record, not the slot).
                    state.save_record(i);
                    changed.push(group);
                }
            }
        }
        changed.sort_unstable();
        changed.dedup();
        for group in changed {
            state.publish_group(group);
        }
        self.short = seen;
    }
}

/// What a check reads under the lock before asking NVML.
pub struct Plan {
    /// Watched process slots and the tokens the controller gave them.
    procs: Vec<(usize, u64)>,
    devices: Vec<(usize, String)>,
    /// (process slot, device) → its report before NVML was asked.
    before: HashMap<(usize, usize), u64>,
}

/// Processes charged by the cross-check now, for `ls` and the metrics.
pub fn findings(state: &State) -> Vec<UnderReportRow> {
    let ledger: &Ledger = &state.ledger;
    let mut rows = Vec::new();
    for (&i, w) in &state.watched {
        let p = ledger.process(i);
        // The controller's device table: a member can rewrite the shared one's state or UUID.
        for (d, uuid) in state.claimed_devices().filter(|&(d, _)| w.penalty[d] != 0) {
            let charged = w.penalty[d];
            let reported = p.devices[d].used.load(Acquire);
            rows.push(UnderReportRow {
                pid: w.pid,
                group: state.groups.get(&w.group).map_or_else(String::new, |g| g.name.clone()),
                device: d as u32,
                uuid: uuid.to_string(),
                reported,
                measured: reported.saturating_add(charged),
                charged,
            });
        }
    }
    rows.sort_by_key(|r| (r.pid, r.device));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Peer;
    use gpuslice_common::ledger;
    use gpuslice_common::protocol::{DeviceClaim, Registration, PROTOCOL_VERSION};

    /// Branch turntoken: a member that writes a new generation (and FREE) into its own slot
    /// while the driver is asked is still cross-checked and charged: which registration a check
    /// judges is the controller's word (the token it gave it), not the slot's. Before, the check
    /// skipped a slot whose generation had moved, and never counted its shortfall twice.
    #[test]
    fn a_member_rewriting_its_slots_generation_is_still_charged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger").to_str().unwrap().to_string();
        let (ledger, _) = Ledger::open_or_create(&path, ledger::Geometry { max_groups: 8, max_procs: 8 }).unwrap();
        let mut state = State::new(ledger, gpuslice_common::settings::FileSettings::parse("test.toml", "").unwrap());
        state.init_memory(false).unwrap();
        let uuid = "GPU-00000000-0000-0000-0000-000000000001";
        let claim = DeviceClaim { ordinal: 0, uuid: uuid.into(), total_memory: 1 << 40, memory_limit: None, sm_share: None, sm_max: 0 };
        let r = Registration { protocol: PROTOCOL_VERSION, group: Some("team".into()), priority: None, name: "liar".into(), own_pid: 1, devices: vec![claim] };
        let pid = std::process::id();
        let a = state.register(Peer { pid, uid: 1000 }, r).unwrap();
        let (slot, d) = (a.slot as usize, a.devices[0].1 as usize);
        let token = state.watched[&slot].token;
        // What `begin` reads (it wants NVML for the rest); the driver says 1 GiB, the slot 0.
        let plan = || Plan { procs: vec![(slot, token)], devices: vec![(d, uuid.to_string())], before: [((slot, d), 0)].into() };
        let held: HashMap<usize, HashMap<u32, u64>> = [(d, [(pid, 1 << 30)].into())].into();
        let mut check = CrossCheck::new();
        for _ in 0..CONFIRMATIONS {
            let p = state.ledger.process(slot);
            p.generation.fetch_add(1, Relaxed);
            p.state.store(ledger::FREE, Relaxed);
            check.finish(&mut state, plan(), held.clone());
        }
        assert_eq!(state.watched[&slot].penalty[d], 1 << 30, "charged the driver's figure");
        assert_eq!(state.group_penalty(a.group as usize, d), 1 << 30);
        let rows = findings(&state);
        assert_eq!((rows.len(), rows[0].uuid.as_str(), rows[0].charged), (1, uuid, 1 << 30), "listed on its GPU");
        // A plan made for an earlier registration in the slot judges nobody.
        let stale = Plan { procs: vec![(slot, token ^ 1)], ..plan() };
        check.finish(&mut state, stale, [(d, HashMap::new())].into());
        assert_eq!(state.watched[&slot].penalty[d], 1 << 30, "not lifted by a check of another registration");
    }
}
