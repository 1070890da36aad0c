//! When each group was last active, for the suspension policy's "least recently active first",
//! judged on what the driver shows (NVML), never on the counters members write in the ledger.
//!
//! A group's members can write anything into their group's ledger counters (`charged_ns`,
//! `used`, ...): a member that kept them changing looked busy, so that an idle group of the same
//! priority was suspended in its place (docs/NOTES.md, branch suspord). The evidence here is the
//! driver's, about the processes the controller itself registered (pids from `SO_PEERCRED`):
//! - a utilization sample above zero for one of the group's processes
//!   (`nvmlDeviceGetProcessUtilization`: kernels, copies, video), and
//! - a change in the memory the driver shows the group's processes holding
//!   (`nvmlDeviceGetComputeRunningProcesses`: an allocation, a free, a process that came with
//!   a context or went).
//!
//! A member can make its group look active only by really using the GPU, which its share and
//! quota already bound; it cannot make another group look idle. Changes the controller causes
//! (a suspension takes the memory off the device, a resume brings it back) are not activity.
//!
//! Ties, and groups of which nothing was ever seen (no NVML, or a device that gives no
//! per-process figures, as MIG instances do for utilization), go by the order in which the
//! controller first saw the groups: oldest first. That order is the controller's own (slot
//! order within one look); no member's word enters it.

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

/// What the driver showed at one look.
#[derive(Default, Debug, Clone)]
pub struct Look {
    /// Ledger device → pid → bytes the driver says it holds there. A device whose process list
    /// could not be read is absent (nothing is compared on it).
    pub held: BTreeMap<u32, HashMap<u32, u64>>,
    /// Pids with a utilization sample above zero since the previous look, on any device.
    pub busy: HashSet<u32>,
}

/// Asks NVML about `devices` (ledger device, UUID). `stamps` keeps, per UUID, the newest
/// utilization sample's timestamp seen, so that each sample is counted at one look only.
pub fn look(nvml: &Nvml, devices: &[(u32, String)], stamps: &mut HashMap<String, u64>) -> Look {
    let mut seen = Look::default();
    for (d, uuid) in devices {
        let Ok(device) = nvml.device_by_uuid(uuid.as_str()) else { continue };
        if let Some(by_pid) = memory_by_pid(&device) {
            seen.held.insert(*d, by_pid);
        }
        let last = stamps.get(uuid).copied();
        match device.process_utilization_stats(last) {
            Ok(samples) => {
                let mut newest = last.unwrap_or(0);
                for s in samples {
                    if last.is_some_and(|l| s.timestamp <= l) {
                        continue;
                    }
                    newest = newest.max(s.timestamp);
                    if s.sm_util > 0 || s.mem_util > 0 || s.enc_util > 0 || s.dec_util > 0 {
                        seen.busy.insert(s.pid);
                    }
                }
                stamps.insert(uuid.clone(), newest);
            }
            // No sample since `last`: nobody was busy.
            Err(NvmlError::NotFound) => {}
            // Not supported here (MIG, some vGPUs): the memory is the only evidence.
            Err(_) => {}
        }
    }
    seen
}

/// Pid → bytes the driver says each compute process holds on `device` (processes whose figure
/// NVML cannot give are left out); `None` when the list cannot be read. The driver's word, which
/// no tenant writes: the cross-check and the suspension policy both rest on it.
pub fn memory_by_pid(device: &nvml_wrapper::Device) -> Option<HashMap<u32, u64>> {
    let list = device.running_compute_processes().ok()?;
    Some(
        list.into_iter()
            .filter_map(|p| match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => Some((p.pid, bytes)),
                UsedGpuMemory::Unavailable => None,
            })
            .collect(),
    )
}

/// A group as the controller knows it at a look: its own records, nothing a member wrote.
#[derive(Debug, Clone)]
pub struct GroupNow {
    pub slot: usize,
    pub name: String,
    /// Neither suspended nor between states: only then is a change of its memory its own doing.
    pub running: bool,
    /// Its registered processes (the controller's `Watched`).
    pub pids: Vec<u32>,
}

/// The bytes a group's processes held at a look, on the devices that answered then.
struct Snapshot {
    devices: BTreeSet<u32>,
    held: BTreeMap<(u32, u32), u64>,
}

impl Snapshot {
    fn of(look: &Look, pids: &[u32]) -> Snapshot {
        let mut held = BTreeMap::new();
        for (&d, by_pid) in &look.held {
            for &pid in pids {
                if let Some(&bytes) = by_pid.get(&pid).filter(|&&b| b > 0) {
                    held.insert((d, pid), bytes);
                }
            }
        }
        Snapshot { devices: look.held.keys().copied().collect(), held }
    }

