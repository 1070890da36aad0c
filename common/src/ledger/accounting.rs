//! Exact accounting across processes: operation windows, charges against the process's cap
//! and the group's limit, and the controller's reconciliation (see the module docs of `ledger`).

use super::layout::*;
use super::monotonic_ns;
use std::sync::atomic::{AtomicU64, Ordering::*};

impl GroupSlot {
    /// Recomputes `used` on every device as the sum over `live` members, with no member's
    /// operation half done (see the module docs). False when a member kept an operation open
    /// for longer than `patience_ns` (stopped by a debugger, say): nothing was changed; retry.
    pub fn reconcile(&self, live: &[&ProcessSlot], patience_ns: u64) -> bool {
        self.reconciling.store(reconcile_stamp(), SeqCst);
        let start = monotonic_ns();
        for p in live {
            while p.ops.load(SeqCst) % 2 == 1 {
                if monotonic_ns() - start > patience_ns {
                    self.reconciling.store(0, SeqCst);
                    return false;
                }
                std::thread::yield_now();
            }
        }
        for (d, gd) in self.devices.iter().enumerate() {
            let sum: u64 = live.iter().map(|p| p.devices[d].used.load(SeqCst)).fold(0, u64::saturating_add);
            gd.used.store(sum, SeqCst);
        }
        self.reconciling.store(0, SeqCst);
        true
    }
}

/// The value a reconciliation raises its flag with: when it started, in ms, never zero.
fn reconcile_stamp() -> u32 {
    ((monotonic_ns() / 1_000_000) as u32) | 1
}

/// True when a reconciliation flag has been up longer than any live controller keeps it.
fn stale(flag: u32) -> bool {
    let age_ms = reconcile_stamp().wrapping_sub(flag) as u64;
    age_ms * 1_000_000 > RECONCILE_PATIENCE_NS
}

/// Which limit refused an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Group,
    Process,
}

/// An allocation refused: which limit, and the figures for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub scope: Scope,
    pub used: u64,
    pub limit: u64,
}

impl ProcessSlot {
    /// Opens an operation window, waiting while the group is being reconciled.
    #[inline]
    fn begin(&self, group: &GroupSlot) {
        self.ops.fetch_add(1, SeqCst);
        if group.reconciling.load(SeqCst) == 0 {
            return;
        }
        self.wait_reconciled(group);
    }

    #[cold]
    fn wait_reconciled(&self, group: &GroupSlot) {
        loop {
            self.ops.fetch_add(1, SeqCst); // Close: let the controller finish.
            loop {
                let flag = group.reconciling.load(SeqCst);
                if flag == 0 {
                    break;
                }
                if stale(flag) {
                    // A controller died mid-way (a live one gives up well before): take the
                    // flag down for everyone; its successor reconciles again.
                    let _ = group.reconciling.compare_exchange(flag, 0, SeqCst, Relaxed);
                    break;
                }
                std::thread::yield_now();
            }
            self.ops.fetch_add(1, SeqCst);
            if group.reconciling.load(SeqCst) == 0 {
                return;
            }
        }
    }

    #[inline]
    fn end(&self) {
        self.ops.fetch_add(1, SeqCst);
    }

    /// Reserves `bytes` on `device` if that keeps both this process's cap and the group's
    /// limit; zero bytes always succeed, so that the driver answers a zero-size request.
    #[inline]
    pub fn try_charge(&self, group: &GroupSlot, device: usize, bytes: u64) -> Result<(), Refusal> {
        self.try_charge_under(group, group, 0, device, bytes)
    }

