//! The cross-group device state: who has high-priority work on a device and whose turn it is
//! among throttled processes (read and written by every process on the device).

use super::monotonic_ns;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// High-priority processes a device tracks at once.
pub const MAX_HIGH: usize = 8;

/// Who has high-priority work on a device: what lower-priority launchers consult before they
/// launch (see the shim's `sched`); and whose turn it is among throttled processes (see the
/// shim's `board`). All leases are CLOCK_MONOTONIC ns.
#[repr(C)]
pub struct DeviceSched {
    /// Some high-priority process lives on this device until this time (renewed every 50 ms).
    pub high_alive_until: AtomicU64,
    /// Futex word: bumped each time a high-priority process's work on the device is done.
    pub wake: AtomicU32,
    /// Bit i set: the process in `highs[i]` says its requests are host-bound (the device idle
    /// most of each request), so a neighbour under `GPUSLICE_PRIORITY_GATE=auto` over a
    /// spatial MPS share need not hold back for it. Clear (the default, and a new claim's):
    /// device-bound, or not measured yet. Was `_pad` (layout unchanged; an older shim never
    /// sets a bit, so its high-priority processes count as device-bound).
    pub host_bound: AtomicU32,
    pub highs: [HighSlot; MAX_HIGH],
    pub turn: Turn,
}

pub use crate::turns::Turn;

/// One high-priority process on a device.
#[repr(C)]
pub struct HighSlot {
    /// A number the process drew at random (pids repeat across pid namespaces); 0 when free.
    pub owner: AtomicU64,
    /// Its pid as it sees itself, for a liveness check by processes of its namespace.
    pub pid: AtomicU32,
    /// Non-zero (1) while it has work queued or running on the device. Whether that work is
    /// device-bound is `DeviceSched::host_bound`'s business, not this word's: it must say the
    /// same while the process is idle.
    pub busy: AtomicU32,
    /// The slot is its until then; a dead process's slot lapses.
    pub alive_until: AtomicU64,
    /// When its next request is expected, if its requests keep time (the shim's `period`):
    /// not before `next_from`, not after `next_until` (ns); 0: no prediction. Neighbours under a
    /// duration budget keep their work clear of the window (`next_request`). Layout 7.
    pub next_from: AtomicU64,
    pub next_until: AtomicU64,
}

/// Furthest ahead, and widest, a window of `HighSlot::next_from`/`next_until` is believed: a
/// slot's words are anyone's to write, and a neighbour never holds back for more than this.
pub const MAX_NEXT_AHEAD_NS: u64 = 1_000_000_000;

impl HighSlot {
    /// The window this slot publishes for its next request, if it is believable at `now`:
    /// whole (not being replaced), not passed, no further ahead or wider than
    /// `MAX_NEXT_AHEAD_NS`.
    fn window(&self, now: u64) -> Option<(u64, u64)> {
        let from = self.next_from.load(Acquire);
        let until = self.next_until.load(Acquire);
        // Changed in between: a window being replaced (its owner's request began).
        let whole = self.next_from.load(Acquire) == from;
        let sane = whole && from != 0 && from < until && until > now;
        let near = || from <= now.saturating_add(MAX_NEXT_AHEAD_NS) && until - from <= MAX_NEXT_AHEAD_NS;
        (sane && near()).then_some((from, until))
    }
}

impl DeviceSched {
    /// True while some high-priority process lives on the device.
    #[inline]
    pub fn high_alive(&self, now: u64) -> bool {
        self.high_alive_until.load(Relaxed) > now
    }

    /// The busy slot of a live high-priority process, if any.
    pub fn busy_high(&self, now: u64) -> Option<&HighSlot> {
        self.highs.iter().find(|h| h.busy.load(SeqCst) != 0 && h.owner.load(Relaxed) != 0 && h.alive_until.load(Relaxed) > now)
    }

