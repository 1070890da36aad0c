//! The turn on a device among throttled processes, handed over in ticket order: a process that
//! wants the turn draws a ticket, sleeps on a futex in the shared page until the ticket is
//! served, and takes the turn; its holder hands it to the next ticket when its burst is done.
//! First come, first served: no process waits behind the same others twice in a row, and a
//! waiter with `d` tickets ahead of it gets the turn after at most `d` holds (each bounded by
//! its lease, or by `CLAIM_GRACE_MS` for a ticket whose process is gone).
//!
//! Everything that decides who holds the turn is one 64-bit word (`head`): the ticket served
//! now (low 32 bits, also the futex word), whether that ticket has claimed the turn (bit 32),
//! and when the head last moved (ms, bits 33..64). Taking, handing over, skipping a ticket
//! nobody claims and taking back an expired lease are each one compare-and-swap on it, so two
//! processes can never both believe they hold the turn. The other fields are what the holder
//! says about itself; they are read only to judge a head, never trusted to decide one.
//!
//! Waking is targeted: each waiter sleeps with the bit `1 << (ticket % 32)` (`FUTEX_WAIT_BITSET`)
//! and a hand-over wakes only the bits of the next two tickets, so 1024 waiters do not all wake
//! at each hand-over. Only the two waiters at the front wait with a timeout (to judge the head's
//! lease or claim); the others sleep until woken, at most `FAR_WAIT_NS`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// How long a served ticket may go unclaimed before the next waiter skips it (its process died
/// or exited while queued). A live waiter is woken at once; this only bounds the dead.
pub const CLAIM_GRACE_MS: u64 = 20;
/// Longest futex sleep of a waiter that is not at the front of the queue.
const FAR_WAIT_NS: u64 = 100_000_000;
const CLAIMED: u64 = 1 << 32;

/// The turn on a device among throttled processes: one burst on the device at a time.
/// Processes are named by a token each was given by the controller or drew at random (pids
/// repeat across pid namespaces).
#[repr(C)]
pub struct Turn {
    /// The token of the process whose burst is on the device; 0 when nobody's.
    pub holder: AtomicU64,
    /// The latest process to hold the turn (to notice a hand-over between processes).
    pub last_holder: AtomicU64,
    /// The holder's own estimate of when its queued work is done, a little more; after it the
    /// turn may be taken back.
    pub lease_until: AtomicU64,
    /// When the turn last passed from one live process to another.
    pub last_handover: AtomicU64,
    /// The holder's pid as it sees itself, for a liveness check by processes of its namespace
    /// (without a controller only); 0 when unknown: then only the lease counts.
    pub holder_pid: AtomicU32,
    /// The same for `last_holder`.
    pub last_holder_pid: AtomicU32,
    /// Ticket served (low 32 bits: the futex word), claimed (bit 32), when it moved (ms, 33..).
    pub head: AtomicU64,
    /// The next ticket to draw.
    pub next_ticket: AtomicU32,
    /// When (ms of the turn clock, low 32 bits; 0: never) a waiter last queued that had done
    /// nothing on the device for a while (issue 18): a holder that is borrowing hands the turn
    /// over at once only to such a one. Was `_pad` (layout unchanged). A stamp, not a count, so
    /// a process that dies queued leaves nothing behind; taken away by its returner once that one
    /// holds the turn (`unmark_returning`); and only a hint: garbage here costs a borrower an
    /// early hand-over, nothing more.
    pub returning: AtomicU32,
}

/// `Turn::returning`'s stamp for `now_ns`: ms, never 0.
fn returning_stamp(now_ns: u64) -> u32 {
    ((now_ns / 1_000_000) as u32).max(1)
}

fn serving(head: u64) -> u32 {
    head as u32
}

fn claimed(head: u64) -> bool {
    head & CLAIMED != 0
}

fn moved_ms(head: u64) -> u64 {
    head >> 33
}

fn ms(now_ns: u64) -> u64 {
    (now_ns / 1_000_000) & ((1 << 31) - 1)
}

fn pack(ticket: u32, claimed: bool, now_ns: u64) -> u64 {
    u64::from(ticket) | if claimed { CLAIMED } else { 0 } | ms(now_ns) << 33
}

/// ms elapsed between two `moved_ms` stamps (31-bit wrap).
fn ms_since(then: u64, now_ns: u64) -> u64 {
    ms(now_ns).wrapping_sub(then) & ((1 << 31) - 1)
}

fn bit(ticket: u32) -> u32 {
    1 << (ticket % 32)
}

