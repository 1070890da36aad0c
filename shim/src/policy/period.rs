//! When a high-priority process's next request is due, if its requests keep time (camera frames,
//! a control loop, a periodic probe): learnt from the starts of its last requests, published in
//! its priority slot, so that lower-priority neighbours under a duration budget can have their
//! work end before the request comes (`sched`'s anticipation) instead of making it wait for a
//! kernel already running. Requests that do not keep time give no prediction, and nothing
//! changes for them. Pure: the caller passes the times.
//!
//! The prediction is a window: the last start plus the period (the median of the last
//! intervals), opened earlier by the earliest any of those intervals came and later by the
//! latest, and by `GUARD_NS` each way. A neighbour keeps its work clear of the window's start
//! and waits at most until its end; a request later than that was mispredicted and the
//! neighbour goes on (the request then waits as it would have without a prediction).
//!
//! One interval may be off the period (`OUTLIERS`): a schedule that starts over at a new phase
//! (a program's warm-up before its measured run, on the H100: nine unprotected requests after
//! each were the p99 of a 400-request phase) or a missed beat. The window is then counted from
//! the last start, at the new phase, and the odd interval does not widen it. Random arrivals
//! almost never put seven of eight intervals within an eighth of their median.

/// Request starts remembered: the prediction needs this many (`HISTORY - 1` intervals).
pub const HISTORY: usize = 9;
/// Shortest period predicted. Requests closer than `request_load::GAP_NS` (1 ms) apart are one
/// request to this module already; below 2 ms the window would be most of the period.
pub const MIN_PERIOD_NS: u64 = 2_000_000;
/// Longest period predicted: beyond a second a neighbour gains nothing worth the risk.
pub const MAX_PERIOD_NS: u64 = 1_000_000_000;
/// Every interval but `OUTLIERS` within the median ± this fraction of it (1/8), or the requests
/// do not keep time.
pub const TOLERANCE_DIVISOR: u64 = 8;
/// Intervals that may lie outside the tolerance.
pub const OUTLIERS: usize = 1;
/// Added on each side of the window: the host's own jitter beyond what the history showed.
pub const GUARD_NS: u64 = 100_000;

/// When the next request is expected: not before `from`, not after `until` (ns, the shim's
/// clock), and the period it was predicted from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due {
    pub from: u64,
    pub until: u64,
    pub period: u64,
}

/// The starts of one process's last requests on one device.
#[derive(Clone, Debug, Default)]
pub struct Period {
    starts: [u64; HISTORY],
    /// Starts recorded, up to `HISTORY`.
    len: usize,
    /// Where the next start goes (a ring).
    next: usize,
}

impl Period {
    pub const fn new() -> Period {
        Period { starts: [0; HISTORY], len: 0, next: 0 }
    }

    /// A request began at `t` (ns). A start before the last one (a clock that went back) starts
    /// the history over.
    pub fn began(&mut self, t: u64) {
        if self.len > 0 && t < self.latest() {
            self.len = 0;
            self.next = 0;
        }
        self.starts[self.next] = t;
        self.next = (self.next + 1) % HISTORY;
        self.len = (self.len + 1).min(HISTORY);
    }

    /// The window of the next request, when the last `HISTORY` starts came on a schedule.
    pub fn due(&self) -> Option<Due> {
        if self.len < HISTORY {
            return None;
        }
        let mut intervals = [0u64; HISTORY - 1];
        for (i, slot) in intervals.iter_mut().enumerate() {
            // Oldest first: the ring's oldest entry is at `next`.
            let a = self.starts[(self.next + i) % HISTORY];
            let b = self.starts[(self.next + i + 1) % HISTORY];
            *slot = b - a;
        }
        let mut sorted = intervals;
        sorted.sort_unstable();
        let period = sorted[sorted.len() / 2];
        if !(MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&period) {
            return None;
        }
        let tolerance = period / TOLERANCE_DIVISOR;
        let kept = || sorted.iter().copied().filter(|&i| i.abs_diff(period) <= tolerance);
        if kept().count() + OUTLIERS < sorted.len() {
            return None;
        }
        let (shortest, longest) = (kept().min()?, kept().max()?);
        let expected = self.latest() + period;
        Some(Due { from: expected - (period - shortest) - GUARD_NS, until: expected + (longest - period) + GUARD_NS, period })
    }