    /// True when every live high-priority process on the device says its requests are
    /// host-bound (`host_bound`); vacuously true with none alive (the caller asks `high_alive`
    /// first). Bits of free or lapsed slots do not count.
    pub fn highs_host_bound(&self, now: u64) -> bool {
        let mask = self.host_bound.load(Acquire);
        if mask == 0 {
            return !self.high_alive(now);
        }
        self.highs.iter().enumerate().all(|(i, h)| mask & (1 << i) != 0 || h.owner.load(Acquire) == 0 || h.alive_until.load(Acquire) <= now)
    }

    /// The earliest window in which a live high-priority process expects its next request
    /// (`HighSlot::next_from`, `next_until`) that has not passed at `now`, as (from, until). A
    /// window further ahead or wider than `MAX_NEXT_AHEAD_NS` is not believed.
    pub fn next_request(&self, now: u64) -> Option<(u64, u64)> {
        self.live_highs(now).filter_map(|h| h.window(now)).min()
    }

    /// The earliest window, as `next_request`, but only when *every* live high-priority
    /// process on the device publishes one: a process whose requests come at random publishes
    /// none, and a neighbour that queued work up to another's window would make its request
    /// wait behind all of it. `None` with none alive.
    pub fn next_request_of_every(&self, now: u64) -> Option<(u64, u64)> {
        let mut earliest: Option<(u64, u64)> = None;
        for h in self.live_highs(now) {
            let window = h.window(now)?;
            earliest = Some(earliest.map_or(window, |e| e.min(window)));
        }
        earliest
    }

    fn live_highs(&self, now: u64) -> impl Iterator<Item = &HighSlot> {
        self.highs.iter().filter(move |h| h.owner.load(Acquire) != 0 && h.alive_until.load(Acquire) > now)
    }

    /// Publishes when `slot`'s process expects its next request (`None`: no prediction).
    pub fn set_next_request(&self, slot: &HighSlot, window: Option<(u64, u64)>) {
        let (from, until) = window.unwrap_or((0, 0));
        // `next_from` cleared first and set last: a reader that reads it before and after
        // `next_until` and finds it unchanged read one window (`next_request`).
        slot.next_from.store(0, Release);
        slot.next_until.store(until, Release);
        slot.next_from.store(from, Release);
    }

    /// Publishes whether `slot`'s process finds its requests host-bound.
    pub fn set_host_bound(&self, slot: &HighSlot, host_bound: bool) {
        let Some(bit) = self.slot_bit(slot) else { return };
        if host_bound {
            self.host_bound.fetch_or(bit, AcqRel);
        } else {
            self.host_bound.fetch_and(!bit, AcqRel);
        }
    }

    /// `slot`'s bit in `host_bound` (`None` for a slot of another device).
    fn slot_bit(&self, slot: &HighSlot) -> Option<u32> {
        let i = self.highs.iter().position(|h| std::ptr::eq(h, slot))?;
        Some(1 << i)
    }

    /// The slot of the high-priority process `owner` (pid `pid`), claiming a free or lapsed one.
    pub fn claim_high(&self, owner: u64, pid: u32, now: u64, lease_ns: u64) -> Option<&HighSlot> {
        if let Some(h) = self.highs.iter().find(|h| h.owner.load(Acquire) == owner) {
            h.alive_until.store(now + lease_ns, Release);
            return Some(h);
        }
        for h in &self.highs {
            let held = h.owner.load(Acquire);
            let lapsed = held != 0 && h.alive_until.load(Acquire) <= now;
            if held == 0 || lapsed {
                // A new owner starts device-bound: its predecessor's word is not its own. (Cleared
                // before the claim, so no neighbour sees the new owner live with the old bit.)
                self.set_host_bound(h, false);
            }
            if (held == 0 || lapsed) && h.owner.compare_exchange(held, owner, AcqRel, Relaxed).is_ok() {
                h.pid.store(pid, Relaxed);
                h.busy.store(0, SeqCst);
                self.set_next_request(h, None);
                h.alive_until.store(now + lease_ns, Release);
                return Some(h);
            }
        }
        None
    }

    /// Gives a slot up (its process left high priority, exited, or died): not busy, free, and
    /// the waiters woken.
    pub fn release_high(&self, slot: &HighSlot, owner: u64) {
        self.release_high_at(slot, owner, monotonic_ns())
    }