/// How a process waiting for the turn reads time, sleeps, wakes others and checks other
/// processes. The sleeps and wakes default to the kernel's futexes on CLOCK_MONOTONIC; the shim
/// routes them through its clock (a simulated one in tests).
pub trait Waiter {
    fn now_ns(&self) -> u64;
    /// False when the process with this pid is known to be gone (pid 0: unknown, alive).
    fn alive(&self, pid: u32) -> bool;
    /// Sleeps while `word` is `expected`, until woken with a bit of `mask`, at most `timeout_ns`.
    fn wait(&self, word: &AtomicU32, expected: u32, mask: u32, timeout_ns: u64) {
        futex_wait(word, expected, mask, timeout_ns)
    }
    /// Wakes the waiters on `word` whose mask shares a bit with `mask`.
    fn wake(&self, word: &AtomicU32, mask: u32) {
        futex_wake(word, mask)
    }
}

/// CLOCK_MONOTONIC and the kernel's futexes; every pid taken for alive.
pub struct Monotonic;

impl Waiter for Monotonic {
    fn now_ns(&self) -> u64 {
        crate::ledger::monotonic_ns()
    }
    fn alive(&self, _: u32) -> bool {
        true
    }
}

/// The futex word of a turn: the low half of `head` (little-endian: its first four bytes).
fn low_half(head: &AtomicU64) -> &AtomicU32 {
    // SAFETY: an AtomicU64 is 8-aligned, so its first four bytes are an aligned u32 that lives
    // as long as it; mixed-size atomic access to it is what the kernel's futex does anyway.
    unsafe { &*(head.as_ptr() as *const AtomicU32) }
}

/// What `take` got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The ticket the turn is held under (`None`: gave up after `patience`).
    pub ticket: Option<u32>,
    pub waited_ns: u64,
    /// Another process held the turn or waited for it meanwhile, or the turn passed between
    /// processes lately: the device is shared.
    pub neighbour: bool,
    /// Processes queued behind this one when it took the turn.
    pub queued: u32,
}

impl Turn {
    /// True when `me` holds the turn under `ticket`.
    pub fn held_by(&self, me: u64, ticket: u32) -> bool {
        let h = self.head.load(Acquire);
        claimed(h) && serving(h) == ticket && self.holder.load(Acquire) == me
    }

    /// Notes that a waiter back from idle queues now (see `returning`); the stamp it left.
    pub fn mark_returning(&self, now_ns: u64) -> u32 {
        let stamp = returning_stamp(now_ns);
        self.returning.store(stamp, Release);
        stamp
    }

    /// The returner that left `stamp` took the turn: it no longer waits, so its stamp goes, unless
    /// another returner has stamped since. Left there, it stayed fresh while its own process held
    /// the turn, and when the borrower re-queued behind it, the stamp said "a returner waits": the
    /// process back from idle handed the turn straight back to the borrower it came to reclaim
    /// from (`guarantee.rs`'s cold reclaim: 3 % of its first 20 ms instead of 72 %, whenever the
    /// borrower re-queued only after the returner's second launch). A returner of the same ms
    /// still queued loses its hint with it, and waits for the holder's slice as without one.
    pub fn unmark_returning(&self, stamp: u32) {
        let _ = self.returning.compare_exchange(stamp, 0, AcqRel, Relaxed);
    }

    /// True when someone queues and a waiter back from idle queued within `within_ms`.
    pub fn returner_waiting(&self, now_ns: u64, within_ms: u32) -> bool {
        let stamp = self.returning.load(Acquire);
        stamp != 0 && returning_stamp(now_ns).wrapping_sub(stamp) <= within_ms && self.queued() > 0
    }

    /// Waiters queued behind the head, the holder excluded.
    pub fn queued(&self) -> u32 {
        let h = self.head.load(Acquire);
        let waiting = self.next_ticket.load(Acquire).wrapping_sub(serving(h));
        waiting.saturating_sub(u32::from(claimed(h)))
    }

