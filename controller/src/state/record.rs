//! The controller's own record of each registered process (`ledger::ProcessRecord`, in the
//! ledger file where no member can write), and a restarted controller's check of each process
//! slot against that record and the kernel: a member's group, pid, uid, caps, penalty and turn
//! token never come from the slot the member writes.

use super::{pidfd_open, State, Watched, OWNER_UNKNOWN};
use gpuslice_common::ledger::{self, ProcessRecord, LIVE, MAX_DEVICES, RECORD_MAGIC};
use std::sync::atomic::Ordering::*;

/// What a restarted controller finds in a process slot.
pub(super) enum Found {
    /// Nobody: the slot is not (or no longer) given out.
    Nobody,
    /// Not a member of any group it knows: freed, with the reason for the log.
    Stray(String),
    /// A member of the group its trusted record names. `gone`: why it is not kept (it exited,
    /// or its pid fails the checks); its figures then leave that group, and no other.
    Member { watched: Box<Watched>, gone: Option<String> },
}

impl State {
    /// Writes the controller's record of the process in slot `slot` (`Watched`) into the ledger
    /// file: after its registration and after each change of its cap, penalty or misbehaviour.
    pub(crate) fn save_record(&self, slot: usize) {
        let Some(w) = self.watched.get(&slot) else { return };
        let mut r = ProcessRecord::none();
        r.magic = RECORD_MAGIC;
        r.group_plus_one = w.group as u64 + 1;
        r.pid = w.pid;
        r.uid = w.uid;
        r.start_time = w.start_time.unwrap_or(0);
        r.devices = w.devices.iter().filter(|&&d| d < MAX_DEVICES).fold(0, |m, &d| m | 1 << d);
        r.caps = w.caps;
        r.penalty = w.penalty;
        r.set_misbehaving(w.misbehaving.as_deref());
        r.token = w.token;
        if let Err(e) = self.ledger.save_process_record(slot, &r) {
            tracing::error!(
                "pid {}: cannot keep the controller's record of it in the ledger file ({e}); after a restart it is checked against the kernel alone, and its cap and charge are not restored",
                w.pid
            );
        }
    }

    /// After a restart: who is in process slot `i`. Its group is the one whose memory holds the
    /// slot (`ProcessIndex`, in the ledger file). Its pid, uid, start time, devices, caps,
    /// penalty and misbehaviour come from the controller's record (`ProcessRecord`); the pid is
    /// kept only while it is alive with the recorded start time. A slot with no record (a ledger
    /// from a controller before the record, or one killed mid-registration) has only the
    /// slot's own word, so its pid must be alive with the start time the slot gives and hold its
    /// group's memory (the kernel's sign that it was handed it; `adopt` also keeps a pid in one
    /// slot only); its uid is the kernel's (/proc/PID/status); its caps are the slot's (a member could only
    /// have lifted them: never tighter than none), its penalty none (the cross-check charges
    /// it again within two checks).
    pub(super) fn find_member(&self, i: usize) -> Found {
        let index = self.ledger.process_index(i).group_plus_one.load(Relaxed);
        let p = self.ledger.process(i);
        let Some(group) = index.checked_sub(1).map(|g| g as usize) else {
            // In no group's memory: the ledger file's own page, which no member reaches.
            return if p.state.load(Acquire) == LIVE { Found::Stray("is in no group's memory".into()) } else { Found::Nobody };
        };
        let record = match self.ledger.process_record(i) {
            Ok(r) if r.magic == RECORD_MAGIC && r.group_plus_one == index => Some(r),
            Ok(r) if r.magic == RECORD_MAGIC => {
                tracing::warn!(
                    "process slot {i}: the controller's record names group slot {}, not {group}; checked against the kernel alone",
                    r.group_plus_one.wrapping_sub(1)
                );
                None
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!("process slot {i}: cannot read the controller's record of it in the ledger file ({e}); checked against the kernel alone");
                None
            }
        };
        if record.is_none() && p.state.load(Acquire) != LIVE {
            return Found::Nobody;
        }
        if !self.groups.contains_key(&group) {
            return Found::Stray(format!("is in the memory of group slot {group}, which holds no group"));
        }
        let claimed = |d: usize| d < MAX_DEVICES && self.devices[d].is_some();
        let (pid, uid, start, devices, caps, penalty, misbehaving, doubt) = match &record {
            Some(r) => (
                r.pid,
                Some(r.uid),
                Some(r.start_time).filter(|&s| s != 0),
                (0..MAX_DEVICES).filter(|&d| r.devices & 1 << d != 0 && claimed(d)).collect(),
                r.caps,
                r.penalty,
                r.misbehaving(),
                None,
            ),
            None => {
                let pid = p.pid.load(Relaxed);
                let counters = self.ledger.group_index(group).counters_inode.load(Relaxed);
                let doubt = if ledger::process_start_time(pid).is_some() && !ledger::holds_memory(pid, counters) {
                    Some("does not hold its group's memory (not adopted)".to_string())
                } else {
                    None
                };
                let caps = std::array::from_fn(|d| p.devices[d].limit.load(Relaxed));
                // Which devices it maps died with the previous controller: all of them, to be safe.
                (
                    pid,
                    None,
                    Some(p.start_time.load(Relaxed)).filter(|&s| s != 0),
                    (0..MAX_DEVICES).filter(|&d| claimed(d)).collect(),
                    caps,
                    [0; MAX_DEVICES],
                    None,
                    doubt,
                )
            }
        };
        let mut gone = match doubt {
            Some(why) => Some(why),
            None if pid == 0 || start.is_none() || ledger::process_start_time(pid) != start => Some("exited while no controller ran".to_string()),
            None => None,
        };
        let uid = uid.or_else(|| ledger::process_uid(pid));
        if uid.is_none() && gone.is_none() {
            gone = Some("exited while no controller ran".into());
        }
        let mut pidfd = if gone.is_none() { pidfd_open(pid) } else { None };
        if gone.is_none() && ledger::process_start_time(pid) != start {
            // The pid went and was reused between the check and the pidfd.
            pidfd = None;
            gone = Some("exited while no controller ran".into());
        }
        if let (Some(why), None) = (&gone, &record) {
            if !why.starts_with("exited") {
                tracing::warn!("process slot {i} says pid {pid}, which {why}; its figures leave group {:?}", self.groups[&group].name);
            }
        }
        let watched = Watched {
            pid,
            pidfd,
            start_time: start,
            devices,
            group,
            // A process gone is released at once; `OWNER_UNKNOWN` is no process's uid.
            uid: uid.unwrap_or(OWNER_UNKNOWN),
            caps,
            // Its own priority as the previous controller published it (read-only to members).
            priority: self.published_priority(group, i),
            penalty,
            misbehaving,
            // Never the slot's word: the process, or any member of its group, may have written
            // another process's token there (its release would free that one's turn).
            token: record.map_or(0, |r| r.token),
        };
        Found::Member { watched: Box::new(watched), gone }
    }
}
