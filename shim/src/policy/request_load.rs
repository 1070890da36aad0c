//! Whether a high-priority process's requests are device-bound (the device busy for most of each
//! request) or host-bound (Python, launches: the device idle most of each), from the busy
//! periods of its priority slot; `sched` publishes the verdict for `GPUSLICE_PRIORITY_GATE=auto`.
//!
//! A request is a run of busy periods (the slot busy from a launch until the watcher sees every
//! event done) separated by idle gaps shorter than `GAP_NS`; its device-busy fraction is the
//! time busy over (request end - request start). Recent requests are smoothed with hysteresis.
//! Pure: the caller passes the times (the shim's clock, simulated in tests).

/// An idle gap this long ends a request. Within a PyTorch forward pass the device idles between
/// kernels for the host's launch overhead (5-100 µs an op); the issue-19 probes' requests are
/// ≥ 3.9 ms apart (their period is 3 × the request). 1 ms sits well between the two, and a
/// server whose requests come back to back has them measured together, which is fine: the
/// fraction of the merged run is theirs.
pub const GAP_NS: u64 = 1_000_000;
/// A request (or a busy period) running past this is measured and a new one begun, so that a
/// process that never idles for `GAP_NS` still yields figures: 20 ms is 3-10 of the probes'
/// requests, and a device that turns busy for good is seen within two such windows.
pub const MAX_REQUEST_NS: u64 = 20_000_000;
/// Below this smoothed fraction the requests are host-bound. Measured on the H100: eager
/// ResNet-50 b8's requests, as this module sees them (the watcher's looks lengthen each busy
/// period), are ~0.5 busy alone and 0.71-0.76 beside a PyTorch neighbour at 40 % of the SMs
/// (stop 24); there lifting the gate cost the probe nothing and gave the neighbour ~96 % of its
/// alone rate against 75-87 % gated (stop 22, 24). Its CUDA graph's requests are busy throughout
/// (~1.0), where lifting the gate cost ×2.1-2.4. The first thresholds (0.5 / 0.7) kept the
/// eager probe gated beside a neighbour: its own contention pushed it over 0.7.
pub const HOST_BELOW: f64 = 0.8;
/// Above this they are device-bound again. The gap between the two thresholds keeps a process
/// near one of them from flipping the neighbours' gate on and off at each request (a neighbour
/// let loose slows the probe's kernels a little, which raises the fraction it measures).
pub const DEVICE_ABOVE: f64 = 0.9;
/// Smoothing towards a higher fraction (fast: a wrongly lifted gate costs the high-priority
/// process its latency; from ~0.2, two fully busy requests cross `DEVICE_ABOVE`) and towards a
/// lower one (slow: from the start, 1.0, requests at ~0.3 cross `HOST_BELOW` after ~6, at ~0.7
/// after ~17).
const RISE: f64 = 0.7;
const FALL: f64 = 0.0625;

/// What a process's requests are, by its own measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The device is busy for most of each request (also: not measured yet).
    DeviceBound,
    /// The device is idle for most of each request.
    HostBound,
}

/// The open request: when it began, the busy time of its finished periods, and when the last
/// of them ended.
#[derive(Clone, Copy, Debug)]
struct Open {
    start: u64,
    busy_ns: u64,
    last_end: u64,
}

/// A verdict that changed, with the smoothed fraction behind it, the last request's, and how
/// many requests have been measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Change {
    pub verdict: Verdict,
    pub fraction: f64,
    pub last: f64,
    pub requests: u64,
}

/// One process's requests on one device.
#[derive(Debug)]
pub struct Requests {
    open: Option<Open>,
    /// The start of the busy period in progress.
    busy_since: Option<u64>,
    smoothed: f64,
    /// The last request's fraction.
    last: f64,
    verdict: Verdict,
    requests: u64,
    /// A change not yet taken by `take_change`.
    changed: bool,
}

impl Default for Requests {
    fn default() -> Requests {
        Requests::new()
    }
}