    /// Takes the turn for the process `me` (pid `pid`, 0 when pids mean nothing to the others),
    /// whose work is queued until `lease_until`; waits in ticket order. Gives up after
    /// `patience(tickets ahead)` ns of waiting (a wedged or garbage page must not hang the
    /// program): then the ticket is left to be skipped.
    pub fn take(&self, me: u64, pid: u32, lease_until: u64, lease_slack: u64, w: &impl Waiter, patience: impl Fn(u32) -> u64) -> Taken {
        let start = w.now_ns();
        let mut ticket = self.next_ticket.fetch_add(1, AcqRel);
        let mut neighbour = false;
        // The claimed head whose holder this waiter checked last.
        let mut checked = 0u64;
        loop {
            let now = w.now_ns();
            let h = self.head.load(Acquire);
            let s = serving(h);
            let ahead = ticket.wrapping_sub(s);
            if ahead > u32::MAX / 2 {
                // Our ticket was skipped (we were too slow to claim it): queue again.
                ticket = self.next_ticket.fetch_add(1, AcqRel);
                neighbour = true;
                continue;
            }
            if ahead == 0 && !claimed(h) {
                // Ours: say who holds it before claiming, so that a judge sees a valid lease.
                self.lease_until.store(lease_until.max(now) + lease_slack, Release);
                self.holder_pid.store(pid, Release);
                self.holder.store(me, Release);
                if self.head.compare_exchange(h, pack(s, true, now), AcqRel, Acquire).is_err() {
                    continue;
                }
                let previous = self.last_holder.swap(me, AcqRel);
                let previous_pid = self.last_holder_pid.swap(pid, AcqRel);
                let queued = self.queued();
                // With others queued the device is shared whether the previous holder lives or
                // not: its pid is checked (a signal and a read of /proc) only when it decides.
                if previous != me && previous != 0 && (queued > 0 || w.alive(previous_pid)) {
                    self.last_handover.store(now, Release);
                    neighbour = true;
                }
                return Taken { ticket: Some(ticket), waited_ns: now - start, neighbour: neighbour || queued > 0 || self.recent_handover(now), queued };
            }
            if ahead == 0 {
                // Claimed under our number by someone else: a damaged page. Queue again.
                ticket = self.next_ticket.fetch_add(1, AcqRel);
                continue;
            }
            let deadline = if claimed(h) {
                let lease = self.lease_until.load(Acquire);
                // The holder's pid (a signal and a read of /proc) is checked by the two waiters
                // at the front only, once per hold they see, and again at each wake once the hold
                // has lasted a claim grace: a waiter wakes a few times per hold, and checking at
                // each wake of every waiter cost every process checks in proportion to the queue.
                let check = ahead <= 2 && (h != checked || ms_since(moved_ms(h), now) >= CLAIM_GRACE_MS);
                if check {
                    checked = h;
                }
                if now >= lease || (check && !w.alive(self.holder_pid.load(Acquire))) {
                    self.advance(h, now, w);
                    continue;
                }
                lease
            } else {
                let since = ms_since(moved_ms(h), now);
                if since >= CLAIM_GRACE_MS {
                    self.advance(h, now, w);
                    continue;
                }
                now + (CLAIM_GRACE_MS - since) * 1_000_000
            };
            // Only a live holder or waiter ahead makes the device shared: a turn taken back from a
            // dead one does not (its process cannot launch again).
            neighbour = true;
            let waited = now - start;
            if waited >= patience(ahead) {
                return Taken { ticket: None, waited_ns: waited, neighbour, queued: self.queued() };
            }
            let until = if ahead <= 2 { deadline.min(now + FAR_WAIT_NS) } else { now + FAR_WAIT_NS };
            w.wait(low_half(&self.head), s, bit(ticket), until.saturating_sub(now).max(20_000));
        }
    }

    /// Moves the head past ticket `serving(h)` (handed over, skipped or taken back), if it is
    /// still `h`, and wakes the next two tickets.
    fn advance(&self, h: u64, now: u64, w: &impl Waiter) -> bool {
        let s = serving(h);
        if self.head.compare_exchange(h, pack(s.wrapping_add(1), false, now), AcqRel, Acquire).is_err() {
            return false;
        }
        if claimed(h) {
            let holder = self.holder.load(Acquire);
            // Only the taken-back holder's name: a next claimant writes its own before claiming.
            if holder != 0 {
                let _ = self.holder.compare_exchange(holder, 0, AcqRel, Relaxed);
            }
        }
        w.wake(low_half(&self.head), bit(s.wrapping_add(1)) | bit(s.wrapping_add(2)));
        true
    }

    /// Extends the lease of `me` holding the turn under `ticket`.
    pub fn extend(&self, me: u64, ticket: u32, lease_until: u64) {
        if self.held_by(me, ticket) {
            self.lease_until.fetch_max(lease_until, AcqRel);
        }
    }

    /// Hands the turn to the next ticket, if `me` holds it under `ticket`.
    pub fn release(&self, me: u64, ticket: u32, w: &impl Waiter) -> bool {
        let h = self.head.load(Acquire);
        if !(claimed(h) && serving(h) == ticket && self.holder.load(Acquire) == me) {
            return false;
        }
        self.holder_pid.store(0, Release);
        self.advance(h, w.now_ns(), w)
    }