    /// This snapshot, with `before`'s figures for the devices that did not answer now: a change
    /// across a look that could not see it is still found at the next one that can.
    fn over(mut self, before: Option<&Snapshot>) -> Snapshot {
        if let Some(before) = before {
            let missing: Vec<u32> = before.devices.difference(&self.devices).copied().collect();
            for d in missing {
                self.devices.insert(d);
                self.held.extend(before.held.iter().filter(|((dev, _), _)| *dev == d).map(|(k, v)| (*k, *v)));
            }
        }
        self
    }

    /// Whether the bytes differ on a device that answered both times.
    fn differs(&self, now: &Snapshot) -> bool {
        let on = |s: &Snapshot, both: &BTreeSet<u32>| s.held.iter().filter(|((d, _), _)| both.contains(d)).map(|(k, v)| (*k, *v)).collect::<Vec<_>>();
        let both: BTreeSet<u32> = self.devices.intersection(&now.devices).copied().collect();
        on(self, &both) != on(now, &both)
    }
}

struct Seen {
    /// The order in which the controller first saw the group.
    order: u64,
    /// The last look that found evidence of activity; `None`: none since the controller saw it.
    last_active: Option<Instant>,
    /// The previous look's bytes; `None`: no baseline (the first look, or after a suspension).
    held: Option<Snapshot>,
}

/// Each group's last evidence of activity, kept by the policy's watcher.
#[derive(Default)]
pub struct Tracker {
    looks: u64,
    next: u64,
    groups: HashMap<String, Seen>,
}

impl Tracker {
    /// Takes one look into account, made at `now`. At the controller's first look the groups'
    /// memory is only measured (nothing before it is known; a busy sample counts, it is the
    /// driver's); a group first seen later starts from nothing held, so that its processes'
    /// arrival is activity.
    pub fn observe(&mut self, now: Instant, groups: &[GroupNow], look: &Look) {
        let first = self.looks == 0;
        self.looks += 1;
        self.groups.retain(|name, _| groups.iter().any(|g| &g.name == name));
        let mut sorted: Vec<&GroupNow> = groups.iter().collect();
        sorted.sort_by_key(|g| g.slot);
        for g in sorted {
            let next = &mut self.next;
            let seen = self.groups.entry(g.name.clone()).or_insert_with(|| {
                *next += 1;
                let nothing = Snapshot { devices: look.held.keys().copied().collect(), held: BTreeMap::new() };
                Seen { order: *next, last_active: None, held: (!first).then_some(nothing) }
            });
            if !g.running {
                seen.held = None;
                continue;
            }
            let now_held = Snapshot::of(look, &g.pids).over(seen.held.as_ref());
            let moved = seen.held.as_ref().is_some_and(|before| before.differs(&now_held));
            if moved || g.pids.iter().any(|p| look.busy.contains(p)) {
                seen.last_active = Some(now);
            }
            seen.held = Some(now_held);
        }
    }

    /// The policy's key for group `name`, lowest first: never seen active, then the earliest
    /// last activity, then the group seen first. A group no look has seen yet (made since the
    /// last one) counts as active `now`, seen last.
    pub fn rank(&self, name: &str, now: Instant) -> (Option<Instant>, u64) {
        self.groups.get(name).map_or((Some(now), u64::MAX), |s| (s.last_active, s.order))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A simulated clock: the instant `s` seconds after a fixed start.
    fn at(start: Instant, s: u64) -> Instant {
        start + Duration::from_secs(s)
    }

    fn group(slot: usize, name: &str, pids: &[u32]) -> GroupNow {
        GroupNow { slot, name: name.into(), running: true, pids: pids.to_vec() }
    }

    /// Device 0's process list: (pid, bytes) pairs.
    fn holding(pairs: &[(u32, u64)]) -> Look {
        Look { held: [(0, pairs.iter().copied().collect())].into(), busy: HashSet::new() }
    }

    fn busy(mut look: Look, pids: &[u32]) -> Look {
        look.busy.extend(pids);
        look
    }

    fn order(t: &Tracker, names: &[&str], now: Instant) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        v.sort_by_key(|n| t.rank(n, now));
        v
    }

    const GIB: u64 = 1 << 30;

    /// Both groups allocate once and do nothing more, `liars` first. Whatever `liars`' members
    /// write into the ledger (the tracker reads none of it), `liars` is the least recently
    /// active; a group that really works is kept ahead of one that does not.
    #[test]
    fn the_driver_decides_who_was_active_last() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let g = [group(0, "liars", &[10]), group(1, "honest", &[20])];
        t.observe(at(t0, 0), &g, &holding(&[]));
        t.observe(at(t0, 1), &g, &holding(&[(10, GIB)]));
        t.observe(at(t0, 2), &g, &holding(&[(10, GIB), (20, GIB)]));
        for s in 3..10 {
            t.observe(at(t0, s), &g, &holding(&[(10, GIB), (20, GIB)]));
        }
        assert_eq!(order(&t, &["honest", "liars"], at(t0, 10)), ["liars", "honest"]);
        assert_eq!(t.rank("liars", at(t0, 10)).0, Some(at(t0, 1)));