    /// `release_high` judging the other slots' leases at `now` (the caller's clock: the shim's
    /// may be a simulated one in tests).
    pub fn release_high_at(&self, slot: &HighSlot, owner: u64, now: u64) {
        if slot.owner.load(Acquire) != owner {
            return;
        }
        slot.busy.store(0, SeqCst);
        self.set_host_bound(slot, false);
        self.set_next_request(slot, None);
        slot.alive_until.store(0, Release);
        let _ = slot.owner.compare_exchange(owner, 0, AcqRel, Relaxed);
        // The last high-priority process gone: the others stop bounding their queues now, not
        // when the lease would have run out. (A neighbour renewing at this instant is seen again
        // at its next renewal, 50 ms on.)
        if !self.highs.iter().any(|h| h.owner.load(Acquire) != 0 && h.alive_until.load(Acquire) > now) {
            self.high_alive_until.store(0, Release);
        }
        self.wake.fetch_add(1, SeqCst);
    }

    /// Renews a high-priority process's lease on its slot and the device's.
    pub fn renew(&self, slot: &HighSlot, now: u64, lease_ns: u64) {
        slot.alive_until.store(now + lease_ns, Release);
        self.high_alive_until.fetch_max(now + lease_ns, AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Ledger;
    use std::sync::atomic::Ordering::*;

    #[test]
    fn neighbours_see_host_bound_only_when_every_live_high_process_says_so() {
        let ledger = Ledger::anonymous().unwrap();
        let s = &ledger.device(0).sched;
        let (now, lease) = (1_000, 300);
        let a = s.claim_high(11, 1, now, lease).unwrap();
        s.renew(a, now, lease);
        assert!(!s.highs_host_bound(now), "a new high-priority process counts as device-bound");
        s.set_host_bound(a, true);
        assert!(s.highs_host_bound(now));
        let b = s.claim_high(12, 2, now, lease).unwrap();
        assert!(!s.highs_host_bound(now), "a second, device-bound one keeps the gate");
        s.set_host_bound(b, true);
        assert!(s.highs_host_bound(now));
        s.set_host_bound(b, false);
        assert!(!s.highs_host_bound(now), "back to device-bound");
        s.release_high_at(b, 12, now);
        assert!(s.highs_host_bound(now), "a released slot's bit does not count");
        // A lapsed slot's bit does not count either, and a new owner of it starts clear.
        s.set_host_bound(b, true);
        assert_eq!(s.host_bound.load(Relaxed).count_ones(), 2);
        s.release_high_at(a, 11, now);
        assert_eq!(s.host_bound.load(Relaxed), 2, "released: its bit cleared (b's stale bit stays, counting for nobody)");
        let c = s.claim_high(13, 3, now, lease).unwrap();
        s.set_host_bound(c, true);
        let d = s.claim_high(14, 4, now + lease + 1, lease).unwrap();
        assert!(std::ptr::eq(c, d), "the lapsed slot is taken again");
        assert!(!s.highs_host_bound(now + lease + 1), "the lapsed owner's word is not the new owner's");
        // Nobody alive: vacuously host-bound (the gate is not asked then).
        s.release_high_at(d, 14, now + lease + 1);
        assert!(s.highs_host_bound(now + 10 * lease));
        // A slot of another device has no bit here.
        let other = &ledger.device(1).sched;
        let e = other.claim_high(15, 5, now, lease).unwrap();
        s.set_host_bound(e, true);
        assert_eq!(s.host_bound.load(Relaxed), 2);
    }

    #[test]
    fn neighbours_see_the_earliest_live_window_they_can_believe() {
        use super::MAX_NEXT_AHEAD_NS;
        let ledger = Ledger::anonymous().unwrap();
        let s = &ledger.device(0).sched;
        let (now, lease) = (10_000_000, 300_000_000);
        let a = s.claim_high(11, 1, now, lease).unwrap();
        let b = s.claim_high(12, 2, now, lease).unwrap();
        assert_eq!(s.next_request(now), None, "a new slot predicts nothing");
        s.set_next_request(a, Some((now + 5_000_000, now + 5_200_000)));
        s.set_next_request(b, Some((now + 3_000_000, now + 3_200_000)));
        assert_eq!(s.next_request(now), Some((now + 3_000_000, now + 3_200_000)), "the earliest");
        assert_eq!(s.next_request(now + 3_200_000), Some((now + 5_000_000, now + 5_200_000)), "a passed window is no longer one");
        s.set_next_request(b, None);
        assert_eq!(s.next_request(now), Some((now + 5_000_000, now + 5_200_000)));
        // Words a neighbour cannot believe: too far ahead, too wide, or backwards.
        s.set_next_request(b, Some((now + MAX_NEXT_AHEAD_NS + 1, now + MAX_NEXT_AHEAD_NS + 2)));
        s.set_next_request(a, Some((now, now + MAX_NEXT_AHEAD_NS + 1)));
        assert_eq!(s.next_request(now), None);
        s.set_next_request(a, Some((now + 2, now + 1)));
        assert_eq!(s.next_request(now), None);
        // A lapsed or released slot's window does not count, and a new owner starts with none.
        s.set_next_request(a, Some((now + 1_000, now + 2_000)));
        assert_eq!(s.next_request(now + lease), None, "lapsed");
        let c = s.claim_high(13, 3, now + lease, lease).unwrap();
        assert!(std::ptr::eq(a, c) || std::ptr::eq(b, c));
        assert_eq!(c.next_from.load(Relaxed), 0);
        s.set_next_request(b, Some((now + 1_000, now + 2_000)));
        s.release_high_at(b, b.owner.load(Relaxed), now);
        assert_eq!((b.next_from.load(Relaxed), b.next_until.load(Relaxed)), (0, 0), "released: cleared");
    }

    #[test]
    fn a_window_of_every_live_process_or_none() {
        let ledger = Ledger::anonymous().unwrap();
        let s = &ledger.device(0).sched;
        let (now, lease) = (10_000_000, 300_000_000);
        assert_eq!(s.next_request_of_every(now), None, "nobody alive");
        let a = s.claim_high(11, 1, now, lease).unwrap();
        let b = s.claim_high(12, 2, now, lease).unwrap();
        s.set_next_request(a, Some((now + 5_000_000, now + 5_200_000)));
        assert_eq!(s.next_request(now), Some((now + 5_000_000, now + 5_200_000)));
        assert_eq!(s.next_request_of_every(now), None, "b publishes none: its requests may come any time");
        s.set_next_request(b, Some((now + 3_000_000, now + 3_200_000)));
        assert_eq!(s.next_request_of_every(now), Some((now + 3_000_000, now + 3_200_000)), "the earliest");
        assert_eq!(s.next_request_of_every(now + 3_200_000), None, "b's window passed and no new one came");
        // A window nobody believes counts as none.
        s.set_next_request(b, Some((now + 2, now + 1)));
        assert_eq!(s.next_request_of_every(now), None);
        // A lapsed or released process no longer counts.
        s.release_high_at(b, 12, now);
        assert_eq!(s.next_request_of_every(now), Some((now + 5_000_000, now + 5_200_000)));
    }

    #[test]
    fn a_gone_process_turn_is_cleared_only_by_its_own_token() {
        let ledger = Ledger::anonymous().unwrap();
        let turn = &ledger.device(0).sched.turn;
        assert!(!turn.clear_holder(7), "nobody holds it");
        turn.holder.store(7, Relaxed);
        turn.holder_pid.store(1234, Relaxed);
        turn.head.store(1 << 32, Relaxed); // ticket 0, claimed
        assert!(!turn.clear_holder(8), "another process's turn is left alone");
        assert!(!turn.clear_holder(0), "a process that never wrote its token clears nothing");
        assert_eq!(turn.holder.load(Relaxed), 7);
        assert!(turn.clear_holder(7));
        assert_eq!((turn.holder.load(Relaxed), turn.holder_pid.load(Relaxed)), (0, 0));
    }
}