    /// Frees the turn if the process named `token` holds it (that process is gone): the others
    /// need not wait out its lease. True when it did. The caller must know `token` to be the gone
    /// process's: the controller passes its own copy (`Watched::token`), never a word a tenant
    /// could have written, or it would free whichever process's turn that word names.
    pub fn clear_holder(&self, token: u64) -> bool {
        let h = self.head.load(Acquire);
        if token == 0 || !claimed(h) || self.holder.load(Acquire) != token {
            return false;
        }
        self.holder_pid.store(0, Release);
        self.advance(h, Monotonic.now_ns(), &Monotonic)
    }

    /// True when the turn passed between live processes within the last 200 ms.
    pub fn recent_handover(&self, now: u64) -> bool {
        now.saturating_sub(self.last_handover.load(Acquire)) < 200_000_000
    }
}

/// Sleeps while `word` is `expected`, at most `timeout_ns` of CLOCK_MONOTONIC, until woken
/// with a mask that shares a bit with `mask`.
pub fn futex_wait(word: &AtomicU32, expected: u32, mask: u32, timeout_ns: u64) {
    // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline.
    let mut abs = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut abs) };
    let ns = abs.tv_nsec as u64 + timeout_ns % 1_000_000_000;
    abs.tv_sec = abs.tv_sec.saturating_add((timeout_ns / 1_000_000_000 + ns / 1_000_000_000).min(i32::MAX as u64) as libc::time_t);
    abs.tv_nsec = (ns % 1_000_000_000) as libc::c_long;
    // SAFETY: a shared (not private: the page may be mapped by other processes) futex wait on an
    // aligned u32 that outlives the call; spurious returns are handled by the callers' loops.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT_BITSET, expected, &abs as *const libc::timespec, std::ptr::null::<u32>(), mask.max(1));
    }
}