        // Now `liars` runs kernels (really): it is the active one, `honest` goes first.
        t.observe(at(t0, 11), &g, &busy(holding(&[(10, GIB), (20, GIB)]), &[10]));
        assert_eq!(order(&t, &["liars", "honest"], at(t0, 12)), ["honest", "liars"]);
    }

    /// A busy group that allocated first is kept; the idle one that allocated later goes first.
    #[test]
    fn a_busy_group_ranks_after_an_idle_one_whatever_their_ages() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let g = [group(0, "train", &[1]), group(1, "idle", &[2])];
        t.observe(at(t0, 0), &g, &holding(&[]));
        t.observe(at(t0, 1), &g, &busy(holding(&[(1, GIB)]), &[1]));
        t.observe(at(t0, 2), &g, &busy(holding(&[(1, GIB), (2, GIB)]), &[1]));
        for s in 3..6 {
            t.observe(at(t0, s), &g, &busy(holding(&[(1, GIB), (2, GIB)]), &[1]));
        }
        assert_eq!(order(&t, &["train", "idle"], at(t0, 6)), ["idle", "train"]);
    }

    /// With nothing seen (no NVML: every look empty), no group is ever active and the order is
    /// the one in which the controller first saw them, by slot within one look, whatever order
    /// they come in; a group made since the last look counts as active now, after the others.
    #[test]
    fn without_evidence_the_controllers_first_sighting_decides() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.observe(at(t0, 0), &[group(3, "c", &[3]), group(1, "a", &[1])], &Look::default());
        t.observe(at(t0, 1), &[group(2, "b", &[2]), group(3, "c", &[3]), group(1, "a", &[1])], &Look::default());
        assert_eq!(order(&t, &["b", "c", "a", "new"], at(t0, 2)), ["a", "c", "b", "new"]);
        assert!(t.rank("a", at(t0, 2)).0.is_none() && t.rank("b", at(t0, 2)).0.is_none());
        // A group that goes is forgotten; one of the same name later is a new group.
        t.observe(at(t0, 3), &[group(2, "b", &[2]), group(3, "c", &[3])], &Look::default());
        t.observe(at(t0, 4), &[group(1, "a", &[1]), group(2, "b", &[2]), group(3, "c", &[3])], &Look::default());
        assert_eq!(order(&t, &["a", "b", "c"], at(t0, 5)), ["c", "b", "a"]);
    }

    /// The controller's first look only measures; a group seen first later starts from nothing
    /// held, so its processes' memory is activity.
    #[test]
    fn memory_found_at_the_first_look_is_not_activity_but_a_newcomers_is() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.observe(at(t0, 0), &[group(0, "old", &[1])], &holding(&[(1, GIB)]));
        t.observe(at(t0, 1), &[group(0, "old", &[1]), group(1, "new", &[2])], &holding(&[(1, GIB), (2, GIB)]));
        assert_eq!(t.rank("old", at(t0, 2)).0, None);
        assert_eq!(t.rank("new", at(t0, 2)).0, Some(at(t0, 1)));
    }

    /// The memory a suspension takes off the device and a resume brings back is the
    /// controller's doing: not activity. A device whose list could not be read at one look keeps
    /// its earlier figures until it answers again.
    #[test]
    fn suspensions_and_unreadable_devices_make_no_activity() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let running = [group(0, "batch", &[1])];
        let suspended = [GroupNow { running: false, ..group(0, "batch", &[1]) }];
        t.observe(at(t0, 0), &running, &holding(&[(1, GIB)]));
        t.observe(at(t0, 1), &suspended, &holding(&[]));
        t.observe(at(t0, 2), &suspended, &holding(&[(1, GIB)]));
        t.observe(at(t0, 3), &running, &holding(&[(1, GIB)]));
        t.observe(at(t0, 4), &running, &Look::default());
        t.observe(at(t0, 5), &running, &holding(&[(1, GIB)]));
        assert_eq!(t.rank("batch", at(t0, 6)).0, None, "nothing the group did");
        t.observe(at(t0, 6), &running, &Look::default());
        t.observe(at(t0, 7), &running, &holding(&[(1, 2 * GIB)]));
        assert_eq!(t.rank("batch", at(t0, 8)).0, Some(at(t0, 7)), "an allocation is, seen across a look that could not see it");
    }
}