    /// `try_charge` with the group's limit read from `settings`: the page the controller
    /// publishes and a shim maps read-only (`regions`), not the group's writable counters;
    /// `penalty` is the controller's extra charge on the group (`MemberSettings::penalty`, from
    /// the same read-only memory), counted as used.
    #[inline]
    pub fn try_charge_under(&self, group: &GroupSlot, settings: &GroupSlot, penalty: u64, device: usize, bytes: u64) -> Result<(), Refusal> {
        let (pd, gd) = (&self.devices[device], &group.devices[device]);
        self.begin(group);
        let mine = pd.used.load(Relaxed);
        let cap = pd.limit.load(Relaxed);
        if bytes != 0 && mine.saturating_add(bytes) > cap {
            self.end();
            return Err(self.refused(group, device, Refusal { scope: Scope::Process, used: mine, limit: cap }));
        }
        let limit = settings.devices[device].limit.load(Relaxed);
        let mut used = gd.used.load(Relaxed);
        loop {
            let next = used.saturating_add(bytes);
            if bytes != 0 && next.saturating_add(penalty) > limit {
                self.end();
                return Err(self.refused(group, device, Refusal { scope: Scope::Group, used: used.saturating_add(penalty), limit }));
            }
            match gd.used.compare_exchange_weak(used, next, SeqCst, Relaxed) {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        let mine = pd.used.fetch_add(bytes, SeqCst) + bytes;
        self.end();
        raise_peak(&pd.peak_used, mine);
        raise_peak(&gd.peak_used, used.saturating_add(bytes));
        Ok(())
    }

    #[cold]
    fn refused(&self, group: &GroupSlot, device: usize, r: Refusal) -> Refusal {
        self.devices[device].refusals.fetch_add(1, Relaxed);
        group.devices[device].refusals.fetch_add(1, Relaxed);
        r
    }

    /// Adds bytes the process already holds, limit or not.
    pub fn charge(&self, group: &GroupSlot, device: usize, bytes: u64) {
        let (pd, gd) = (&self.devices[device], &group.devices[device]);
        self.begin(group);
        let total = gd.used.fetch_add(bytes, SeqCst) + bytes;
        let mine = pd.used.fetch_add(bytes, SeqCst) + bytes;
        self.end();
        raise_peak(&pd.peak_used, mine);
        raise_peak(&gd.peak_used, total);
    }

    /// Returns bytes; never below zero.
    #[inline]
    pub fn uncharge(&self, group: &GroupSlot, device: usize, bytes: u64) {
        let (pd, gd) = (&self.devices[device], &group.devices[device]);
        self.begin(group);
        // Only what this process holds can be given back: the group keeps other members' bytes.
        let mut given = 0;
        let _ = pd.used.fetch_update(SeqCst, Relaxed, |u| {
            given = u.min(bytes);
            Some(u - given)
        });
        let _ = gd.used.fetch_update(SeqCst, Relaxed, |u| Some(u.saturating_sub(given)));
        self.end();
    }

    /// Replaces the overhead estimate on `device`, moving `used` by the difference.
    pub fn set_overhead(&self, group: &GroupSlot, device: usize, bytes: u64) {
        let old = self.devices[device].overhead.swap(bytes, AcqRel);
        if bytes >= old {
            self.charge(group, device, bytes - old);
        } else {
            self.uncharge(group, device, old - bytes);
        }
    }

    pub fn add_overhead(&self, group: &GroupSlot, device: usize, bytes: u64) {
        self.devices[device].overhead.fetch_add(bytes, AcqRel);
        self.charge(group, device, bytes);
    }

    pub fn remove_overhead(&self, group: &GroupSlot, device: usize, bytes: u64) {
        let _ = self.devices[device].overhead.fetch_update(AcqRel, Relaxed, |o| Some(o.saturating_sub(bytes)));
        self.uncharge(group, device, bytes);
    }
}

/// Raises a peak figure; a plain load when it is not a new peak, so that processes of a group
/// allocating below their peak do not all write the group's cache line.
#[inline]
fn raise_peak(peak: &AtomicU64, value: u64) {
    if value > peak.load(Relaxed) {
        peak.fetch_max(value, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Geometry, Ledger};
    use std::sync::Arc;

    fn temp_path(name: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name).to_str().unwrap().to_string();
        (dir, path)
    }

    fn group_with_members(limit: u64, members: usize) -> (Ledger, Vec<usize>) {
        let (_d, path) = temp_path("l");
        let l = Ledger::create(&path, Geometry { max_groups: 2, max_procs: 16 }).unwrap();
        l.group(0).devices[0].limit.store(limit, Relaxed);
        (l, (0..members).collect())
    }

    #[test]
    fn group_limit_holds_exactly_across_racing_members() {
        let (l, members) = group_with_members(1_000_000, 8);
        let l = Arc::new(l);
        let granted: u64 = members
            .iter()
            .map(|&m| {
                let l = l.clone();
                std::thread::spawn(move || (0..20_000).filter(|_| l.process(m).try_charge(l.group(0), 0, 13).is_ok()).count() as u64 * 13)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        let used = l.group(0).devices[0].used.load(Relaxed);
        assert_eq!(granted, used);
        assert!(used <= 1_000_000 && used > 1_000_000 - 13);
        let by_members: u64 = members.iter().map(|&m| l.process(m).devices[0].used.load(Relaxed)).sum();
        assert_eq!(by_members, used);
    }

    #[test]
    fn a_process_cap_inside_the_group() {
        let (l, _) = group_with_members(1000, 2);
        l.process(0).devices[0].limit.store(300, Relaxed);
        l.process(0).try_charge(l.group(0), 0, 300).unwrap();
        let r = l.process(0).try_charge(l.group(0), 0, 1).unwrap_err();
        assert_eq!(r, Refusal { scope: Scope::Process, used: 300, limit: 300 });
        l.process(1).try_charge(l.group(0), 0, 700).unwrap();
        let r = l.process(1).try_charge(l.group(0), 0, 1).unwrap_err();
        assert_eq!(r.scope, Scope::Group);
        assert_eq!(l.group(0).devices[0].refusals.load(Relaxed), 2);
        // Freeing more than one holds gives back only what it holds.
        l.process(0).uncharge(l.group(0), 0, 1000);
        assert_eq!(l.group(0).devices[0].used.load(Relaxed), 700);
    }

    #[test]
    fn reconciliation_drops_a_dead_member_while_others_allocate() {
        let (l, _) = group_with_members(UNLIMITED, 3);
        let l = Arc::new(l);
        // Member 2 "dies" in the middle of an operation: its window stays open, its bytes half
        // counted (the group has them, its own slot does not).
        l.process(2).try_charge(l.group(0), 0, 5000).unwrap();
        l.process(2).ops.fetch_add(1, SeqCst);
        l.group(0).devices[0].used.fetch_add(123, SeqCst);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|m| {
                let (l, stop) = (l.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Relaxed) {
                        l.process(m).try_charge(l.group(0), 0, 10).unwrap();
                        if n % 2 == 1 {
                            l.process(m).uncharge(l.group(0), 0, 10);
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let live = [l.process(0), l.process(1)];
        assert!(l.group(0).reconcile(&live, 1_000_000_000));
        stop.store(true, Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let members: u64 = live.iter().map(|p| p.devices[0].used.load(Relaxed)).sum();
        assert_eq!(l.group(0).devices[0].used.load(Relaxed), members, "exact after reconciliation");
    }

    #[test]
    fn a_flag_left_by_a_dead_controller_is_taken_down_once() {
        let (l, _) = group_with_members(UNLIMITED, 1);
        // Raised 10 s ago and never lowered.
        l.group(0).reconciling.store(reconcile_stamp().wrapping_sub(10_000) | 1, SeqCst);
        let start = monotonic_ns();
        l.process(0).try_charge(l.group(0), 0, 10).unwrap();
        assert_eq!(l.group(0).reconciling.load(Relaxed), 0);
        for _ in 0..100 {
            l.process(0).try_charge(l.group(0), 0, 10).unwrap();
        }
        assert!(monotonic_ns() - start < 50_000_000, "no operation waited");
        assert_eq!(l.group(0).devices[0].used.load(Relaxed), 1010);
    }

    #[test]
    fn reconciliation_gives_up_on_a_member_stuck_mid_operation() {
        let (l, _) = group_with_members(UNLIMITED, 1);
        l.process(0).ops.fetch_add(1, SeqCst);
        assert!(!l.group(0).reconcile(&[l.process(0)], 5_000_000));
        assert_eq!(l.group(0).reconciling.load(Relaxed), 0);
    }
}