/// Wakes the waiters on `word` whose mask shares a bit with `mask`.
pub fn futex_wake(word: &AtomicU32, mask: u32) {
    // SAFETY: as `futex_wait`; waking has no memory effects.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE_BITSET,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            mask.max(1),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use Monotonic as Real;

    fn turn() -> Arc<Turn> {
        // SAFETY: all-zero is a free turn (every field an atomic integer).
        Arc::new(unsafe { std::mem::zeroed() })
    }

    #[test]
    fn waiters_get_the_turn_in_the_order_they_asked() {
        let t = turn();
        let first = t.take(1, 0, 0, 1_000_000_000, &Real, |_| u64::MAX);
        assert_eq!(first.ticket, Some(0));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for me in 2..10u64 {
            let (mine, order) = (t.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let got = mine.take(me, 0, 0, 1_000_000_000, &Real, |_| u64::MAX);
                order.lock().unwrap().push(me);
                let ticket = got.ticket.unwrap();
                assert!(mine.held_by(me, ticket));
                assert!(mine.release(me, ticket, &Real));
            }));
            // Each thread draws its ticket before the next starts.
            while t.next_ticket.load(SeqCst) != me as u32 {
                std::thread::yield_now();
            }
        }
        assert!(t.release(1, 0, &Real));
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (2..10).collect::<Vec<_>>());
        assert_eq!(t.queued(), 0);
        assert_eq!(t.holder.load(SeqCst), 0);
    }

    #[test]
    fn an_expired_lease_and_an_unclaimed_ticket_are_passed_over() {
        let t = turn();
        // Holder 1 with a lease of 5 ms that never releases; ticket 1 drawn by nobody alive.
        assert_eq!(t.take(1, 0, 0, 5_000_000, &Real, |_| u64::MAX).ticket, Some(0));
        assert_eq!(t.next_ticket.fetch_add(1, SeqCst), 1);
        let start = Real.now_ns();
        let got = t.take(2, 0, 0, 1_000_000, &Real, |_| u64::MAX);
        let waited = Real.now_ns() - start;
        assert_eq!(got.ticket, Some(2));
        assert!(got.neighbour);
        assert!(waited >= 4_000_000 + CLAIM_GRACE_MS * 1_000_000 - 2_000_000, "waited {waited}");
        assert!(waited < 200_000_000, "waited {waited}");
        // The taken-back holder no longer holds it and cannot release the new holder's turn.
        assert!(!t.held_by(1, 0));
        assert!(!t.release(1, 0, &Real));
        assert!(t.held_by(2, 2));
    }

    #[test]
    fn patience_bounds_a_wait_on_a_wedged_turn() {
        let t = turn();
        assert!(t.take(1, 0, 0, 10_000_000_000, &Real, |_| u64::MAX).ticket.is_some());
        let got = t.take(2, 0, 0, 0, &Real, |_| 30_000_000);
        assert_eq!(got.ticket, None);
        assert!(got.waited_ns >= 30_000_000);
    }

    /// A clock the test moves by hand; futex waits return after at most 1 ms of real time (a
    /// spurious return, as the callers allow); pids up to 99 are alive, and each check counted.
    struct Checked {
        now: AtomicU64,
        checks: AtomicU32,
        waits: AtomicU32,
    }

    impl Waiter for Checked {
        fn now_ns(&self) -> u64 {
            self.now.load(SeqCst)
        }
        fn alive(&self, pid: u32) -> bool {
            self.checks.fetch_add(1, SeqCst);
            pid < 100
        }
        fn wait(&self, word: &AtomicU32, expected: u32, mask: u32, timeout_ns: u64) {
            self.waits.fetch_add(1, SeqCst);
            futex_wait(word, expected, mask, timeout_ns.min(1_000_000))
        }
    }

    fn checked() -> Arc<Checked> {
        Arc::new(Checked { now: AtomicU64::new(1_000_000_000), checks: AtomicU32::new(0), waits: AtomicU32::new(0) })
    }

    /// Issue 14: a waiter at the front wakes a few times per hold; checking the holder's pid at
    /// each wake (a signal and a read of /proc) cost every process a check per wake. A hold
    /// shorter than the claim grace is checked once by each waiter at the front.
    #[test]
    fn a_short_hold_is_not_checked_however_often_its_waiter_wakes() {
        let (t, w) = (turn(), checked());
        assert_eq!(t.take(1, 7, 0, 10_000_000_000, &*w, |_| u64::MAX).ticket, Some(0));
        let (t2, w2) = (t.clone(), w.clone());
        let waiter = std::thread::spawn(move || t2.take(2, 8, 0, 1_000_000, &*w2, |_| u64::MAX));
        // The waiter wakes every millisecond of real time while no virtual time passes.
        let start = std::time::Instant::now();
        while w.waits.load(SeqCst) < 5 && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let waits = w.waits.load(SeqCst);
        assert!(w.checks.load(SeqCst) <= 1, "the holder's pid was checked {} times in {waits} wakes of a short hold", w.checks.load(SeqCst));
        assert!(t.release(1, 0, &*w));
        assert_eq!(waiter.join().unwrap().ticket, Some(1));
        // Taking it, the waiter asks once whether the previous holder lives (nobody else queues).
        assert!(w.checks.load(SeqCst) <= 2, "{} checks", w.checks.load(SeqCst));
    }

    /// A holder whose process is gone is passed over at once, long before its lease ends.
    #[test]
    fn a_dead_holder_is_passed_over_after_the_grace() {
        let (t, w) = (turn(), checked());
        assert_eq!(t.take(1, 700, 0, 10_000_000_000, &*w, |_| u64::MAX).ticket, Some(0));
        let got = t.take(2, 8, 0, 1_000_000, &*w, |_| u64::MAX);
        assert_eq!(got.ticket, Some(1));
        assert!(w.checks.load(SeqCst) >= 1);
    }

    /// A returner's stamp tells a borrowing holder that someone back from idle waits; once that
    /// returner holds the turn itself, its stamp must not say so to it about a neighbour that
    /// queues behind it.
    #[test]
    fn a_returner_that_takes_the_turn_is_no_longer_waiting() {
        let t = turn();
        let now = 5_000_000_000;
        let stamp = t.mark_returning(now);
        assert_eq!(t.take(1, 0, 0, 1_000_000_000, &Real, |_| u64::MAX).ticket, Some(0));
        t.unmark_returning(stamp);
        // A saturating neighbour queues behind it (a ticket drawn, not served).
        t.next_ticket.fetch_add(1, SeqCst);
        assert!(!t.returner_waiting(now + 2_000_000, 10));
        // A later returner's stamp is not taken away by an earlier one's.
        let later = t.mark_returning(now + 1_000_000);
        t.unmark_returning(stamp);
        assert!(t.returner_waiting(now + 2_000_000, 10));
        t.unmark_returning(later);
        assert!(!t.returner_waiting(now + 2_000_000, 10));
    }

    #[test]
    fn the_controller_frees_a_gone_holders_turn() {
        let t = turn();
        let got = t.take(7, 0, 0, 10_000_000_000, &Real, |_| u64::MAX);
        assert!(!t.clear_holder(8));
        assert!(t.clear_holder(7));
        assert!(!t.held_by(7, got.ticket.unwrap()));
        assert_eq!(t.take(9, 0, 0, 0, &Real, |_| 1_000_000).ticket, Some(1));
    }
}
