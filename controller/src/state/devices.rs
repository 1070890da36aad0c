//! Which GPU each device index means, as the controller knows it: its own table (`State::devices`,
//! from the registrations it checked), kept in the ledger file (`save_device_record`), and a
//! restarted controller's rebuild of the shared device table from that record. The shared
//! table is in the device memory that every registered process maps writable: a tenant that
//! swapped two UUIDs there before a restart made the restarted controller count new
//! registrations, ask NVML and apply limits under the wrong GPU's index.

use super::{is_gpu_uuid, truncated, State};
use gpuslice_common::ledger::{self, FREE, LIVE, MAX_DEVICES};
use std::sync::atomic::Ordering::*;

/// What a device slot is called while the controller does not know which GPU it is (a restart
/// found no record of it): a name no registration can claim (not a GPU UUID), so that no new
/// process is given the slot, NVML is not asked about it, and no GPU's settings are applied
/// to it by UUID. Its processes keep their index. As `settings::lost_group_name` for a group.
pub(crate) fn lost_device_name(d: usize) -> String {
    format!("{LOST_PREFIX}{d}")
}

const LOST_PREFIX: &str = "lost-device-";

/// Whether `uuid` is a held slot's name (`lost_device_name`), not a GPU's.
pub(crate) fn is_lost_device(uuid: &str) -> bool {
    uuid.starts_with(LOST_PREFIX)
}

impl State {
    /// Keeps the controller's table in the ledger file (`Ledger::save_device_table`): what a
    /// restart rebuilds the shared table from. Every tick and after every request, from
    /// `publish`: one pwrite of the device pages (8 KiB), none of it read from shared memory.
    pub(super) fn save_device_record(&self) {
        let known: [Option<(&str, u64)>; MAX_DEVICES] = std::array::from_fn(|d| self.devices[d].as_deref().map(|u| (u, self.device_totals[d])));
        if let Err(e) = self.ledger.save_device_table(&known) {
            tracing::error!("cannot keep the controller's record of the device table in the ledger file ({e}); until it can, a restart takes no device slot's UUID on trust");
        }
    }

    /// After a restart, before any process slot is read: the device table from the controller's
    /// record, never from the shared table (every member's to write). A slot the record holds
    /// is that GPU's; where the shared table says otherwise the record wins, the shared table
    /// is put back, and the log names the slot and both UUIDs. A slot the record does not hold
    /// while something is there, and every slot when there is no record (`Ledger::device_record`
    /// says why), is held (`lost_device_name`) until `settle_lost_devices` sees whether a
    /// running process still uses it.
    pub(super) fn adopt_devices(&mut self) {
        let record = self.ledger.device_record();
        if let Err(why) = &record {
            tracing::warn!(
                "device table: {why}; no slot's UUID is taken from the shared table, which every registered process can write: a slot a running process still uses is held for it, the others are freed"
            );
        }
        for d in 0..MAX_DEVICES {
            let slot = self.ledger.device(d);
            let state = slot.state.load(Acquire);
            let shared = if state == LIVE { format!("{:?}", truncated(&slot.uuid())) } else { format!("{:?} (state {state})", truncated(&slot.uuid())) };
            let recorded = record.as_ref().ok().and_then(|r| r.get(d).cloned().flatten());
            match recorded {
                Some(k) if is_gpu_uuid(&k.uuid) && !self.devices.iter().flatten().any(|u| *u == k.uuid) => {
                    if state != LIVE || slot.uuid() != k.uuid {
                        tracing::warn!(
                            "device slot {d}: the shared device table names {shared}, the controller's record {}: the record is taken and the shared table put back (a registered process rewrote it)",
                            k.uuid
                        );
                        slot.state.store(ledger::CLAIMING, Release);
                        ledger::write_text(&slot.uuid, &k.uuid);
                        slot.total_memory.store(k.total_memory, Relaxed);
                        slot.state.store(LIVE, Release);
                    }
                    self.devices[d] = Some(k.uuid);
                    self.device_totals[d] = k.total_memory;
                }
                None if record.is_ok() && state == FREE => {}
                other => {
                    if record.is_ok() && state != FREE {
                        let what = match &other {
                            Some(k) if is_lost_device(&k.uuid) => "a slot it was already holding for the processes using it".to_string(),
                            Some(k) => format!("{:?}, not a device it could take", truncated(&k.uuid)),
                            None => "no device there".to_string(),
                        };
                        tracing::warn!("device slot {d}: the shared device table names {shared}, the controller's record {what}: not taken");
                    } else if state != FREE {
                        tracing::warn!("device slot {d}: the shared device table names {shared}: not taken");
                    }
                    self.devices[d] = Some(lost_device_name(d));
                    self.device_totals[d] = 0;
                }
            }
        }
    }