    fn latest(&self) -> u64 {
        self.starts[(self.next + HISTORY - 1) % HISTORY]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;

    fn fed(starts: impl IntoIterator<Item = u64>) -> Period {
        let mut p = Period::new();
        starts.into_iter().for_each(|t| p.began(t));
        p
    }

    #[test]
    fn a_steady_period_predicts_the_next_start() {
        let p = fed((0..HISTORY as u64).map(|i| 5 * MS + i * 6 * MS));
        let expected = 5 * MS + HISTORY as u64 * 6 * MS;
        assert_eq!(p.due(), Some(Due { from: expected - GUARD_NS, until: expected + GUARD_NS, period: 6 * MS }));
    }

    #[test]
    fn too_few_starts_predict_nothing() {
        assert_eq!(fed((0..HISTORY as u64 - 1).map(|i| i * 6 * MS)).due(), None);
    }

    #[test]
    fn jitter_widens_the_window_by_what_the_history_showed() {
        // On a 6 ms schedule with starts up to 40 µs late: intervals from 5.96 to 6.04 ms.
        let late = [0, 40, 0, 10, 40, 0, 20, 0, 30];
        let p = fed(late.iter().enumerate().map(|(i, l)| i as u64 * 6 * MS + l * US));
        let due = p.due().unwrap();
        let last = 8 * 6 * MS + 30 * US;
        // The shortest interval 5.96 ms, the longest 6.04 (the median, the upper one of eight,
        // 6.02, does not move the window's edges).
        assert_eq!(due, Due { from: last + 6 * MS - 40 * US - GUARD_NS, until: last + 6 * MS + 40 * US + GUARD_NS, period: 6_020 * US });
        // The next start on schedule, whatever its own lateness up to 40 µs, falls inside.
        for l in [0, 40] {
            let t = 9 * 6 * MS + l * US;
            assert!(due.from <= t && t <= due.until, "{t} outside {due:?}");
        }
    }

    #[test]
    fn requests_off_the_schedule_predict_nothing() {
        // Pauses of 10-30 ms drawn at random (the simulated probe's), a missed beat, a burst.
        let random = [0, 21, 33, 60, 71, 99, 118, 140, 151];
        assert_eq!(fed(random.iter().map(|ms| ms * MS)).due(), None);
        let missed_twice = [0, 6, 12, 24, 30, 36, 48, 54, 60];
        assert_eq!(fed(missed_twice.iter().map(|ms| ms * MS)).due(), None, "two intervals of twice the period");
        // Too fast to be worth a window, and too slow.
        assert_eq!(fed((0..HISTORY as u64).map(|i| i * MS)).due(), None);
        assert_eq!(fed((0..HISTORY as u64).map(|i| i * 2 * MAX_PERIOD_NS)).due(), None);
    }

    #[test]
    fn a_new_schedule_is_followed_once_the_history_holds_only_it() {
        let mut p = fed((0..HISTORY as u64).map(|i| i * 6 * MS));
        // The first start of the new schedule 10 ms after the last of the old: after k new
        // starts the intervals are k of 10 ms and HISTORY - 1 - k of 6 ms; one may be off.
        let base = (HISTORY as u64 - 1) * 6 * MS + 10 * MS;
        // The first looks like the old schedule at a new phase.
        p.began(base);
        assert_eq!(p.due().map(|d| d.period), Some(6 * MS));
        for k in 1..HISTORY as u64 - 3 {
            p.began(base + k * 10 * MS);
            assert_eq!(p.due(), None, "mixed history after {} new starts", k + 1);
        }
        let last = base + (HISTORY as u64 - 3) * 10 * MS;
        p.began(last);
        assert_eq!(p.due(), Some(Due { from: last + 10 * MS - GUARD_NS, until: last + 10 * MS + GUARD_NS, period: 10 * MS }));
    }

    #[test]
    fn a_schedule_that_starts_over_at_a_new_phase_is_followed_at_once() {
        // A warm-up on a 6 ms schedule, then the measured run on the same period from a new
        // start 2.5 ms off the old phase: the odd interval is the last one.
        let mut starts: Vec<u64> = (0..HISTORY as u64 - 1).map(|i| i * 6 * MS).collect();
        let shifted = starts[starts.len() - 1] + 8_500 * US;
        starts.push(shifted);
        let p = fed(starts.iter().copied());
        assert_eq!(
            p.due(),
            Some(Due { from: shifted + 6 * MS - GUARD_NS, until: shifted + 6 * MS + GUARD_NS, period: 6 * MS }),
            "from the new phase, as narrow as before"
        );
        // A missed beat: one interval of twice the period, the window after the last start.
        let missed = [0, 6, 12, 18, 24, 36, 42, 48, 54];
        let p = fed(missed.iter().map(|ms| ms * MS));
        assert_eq!(p.due(), Some(Due { from: 60 * MS - GUARD_NS, until: 60 * MS + GUARD_NS, period: 6 * MS }));
    }

    #[test]
    fn a_clock_that_goes_back_starts_over() {
        let mut p = fed((0..HISTORY as u64).map(|i| 100 * MS + i * 6 * MS));
        p.began(MS);
        assert_eq!(p.due(), None);
    }

    proptest! {
        /// Whatever the starts, a prediction is a window after the last start, no wider than
        /// the period's tolerance and the guards, and never panics.
        #[test]
        fn any_starts_give_a_sane_window_or_none(gaps in proptest::collection::vec(0u64..3 * MAX_PERIOD_NS, 0..30)) {
            let mut p = Period::new();
            let mut t = 0u64;
            for g in gaps {
                t += g;
                p.began(t);
                if let Some(due) = p.due() {
                    prop_assert!(due.from > t && due.from < due.until, "{due:?} after {t}");
                    prop_assert!(due.until - due.from <= 2 * MAX_PERIOD_NS / TOLERANCE_DIVISOR + 2 * GUARD_NS);
                }
            }
        }
    }
}