impl Requests {
    /// Device-bound until the evidence says otherwise (fail closed: the gate stays on).
    pub const fn new() -> Requests {
        Requests { open: None, busy_since: None, smoothed: 1.0, last: 1.0, verdict: Verdict::DeviceBound, requests: 0, changed: false }
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// The smoothed busy fraction of recent requests.
    pub fn fraction(&self) -> f64 {
        self.smoothed
    }

    /// The busy fraction of the last request measured.
    pub fn last(&self) -> f64 {
        self.last
    }

    /// The slot turned busy at `t`. A gap of `GAP_NS` or more since the last busy period ends
    /// the open request first. A second call within a busy period changes nothing. True when a
    /// new request began at `t` (`period` learns their starts).
    pub fn busy(&mut self, t: u64) -> bool {
        if self.busy_since.is_some() {
            return false;
        }
        if self.open.is_some_and(|o| t.saturating_sub(o.last_end) >= GAP_NS) {
            self.close();
        }
        let began = self.open.is_none();
        if began {
            self.open = Some(Open { start: t, busy_ns: 0, last_end: t });
        }
        self.busy_since = Some(t);
        began
    }

    /// The slot turned idle at `t` (the work's end as the watcher estimates it).
    pub fn idle(&mut self, t: u64) {
        let Some(since) = self.busy_since.take() else { return };
        let t = t.max(since);
        if let Some(o) = self.open.as_mut() {
            o.busy_ns += t - since;
            o.last_end = t;
            if t - o.start >= MAX_REQUEST_NS {
                self.close();
            }
        }
    }

    /// Requests measured so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The watcher found the work done at `now`, having last seen it outstanding at
    /// `seen_busy`: the period ended in between, and the midpoint is the estimate (unbiased
    /// for an end anywhere in the watcher's poll interval; `now` alone would add half a poll to
    /// every period, which for many short kernels is much of their length).
    pub fn idle_seen(&mut self, seen_busy: u64, now: u64) {
        let Some(since) = self.busy_since else { return };
        let from = seen_busy.max(since).min(now.max(since));
        self.idle(from + (now.max(since) - from) / 2);
    }

    /// The watcher's look at `now`: ends the open request once it has been idle for `GAP_NS`,
    /// and cuts one that has run for `MAX_REQUEST_NS` (a busy period in progress goes on in the
    /// next).
    pub fn tick(&mut self, now: u64) {
        let Some(o) = self.open else { return };
        match self.busy_since {
            None if now.saturating_sub(o.last_end) >= GAP_NS => self.close(),
            Some(since) if now.saturating_sub(o.start) >= MAX_REQUEST_NS => {
                let now = now.max(since);
                self.open = Some(Open { start: o.start, busy_ns: o.busy_ns + (now - since), last_end: now });
                self.close();
                self.open = Some(Open { start: now, busy_ns: 0, last_end: now });
                self.busy_since = Some(now);
            }
            _ => {}
        }
    }

    /// The verdict, if it changed since the last call.
    pub fn take_change(&mut self) -> Option<Change> {
        std::mem::take(&mut self.changed).then_some(Change { verdict: self.verdict, fraction: self.smoothed, last: self.last, requests: self.requests })
    }

    /// Measures the open request and moves the smoothed figure and the verdict.
    fn close(&mut self) {
        let Some(o) = self.open.take() else { return };
        let span = o.last_end - o.start;
        // A request with no length is one launch done at once: counts as busy (fail closed).
        let fraction = if span == 0 { 1.0 } else { (o.busy_ns as f64 / span as f64).min(1.0) };
        self.last = fraction;
        let weight = if fraction > self.smoothed { RISE } else { FALL };
        self.smoothed += weight * (fraction - self.smoothed);
        self.requests += 1;
        let next = match self.verdict {
            Verdict::DeviceBound if self.smoothed < HOST_BELOW => Verdict::HostBound,
            Verdict::HostBound if self.smoothed > DEVICE_ABOVE => Verdict::DeviceBound,
            v => v,
        };
        if next != self.verdict {
            self.verdict = next;
            self.changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;

    /// Feeds `n` requests of `kernels` busy periods of `busy` each followed by `host` idle,
    /// requests `gap` apart, from `t`; returns the time after the last and the changes seen.
    fn requests(r: &mut Requests, t: &mut u64, n: usize, kernels: usize, busy: u64, host: u64, gap: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        for _ in 0..n {
            for k in 0..kernels {
                let _ = r.busy(*t);
                *t += busy;
                r.idle(*t);
                if k + 1 < kernels {
                    *t += host;
                }
            }
            *t += gap;
            r.tick(*t);
            changes.extend(r.take_change());
        }
        changes
    }

    #[test]
    fn a_request_begins_after_a_gap_not_at_each_busy_period() {
        let mut r = Requests::new();
        assert!(r.busy(0), "the first");
        r.idle(100 * US);
        assert!(!r.busy(100 * US + GAP_NS - 1), "a shorter gap: the same request");
        assert!(!r.busy(200 * US + GAP_NS), "already busy");
        r.idle(300 * US + GAP_NS);
        assert!(r.busy(300 * US + 2 * GAP_NS), "a gap of GAP_NS: the next request");
    }

    #[test]
    fn starts_device_bound_and_graph_like_requests_stay_so() {
        let mut r = Requests::new();
        assert_eq!(r.verdict(), Verdict::DeviceBound);
        let mut t = 0;
        // One 2 ms busy period per request, 4 ms apart (the ResNet-50 graph probe).
        let changes = requests(&mut r, &mut t, 50, 1, 2 * MS, 0, 4 * MS);
        assert!(changes.is_empty() && r.verdict() == Verdict::DeviceBound, "{changes:?}");
        assert!(r.fraction() > 0.99, "{}", r.fraction());
    }

    #[test]
    fn eager_like_requests_turn_host_bound_after_about_six() {
        let mut r = Requests::new();
        let mut t = 0;
        // 170 kernels of 11 µs, 24 µs of host between them (~0.31 busy), 12 ms apart.
        let changes = requests(&mut r, &mut t, 30, 170, 11 * US, 24 * US, 12 * MS);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let c = changes[0];
        assert_eq!(c.verdict, Verdict::HostBound);
        assert!((5..=7).contains(&c.requests), "{c:?}");
        // Still falling slowly towards ~0.31 thirty requests on.
        assert!(c.fraction < HOST_BELOW && r.fraction() > 0.31 && r.fraction() < 0.45, "{c:?} {}", r.fraction());
    }

    #[test]
    fn a_switch_to_device_bound_requests_is_seen_within_two() {
        let mut r = Requests::new();
        let mut t = 0;
        let _ = requests(&mut r, &mut t, 40, 20, 20 * US, 80 * US, 5 * MS);
        assert_eq!(r.verdict(), Verdict::HostBound);
        let changes = requests(&mut r, &mut t, 5, 1, 3 * MS, 0, 5 * MS);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!((changes[0].verdict, changes[0].requests), (Verdict::DeviceBound, 42), "{changes:?}");
    }

    #[test]
    fn fractions_between_the_thresholds_keep_the_verdict() {
        for start_host in [false, true] {
            let mut r = Requests::new();
            let mut t = 0;
            if start_host {
                let _ = requests(&mut r, &mut t, 40, 10, 10 * US, 90 * US, 5 * MS);
                assert_eq!(r.verdict(), Verdict::HostBound);
            }
            let before = r.verdict();
            // ~0.85 busy, alternating with ~0.82 and ~0.88 (host 9, 11, 7 µs after each 50 µs).
            for i in 0..60 {
                let host = [9, 11, 7][i % 3] * US;
                let changes = requests(&mut r, &mut t, 1, 10, 50 * US, host, 5 * MS);
                assert!(changes.is_empty(), "from {before:?}: {changes:?} at {i}, fraction {}", r.fraction());
            }
        }
    }

    #[test]
    fn gaps_end_requests_and_short_ones_do_not() {
        let mut r = Requests::new();
        // Busy 1 ms, idle 0.9 ms (< GAP_NS), busy 1 ms: one request of 2.9 ms, 2 ms busy.
        r.busy(0);
        r.idle(MS);
        r.busy(1_900 * US);
        r.idle(2_900 * US);
        r.tick(2_900 * US + GAP_NS - 1);
        assert_eq!(r.requests, 0, "still open just before the gap");
        r.tick(2_900 * US + GAP_NS);
        assert_eq!(r.requests, 1);
        assert!((r.fraction() - (1.0 - FALL * (1.0 - 2.0 / 2.9))).abs() < 1e-9, "{}", r.fraction());
        // The next busy period after a gap the watcher did not see ends the request too.
        r.busy(10 * MS);
        r.idle(11 * MS);
        r.busy(20 * MS);
        assert_eq!(r.requests, 2);
        // A repeated busy mark inside a period, and an idle without a busy, change nothing.
        r.busy(20 * MS + 5);
        r.idle(21 * MS);
        r.idle(22 * MS);
        r.tick(30 * MS);
        assert_eq!(r.requests, 3);
        assert!(r.open.is_none() && r.busy_since.is_none());
    }

    #[test]
    fn a_device_that_stays_busy_is_measured_in_windows() {
        let mut r = Requests::new();
        let mut t = 0;
        let _ = requests(&mut r, &mut t, 40, 20, 20 * US, 80 * US, 5 * MS);
        assert_eq!(r.verdict(), Verdict::HostBound);
        // One busy period that never ends: the watcher's ticks cut it every MAX_REQUEST_NS.
        r.busy(t);
        let start = t;
        let mut seen = None;
        while t < start + 10 * MAX_REQUEST_NS {
            t += 20 * US;
            r.tick(t);
            if let Some(c) = r.take_change() {
                seen = Some((c, t - start));
                break;
            }
        }
        let (c, after) = seen.expect("the verdict should turn device-bound");
        assert_eq!(c.verdict, Verdict::DeviceBound);
        assert!(after <= 2 * MAX_REQUEST_NS + 20 * US, "after {after} ns");
        // The period goes on in a new request.
        assert!(r.busy_since.is_some() && r.open.is_some());
    }

    #[test]
    fn a_long_request_with_short_gaps_is_cut_at_max_request_ns() {
        let mut r = Requests::new();
        let mut t = 0;
        // Back to back host-bound work, never idle for GAP_NS: still measured, every ~20 ms.
        for _ in 0..2000 {
            r.busy(t);
            t += 20 * US;
            r.idle(t);
            t += 80 * US;
            r.tick(t);
        }
        assert!(r.requests >= 9 && r.requests <= 11, "{}", r.requests);
        assert_eq!(r.verdict(), Verdict::HostBound, "{}", r.fraction());
    }

    #[test]
    fn the_watcher_s_end_is_the_midpoint_of_its_last_two_looks() {
        let mut r = Requests::new();
        // Busy from 100 µs; last seen outstanding at 150 µs, done at 170 µs: ended ~160 µs.
        r.busy(100 * US);
        r.idle_seen(150 * US, 170 * US);
        assert_eq!(r.open.unwrap().busy_ns, 60 * US);
        // Never seen outstanding since the start (a look from an earlier period): the midpoint
        // of the start and the look that found it done.
        r.busy(300 * US);
        r.idle_seen(150 * US, 340 * US);
        assert_eq!(r.open.unwrap().busy_ns, 80 * US);
        // A look from before the start (the launch came between the watcher's clock read and
        // its look): a period of no length, never a negative one.
        r.busy(500 * US);
        r.idle_seen(150 * US, 490 * US);
        assert_eq!((r.open.unwrap().busy_ns, r.open.unwrap().last_end), (80 * US, 500 * US));
        // Not busy: nothing.
        r.idle_seen(0, 600 * US);
        assert_eq!(r.open.unwrap().last_end, 500 * US);
    }

    #[test]
    fn an_instant_request_counts_as_busy() {
        let mut r = Requests::new();
        let mut t = 0;
        let _ = requests(&mut r, &mut t, 40, 20, 20 * US, 80 * US, 5 * MS);
        let before = r.fraction();
        r.busy(t);
        r.idle(t);
        r.tick(t + GAP_NS);
        assert!(r.fraction() > before, "{before} -> {}", r.fraction());
    }
}