    /// After a restart, once every running process is adopted: each held slot (`adopt_devices`)
    /// that none of them uses is freed; one that some use stays held for them, as a group
    /// whose settings were lost does (`memory::fail_closed`): which GPU it is, is not known, so
    /// no new process is given it (a new process on that GPU gets a slot of its own), NVML is
    /// not asked about it, and its processes keep counting there, held to the memory they have
    /// on it (their own caps, which a member that lifts them in its slot gets back each tick
    /// and is flagged for); it is freed when the last of them exits.
    pub(super) fn settle_lost_devices(&mut self) {
        let mut freed = Vec::new();
        for d in self.lost_devices() {
            let users: Vec<usize> = self.watched.iter().filter(|(_, w)| w.devices.contains(&d)).map(|(&slot, _)| slot).collect();
            if users.is_empty() {
                self.free_device_slot(d);
                freed.push(d);
                continue;
            }
            let name = lost_device_name(d);
            let slot = self.ledger.device(d);
            slot.state.store(ledger::CLAIMING, Release);
            ledger::write_text(&slot.uuid, &name);
            slot.total_memory.store(0, Relaxed);
            slot.state.store(LIVE, Release);
            let mut pids = Vec::new();
            for &i in &users {
                let held = self.ledger.process(i).devices[d].used.load(Relaxed);
                let Some(w) = self.watched.get_mut(&i) else { continue };
                w.caps[d] = w.caps[d].min(held);
                self.ledger.process(i).devices[d].limit.store(w.caps[d], Relaxed);
                pids.push(w.pid);
                self.save_record(i);
            }
            pids.sort_unstable();
            tracing::warn!(
                "device slot {d}: which GPU it is is not known to the controller; it is now {name:?}, held for its {} running process(es) (pids {pids:?}): they keep counting there, each held to the memory it has on it; no new process is given it (one on that GPU gets a slot of its own), and it is freed when the last of them exits",
                pids.len()
            );
        }
        if !freed.is_empty() {
            tracing::info!("device slots {freed:?}: no running process uses them; freed");
        }
        self.save_device_record();
    }

    /// Frees each held slot whose last process has gone (after every release).
    pub(super) fn free_lost_devices(&mut self) {
        for d in self.lost_devices() {
            if !self.watched.values().any(|w| w.devices.contains(&d)) {
                self.free_device_slot(d);
                tracing::info!("device slot {d} ({}): the last process that used it exited; freed", lost_device_name(d));
            }
        }
    }

    /// The device slots held for the processes that use them (`lost_device_name`).
    fn lost_devices(&self) -> Vec<usize> {
        (0..MAX_DEVICES).filter(|&d| self.devices[d].as_deref().is_some_and(is_lost_device)).collect()
    }

    /// Whether device slot `d` is held (`lost_device_name`): its GPU is not known.
    pub(crate) fn is_lost_slot(&self, d: usize) -> bool {
        self.devices.get(d).and_then(Option::as_deref).is_some_and(is_lost_device)
    }

    /// Device slot `d` is nobody's: free in the controller's table and the shared one, and no
    /// group's counters there (a new device may take it).
    pub(super) fn free_device_slot(&mut self, d: usize) {
        self.devices[d] = None;
        self.device_totals[d] = 0;
        self.ledger.device(d).release();
        for (_, g) in self.ledger.groups() {
            g.devices[d].clear_counters();
        }
    }
}
